/**
 * The cache directory: entries by release and archive digest, the `current` pointer, the lock,
 * and a tmp/ area for half-built entries.
 *
 *   <cache>/entries/<release>~<sha256>/{manifest.json,index.json,pack.tar,archive.tar.xz}
 *   <cache>/current        the id of the running kernel's entry (replaced atomically)
 *   <cache>/tmp/           builds in progress; swept under the lock
 *   <cache>/lock
 *
 * Entries are immutable: they appear by one rename and disappear by one rename, so a reader
 * sees a whole entry or none. The directory must be ours and not writable by anyone else: a
 * cache another user can write is how the /tmp/kheaders-* tools were exploited (CVE-2024-2313).
 */
import { mkdir, open, readdir, readFile, rename, rm, stat, chmod } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { KheadersError, errnoOf } from '../errors.js';
import { INDEX_FILE, MANIFEST_FILE, type CacheEntry, type Manifest } from './entry.js';
import { withLock } from './lock.js';
import { TreeIndex, type IndexFile } from './tree-index.js';

export const DEFAULT_CACHE_DIR = '/var/cache/kheadersd';
export const ANDROID_CACHE_DIR = '/data/local/kheadersd';

export function isAndroid(): boolean {
  return process.platform === 'android' || process.env.ANDROID_ROOT !== undefined;
}

/** --cache-dir, then KHEADERSD_CACHE_DIR, then the platform default. */
export function defaultCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.KHEADERSD_CACHE_DIR || (isAndroid() ? ANDROID_CACHE_DIR : DEFAULT_CACHE_DIR);
}

const RELEASE_RE = /^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$/;
const DIGEST_RE = /^[0-9a-f]{64}$/;

export function validRelease(release: string): boolean {
  return RELEASE_RE.test(release) && !release.includes('~');
}

export function entryId(release: string, digest: string): string {
  return `${release}~${digest}`;
}

export interface OpenOptions {
  /** Create the directory if missing and insist that we own it (every writing command). */
  write: boolean;
  lockTimeoutMs?: number;
}

export interface GcOptions {
  keep: number;
  maxBytes?: number;
  /** Entries never to evict besides the current one (e.g. the one an ingest just made). */
  protect?: readonly string[];
}

export class CacheStore {
  readonly entriesDir: string;
  readonly tmpDir: string;
  private readonly loaded = new Map<string, CacheEntry>();

  private constructor(
    readonly dir: string,
    private readonly lockTimeoutMs: number,
  ) {
    this.entriesDir = path.join(dir, 'entries');
    this.tmpDir = path.join(dir, 'tmp');
  }

  static async open(dir: string, options: OpenOptions = { write: false }): Promise<CacheStore> {
    const abs = path.resolve(dir);
    if (options.write) {
      await createPrivateDir(abs);
      await checkOwnership(abs, true);
      for (const sub of ['entries', 'tmp']) {
        await createPrivateDir(path.join(abs, sub));
        await checkOwnership(path.join(abs, sub), true);
      }
    } else {
      await checkOwnership(abs, false);
      // A reader trusts what is under entries/ too: it must be as closed as the cache dir.
      await checkOwnership(path.join(abs, 'entries'), false).catch((err: unknown) => {
        if (!(err instanceof KheadersError && err.code === 'E_NOT_FOUND')) throw err;
      });
    }
    return new CacheStore(abs, options.lockTimeoutMs ?? 30_000);
  }

  /** Run fn holding the cache's cross-process lock; E_LOCKED after the timeout. */
  locked<T>(fn: () => Promise<T>, timeoutMs = this.lockTimeoutMs): Promise<T> {
    return withLock(path.join(this.dir, 'lock'), { timeoutMs }, fn);
  }

  /** Remove half-built entries left by a crash. Call only while holding the lock. */
  async sweepTmp(): Promise<string[]> {
    const names = await readdir(this.tmpDir).catch(() => [] as string[]);
    await Promise.all(names.map((n) => rm(path.join(this.tmpDir, n), { recursive: true, force: true })));
    return names;
  }

  async list(): Promise<Manifest[]> {
    let names: string[];
    try {
      names = await readdir(this.entriesDir);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return [];
      throw err;
    }
    const manifests: Manifest[] = [];
    for (const name of names) {
      const m = await this.readManifest(name).catch(() => undefined); // a foreign file is not an entry
      if (m) manifests.push(m);
    }
    return manifests.sort((a, b) => (a.ingestedAt < b.ingestedAt ? 1 : a.ingestedAt > b.ingestedAt ? -1 : 0));
  }

