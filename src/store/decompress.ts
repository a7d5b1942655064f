/**
 * xz decoding for ingest. Two decoders, chosen by measurement (BENCHMARKS.md, "ingest"):
 * an `xz -dc` child process, which decodes on the other core at the speed of the xz tool itself,
 * and lzma-native on the libuv threadpool, about twice as slow, used where no xz binary exists.
 * Either way the event loop only moves buffers.
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';
import { access, constants, open } from 'node:fs/promises';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { KheadersError } from '../errors.js';

export type DecoderName = 'xz' | 'lzma-native';
export type DecoderChoice = DecoderName | 'auto';

export interface Decoder {
  readonly name: DecoderName;
  /** The decoded tar stream, in order. */
  readonly chunks: AsyncIterable<Buffer>;
  /**
   * True when the decoder itself writes the pack file (the xz child writes it directly, so the
   * bytes never cross a pipe); false when the caller must write `chunks` to the pack.
   */
  readonly writesPack: boolean;
  /** Resolves when the decoder has verified the whole stream; rejects with E_ARCHIVE_CORRUPT. */
  readonly done: Promise<void>;
  abort(): void;
}

/** Find an xz decoder binary on PATH: `xz`, or `xzcat` (toybox and busybox on Android have it). */
export async function findXzBinary(envPath = process.env.PATH ?? ''): Promise<{ file: string; args: string[] } | undefined> {
  for (const [name, args] of [
    ['xz', ['-dc']],
    ['xzcat', []],
  ] as const) {
    for (const dir of envPath.split(path.delimiter)) {
      if (!dir) continue;
      const file = path.join(dir, name);
      try {
        await access(file, constants.X_OK);
        return { file, args: [...args] };
      } catch {
        // not here
      }
    }
  }
  return undefined;
}

/** Decode `input` into the file `packPath` (already created by the caller). */
export async function startDecoder(input: Buffer, packPath: string, choice: DecoderChoice = 'auto'): Promise<Decoder> {
  if (choice !== 'lzma-native') {
    const xz = await findXzBinary();
    if (xz) return startXzChild(input, packPath, xz.file, xz.args);
    if (choice === 'xz') throw new KheadersError('E_USAGE', 'no xz or xzcat binary on PATH (--decoder xz); install xz-utils or use --decoder auto');
  }
  return startLzmaNative(input);
}

function corrupt(detail: string): KheadersError {
  return new KheadersError('E_ARCHIVE_CORRUPT', `corrupt archive: the xz stream does not decode (${detail})`, { decoderMessage: detail });
}

/**
 * xz writes into the pack file itself (its stdout is the file) while we follow the growing file
 * in large reads. Through a pipe, xz's 8 KiB writes cost ~3,000 event-loop wake-ups per archive;
 * this way the index is built on our core while xz decodes on the other, in ~30 reads.
 */
async function startXzChild(input: Buffer, packPath: string, file: string, args: string[]): Promise<Decoder> {
  const out = await open(packPath, 'r+');
  const child = spawn(file, args, { stdio: ['pipe', out.fd, 'pipe'] }) as ChildProcessByStdio<Writable, null, Readable>;
  let stderr = '';
  let exited = false;
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => {
    if (stderr.length < 4096) stderr += s;
  });
  // xz exits early on bad input; the EPIPE that follows on its stdin is expected, not an error.
  child.stdin.on('error', () => {});
  child.stdin.end(input);
  const done = new Promise<void>((resolve, reject) => {
    child.on('error', (err) => reject(new KheadersError('E_INTERNAL', `could not run ${file}: ${err.message}`, {}, { cause: err })));
    child.on('close', (code, signal) => {
      exited = true;
      const message = stderr.replace(/^.*?\((?:stdin|stdout)\):\s*/s, '').trim();
      if (code === 0) resolve();
      else if (/no space left|disk quota/i.test(message)) reject(Object.assign(new Error(message), { code: 'ENOSPC' }));
      else if (signal) reject(new KheadersError('E_INTERNAL', `${file} was killed by ${signal}`));
      else reject(corrupt(message || `${path.basename(file)} exited with status ${code}`));
    });
  });
  done.catch(() => {}).finally(() => void out.close().catch(() => {}));
  return { name: 'xz', chunks: followFile(packPath, () => exited), writesPack: true, done, abort: () => child.kill('SIGKILL') };
}

/** Yield a file's bytes as another process appends them, until `finished()` and EOF. */
async function* followFile(file: string, finished: () => boolean): AsyncGenerator<Buffer> {
  const fh = await open(file, 'r');
  try {
    let position = 0;
    for (;;) {
      const wasFinished = finished(); // read it before the read, so no byte written after is missed
      const buf = Buffer.allocUnsafe(FOLLOW_CHUNK);
      const { bytesRead } = await fh.read(buf, 0, buf.length, position);
      if (bytesRead > 0) {
        position += bytesRead;
        yield buf.subarray(0, bytesRead);
        // A short read means we caught up with xz: let it get ahead before the next read, so
        // reads stay large (each costs a threadpool round trip and a wake-up of this thread).
        if (bytesRead < FOLLOW_CHUNK / 4 && !wasFinished) await new Promise((r) => setTimeout(r, FOLLOW_POLL_MS));
      } else if (wasFinished) {
        return;
      } else {
        await new Promise((r) => setTimeout(r, FOLLOW_POLL_MS));
      }
    }
  } finally {
    await fh.close();
  }
}

const FOLLOW_CHUNK = 1024 * 1024;
const FOLLOW_POLL_MS = 2;

async function startLzmaNative(input: Buffer): Promise<Decoder> {
  const lzma = await import('lzma-native');
  const decompressor = lzma.createDecompressor();
  const output = new PassThrough({ highWaterMark: 1024 * 1024 });
  const done = new Promise<void>((resolve, reject) => {
    decompressor.on('error', (err: Error) => {
      reject(corrupt(err.message));
      output.destroy(corrupt(err.message)); // so the reader of `chunks` sees the typed error, not ERR_STREAM_PREMATURE_CLOSE
    });
    output.on('finish', resolve);
    // abort() destroys the output: settle `done` so whoever waits for the decoder is released.
    output.on('close', () => reject(new KheadersError('E_INTERNAL', 'the lzma-native decoder was stopped')));
  });
  done.catch(() => {}); // observed by the caller later; a rejection before then is not "unhandled"
  decompressor.pipe(output);
  decompressor.end(input);
  return { name: 'lzma-native', chunks: output, writesPack: false, done, abort: () => {
      decompressor.unpipe(output);
      decompressor.destroy();
      output.destroy();
    },
  };
}
