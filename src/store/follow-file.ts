/**
 * Read a file while another process is still writing it, in order, in large reads from the page
 * cache. The decoder (an `xz -dc` child) writes the pack itself; ingest follows it here to index
 * and hash the same bytes, so what is left to do when the decoder exits is the last short read.
 *
 * Reading is a pread at the next offset: a full buffer is handed over and the next read follows
 * at once; a short one means the reader has caught up, so it waits for the writer (a short timer,
 * or the writer's exit, whichever comes first). The file is complete only when a read that
 * started after the writer had exited comes back empty: a writer's bytes are in the page cache
 * before its exit is seen, so nothing it wrote can be missed.
 */
import type { FileHandle } from 'node:fs/promises';
import { KheadersError } from '../errors.js';

/** The process writing the file, as far as the reader needs it. */
export interface FileWriter {
  /** True once the writer can write no more. */
  readonly exited: boolean;
  /** Resolves when `exited` becomes true (at once if it is). */
  whenExited(): Promise<void>;
}

export interface FollowOptions {
  /** One read; also the only buffer, reused for every read. Default 1 MiB. */
  chunkBytes?: number;
  /** How long to wait for more after a short read (the writer's exit wakes the reader at once). Default 4 ms. */
  waitMs?: number;
  /**
   * Give up (E_INTERNAL) when the file has not grown for this long and the writer has not
   * exited: a hung writer must not hold the reader forever. Default: wait as long as it takes.
   */
  stallMs?: number;
}

/**
 * Hand every byte of `file` that `writer` writes to `take`, from offset 0, until the writer has
 * exited and the file is read to its end, or `take` returns false. `take` gets a view of the one
 * reused buffer: it must copy what it keeps. Resolves with the bytes read.
 */
export async function followFile(file: FileHandle, writer: FileWriter, take: (chunk: Buffer) => boolean, opts: FollowOptions = {}): Promise<number> {
  const buffer = Buffer.allocUnsafe(opts.chunkBytes ?? 1024 * 1024);
  const waitMs = opts.waitMs ?? 4;
  const stallMs = opts.stallMs ?? Infinity;
  let position = 0;
  let grewAt = performance.now(); // monotonic: a device asleep is not a writer stalled
  for (;;) {
    const finished = writer.exited; // before the read: then that read sees every byte written
    const { bytesRead } = await file.read(buffer, 0, buffer.length, position);
    if (bytesRead > 0) {
      grewAt = performance.now();
      position += bytesRead;
      if (!take(buffer.subarray(0, bytesRead))) return position;
      if (bytesRead === buffer.length) continue;
    } else if (finished) {
      return position;
    }
    if (!writer.exited && performance.now() - grewAt > stallMs) {
      throw new KheadersError('E_INTERNAL', `the decoder wrote nothing for ${Math.round(stallMs / 1000)} s (${position} bytes in) and did not exit: stopped as hung`, { stalledAt: position, stallMs });
    }
    if (!writer.exited) await Promise.race([writer.whenExited(), delay(waitMs)]);
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