  private async readManifest(id: string): Promise<Manifest> {
    const m = JSON.parse(await readFile(path.join(this.entriesDir, id, MANIFEST_FILE), 'utf8')) as Manifest;
    if (m.formatVersion !== 1 || m.id !== id) throw new Error('not a kheadersd entry');
    return m;
  }

  /** The full entry (manifest + index); memoised, since entries never change. */
  async load(id: string): Promise<CacheEntry> {
    const hit = this.loaded.get(id);
    if (hit) return hit;
    const dir = path.join(this.entriesDir, id);
    let manifest: Manifest;
    let indexFile: IndexFile;
    try {
      manifest = await this.readManifest(id);
      indexFile = JSON.parse(await readFile(path.join(dir, INDEX_FILE), 'utf8')) as IndexFile;
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') throw new KheadersError('E_NOT_FOUND', `no cache entry ${id}`, { id });
      throw err;
    }
    const entry: CacheEntry = { manifest, dir, index: TreeIndex.fromJSON(indexFile) };
    this.loaded.set(id, entry);
    return entry;
  }

  /** Keep an entry just built in memory, so its index is not parsed back from disk. */
  remember(entry: CacheEntry): CacheEntry {
    this.loaded.set(entry.manifest.id, entry);
    return entry;
  }

  async currentId(): Promise<string | null> {
    try {
      const id = (await readFile(path.join(this.dir, 'current'), 'utf8')).trim();
      return id === '' ? null : id;
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return null;
      throw err;
    }
  }

  /** Point `current` at an entry: write a temp file, fsync, rename (never a torn pointer). */
  async setCurrent(id: string): Promise<void> {
    await writeFileDurably(path.join(this.dir, 'current'), `${id}\n`, this.tmpDir);
  }

  /**
   * Find an entry by `current`, a release, a digest (or an unambiguous prefix of at least 8 hex
   * digits), or its full id. A release with several builds names the current one if it is among
   * them, else the most recently ingested.
   */
  async resolve(ref: string): Promise<CacheEntry> {
    const manifests = await this.list();
    const current = await this.currentId();
    if (ref === 'current') {
      if (current && manifests.some((m) => m.id === current)) return this.load(current);
      const running = manifests.find((m) => m.release === os.release());
      if (running) return this.load(running.id);
      // `current` means the running kernel: say which that is, and what the cache does hold.
      const cached = [...new Set(manifests.map((m) => m.release))];
      throw new KheadersError(
        'E_NOT_FOUND',
        `"current" is the running kernel, ${os.release()}, and no entry for it is cached` +
          (cached.length > 0 ? ` (cached: ${cached.join(', ')}: name one of them instead of "current")` : ' (the cache is empty)') +
          '; `kheadersd ingest` caches the running kernel\'s headers',
        { ref, running: os.release(), cached },
      );
    }
    const byId = manifests.find((m) => m.id === ref);
    if (byId) return this.load(byId.id);
    const byRelease = manifests.filter((m) => m.release === ref);
    if (byRelease.length > 0) return this.load((byRelease.find((m) => m.id === current) ?? byRelease[0]!).id);
    if (/^[0-9a-f]{8,64}$/.test(ref)) {
      const byDigest = manifests.filter((m) => m.digest.startsWith(ref));
      // One archive ingested under two release names is two entries with one digest: any will do.
      const digests = new Set(byDigest.map((m) => m.digest));
      if (digests.size === 1) return this.load((byDigest.find((m) => m.id === current) ?? byDigest[0]!).id);
      if (digests.size > 1) throw new KheadersError('E_USAGE', `digest prefix ${ref} is ambiguous (${digests.size} entries); give more digits`, { ref });
    }
    throw new KheadersError('E_NOT_FOUND', `no cached entry matches ${JSON.stringify(ref)} (a release, a digest, or "current"); see \`kheadersd ls\``, { ref });
  }

  findByDigest(manifests: readonly Manifest[], digest: string, release?: string): Manifest | undefined {
    return manifests.find((m) => m.digest === digest && (release === undefined || m.release === release));
  }

