/**
 * Which processes hold files open under a directory, from /proc/<pid>/fd: a test's proof that
 * nothing (a killed daemon's xz, an ingest process) still writes into a cache's staging.
 */
import { readdir, readlink } from 'node:fs/promises';

/** Processes other than this one holding a file under `dir` open, as "pid -> path". */
export async function holdersUnder(dir: string): Promise<string[]> {
  const held: string[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    for (const fd of await readdir(`/proc/${pid}/fd`).catch(() => [] as string[])) {
      const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
      if (target.startsWith(dir + '/')) held.push(`${pid} -> ${target}`);
    }
  }
  return held;
}
