/**
 * What the cache remembers of the archives it has read: under an archive source's identity
 * (source/locate.ts identifyArchive: a file's inode, size and times; the kernel's and module's
 * build ids), the sha256 and facts of the bytes it held. A start whose source has not changed
 * since knows its digest without reading and hashing the archive again; the entry it names is
 * still loaded and checked as ever, and anything missing sends the ingest back to reading.
 *
 * One small JSON file in the cache directory, replaced whole (write, then rename). A file that
 * does not parse, or a record that breaks a rule, is ignored: the archive is then read, as if
 * nothing had been recorded, and the file is written anew.
 */
import { chmod, rename, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { ArchiveOrigin, ArchiveSource } from '../source/locate.js';
import { readRegularFileSync } from './small-file.js';

export const SOURCE_MEMO_FILE = 'sources.json';
const FORMAT = 1;
/** Sources remembered (the newest): a device has one kernel at a time, a test host a few. */
const KEEP = 16;
/** Far above what KEEP records take (~0.5 KiB each): a bigger file is not one this code wrote. */
const MAX_MEMO_BYTES = 1 << 20;

/**
 * What an archive's source is known to hold: an ArchiveSource without its bytes and its module
 * file (a recalled digest is only ever used to find an entry already built, never to build one),
 * with the digest and size of its bytes.
 */
export type RememberedArchive = Omit<ArchiveSource, 'bytes' | 'module'> & {
  digest: string;
  /** Its uncompressed size as its xz index states it (null when it states none). */
  total: number | null;
};

const ORIGINS: ReadonlySet<string> = new Set<ArchiveOrigin>(['exposed', 'module-file', 'module-loaded', 'file']);

/**
 * Each remembered fact and what a recorded value of it must be. Every key of RememberedArchive,
 * optional ones included, must have its row (tsc refuses the table otherwise): a field added to
 * ArchiveSource is recorded, checked and recalled, or left out of RememberedArchive by name.
 */
const FACTS: { readonly [K in keyof RememberedArchive]-?: (v: unknown) => boolean } = {
  digest: (v) => typeof v === 'string' && /^[0-9a-f]{64}$/.test(v),
  total: (v) => v === null || (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0),
  source: (v) => typeof v === 'string',
  obtained: (v) => typeof v === 'string' && ORIGINS.has(v),
  live: (v) => typeof v === 'boolean',
  release: (v) => v === undefined || typeof v === 'string',
  buildId: (v) => v === null || typeof v === 'string',
};

/**
 * The facts to remember of `from` (an archive just read, or a record read back), and nothing
 * else: not its bytes, not a record's own fields, not what a damaged file may add.
 */
export function rememberedArchive(from: RememberedArchive): RememberedArchive {
  const facts: Partial<Record<keyof RememberedArchive, unknown>> = {};
  for (const key of Object.keys(FACTS) as Array<keyof RememberedArchive>) if (from[key] !== undefined) facts[key] = from[key];
  return facts as RememberedArchive;
}

type MemoRecord = RememberedArchive & {
  key: string;
  /** When it was recorded (ISO 8601): the newest are kept. */
  at: string;
};

function validRecord(r: unknown): r is MemoRecord {
  if (typeof r !== 'object' || r === null) return false;
  const m = r as Record<string, unknown>;
  return typeof m.key === 'string' && typeof m.at === 'string' && Object.entries(FACTS).every(([key, valid]) => valid(m[key]));
}

async function readRecords(cacheDir: string): Promise<MemoRecord[]> {
  try {
    const bytes = readRegularFileSync(path.join(cacheDir, SOURCE_MEMO_FILE), MAX_MEMO_BYTES);
    if (bytes === undefined) return [];
    const parsed = JSON.parse(bytes.toString('utf8')) as { format?: unknown; sources?: unknown };
    if (parsed.format !== FORMAT || !Array.isArray(parsed.sources)) return [];
    return parsed.sources.filter(validRecord);
  } catch {
    return [];
  }
}

/** What was recorded under `key`, if anything (never throws: a cache without the file knows nothing). */
export async function recallArchive(cacheDir: string, key: string): Promise<RememberedArchive | undefined> {
  const hit = (await readRecords(cacheDir)).find((r) => r.key === key);
  return hit && rememberedArchive(hit);
}

/**
 * Record what `key`'s source held. The rename replaces the file whole; a crash leaves the old
 * file, or a new one, or (without a sync) one that does not parse and is ignored. Not synced: a
 * record lost to a power cut costs the next start one read of the archive.
 */
export async function rememberArchive(cacheDir: string, key: string, what: RememberedArchive): Promise<void> {
  const others = (await readRecords(cacheDir)).filter((r) => r.key !== key);
  const records: MemoRecord[] = [{ key, at: new Date().toISOString(), ...rememberedArchive(what) }, ...others].slice(0, KEEP);
  const file = path.join(cacheDir, SOURCE_MEMO_FILE);
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    await writeFile(tmp, JSON.stringify({ format: FORMAT, sources: records }) + '\n', { mode: 0o644 });
    await chmod(tmp, 0o644); // writeFile's mode is masked by the umask: it must not decide who can read the cache
    await rename(tmp, file);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw err;
  }
}
