/**
 * An xz decoder run by one process (serve's daemon) for a build in another (its ingest process),
 * over the IPC channel between them: the daemon starts xz into the staged pack as soon as it
 * knows it must build, and the ingest process follows that pack (follow-file.ts) as if it had
 * started xz itself. What crosses the channel is the decoder's life: its exit (the file is
 * complete once read after it), its verdict (success, or the same typed failure it gives in
 * process: E_ARCHIVE_CORRUPT, E_LIMIT, E_KILLED, an errno error such as ENOSPC that the reader
 * names as the pack's), and, the other way, a request to kill it.
 *
 * The daemon side forwards; the ingest-process side is a FileDecoder that the build uses
 * unchanged. Both sides only ever see these messages, never each other's objects.
 */
import { KheadersError, isErrorCode } from '../errors.js';
import type { FileDecoder } from '../store/decompress.js';
import { processStartTime } from '../store/lock.js';

/** The daemon's decoder, told to the ingest process. */
export type DecoderEvent = { decoder: 'exited' } | { decoder: 'done'; failure?: WireError };

/** The ingest process asking the daemon to kill the decoder (its build failed or stopped). */
export interface DecoderAbort {
  abortDecoder: true;
}

/** A decoder's failure as it crosses the channel: a KheadersError (code) or an errno error (errno). */
export type WireError = { code: string; message: string; details: Record<string, unknown> } | { errno: string; message: string };

/**
 * The daemon's xz, named to the ingest process so that it can kill it if the daemon dies: a pid
 * and that process's start time (a pid alone may be another process's by then).
 *
 * Why the ingest process kills it: xz is the daemon's child, not in the ingest process's group,
 * and an xz that has its whole input (a pipe buffers ~64 KiB, and node keeps it full) decodes
 * on after the daemon's death; an xz bomb's few KiB are hundreds of MiB, written into a staging
 * nobody owns any more (measured: 52 MB to 1.45 GB over 5 s). The ingest process dies with its
 * channel, however the daemon died (ingest-process-main.ts): it takes the daemon's xz with it, as
 * it takes its own xz when it runs one.
 */
export interface DecoderIdentity {
  pid: number;
  start: string;
}

/**
 * Daemon side: `decoder`'s identity, read now. Undefined once it has exited (node has reaped it:
 * its pid may be anyone's), or when it is no process (or /proc cannot say). Not yet exited, it is
 * not yet reaped (node reaps and reports the exit in one step), so the pid is still xz's.
 */
export function decoderIdentity(decoder: FileDecoder): DecoderIdentity | undefined {
  if (decoder.exited || decoder.pid === undefined) return undefined;
  const start = processStartTime(decoder.pid);
  return start === undefined ? undefined : { pid: decoder.pid, start };
}

/** Ingest-process side: kill the daemon's decoder named by `identity`, if that process is still the one named. */
export function killDecoder(identity: DecoderIdentity): void {
  if (processStartTime(identity.pid) !== identity.start) return;
  try {
    process.kill(identity.pid, 'SIGKILL');
  } catch {
    // gone meanwhile
  }
}

export function isDecoderEvent(msg: unknown): msg is DecoderEvent {
  return typeof msg === 'object' && msg !== null && 'decoder' in msg;
}

export function isDecoderAbort(msg: unknown): msg is DecoderAbort {
  return typeof msg === 'object' && msg !== null && (msg as Partial<DecoderAbort>).abortDecoder === true;
}

function toWire(err: unknown): WireError {
  if (err instanceof KheadersError) return { code: err.code, message: err.message, details: err.details };
  const errno = (err as { code?: unknown }).code;
  const message = err instanceof Error ? err.message : String(err);
  if (typeof errno === 'string') return { errno, message };
  return { code: 'E_INTERNAL', message: `the decoder failed: ${message}`, details: {} };
}

function fromWire(w: WireError): Error {
  if ('errno' in w) return Object.assign(new Error(w.message), { code: w.errno });
  return new KheadersError(isErrorCode(w.code) ? w.code : 'E_INTERNAL', w.message, w.details);
}

/**
 * Daemon side: tell `send` the decoder's exit and verdict as they come. `send` must not throw
 * (a channel already closed: the ingest process is gone, and its end is reported by its exit).
 */
export function forwardDecoder(decoder: FileDecoder, send: (event: DecoderEvent) => void): void {
  void decoder.whenExited().then(() => send({ decoder: 'exited' }));
  decoder.done.then(
    () => send({ decoder: 'done' }),
    (err: unknown) => send({ decoder: 'done', failure: toWire(err) }),
  );
}

/**
 * Ingest-process side: the daemon's decoder as a FileDecoder, fed with the daemon's events
 * (deliver each one here); `requestAbort` asks the daemon to kill it. Made before the request
 * arrives, so that no event is missed: the channel may deliver a decoder that failed at once
 * (a corrupt archive) right behind the request itself.
 */
export class RemoteDecoder implements FileDecoder {
  readonly name = 'xz' as const;
  readonly done: Promise<void>;
  private exitedFlag = false;
  private readonly exit: Promise<void>;
  private markExited!: () => void;
  private settle!: (failure?: WireError) => void;

  constructor(private readonly requestAbort: () => void) {
    this.exit = new Promise<void>((resolve) => (this.markExited = resolve));
    this.done = new Promise<void>((resolve, reject) => {
      this.settle = (failure) => (failure ? reject(fromWire(failure)) : resolve());
    });
    this.done.catch(() => {}); // observed by the build later; a rejection before then is not "unhandled"
  }

  get exited(): boolean {
    return this.exitedFlag;
  }

  whenExited(): Promise<void> {
    return this.exit;
  }

  abort(): void {
    if (!this.exitedFlag) this.requestAbort();
  }

  /** One event of the daemon's. Its verdict implies its exit (a decoder that failed to start never exited). */
  deliver(event: DecoderEvent): void {
    if (event.decoder === 'done') this.settle(event.failure);
    this.exitedFlag = true;
    this.markExited();
  }
}