  /**
   * Evict the oldest entries beyond `keep` and beyond `maxBytes` (packed bytes on disk), never the
   * current one. Call while holding the lock. Returns the evicted ids.
   */
  async gc({ keep, maxBytes, protect = [] }: GcOptions): Promise<string[]> {
    const manifests = await this.list(); // newest first
    const pinned = new Set<string>(protect);
    const current = await this.currentId();
    if (current) pinned.add(current);
    const sizeOf = (m: Manifest): number => m.packBytes + m.archiveBytes + (m.btf?.bytes ?? 0) + (m.config?.bytes ?? 0);
    // Pinned entries are kept first and use up their share of --keep and --max-cache-bytes.
    let kept = 0;
    let bytes = 0;
    for (const m of manifests) {
      if (!pinned.has(m.id)) continue;
      kept++;
      bytes += sizeOf(m);
    }
    const evicted: string[] = [];
    for (const m of manifests) {
      if (pinned.has(m.id)) continue;
      const size = sizeOf(m);
      if (kept < keep && (maxBytes === undefined || bytes + size <= maxBytes)) {
        kept++;
        bytes += size;
        continue;
      }
      evicted.push(m.id);
    }
    for (const id of evicted) await this.remove(id);
    return evicted;
  }

  /** Take an entry away atomically (rename out of entries/, then delete at leisure). */
  async remove(id: string): Promise<void> {
    const doomed = path.join(this.tmpDir, `evict-${process.pid}-${Date.now()}-${id}`);
    await rename(path.join(this.entriesDir, id), doomed);
    this.loaded.delete(id);
    await rm(doomed, { recursive: true, force: true });
  }

  /** Bytes the cache occupies (entries only). */
  async totalBytes(): Promise<number> {
    return (await this.list()).reduce((sum, m) => sum + m.packBytes + m.archiveBytes + (m.btf?.bytes ?? 0) + (m.config?.bytes ?? 0), 0);
  }
}

export function isDigest(s: string): boolean {
  return DIGEST_RE.test(s);
}

async function createPrivateDir(dir: string): Promise<void> {
  try {
    await mkdir(dir, { mode: 0o755 });
    await chmod(dir, 0o755); // the umask must not decide who can read the cache
  } catch (err) {
    const code = errnoOf(err);
    if (code === 'EEXIST') return;
    if (code === 'ENOENT') {
      await mkdir(path.dirname(dir), { recursive: true, mode: 0o755 });
      return createPrivateDir(dir);
    }
    if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') {
      throw new KheadersError('E_CACHE_UNSAFE', `cannot create the cache directory ${dir} (${code}): run as root, or choose another with --cache-dir`, { dir });
    }
    throw err;
  }
}

async function checkOwnership(dir: string, forWriting: boolean): Promise<void> {
  let st;
  try {
    st = await stat(dir);
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') {
      throw new KheadersError('E_NOT_FOUND', `the cache directory ${dir} does not exist yet: run \`kheadersd ingest\` (or pass --cache-dir)`, { dir });
    }
    throw err;
  }
  if (!st.isDirectory()) throw new KheadersError('E_CACHE_UNSAFE', `the cache path ${dir} is not a directory`, { dir });
  const uid = process.getuid?.() ?? 0;
  if ((st.mode & 0o022) !== 0) {
    throw new KheadersError(
      'E_CACHE_UNSAFE',
      `refusing the cache directory ${dir}: it is writable by ${st.mode & 0o002 ? 'everyone' : 'its group'} (mode ${(st.mode & 0o7777).toString(8)}), so anyone could plant headers in it; fix with: chmod 755 ${dir}`,
      { dir, mode: st.mode & 0o7777 },
    );
  }
  const acceptable = forWriting ? st.uid === uid : st.uid === uid || st.uid === 0;
  if (!acceptable) {
    throw new KheadersError('E_CACHE_UNSAFE', `refusing the cache directory ${dir}: it is owned by uid ${st.uid}, not by ${forWriting ? 'you' : 'you or root'} (uid ${uid}); fix with: chown ${uid} ${dir} (as root), or choose another with --cache-dir`, {
      dir,
      owner: st.uid,
    });
  }
}

/** Write a small file so that a crash leaves the old content or the new, never a torn one. */
export async function writeFileDurably(file: string, content: string | Buffer, tmpDir: string): Promise<void> {
  const tmp = path.join(tmpDir, `.${path.basename(file)}.${process.pid}.${Date.now()}`);
  try {
    const fh = await open(tmp, 'w', 0o644);
    try {
      await fh.writeFile(content);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true }); // a full disk must not leave the half-written file in tmp/
    throw err;
  }
  await fsyncDir(path.dirname(file));
}

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
