/**
 * The cache directory: entries by release and archive digest, the `current` pointer, the lock,
 * and a tmp/ area for half-built entries.
 *
 *   <cache>/entries/<release>~<sha256>/{manifest.json,index.bin,pack.tar,archive.tar.xz}  (entry.ts)
 *   <cache>/current        the id of the running kernel's entry and the boot that chose it (replaced atomically)
 *   <cache>/tmp/           builds in progress; swept under the lock
 *   <cache>/lock
 *   <cache>/quarantine/    damaged entries moved aside, with why (quarantine.ts)
 *   <cache>/sources.json   archive digests by what identifies their source (source-memo.ts)
 *   <cache>/code/          V8's compiled code of the shipped bundle's commands (../code-cache.ts)
 *
 * Entries are immutable: they appear by one rename and disappear by one rename, so a reader
 * sees a whole entry or none. The directory must be ours and not writable by anyone else: a
 * cache another user can write is how the /tmp/kheaders-* tools were exploited (CVE-2024-2313).
 */
import { readdirSync } from 'node:fs';
import { mkdir, open, readdir, rename, rm, stat, chmod } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { KheadersError, errnoOf } from '../errors.js';
import { cacheDirProblem, unreadableCache } from './cache-dir.js';
import { readBootId } from '../source/boot.js';
import { readLiveBuildId } from '../source/notes.js';
import { entriesDirPresent, entriesDirPresentAsync, isDamage, loadEntry, loadManifest, openEntryLazily } from './entry-load.js';
import { parseEntryId, type CacheEntry, type Manifest } from './entry.js';
import { readRegularFileAs, type ReadMode } from './small-file.js';
import { withLock } from './lock.js';
import { listQuarantine, pruneQuarantine, quarantineEntry, type QuarantineRecord } from './quarantine.js';
import { makeEntry } from './reader.js';
import { Resolver, newestFirst } from './resolve.js';
import type { TreeIndex } from './tree-index.js';

export { entryId, isDigest, validRelease } from './entry.js';
export { cacheDirProblem, type CacheDirProblem } from './cache-dir.js';

export interface OpenOptions {
  /** Create the directory if missing and insist that we own it (every writing command). */
  write: boolean;
  lockTimeoutMs?: number;
  /** The boot `current` belongs to (default: the running one's id; tests simulate a reboot). */
  bootId?: string | null;
}

/**
 * What `<cache>/current` says: an entry id, the boot that chose it, and whether that boot found
 * the entry cached already (reused: nothing decoded). Lines: the id, then `boot=<id>`, `reused=1`.
 */
export interface CurrentPointer {
  id: string;
  bootId: string | null;
  reused: boolean;
}

export function parseCurrentPointer(text: string): CurrentPointer | null {
  const [id = '', ...rest] = text.split('\n').map((l) => l.trim());
  if (id === '') return null;
  const field = (key: string): string | undefined => rest.find((l) => l.startsWith(`${key}=`))?.slice(key.length + 1);
  return { id, bootId: field('boot') ?? null, reused: field('reused') === '1' };
}

/** Far above any pointer formatCurrentPointer writes (an id, a boot id, a flag). */
const MAX_POINTER_BYTES = 1024;

export function formatCurrentPointer(p: CurrentPointer): string {
  return `${p.id}\n${p.bootId !== null ? `boot=${p.bootId}\n` : ''}${p.reused ? 'reused=1\n' : ''}`;
}

export interface GcOptions {
  keep: number;
  maxBytes?: number;
  /** Entries never to evict besides the current one (e.g. the one an ingest just made). */
  protect?: readonly string[];
}

/** An entry directory that failed its checks, and the error saying why. */
export interface DamagedEntry {
  id: string;
  error: KheadersError;
  /** A well-formed entry of an older format: rebuilt, not kept as evidence. */
  outdated: boolean;
}

export class CacheStore {
  readonly entriesDir: string;
  readonly tmpDir: string;
  private readonly loaded = new Map<string, CacheEntry>();
  private readonly loading = new Map<string, Promise<CacheEntry>>();
  /** How many times each entry was dropped: a load that a drop overtook must not keep what it read. */
  private readonly drops = new Map<string, number>();
  private readonly damageListeners = new Set<(err: KheadersError, manifest: Manifest) => void>();

