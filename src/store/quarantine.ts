/**
 * Where damaged entries go: moved aside whole (one rename, nothing deleted at that moment) into
 * `<cache>/quarantine/<time>~<id>/`, with a `reason.json` saying what was wrong, so a person can
 * look at what broke and `ls` / `doctor` can say so.
 *
 * Bounded: only the QUARANTINE_KEEP newest quarantined entries are kept; older ones are deleted
 * when a new one arrives. A damaged entry is usually rebuilt at once, so its quarantined copy is
 * only evidence; three copies (about 35 MiB each for a kernel's headers) keep the recent history
 * of a failing disk without letting a disk that keeps corrupting fill itself with copies.
 */
import { chmod, mkdir, readFile, readdir, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { errnoOf } from '../errors.js';
import { unreadableCache } from './cache-dir.js';

export const QUARANTINE_DIR = 'quarantine';
export const QUARANTINE_KEEP = 3;
export const REASON_FILE = 'reason.json';

export interface QuarantineRecord {
  /** The entry id that was moved aside. */
  id: string;
  /** What was wrong, as the check that failed said it. */
  reason: string;
  /** The file that failed, when one did (index.bin, pack.tar, include/linux/sched.h, ...). */
  file?: string;
  /** When it was moved aside (ISO 8601). */
  at: string;
  /** Directory under quarantine/. */
  name: string;
}

/**
 * Move `fromDir/name` (an entry directory) into quarantine as entry `id`, with its reason; prune
 * to QUARANTINE_KEEP. Caller holds the cache lock.
 */
export async function quarantineEntry(cacheDir: string, fromDir: string, name: string, why: { reason: string; file?: string }, id = name): Promise<QuarantineRecord> {
  const qdir = path.join(cacheDir, QUARANTINE_DIR);
  await mkdir(qdir, { recursive: true, mode: 0o755 });
  await chmod(qdir, 0o755); // the umask must not decide who can read it
  const at = new Date().toISOString();
  // Sortable by time; unique even if one entry is quarantined twice in a millisecond.
  const qname = `${at.replace(/[:.]/g, '-')}~${process.pid}~${id}`;
  const dest = path.join(qdir, qname);
  await rename(path.join(fromDir, name), dest);
  const record: QuarantineRecord = { id, reason: why.reason, ...(why.file !== undefined ? { file: why.file } : {}), at, name: qname };
  const reasonFile = path.join(dest, REASON_FILE);
  await writeFile(reasonFile, JSON.stringify(record, null, 2) + '\n', { mode: 0o644 }).then(() => chmod(reasonFile, 0o644)).catch(() => {
    // A full disk must not stop the entry from leaving entries/: the move is what matters.
  });
  await pruneQuarantine(cacheDir);
  return record;
}

/** Delete all but the QUARANTINE_KEEP newest quarantined entries. Returns the names deleted. */
export async function pruneQuarantine(cacheDir: string, keep = QUARANTINE_KEEP): Promise<string[]> {
  const qdir = path.join(cacheDir, QUARANTINE_DIR);
  const names = (await readdir(qdir).catch(() => [] as string[])).sort().reverse();
  const doomed = names.slice(keep);
  for (const n of doomed) await rm(path.join(qdir, n), { recursive: true, force: true });
  return doomed;
}

/** What is in quarantine, newest first. */
export async function listQuarantine(cacheDir: string): Promise<QuarantineRecord[]> {
  const qdir = path.join(cacheDir, QUARANTINE_DIR);
  let names: string[];
  try {
    names = await readdir(qdir);
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return [];
    throw unreadableCache(qdir, err) ?? err;
  }
  const out: QuarantineRecord[] = [];
  for (const name of names.sort().reverse()) {
    const text = await readFile(path.join(qdir, name, REASON_FILE), 'utf8').catch(() => undefined);
    let rec: Partial<QuarantineRecord> = {};
    try {
      rec = text === undefined ? {} : (JSON.parse(text) as Partial<QuarantineRecord>);
    } catch {
      // an unreadable reason still leaves the directory to report
    }
    const id = typeof rec.id === 'string' ? rec.id : (name.split('~').slice(2).join('~') || name);
    out.push({
      id,
      reason: typeof rec.reason === 'string' ? rec.reason : 'no reason recorded',
      ...(typeof rec.file === 'string' ? { file: rec.file } : {}),
      at: typeof rec.at === 'string' ? rec.at : '',
      name,
    });
  }
  return out;
}
