/**
 * `serve`'s builds run in a short-lived `node` process of their own (ingest-process-main.ts):
 * decoding an archive and generating vmlinux.h allocate tens of MiB that V8 and the C allocator
 * rarely give back, and a daemon that built its entry in-process idled all day at more than twice
 * the memory of one that found it cached (measured: 40 against 13–17 MiB anonymous). The cost is
 * one node start, paid only when there is something new to build.
 *
 * The child is the same code as `kheadersd ingest`, with the daemon's configuration sent over an
 * IPC channel; its log lines come back through the daemon's logger, its failure as the same
 * KheadersError (code, message, details: E_NO_SPACE keeps its step). It dies with the daemon,
 * however the daemon ends: the closing of the channel kills it and whatever it started.
 *
 * serve starts it as soon as it finds its archive's source unread by this cache (a new kernel's
 * first boot, almost always a build), so that node starts while the daemon still hashes the
 * archive and looks it up.
 *
 * With the xz binary, the daemon goes further (runStaged): it starts xz itself, on the bytes it
 * hashed, into a staging under the lock it then holds for the child, and the child builds from
 * that staging, told xz's end over the channel (remote-decoder.ts; ingest.ts, StagedBuild). xz
 * then decodes while the child's node is still starting, instead of after it.
 */
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import type { Config } from '../config.js';
import { KheadersError, endedBySignal, isErrorCode } from '../errors.js';
import { warmLogger, type Logger, type LogLevel } from '../log.js';
import type { StagedBuild } from '../store/ingest.js';
import { decoderIdentity, forwardDecoder, isDecoderAbort, type DecoderEvent, type DecoderIdentity } from './remote-decoder.js';
import type { CommandIO } from './store-commands.js';

/** What the daemon sends: the ingest to run. */
export interface IngestRequest {
  cfg: Config;
  logLevel: LogLevel;
  /**
   * Build from the staging the daemon made, under the cache lock the daemon holds for this
   * process (see StagedBuild): the decoder's events follow on the channel (remote-decoder.ts).
   */
  staged?: { tmp: string; digest: string; decoder?: DecoderIdentity };
}

/** What the child answers before it exits. */
export type IngestOutcome = { ok: true } | { ok: false; code: string; message: string; details: Record<string, unknown> };

const MAIN = fileURLToPath(new URL('./ingest-process-main.js', import.meta.url));
const LEVELS: Record<number, LogLevel> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' };

/** An ingest process, started ahead of the moment it is needed. */
export interface IngestProcess {
  /**
   * Run the configured ingest in it; resolves when its entry is committed (its answer, not its
   * exit: what is left of it then is its own exit), or at once when no child could be started
   * (the ingest then builds in this process).
   */
  run(): Promise<void>;
  /**
   * Run the ingest from `staged`, the daemon's staging with the daemon's xz decoding into it,
   * under the lock the daemon holds: true once its entry is committed, false at once when no
   * child could be started (nothing was asked: the caller still owns the staging and its
   * decoder). Its failure rejects as run()'s does. Either way the decoder is the caller's to
   * kill and wait for: the child may have died with it still running.
   */
  runStaged(staged: StagedBuild): Promise<boolean>;
  /** Not needed after all (the entry was cached): it is killed before it was asked anything, so it has written nothing. */
  discard(): void;
}

/**
 * Build the configured ingest's entry in a child process (see IngestProcess.run). `node` is the
 * program to run it with: this node, except in a test of a node that cannot be started.
 * `cancel` (the daemon stopping) kills the child's process group, its xz with it: a stop does
 * not wait for a build to finish.
 */
export function ingestInChildProcess(cfg: Config, io: CommandIO, node = process.execPath, cancel?: AbortSignal): Promise<void> {
  return startIngestProcess(cfg, io, node, cancel).run();
}

/**
 * Start the child now, to be given its work later: node's own start and the compile of the
 * child's code (~100 ms, on the other core) then overlap the daemon's reading, hashing and
 * cache lookup, instead of following them. Until run(), the child only waits for its request.
 */