  private constructor(
    readonly dir: string,
    private readonly lockTimeoutMs: number,
    private readonly bootId: string | null,
  ) {
    this.entriesDir = path.join(dir, 'entries');
    this.tmpDir = path.join(dir, 'tmp');
  }

  static async open(dir: string, options: OpenOptions = { write: false }): Promise<CacheStore> {
    const abs = path.resolve(dir);
    if (options.write) {
      await createPrivateDir(abs);
      await checkOwnership(abs, true);
      // The two subdirectories at once: each check is a thread-pool round trip, paid at every start.
      await Promise.all(
        ['entries', 'tmp'].map(async (sub) => {
          await createPrivateDir(path.join(abs, sub));
          await checkOwnership(path.join(abs, sub), true);
        }),
      );
    } else {
      await checkOwnership(abs, false);
      // A reader trusts what is under entries/ too: it must be as closed as the cache dir.
      await checkOwnership(path.join(abs, 'entries'), false).catch((err: unknown) => {
        if (!(err instanceof KheadersError && err.code === 'E_NOT_FOUND')) throw err;
      });
    }
    return new CacheStore(abs, options.lockTimeoutMs ?? 30_000, options.bootId !== undefined ? options.bootId : await readBootId());
  }

  /**
   * Run fn holding the cache's cross-process lock; E_LOCKED after the timeout. `signal` (a stop)
   * ends the wait at once, rejecting with its reason (lock.ts).
   */
  locked<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    return withLock(path.join(this.dir, 'lock'), { timeoutMs: this.lockTimeoutMs, ...(signal ? { signal } : {}) }, fn);
  }

  /**
   * Remove half-built entries left by a crash; an entry set aside for a rebuild (setAside) that
   * no rebuilt entry replaced goes back into entries/ first (restoreSetAside). Call only while
   * holding the lock. Returns the names removed.
   */
  async sweepTmp(): Promise<string[]> {
    const names = await readdir(this.tmpDir).catch(() => [] as string[]);
    const restored = new Set(await this.restoreSetAside(names));
    const doomed = names.filter((n) => !restored.has(n));
    await Promise.all(doomed.map((n) => rm(path.join(this.tmpDir, n), { recursive: true, force: true })));
    return doomed;
  }

  /** Entries set aside in tmp/ (setAside) by a rebuild that never finished: their ids by name. */
  async setAsideLeft(names?: readonly string[]): Promise<Map<string, string>> {
    const left = new Map<string, string>();
    for (const name of names ?? (await readdir(this.tmpDir).catch(() => [] as string[]))) {
      const id = SET_ASIDE.exec(name)?.[1];
      if (id !== undefined && parseEntryId(id) !== undefined) left.set(name, id);
    }
    return left;
  }

  /**
   * Put entries set aside for a rebuild back into entries/ when the process rebuilding them died
   * (a SIGKILL, a power cut) before a rebuilt entry replaced them: in tmp/ the next sweep would
   * delete the only copy. Under the lock, any set-aside entry is a dead process's. Returns the
   * names (in tmp/) put back; their entries are rebuilt by the next heal, as before. `names`: tmp/'s, if read already.
   */
  async restoreSetAside(names?: readonly string[]): Promise<string[]> {
    const back: string[] = [];
    for (const [name, id] of await this.setAsideLeft(names)) {
      try {
        await rename(path.join(this.tmpDir, name), path.join(this.entriesDir, id));
        back.push(name);
      } catch (err) {
        // Replaced by its rebuild (EEXIST, ENOTEMPTY): the copy is swept with the rest of tmp/.
        if (!['EEXIST', 'ENOTEMPTY', 'ENOENT'].includes(errnoOf(err) ?? '')) throw err;
      }
    }
    return back;
  }

  /**
   * Names under entries/ that are entry ids (`<release>~<digest>`); anything else is not ours.
   * `mode`: as the reads of manifests (entry-load.ts), and either way only through a real directory.
   */
  async entryIds(mode: ReadMode = 'sync'): Promise<string[]> {
    try {
      const names =
        mode === 'sync'
          ? entriesDirPresent(this.entriesDir)
            ? readdirSync(this.entriesDir)
            : []
          : (await entriesDirPresentAsync(this.entriesDir))
            ? await readdir(this.entriesDir)
            : [];
      return names.filter((n) => parseEntryId(n) !== undefined);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return [];
      throw unreadableCache(this.entriesDir, err) ?? err;
    }
  }

  /**
   * The manifests that read back and check out, newest first (damaged entries are in scan()).
   * `mode`: 'async' on a request's path (the HTTP catalog), where nothing may wait on the disk.
   */
  async list(mode: ReadMode = 'sync'): Promise<Manifest[]> {
    // Every manifest at once: read one after another, each entry cost a start five serial round trips.
    const read = await Promise.all(
      (await this.entryIds(mode)).map(async (id) => {
        const m = await loadManifest(this.entriesDir, id, mode).catch((err: unknown) => {
          // Damage is scan()'s to report; a manifest this user may not read is not to be skipped silently.
          if (err instanceof KheadersError && err.code === 'E_CACHE_UNREADABLE') throw err;
          return undefined;
        });
        this.dropIfReplaced(id, m);
        return m;
      }),
    );
    return newestFirst(read.filter((m): m is Manifest => m !== undefined));
  }

  /**
   * Another process (an ingest, a repair) may have replaced entries/<id> since it was loaded: a
   * rebuilt entry has another ingestedAt. Forget the old copy so the next load reads the new one.
   */
  private dropIfReplaced(id: string, onDisk: Manifest | undefined): void {
    const held = this.loaded.get(id);
    if (held && held.manifest.ingestedAt !== onDisk?.ingestedAt) this.drop(id);
  }

  /**
   * Every entry fully checked (manifest, index, file sizes): the good ones, newest first, and the
   * damaged. `only`: just the entries whose id it accepts (judged by id, so a manifest that does
   * not read is still checked, and found damaged). `mode`: see list(); 'async' while serving, so
   * requests (and a mount being made) go on between the reads.
   */
  async scan(only?: (id: string) => boolean, mode: ReadMode = 'sync'): Promise<{ entries: Manifest[]; damaged: DamagedEntry[] }> {
    const entries: Manifest[] = [];
    const damaged: DamagedEntry[] = [];
    // Entries at once: one's reads overlap another's index check (CPU), instead of waiting in turn.
    const outcomes = await Promise.all(
      (await this.entryIds(mode)).filter((id) => only?.(id) ?? true).map(async (id) => {
        try {
          this.dropIfReplaced(id, await loadManifest(this.entriesDir, id, mode).catch(() => undefined));
          return { id, manifest: (await this.load(id, mode)).manifest };
        } catch (err) {
          return { id, err };
        }
      }),
    );
    for (const o of outcomes) {
      if ('manifest' in o) {
        entries.push(o.manifest);
        continue;
      }
      if (isKheadersNotFound(o.err)) continue; // removed meanwhile
      if (!isDamage(o.err)) throw o.err;
      damaged.push({ id: o.id, error: o.err, outdated: o.err.details['outdated'] === true });
    }
    return { entries: newestFirst(entries), damaged };
  }

  /**
   * The full entry, checked (see entry-load.ts); memoised, since entries never change. `mode`:
   * see list(); a load already under way is shared whichever way it reads.
   */
  async load(id: string, mode: ReadMode = 'sync'): Promise<CacheEntry> {
    const hit = this.loaded.get(id);
    if (hit) return hit;
    const drops = this.drops.get(id) ?? 0;
    // Callers asking at once (a scan, HTTP's catalog) share one read and check of the index.
    let pending = this.loading.get(id);
    if (!pending) {
      const started: Promise<CacheEntry> = loadEntry(this.entriesDir, id, (err, m) => this.emitDamage(err, m), mode)
        .then((entry) => {
          // Kept before the load stops being shared, with no turn between: a caller that came in
          // between would find neither and read and check the entry again (the reads are
          // synchronous, so a load can end in the same turn as the scan that asked for it).
          // Dropped while it was read (quarantined, evicted, replaced): not kept, since it would
          // be served on after the drop; the callers that asked before still get what was there.
          if ((this.drops.get(id) ?? 0) === drops && !this.loaded.has(id)) this.loaded.set(id, entry);
          return entry;
        })
        .finally(() => {
          if (this.loading.get(id) === started) this.loading.delete(id);
        });
      this.loading.set(id, started);
      pending = started;
    }
    const entry = await pending;
    if ((this.drops.get(id) ?? 0) !== drops) return entry;
    return this.loaded.get(id) ?? entry;
  }

  /** Forget an entry's in-memory copy, and any load of it under way (it changed on disk). */
  private drop(id: string): void {
    this.loaded.delete(id);
    this.loading.delete(id);
    this.drops.set(id, (this.drops.get(id) ?? 0) + 1);
  }

  /** The entry with its index read on demand, for one lookup (`cat`). Close it when done. */
  lazy(id: string): ReturnType<typeof openEntryLazily> {
    return openEntryLazily(this.entriesDir, id, (err, m) => this.emitDamage(err, m));
  }

  /** An entry ingest has just renamed into place: kept in memory, so its index is not read back. */
  adopt(manifest: Manifest, dir: string, index: TreeIndex): CacheEntry {
    const entry = makeEntry(manifest, dir, index, (err, m) => this.emitDamage(err, m));
    this.loaded.set(manifest.id, entry);
    return entry;
  }

  /** Hear about entries found damaged while being read (the daemon repairs them). */
  onDamage(listener: (err: KheadersError, manifest: Manifest) => void): () => void {
    this.damageListeners.add(listener);
    return () => this.damageListeners.delete(listener);
  }

  private emitDamage(err: KheadersError, manifest: Manifest): void {
    for (const l of this.damageListeners) l(err, manifest);
  }

  /**
   * Which entry each name means, as of now (see resolve.ts). `pointer` overrides the `current`
   * file. `mode`: how the cache (and the running kernel's notes) are read; see list().
   */
  async snapshot(pointer?: string | null, mode: ReadMode = 'sync'): Promise<Resolver> {
    const manifests = await this.list(mode);
    const current = pointer === undefined ? ((await this.currentPointer(mode))?.id ?? null) : pointer;
    return new Resolver(manifests, current, os.release(), await readLiveBuildId(undefined, mode));
  }

  /** The entry `ref` names (current, a release, a digest or prefix, an id). */
  async resolve(ref: string): Promise<CacheEntry> {
    return this.load((await this.snapshot()).resolve(ref).id);
  }

  findByDigest(manifests: readonly Manifest[], digest: string, release?: string): Manifest | undefined {
    return manifests.find((m) => m.digest === digest && (release === undefined || m.release === release));
  }

  /**
   * Move a damaged entry out of entries/ into quarantine/ (see quarantine.ts). Readers of the
   * instance in memory fail from now on. Call while holding the lock.
   */
  async quarantine(id: string, why: { reason: string; file?: string }): Promise<QuarantineRecord> {
    const entry = this.loaded.get(id);
    this.drop(id);
    const record = await quarantineEntry(this.dir, this.entriesDir, id, why);
    await entry?.reader.kill(new KheadersError('E_ENTRY_DAMAGED', `cache entry ${id} was moved to quarantine: ${why.reason}`, { id, reason: why.reason, errno: 'EIO' }));
    return record;
  }

  /** Move an entry out of entries/ into tmp/ (to rebuild it from there). Call while holding the lock. */
  async setAside(id: string): Promise<string> {
    const aside = path.join(this.tmpDir, `aside-${process.pid}-${Date.now()}-${id}`); // SET_ASIDE
    await rename(path.join(this.entriesDir, id), aside);
    this.drop(id);
    return aside;
  }

  /** Quarantine an entry already set aside (see setAside). Call while holding the lock. */
  quarantineFrom(aside: string, id: string, why: { reason: string; file?: string }): Promise<QuarantineRecord> {
    return quarantineEntry(this.dir, path.dirname(aside), path.basename(aside), why, id);
  }

  /** Quarantined entries, newest first. */
  quarantined(): Promise<QuarantineRecord[]> {
    return listQuarantine(this.dir);
  }

  /** Keep only the newest quarantined copies (gc does this too). */
  pruneQuarantine(): Promise<string[]> {
    return pruneQuarantine(this.dir);
  }

  /**
   * The running kernel's entry, as chosen during this boot; null before anything chose one. A
   * pointer left by an earlier boot names what ran then (maybe another kernel, or another build
   * of this release): it is never taken for this boot's.
   */
  async currentId(mode: ReadMode = 'sync'): Promise<string | null> {
    return (await this.currentPointer(mode))?.id ?? null;
  }

  /** The `current` pointer if this boot wrote it, else null. `mode`: see list(). */
  async currentPointer(mode: ReadMode = 'sync'): Promise<CurrentPointer | null> {
    let text: string;
    try {
      // A start reads it three times, synchronously (small-file.ts). Not a regular file (a link,
      // a FIFO), or one longer than any pointer: no pointer, as EISDIR.
      const bytes = await readRegularFileAs(mode, path.join(this.dir, 'current'), MAX_POINTER_BYTES);
      if (bytes === undefined) return null;
      text = bytes.toString('utf8');
    } catch (err) {
      // Missing, or not a file: no pointer (the resolver falls back to the running release).
      if (errnoOf(err) === 'ENOENT' || errnoOf(err) === 'EISDIR') return null;
      throw unreadableCache(path.join(this.dir, 'current'), err) ?? err;
    }
    const pointer = parseCurrentPointer(text);
    return pointer !== null && pointer.bootId === this.bootId ? pointer : null;
  }

  /** Point `current` at an entry, for this boot: write a temp file, fsync, rename (never a torn pointer). */
  async setCurrent(id: string, opts: { reused?: boolean } = {}): Promise<void> {
    const content = formatCurrentPointer({ id, bootId: this.bootId, reused: opts.reused === true });
    await writeFileDurably(path.join(this.dir, 'current'), content, this.tmpDir);
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
    this.drop(id);
    await rm(doomed, { recursive: true, force: true });
  }

  /** Drop the in-memory copy of an entry (it was replaced on disk). */
  forget(id: string): void {
    this.drop(id);
  }

  /** Bytes the cache occupies (entries only). */
  async totalBytes(): Promise<number> {
    return (await this.list()).reduce((sum, m) => sum + m.packBytes + m.archiveBytes + (m.btf?.bytes ?? 0) + (m.config?.bytes ?? 0), 0);
  }
}

