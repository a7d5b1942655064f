/**
 * A cross-process lock on one cache directory: a file holding the owner's pid and start time.
 * A lock whose owner is gone (killed, crashed) is stale and broken on sight; the start time tells
 * a reused pid from the real owner. Within one process, callers queue.
 *
 * Two races are closed by construction rather than by timing:
 * - The file appears with its content already in it (written to a private name, then link(2)ed
 *   into place, which fails with EEXIST like O_EXCL). An O_EXCL file is empty for a moment, and a
 *   waiter reading it then would take the live lock for a torn one and break it.
 * - Breaking is serialised through a second lock (`<lock>.break`), and the breaker re-reads the
 *   lock under it: two waiters that both saw the same dead owner cannot both unlink, the second
 *   removing the fresh lock the first one just took. The break section is a read and an unlink,
 *   so a `.break` older than BREAK_STALE_MS belongs to a process that died inside it.
 *
 * A stop (LockOptions.signal) ends a wait at once, in the queue or on another process's lock, and
 * rejects with the stop's reason: a daemon told to stop does not wait out the lock timeout. It
 * takes nothing with it: the queue moves on, and the lock file is only ever ours while fn runs.
 */
import { randomBytes } from 'node:crypto';
import { closeSync, linkSync, openSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { KheadersError, errnoOf } from '../errors.js';
import { readRegularFileSync } from './small-file.js';

const BREAK_STALE_MS = 5_000;

export interface LockOptions {
  /** How long to wait for another process to finish (0: fail at once). */
  timeoutMs: number;
  pollMs?: number;
  /** A stop: waiting for the lock ends at once, rejecting with the signal's reason. */
  signal?: AbortSignal;
}

// The lock's files are read and written with synchronous calls: they are small files of the cache
// directory (never of the mount), and as promises an uncontended lock and its release took ~16
// thread-pool round trips, each costing more than its call (see small-file.ts).

/** Far above a lock's content (a pid and a start time) and a /proc/<pid>/stat (which says it has 0 bytes). */
const LOCK_MAX_BYTES = 4096;

/** A lock file's content; undefined when it is gone (or is not a regular file). */
function readLock(file: string): string | undefined {
  try {
    return readRegularFileSync(file, LOCK_MAX_BYTES)?.toString('utf8');
  } catch {
    return undefined;
  }
}

function unlinkQuietly(file: string): void {
  try {
    unlinkSync(file);
  } catch {
    // gone already
  }
}

/**
 * When process `pid` started (field 22 of /proc/<pid>/stat, in clock ticks since boot): with the
 * pid, it names one process for good, where a pid alone may be reused. Undefined when /proc
 * cannot say (the process is gone, or no /proc). Read synchronously: procfs answers from the
 * kernel's own tables, never through a mount.
 */
export function processStartTime(pid: number): string | undefined {
  try {
    const procStat = readRegularFileSync(`/proc/${pid}/stat`, LOCK_MAX_BYTES)?.toString('utf8');
    // Field 22 (starttime) counts from after the parenthesised command name, which may hold spaces.
    return procStat === undefined ? undefined : procStat.slice(procStat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

async function ownerAlive(content: string): Promise<boolean> {
  const [pidText, start = ''] = content.trim().split(' ');
  const pid = Number(pidText);
  if (!Number.isInteger(pid) || pid <= 0) return false; // not a lock this code wrote (it is never seen half-written)
  try {
    process.kill(pid, 0);
  } catch (err) {
    if (errnoOf(err) === 'ESRCH') return false;
  }
  const now = processStartTime(pid) ?? '';
  return start === '' || now === '' || now === start;
}

const inProcess = new Map<string, Promise<void>>();

export async function withLock<T>(lockPath: string, options: LockOptions, fn: () => Promise<T>): Promise<T> {
  // Queue behind any holder in this process first: the file lock is not re-entrant.
  const previous = inProcess.get(lockPath) ?? Promise.resolve();
  let releaseQueue!: () => void;
  const mine = new Promise<void>((r) => (releaseQueue = r));
  const chained = previous.then(() => mine);
  inProcess.set(lockPath, chained);
  try {
    await untilAborted(previous, options.signal);
    const release = await acquire(lockPath, options);
    try {
      options.signal?.throwIfAborted(); // stopped as it took the lock: fn never starts
      return await fn();
    } finally {
      await release();
    }
  } finally {
    releaseQueue();
    // Only once the holder before us is done (a stop can leave the queue before it is): a caller
    // arriving meanwhile must still queue behind it.
    void chained.then(() => {
      if (inProcess.get(lockPath) === chained) inProcess.delete(lockPath);
    });
  }
}

/** `p`, or the signal's reason as soon as it aborts. */
function untilAborted<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return p;
  if (signal.aborted) return Promise.reject(signal.reason as Error);
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason as Error);
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

/** Wait `ms`, or reject with the signal's reason as soon as it aborts. */
function pause(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return untilAborted(new Promise<void>((resolve) => setTimeout(resolve, ms)), signal);
}

/** Create `file` holding `content`, atomically: false if it exists already. */
function createWithContent(file: string, content: string): boolean {
  const scratch = `${file}.${process.pid}.${randomBytes(6).toString('hex')}`;
  const fd = openSync(scratch, 'wx', 0o644);
  try {
    writeFileSync(fd, content);
  } catch (err) {
    unlinkQuietly(scratch); // a full disk must not leave it behind
    throw err;
  } finally {
    closeSync(fd);
  }
  try {
    linkSync(scratch, file);
    return true;
  } catch (err) {
    if (errnoOf(err) === 'EEXIST') return false;
    throw err;
  } finally {
    unlinkQuietly(scratch);
  }
}

/** Remove the lock if it still holds `holder` (whose owner is dead), one breaker at a time. */
async function breakStale(lockPath: string, holder: string, me: string): Promise<void> {
  const breaker = `${lockPath}.break`;
  if (!createWithContent(breaker, me)) {
    let st;
    try {
      st = statSync(breaker);
    } catch {
      st = undefined;
    }
    if (st && Date.now() - st.mtimeMs > BREAK_STALE_MS) unlinkQuietly(breaker);
    return;
  }
  try {
    if (readLock(lockPath) === holder) unlinkQuietly(lockPath);
  } finally {
    unlinkQuietly(breaker);
  }
}

async function acquire(lockPath: string, { timeoutMs, pollMs = 50, signal }: LockOptions): Promise<() => Promise<void>> {
  const me = `${process.pid} ${processStartTime(process.pid) ?? ''}\n`;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    signal?.throwIfAborted(); // before a try, never after one succeeded: a lock taken is released by the caller
    if (createWithContent(lockPath, me)) {
      return () => {
        // Only our own lock: never one that another process holds now.
        if (readLock(lockPath) === me) unlinkQuietly(lockPath);
        return Promise.resolve();
      };
    }
    const holder = readLock(lockPath);
    if (holder === undefined) continue; // released between our attempt and the read: try again
    if (!(await ownerAlive(holder))) {
      await breakStale(lockPath, holder, me);
      continue;
    }
    if (Date.now() >= deadline) {
      const pid = holder.trim().split(' ')[0];
      throw new KheadersError('E_LOCKED', `the cache is locked by process ${pid} (another kheadersd writing to it); try again when it finishes`, {
        lockPath,
        pid: Number(pid),
      });
    }
    await pause(pollMs, signal);
  }
}
