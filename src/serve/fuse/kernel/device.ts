/**
 * The /dev/fuse descriptor: requests in, replies and notifications out.
 *
 * Two ways to read requests, both keeping the event loop free:
 *
 * - 'loop' (preferred): the descriptor is handed to libuv as a stream, so the event loop's own
 *   epoll wakes us when the kernel has a request and reads it without blocking (the descriptor
 *   becomes O_NONBLOCK; /dev/fuse supports poll). One wake-up per request, no thread hop:
 *   measured ~90 µs per LOOKUP round trip against ~280 µs through a reader thread. Node has no
 *   public API that accepts a character device as a stream, so this uses the Pipe binding
 *   (`process.binding('pipe_wrap')`, documentation-only deprecated, still on Node's allow list);
 *   when it is unavailable (a future Node, the permission model) 'thread' is used.
 * - 'thread': a worker thread blocks in read() and transfers each message to the main thread
 *   (io-worker.ts explains why not `fs.read`).
 *
 * Replies are written synchronously from the main thread: answering a request never blocks in
 * the kernel. Notifications can (see io-worker.ts) and go through the notifier thread.
 *
 * Descriptor lifetime: in 'loop' mode libuv closes the descriptor when the stream closes. Every
 * writer checks `closed` first, and the close is held back until the notifier thread is gone,
 * so nothing ever writes to a descriptor number the process may have reused for another file.
 */
import fs from 'node:fs';
import net from 'node:net';
import { Worker } from 'node:worker_threads';
import type { Logger } from '../../../log.js';
import { encodeNotifyRetrieve, FUSE_ROOT_ID } from './protocol.js';
import type { NotifierData, NotifyDone, NotifyJob, ReaderData, ReaderMessage } from './io-worker.js';

const WORKER_URL = new URL('./io-worker.js', import.meta.url);
/** The unique we put on the wake-up retrieve, so its NOTIFY_REPLY is recognisable in logs. */
export const WAKE_UNIQUE = 0x6b68_6472n; // 'khdr'
const NOTIFIER_STOP_MS = 1000;

export type ReaderKind = 'loop' | 'thread';

export interface DeviceEnd {
  /** 'ENODEV' when the kernel ended the connection (unmount/abort), 'STOPPED' when we did. */
  code: string;
  message?: string;
}

/** What the session needs from a transport: also implemented by tests with plain arrays. */
export interface FuseChannel {
  /** Write one reply (several buffers are written with a single writev). Returns the errno code
   * when the kernel refused it (ENOENT: the request was interrupted and is gone). */
  reply(parts: readonly Buffer[]): string | undefined;
  /** Queue a notification; resolves with the errno code if the kernel refused it. */
  notify(buf: Buffer): Promise<string | undefined>;
}

// The slice of Node's Pipe binding used here (lib/net.js uses the same calls).
interface PipeHandle {
  open(fd: number): number;
}
interface PipeWrapBinding {
  Pipe: new (type: number) => PipeHandle;
  constants: { SOCKET: number };
}

function pipeWrap(): PipeWrapBinding | undefined {
  try {
    const binding = (process as unknown as { binding?: (name: string) => unknown }).binding?.('pipe_wrap') as Partial<PipeWrapBinding> | undefined;
    return typeof binding?.Pipe === 'function' && typeof binding.constants?.SOCKET === 'number' ? (binding as PipeWrapBinding) : undefined;
  } catch {
    return undefined;
  }
}

/** Whether the 'loop' reader can be used in this Node. */
export function loopReaderAvailable(): boolean {
  return pipeWrap() !== undefined;
}

/**
 * A net.Socket over the descriptor whose destruction runs `beforeClose` to completion first:
 * `_destroy` is the stream implementer's hook, called synchronously by destroy() — including
 * the destroy Node does itself when a read fails (ENODEV after unmount) — before the handle,
 * and with it the descriptor, is closed.
 */
class DeviceSocket extends net.Socket {
  beforeClose: (() => Promise<void>) | undefined;
  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    const before = this.beforeClose;
    this.beforeClose = undefined;
    if (!before) return super._destroy(err, cb);
    void before().finally(() => super._destroy(err, cb));
  }
}