/** The name setAside gives an entry in tmp/: `aside-<pid>-<ms>-<id>`. */
const SET_ASIDE = /^aside-\d+-\d+-(.+)$/;

function isKheadersNotFound(err: unknown): boolean {
  return err instanceof KheadersError && err.code === 'E_NOT_FOUND';
}

async function createPrivateDir(dir: string): Promise<void> {
  try {
    await mkdir(dir, { mode: 0o755 });
    await chmod(dir, 0o755); // the umask must not decide who can read the cache
  } catch (err) {
    const code = errnoOf(err);
    if (code === 'EEXIST') return;
    if (code === 'ENOENT') {
      // The parents too are made 0755 whatever the umask: a reader must be able to reach the cache.
      await createPrivateDir(path.dirname(dir));
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
    throw unreadableCache(dir, err) ?? err;
  }
  const problem = cacheDirProblem(dir, st, process.getuid?.() ?? 0, forWriting);
  if (problem) throw new KheadersError('E_CACHE_UNSAFE', `${problem.what}; fix with: ${problem.fix}`, { dir, problem: problem.kind, mode: st.mode & 0o7777, owner: st.uid });
}

/** Write a small file so that a crash leaves the old content or the new, never a torn one. */
export async function writeFileDurably(file: string, content: string | Buffer, tmpDir: string): Promise<void> {
  const tmp = path.join(tmpDir, `.${path.basename(file)}.${process.pid}.${Date.now()}`);
  try {
    const fh = await open(tmp, 'w', 0o644);
    try {
      await fh.chmod(0o644); // the umask must not decide who can read it (`current`: every reader)
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
