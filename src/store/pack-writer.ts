/**
 * Appends the decoded tar to the pack file in large batches, one write in flight: the decoder's
 * small reads (8–64 KiB from a pipe) become ~30 thread-pool round trips for a kernel's 30 MiB, and
 * the next batch is gathered while the last one is written. When the disk is slower than the
 * decoder, write() waits, and with it the decoder: memory stays at two batches.
 */
import type { FileHandle } from 'node:fs/promises';

const BATCH_BYTES = 1024 * 1024;

export class PackWriter {
  private batch: Buffer[] = [];
  private batchBytes = 0;
  private position = 0;
  private inFlight: Promise<void>;

  /** `after`: the first write waits for it, and fails with its failure (what else had to be written first). */
  constructor(
    private readonly file: FileHandle,
    after: Promise<unknown> = Promise.resolve(),
  ) {
    this.inFlight = after.then(() => undefined);
    this.inFlight.catch(() => {}); // observed by the first flush, end() or settle()
  }

  /** Queue `chunk` (which must not change afterwards); waits only when a full batch is ready and the last one is still being written. */
  async write(chunk: Buffer): Promise<void> {
    this.batch.push(chunk);
    this.batchBytes += chunk.length;
    if (this.batchBytes >= BATCH_BYTES) await this.flush();
  }

  /** Write what is queued and wait until every byte is in the file. */
  async end(): Promise<void> {
    await this.flush();
    await this.inFlight;
  }

  /** Wait for the write in flight, whatever its outcome: after this the file handle is idle and may be closed. */
  async settle(): Promise<void> {
    await this.inFlight.catch(() => {});
  }

  private async flush(): Promise<void> {
    await this.inFlight; // a failed write surfaces here, before more is queued behind it
    if (this.batchBytes === 0) return;
    const buffers = this.batch;
    const at = this.position;
    this.position += this.batchBytes;
    this.batch = [];
    this.batchBytes = 0;
    this.inFlight = writeAll(this.file, buffers, at);
    this.inFlight.catch(() => {}); // observed by the next flush, end() or settle()
  }
}

async function writeAll(file: FileHandle, buffers: Buffer[], position: number): Promise<void> {
  let pending = buffers;
  let at = position;
  while (pending.length > 0) {
    const { bytesWritten } = await file.writev(pending, at);
    if (bytesWritten === 0) throw Object.assign(new Error('the pack file took no bytes'), { code: 'EIO' });
    at += bytesWritten;
    pending = dropWritten(pending, bytesWritten);
  }
}

/** The buffers still to write after a short writev of `written` bytes. */
function dropWritten(buffers: Buffer[], written: number): Buffer[] {
  let skip = written;
  const rest: Buffer[] = [];
  for (const b of buffers) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    rest.push(skip > 0 ? b.subarray(skip) : b);
    skip = 0;
  }
  return rest;
}
