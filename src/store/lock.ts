/**
 * A cross-process lock on one cache directory: a file created with O_EXCL holding the owner's
 * pid and start time. A lock whose owner is gone (killed, crashed) is stale and broken on sight;
 * the start time tells a reused pid from the real owner. Within one process, callers queue.
 */
import { open, readFile, unlink } from 'node:fs/promises';
import { KheadersError, errnoOf } from '../errors.js';

export interface LockOptions {
  /** How long to wait for another process to finish (0: fail at once). */
  timeoutMs: number;
  pollMs?: number;
}

async function processStartTime(pid: number): Promise<string> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // Field 22 (starttime) counts from after the parenthesised command name, which may hold spaces.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? '';
  } catch {
    return '';
  }
}

async function ownerAlive(content: string): Promise<boolean> {
  const [pidText, start = ''] = content.trim().split(' ');
  const pid = Number(pidText);
  if (!Number.isInteger(pid) || pid <= 0) return false; // unreadable: a torn write by a dead owner
  try {
    process.kill(pid, 0);
  } catch (err) {
    if (errnoOf(err) === 'ESRCH') return false;
  }
  const now = await processStartTime(pid);
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
  await previous;
  try {
    const release = await acquire(lockPath, options);
    try {
      return await fn();
    } finally {
      await release();
    }
  } finally {
    releaseQueue();
    if (inProcess.get(lockPath) === chained) inProcess.delete(lockPath);
  }
}

async function acquire(lockPath: string, { timeoutMs, pollMs = 50 }: LockOptions): Promise<() => Promise<void>> {
  const me = `${process.pid} ${await processStartTime(process.pid)}\n`;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const fh = await open(lockPath, 'wx', 0o644);
      try {
        await fh.writeFile(me);
      } finally {
        await fh.close();
      }
      return async () => {
        await unlink(lockPath).catch(() => {});
      };
    } catch (err) {
      if (errnoOf(err) !== 'EEXIST') throw err;
    }
    const holder = await readFile(lockPath, 'utf8').catch(() => '');
    if (!(await ownerAlive(holder))) {
      // Re-read right before breaking it, so a lock just taken by a live process survives.
      if ((await readFile(lockPath, 'utf8').catch(() => '')) === holder) await unlink(lockPath).catch(() => {});
      continue;
    }
    if (Date.now() >= deadline) {
      const pid = holder.trim().split(' ')[0];
      throw new KheadersError('E_LOCKED', `the cache is locked by process ${pid} (another kheadersd writing to it); try again when it finishes`, {
        lockPath,
        pid: Number(pid),
      });
    }
    await new Promise((r) => setTimeout(r, pollMs));
  }
}