export class DevFuse implements FuseChannel {
  readonly fd: number;
  private readonly log: Logger;
  private readonly bufferSize: number;
  private kind: ReaderKind | undefined;
  private reader: Worker | undefined;
  private socket: DeviceSocket | undefined;
  private notifier: Worker | undefined;
  private readonly control = new SharedArrayBuffer(8);
  private nextJob = 1;
  private readonly jobs = new Map<number, (code: string | undefined) => void>();
  private ended: DeviceEnd | undefined;
  private onEnd: ((end: DeviceEnd) => void) | undefined;
  private endWaiters: Array<(end: DeviceEnd) => void> = [];
  /** Set before the descriptor can be closed: from then on nothing writes to it. */
  private closed = false;
  private fdClosed = false;
  /** Registered while a reader thread runs: a thread blocked in read() would hang process exit. */
  private readonly exitHook = (): void => this.wakeAndStop();

  private constructor(fd: number, bufferSize: number, log: Logger) {
    this.fd = fd;
    this.bufferSize = bufferSize;
    this.log = log;
  }

  /**
   * Open /dev/fuse. Node opens with O_CLOEXEC, so no child the daemon spawns later inherits the
   * connection (a stray copy would keep the mount alive after we exit); the `mount` child gets
   * it explicitly, as its fd 3.
   */
  static async open(devicePath: string, bufferSize: number, log: Logger): Promise<DevFuse> {
    const fd = await new Promise<number>((resolve, reject) => fs.open(devicePath, fs.constants.O_RDWR, (err, fd) => (err ? reject(err) : resolve(fd))));
    return new DevFuse(fd, bufferSize, log);
  }

  get readerKind(): ReaderKind | undefined {
    return this.kind;
  }

  get end(): DeviceEnd | undefined {
    return this.ended;
  }

  /**
   * The notifier thread, started by the first notification (a kernel swap), not at mount: a
   * worker is a whole V8 isolate (~5 MiB of a phone's memory, and its start-up), and most
   * boots never swap kernels.
   */
  private startNotifier(): Worker {
    if (this.notifier) return this.notifier;
    const data: NotifierData = { role: 'notifier', fd: this.fd };
    // execArgv: [] — workers inherit the parent's flags by default, and some (--test ones) are
    // refused per thread.
    this.notifier = new Worker(WORKER_URL, { workerData: data, execArgv: [] });
    this.notifier.on('message', (m: NotifyDone) => {
      const done = this.jobs.get(m.id);
      this.jobs.delete(m.id);
      done?.(m.code);
    });
    this.notifier.on('error', (err) => this.log.error({ err }, 'fuse notifier thread failed'));
    this.notifier.unref();
    return this.notifier;
  }

  /**
   * Start reading. A 'thread' reader may start before mount(2) (it waits out the EPERM an
   * unattached descriptor gives); a 'loop' reader must start after it, since a failed read
   * destroys the stream.
   */
  startReader(kind: ReaderKind, onRequest: (buf: Buffer) => void, onEnd: (end: DeviceEnd) => void): void {
    this.kind = kind;
    this.onEnd = onEnd;
    if (kind === 'loop') this.startLoop(onRequest);
    else this.startThread(onRequest);
  }

  private startLoop(onRequest: (buf: Buffer) => void): void {
    const binding = pipeWrap();
    if (!binding) throw new Error('the event-loop reader needs process.binding("pipe_wrap")');
    const handle = new binding.Pipe(binding.constants.SOCKET);
    const rc = handle.open(this.fd);
    if (rc !== 0) throw new Error(`libuv refused the /dev/fuse descriptor (${rc})`);
    // One message per read(), into one reused buffer: the session copies what it keeps.
    const buffer = Buffer.allocUnsafe(this.bufferSize);
    // `handle` is how lib/net.js itself wraps an existing handle; the public typings omit it.
    const options = {
      handle,
      readable: true,
      writable: false,
      onread: {
        buffer,
        callback: (n: number, buf: Uint8Array): boolean => {
          onRequest(Buffer.from(buf.buffer, buf.byteOffset, n));
          return true;
        },
      },
    };
    const socket = new DeviceSocket(options);
    socket.beforeClose = () => this.beforeFdClose();
    let failure: DeviceEnd | undefined;
    socket.on('error', (err: NodeJS.ErrnoException) => {
      failure = { code: err.code ?? 'EIO', message: err.message };
    });
    socket.on('close', () => {
      this.fdClosed = true;
      this.finish(failure ?? { code: 'STOPPED' });
    });
    // Referenced: a mounted filesystem keeps its server alive, as fuse-native's does (a daemon
    // serving FUSE alone, --http off, has nothing else on its event loop).
    this.socket = socket;
  }