export function startIngestProcess(cfg: Config, io: CommandIO, node = process.execPath, cancel?: AbortSignal): IngestProcess {
  // detached: the child leads a process group of its own, so that it can kill itself and its
  // xz together when the channel closes (a terminal's ^C goes to the daemon, which stops in order).
  const child = spawn(node, [MAIN], { stdio: ['ignore', 'pipe', 'pipe', 'ipc'], detached: true });
  const kill = (): void => {
    try {
      if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  };
  if (cancel?.aborted) kill();
  else cancel?.addEventListener('abort', kill, { once: true });
  child.once('close', () => cancel?.removeEventListener('abort', kill));
  let discarded = false;
  let asked = false;
  let outcome: IngestOutcome | undefined;
  let stderr = '';
  createInterface({ input: child.stdout! }).on('line', (line) => relay(io.log, line, child.pid));
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr = (stderr + s).slice(-4096)));
  /** The staged build's decoder, which the child may ask to kill. */
  let decoder: StagedBuild['decoder'] | undefined;
  const settled = new Promise<void>((resolve, reject) => {
    child.on('message', (msg: IngestOutcome | { abortDecoder: true }) => {
      if (isDecoderAbort(msg)) return decoder?.abort();
      outcome = msg;
      // Committed, and the lock released: the daemon goes on while the child exits.
      if (msg.ok) resolve();
    });
    child.on('error', (err) => {
      // Once it runs, how it ended is told by 'close' (a send to a child already dead fails too).
      if (child.pid !== undefined) return;
      // No child at all (EAGAIN, ENOMEM, node gone from under us): the daemon must still start,
      // so the ingest builds in this process as it did before there was a child (resolving
      // without an entry is the hook's "build it here"); only the idle memory pays.
      if (!discarded) io.log.warn({ err: err.message }, `cannot start the ingest process (${node} ${MAIN}): building the entry in the daemon instead`);
      resolve();
    });
    child.on('close', (code, signal) => {
      if (stderr.trim() !== '') io.log.warn({ pid: child.pid }, `the ingest process said: ${stderr.trim()}`);
      if (outcome?.ok) resolve();
      else if (outcome) reject(new KheadersError(isErrorCode(outcome.code) ? outcome.code : 'E_INTERNAL', outcome.message, outcome.details));
      else if (signal) reject(endedBySignal(`the ingest process (pid ${child.pid})`, signal, { pid: child.pid }));
      else reject(new KheadersError('E_INTERNAL', `the ingest process (pid ${child.pid}) exited with status ${code} before it finished; nothing it left is served`, { pid: child.pid, status: code }));
    });
  });
  settled.catch(() => {}); // observed by run(); a child discarded or dead before run() is not "unhandled"
  const ask = (staged?: StagedBuild): Promise<void> => {
    if (asked || discarded) throw new Error('an ingest process runs one ingest');
    asked = true;
    if (child.pid !== undefined) io.log.info({ ingestPid: child.pid, ...(staged ? { decoding: 'daemon' } : {}) }, 'building the entry in a child process');
    // The staged decoder is named so that the child kills it if this process dies (remote-decoder.ts, DecoderIdentity).
    const identity = staged && decoderIdentity(staged.decoder);
    const request: IngestRequest = {
      cfg,
      logLevel: io.log.level as LogLevel,
      ...(staged ? { staged: { tmp: staged.tmp, digest: staged.digest, ...(identity ? { decoder: identity } : {}) } } : {}),
    };
    if (child.connected) child.send(request, () => {}); // a failed send means the child died: 'close' reports it
    if (staged) {
      decoder = staged.decoder;
      // After the request, in order on the channel; a child gone meanwhile misses them harmlessly.
      forwardDecoder(staged.decoder, (event: DecoderEvent) => {
        if (child.connected) child.send(event, () => {});
      });
    }
    // The daemon now waits on the child: the moment for pino to load (and serve's held start
    // lines to be written). Not with the daemon's own xz: this thread feeds xz its input through
    // a pipe, and pino's load (~50 ms of it in one piece) starved xz; loaded when xz has exited,
    // it held up the child's answer instead. The start's lines then wait for ready (cli.ts).
    if (!staged) setImmediate(() => warmLogger(io.log));
    return settled;
  };
  return {
    run: () => ask(),
    async runStaged(staged: StagedBuild): Promise<boolean> {
      // A child that could not be started has said so already ('error' comes at once): ask nothing of it.
      if (child.pid === undefined) {
        await settled;
        return false;
      }
      // A child that was started answers with its entry committed, or fails.
      await ask(staged);
      return true;
    },
    discard(): void {
      if (asked || discarded) return;
      discarded = true;
      kill();
      io.log.debug({ ingestPid: child.pid }, 'the ingest process started ahead is not needed (the entry is cached): killed unasked');
    },
  };
}

/** One JSON log line of the child's, logged again by the daemon's logger at its level (with the child's pid); anything else as a warning. */
function relay(log: Logger, line: string, pid: number | undefined): void {
  let entry: Record<string, unknown>;
  try {
    entry = JSON.parse(line) as Record<string, unknown>;
  } catch {
    if (line.trim() !== '') log.warn(`the ingest process said: ${line}`);
    return;
  }
  // The daemon's logger stamps its own level, time and name; ingestPid tells the child's lines apart.
  const fields: Record<string, unknown> = { ...entry, ingestPid: pid };
  for (const key of ['level', 'time', 'name', 'msg']) delete fields[key];
  log[LEVELS[Number(entry.level)] ?? 'info'](fields, typeof entry.msg === 'string' ? entry.msg : '');
}
