/**
 * The two threads that touch /dev/fuse besides the main one. Why threads at all:
 *
 * - reader: read() on /dev/fuse blocks until the kernel has a request. Node cannot poll a
 *   character device, and `fs.read` would park a libuv threadpool thread per pending read — the
 *   same 4 threads the pack reads that answer FUSE READs need, which can deadlock. So one worker
 *   owns a blocking read loop and hands each message to the main thread (transferring the bytes,
 *   no copy on the main side). Requests are answered on the main thread, concurrently, while
 *   this thread is already waiting for the next one.
 *
 * - notifier: a notification (INVAL_ENTRY) can block inside the kernel until it gets a directory
 *   lock held by a request that is waiting for our answer. Written from the main thread, that
 *   would deadlock the daemon; written from the threadpool, it would pin a pool thread. It is
 *   written here, one at a time, while the main thread keeps answering.
 *
 * Replies are written by the main thread itself: answering a request never blocks in the kernel.
 */
import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';

export interface ReaderData {
  role: 'reader';
  fd: number;
  bufferSize: number;
  /**
   * Int32Array over a SharedArrayBuffer: [0] = 1 asks the loop to stop after its current read;
   * [1] = 1 once mount(2) has succeeded. Before that, read() fails with EPERM (the descriptor
   * is not attached to a connection yet) and the loop waits for it instead of giving up.
   */
  control: SharedArrayBuffer;
}
export interface NotifierData {
  role: 'notifier';
  fd: number;
}
export type WorkerData = ReaderData | NotifierData;

/** Reader → main. */
export type ReaderMessage =
  | { type: 'request'; buf: ArrayBuffer }
  /** The loop ended: ENODEV (unmounted/aborted), asked to stop, or an unexpected error. */
  | { type: 'end'; code: string; message?: string };

/** Main → notifier, and its answer. */
export interface NotifyJob {
  id: number;
  buf: Uint8Array;
}
export interface NotifyDone {
  id: number;
  /** errno code when the write failed (ENOENT: the kernel did not have that inode/name cached). */
  code?: string;
}

function codeOf(err: unknown): string {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : 'EUNKNOWN';
}

function runReader(data: ReaderData, port: NonNullable<typeof parentPort>): void {
  const stop = new Int32Array(data.control);
  const buf = Buffer.allocUnsafe(data.bufferSize);
  for (;;) {
    let n: number;
    try {
      n = fs.readSync(data.fd, buf, 0, buf.length, null);
    } catch (err) {
      const code = codeOf(err);
      if (code === 'EPERM' && Atomics.load(stop, 1) === 0 && Atomics.load(stop, 0) === 0) {
        // Not mounted yet: the `mount` child is still running. Sleep on the stop word, so a
        // stop request wakes us at once.
        Atomics.wait(stop, 0, 0, 2);
        continue;
      }
      // ENOENT: the request was interrupted before we read it; EINTR/EAGAIN: try again (libfuse
      // does the same). ENODEV: the connection is gone (unmounted or aborted): a normal end.
      if ((code === 'ENOENT' || code === 'EINTR' || code === 'EAGAIN') && Atomics.load(stop, 0) === 0) continue;
      port.postMessage({ type: 'end', code, message: err instanceof Error ? err.message : String(err) } satisfies ReaderMessage);
      return;
    }
    if (Atomics.load(stop, 0) !== 0) {
      // Woken on purpose (see FuseSession.stopSync): the message is the wake-up, not work.
      port.postMessage({ type: 'end', code: 'STOPPED' } satisfies ReaderMessage);
      return;
    }
    // One exact-size copy per message, transferred: the main thread owns it without copying.
    const out = new ArrayBuffer(n);
    new Uint8Array(out).set(buf.subarray(0, n));
    port.postMessage({ type: 'request', buf: out } satisfies ReaderMessage, [out]);
  }
}

function runNotifier(data: NotifierData, port: NonNullable<typeof parentPort>): void {
  port.on('message', (job: NotifyJob) => {
    let code: string | undefined;
    try {
      fs.writeSync(data.fd, job.buf);
    } catch (err) {
      code = codeOf(err);
    }
    port.postMessage(code === undefined ? { id: job.id } : ({ id: job.id, code } satisfies NotifyDone));
  });
}

if (parentPort) {
  const data = workerData as WorkerData;
  if (data.role === 'reader') runReader(data, parentPort);
  else runNotifier(data, parentPort);
}