  private startThread(onRequest: (buf: Buffer) => void): void {
    const data: ReaderData = { role: 'reader', fd: this.fd, bufferSize: this.bufferSize, control: this.control };
    const reader = new Worker(WORKER_URL, { workerData: data, execArgv: [] });
    reader.on('message', (m: ReaderMessage) => {
      if (m.type === 'request') onRequest(Buffer.from(m.buf));
      else this.finish(m.code === 'STOPPED' ? { code: m.code } : { code: m.code, ...(m.message ? { message: m.message } : {}) });
    });
    reader.on('error', (err) => this.finish({ code: 'EWORKER', message: err.message }));
    reader.on('exit', () => this.finish({ code: 'EXITED' }));
    // Referenced, like the loop reader's socket; process.exit() with the mount still up is
    // handled by the exit hook, which wakes the thread so the exit can join it.
    process.on('exit', this.exitHook);
    this.reader = reader;
  }

  /** mount(2) succeeded: from now on EPERM from read() is an error, not "not yet". */
  mounted(): void {
    Atomics.store(new Int32Array(this.control), 1, 1);
  }

  private finish(end: DeviceEnd): void {
    if (this.ended) return;
    this.ended = end;
    process.off('exit', this.exitHook);
    this.onEnd?.(end);
    for (const w of this.endWaiters) w(end);
    this.endWaiters = [];
  }

  /** Resolves when the reader has ended; undefined after `ms` if it has not. */
  waitEnd(ms: number): Promise<DeviceEnd | undefined> {
    if (this.ended || (!this.reader && !this.socket)) return Promise.resolve(this.ended);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.endWaiters = this.endWaiters.filter((w) => w !== done);
        resolve(undefined);
      }, ms);
      const done = (end: DeviceEnd): void => {
        clearTimeout(timer);
        resolve(end);
      };
      this.endWaiters.push(done);
    });
  }

  reply(parts: readonly Buffer[]): string | undefined {
    if (this.closed) return 'EBADF';
    try {
      if (parts.length === 1) fs.writeSync(this.fd, parts[0]!);
      else fs.writevSync(this.fd, parts);
      return undefined;
    } catch (err) {
      return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : 'EIO';
    }
  }

  notify(buf: Buffer): Promise<string | undefined> {
    if (this.closed) return Promise.resolve('EBADF');
    const notifier = this.startNotifier();
    const id = this.nextJob++;
    return new Promise((resolve) => {
      this.jobs.set(id, resolve);
      notifier.postMessage({ id, buf } satisfies NotifyJob);
    });
  }

  /**
   * Make a reader thread return from read() and stop, synchronously (usable in an 'exit'
   * handler). Asking the kernel to "retrieve" zero cached bytes of the root puts a NOTIFY_REPLY
   * request on the queue, which wakes the reader; the write itself never waits for a lock.
   * Without a superblock (not mounted yet, or gone) it fails harmlessly — and then the reader
   * is not blocked on a live queue anyway.
   */
  wakeAndStop(): void {
    if (this.ended || this.closed || !this.reader) return;
    const control = new Int32Array(this.control);
    Atomics.store(control, 0, 1);
    Atomics.notify(control, 0); // a reader still waiting for the mount sleeps on this word
    try {
      fs.writeSync(this.fd, encodeNotifyRetrieve(WAKE_UNIQUE, FUSE_ROOT_ID, 0, 0));
    } catch {
      // see above
    }
  }

  /** Stop writing, and let the notifier thread go, before the descriptor may close. */
  private async beforeFdClose(): Promise<void> {
    this.closed = true;
    for (const [, done] of this.jobs) done('EBADF');
    this.jobs.clear();
    const notifier = this.notifier;
    this.notifier = undefined;
    // A notifier stuck in the kernel (see io-worker.ts) cannot be joined; do not wait for ever.
    if (notifier) await Promise.race([notifier.terminate(), new Promise((r) => setTimeout(r, NOTIFIER_STOP_MS).unref())]);
  }

  /**
   * Stop reading and close the descriptor. Closing the last descriptor of a connection aborts
   * it: anything still mounted from it answers ENOTCONN/ECONNABORTED afterwards.
   */
  async close(): Promise<void> {
    if (this.socket) {
      if (!this.fdClosed) {
        const closed = new Promise<void>((resolve) => this.socket!.once('close', () => resolve()));
        this.socket.destroy();
        await closed;
      }
      return;
    }
    if (this.fdClosed) return;
    if (this.reader && !this.ended) {
      this.wakeAndStop();
      if (!(await this.waitEnd(2000))) this.log.warn('fuse reader thread did not stop; closing its descriptor anyway');
    }
    process.off('exit', this.exitHook);
    await this.beforeFdClose();
    this.fdClosed = true;
    await new Promise<void>((resolve) => fs.close(this.fd, () => resolve()));
  }
}
