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
import { readFile, rename, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { ArchiveOrigin } from '../source/locate.js';

export const SOURCE_MEMO_FILE = 'sources.json';
const FORMAT = 1;
/** Sources remembered (the newest): a device has one kernel at a time, a test host a few. */
const KEEP = 16;

/** What an archive's source is known to hold: an ArchiveSource without its bytes, its digest and size. */
export interface RememberedArchive {
  digest: string;
  /** Its uncompressed size as its xz index states it (null when it states none). */
  total: number | null;
  source: string;
  obtained: ArchiveOrigin;
  live: boolean;
  release?: string;
  buildId: string | null;
}

interface MemoRecord extends RememberedArchive {
  key: string;
  /** When it was recorded (ISO 8601): the newest are kept. */
  at: string;
}

const ORIGINS: ReadonlySet<string> = new Set<ArchiveOrigin>(['exposed', 'module-file', 'module-loaded', 'file']);

function validRecord(r: unknown): r is MemoRecord {
  if (typeof r !== 'object' || r === null) return false;
  const m = r as Record<string, unknown>;
  return (
    typeof m.key === 'string' &&
    typeof m.at === 'string' &&
    typeof m.digest === 'string' &&
    /^[0-9a-f]{64}$/.test(m.digest) &&
    (m.total === null || (typeof m.total === 'number' && Number.isSafeInteger(m.total) && m.total >= 0)) &&
    typeof m.source === 'string' &&
    typeof m.obtained === 'string' &&
    ORIGINS.has(m.obtained) &&
    typeof m.live === 'boolean' &&
    (m.release === undefined || typeof m.release === 'string') &&
    (m.buildId === null || typeof m.buildId === 'string')
  );
}

async function readRecords(cacheDir: string): Promise<MemoRecord[]> {
  try {
    const parsed = JSON.parse(await readFile(path.join(cacheDir, SOURCE_MEMO_FILE), 'utf8')) as { format?: unknown; sources?: unknown };
    if (parsed.format !== FORMAT || !Array.isArray(parsed.sources)) return [];
    return parsed.sources.filter(validRecord);
  } catch {
    return [];
  }
}

/** What was recorded under `key`, if anything (never throws: a cache without the file knows nothing). */
export async function recallArchive(cacheDir: string, key: string): Promise<RememberedArchive | undefined> {
  const hit = (await readRecords(cacheDir)).find((r) => r.key === key);
  if (!hit) return undefined;
  return { digest: hit.digest, total: hit.total, source: hit.source, obtained: hit.obtained, live: hit.live, buildId: hit.buildId, ...(hit.release !== undefined ? { release: hit.release } : {}) };
}

/**
 * Record what `key`'s source held. The rename replaces the file whole; a crash leaves the old
 * file, or a new one, or (without a sync) one that does not parse and is ignored. Not synced: a
 * record lost to a power cut costs the next start one read of the archive.
 */
export async function rememberArchive(cacheDir: string, key: string, what: RememberedArchive): Promise<void> {
  const others = (await readRecords(cacheDir)).filter((r) => r.key !== key);
  const records: MemoRecord[] = [{ key, at: new Date().toISOString(), ...what }, ...others].slice(0, KEEP);
  const file = path.join(cacheDir, SOURCE_MEMO_FILE);
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    await writeFile(tmp, JSON.stringify({ format: FORMAT, sources: records }) + '\n', { mode: 0o644 });
    await rename(tmp, file);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw err;
  }
}
