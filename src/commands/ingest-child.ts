/**
 * The start of `serve`'s ingest process (ingest-process-main.ts), apart from its supervision
 * (ingest-process.ts) so that the CLI entry can start it before the commands bundle loads. On a
 * first boot (the cache holds no entry: an ingest will almost surely build), cli.ts starts it as
 * soon as the configuration is resolved: node's start and the compile of the child's code (~90 ms)
 * and its reading and hashing of the archive then overlap the daemon's own start (loading and
 * compiling the commands, opening the cache, reading and looking up the archive), instead of
 * following part of it. A cached start spawns nothing and loads nothing of this:
 * node:child_process is taken only when a child is spawned.
 *
 * The protocol, two steps: `configure` at once (the child reads and hashes the archive, and
 * writes nothing), then `build` once the daemon has found no entry for the archive's digest (it
 * checks the cache and looks up under the lock first). A child the daemon does not ask is killed
 * unasked, and has written nothing.
 */
import type { ChildProcess } from 'node:child_process';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Config } from '../config.js';
import type { LogLevel } from '../log.js';

/** What the daemon sends, in this order: the configuration at once, then the build (or nothing: killed). */
export type IngestMessage =
  | { kind: 'configure'; cfg: Config; logLevel: LogLevel }
  /** `digest`: the archive's the daemon looked up; the child builds from bytes of that digest (it reads again if its own differ). */
  | { kind: 'build'; digest?: string };

/** How the child ended ('close': exited, and its stdio closed). */
export interface ChildEnd {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A started ingest process: configured, waiting for its build. */
export interface IngestChild {
  readonly child: ChildProcess;
  /** Its end, whenever it comes (events before anyone listens are not lost). */
  readonly closed: Promise<ChildEnd>;
  /** Resolves with the error when no process could be started at all (never otherwise). */
  readonly notStarted: Promise<Error>;
  /** Kill its process group (it, and the xz it started). */
  readonly kill: () => void;
  /** Claim it to run it (ingest-process.ts); false when it was claimed or discarded already. */
  readonly take: () => boolean;
  /** Not claimed by then: killed, unasked (nothing for a child that was claimed). */
  readonly discard: () => void;
}

const MAIN = fileURLToPath(new URL('./ingest-process-main.js', import.meta.url));

/** Start the ingest process with `node` and send it its configuration. */
export function spawnIngestChild(node: string, cfg: Config, logLevel: LogLevel): IngestChild {
  const { spawn } = process.getBuiltinModule('node:child_process');
  // detached: the child leads a process group of its own, so that it can kill itself and its
  // xz together when the channel closes (a terminal's ^C goes to the daemon, which stops in order).
  const child = spawn(node, [MAIN], { stdio: ['ignore', 'pipe', 'pipe', 'ipc'], detached: true });
  const notStarted = new Promise<Error>((resolve) =>
    child.on('error', (err) => {
      // Once it runs, how it ended is told by 'close' (a send to a child already dead fails too).
      if (child.pid === undefined) resolve(err);
    }),
  );
  const closed = new Promise<ChildEnd>((resolve) => child.once('close', (code, signal) => resolve({ code, signal })));
  const kill = (): void => {
    try {
      if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  };
  let state: 'waiting' | 'taken' | 'discarded' = 'waiting';
  const configure: IngestMessage = { kind: 'configure', cfg, logLevel };
  if (child.connected) child.send(configure, () => {}); // a failed send means the child died: 'close' tells
  return {
    child,
    closed,
    notStarted,
    kill,
    take: () => {
      if (state !== 'waiting') return false;
      state = 'taken';
      return true;
    },
    discard: () => {
      if (state !== 'waiting') return;
      state = 'discarded';
      kill();
    },
  };
}

/**
 * serve's first boot: the ingest process started now, when the cache holds no entry at all (its
 * entries/ is empty or not made yet), so that nothing cached can make the build unneeded but a
 * repair at the start (then it is discarded). Anything else (an entry cached, entries/ unreadable)
 * starts none here: serve starts one later if its archive turns out new (serve.ts).
 */
export function startIngestAhead(cfg: Config): IngestChild | undefined {
  try {
    if (readdirSync(path.join(cfg.cacheDir, 'entries')).length > 0) return undefined;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') return undefined;
  }
  return spawnIngestChild(process.execPath, cfg, cfg.logLevel);
}
