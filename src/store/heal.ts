/**
 * Self-healing: every entry that fails its checks (entry-load.ts), or whose bytes a reader found
 * wrong (reader.ts), is moved aside into quarantine/ with its reason (quarantine.ts), then built
 * again from its own archive.tar.xz when that archive still has the entry's digest. What cannot
 * be rebuilt that way stays quarantined; the live ingest that follows in `serve` (and on SIGHUP)
 * builds the running kernel's entry again from the live source.
 *
 * An entry of an older format is not damage: it is moved aside the same way, rebuilt, and its
 * old copy deleted once the rebuild worked (it is not evidence of anything).
 *
 * A stop (IngestOptions.signal: serve stopping) ends a heal at its next step. It is not a failed
 * rebuild, and says nothing about the entry: the rebuild under way is cancelled (its decoder
 * killed, its staging removed), the entry goes back into entries/ as it was (out of tmp/, where
 * the next ingest would sweep it away, or out of quarantine/, with no reason recorded), the
 * entries not reached yet are left alone, and the heal rejects with the stop. The next start's
 * heal finds them as this one did and rebuilds them; bytes a reader found wrong (an entry whose
 * structure loads) are found again by the first read of them, never served, and repaired then.
 *
 * A crash (SIGKILL, power cut) while an outdated entry is rebuilt leaves its copy set aside in
 * tmp/: the next heal, or the next sweep of tmp/, puts it back into entries/ unless a rebuilt
 * entry replaced it (CacheStore.restoreSetAside), and the heal rebuilds it then.
 */
import { createHash } from 'node:crypto';
import { readFile, rename, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { KheadersError, errnoOf } from '../errors.js';
import type { ArchiveOrigin, ModuleFileInfo } from '../source/locate.js';
import { CacheStore, type DamagedEntry } from './cache.js';
import { damageOf } from './entry-load.js';
import { ARCHIVE_FILE, MANIFEST_FILE, parseEntryId } from './entry.js';
import { rebuildEntry, type IngestOptions } from './ingest.js';
import { QUARANTINE_DIR, REASON_FILE, type QuarantineRecord } from './quarantine.js';

/** A damaged entry a reader found (its structure may load fine: its bytes did not prove). */
export interface KnownDamage {
  id: string;
  /** The instance that was read (a later rebuild of the same id has another ingestedAt). */
  ingestedAt: string;
  reason: string;
  file?: string;
}

export interface HealReport {
  quarantined: QuarantineRecord[];
  /** Ids built again from their own archive. */
  rebuilt: string[];
  /** Ids moved aside and not rebuilt, with why. */
  unrepaired: Array<{ id: string; why: string }>;
}

export interface HealOptions extends IngestOptions {
  /** Damage readers reported, to repair even if the entry's structure checks out. */
  known?: readonly KnownDamage[];
  /**
   * false: do not check every entry first, only the running kernel's and the one `current`
   * names, and repair what `known` names and what a crash left set aside. For a caller that
   * checks the others itself soon after (serve, once HTTP is up) and repairs what that finds.
   */
  checkEntries?: boolean;
}

/**
 * Check the cache and repair what is damaged. Takes the cache lock when there is something to
 * repair. Rejects with the stop's reason when `opts.signal` stops it (see above).
 */
export async function healCache(opts: HealOptions): Promise<HealReport> {
  opts.signal?.throwIfAborted();
  const store = opts.store ?? (await CacheStore.open(opts.cacheDir, { write: true, ...(opts.lockTimeoutMs !== undefined ? { lockTimeoutMs: opts.lockTimeoutMs } : {}) }));
  // Checking needs no lock (entries come and go by one rename each, never half-made): only a
  // repair does, and it checks again under the lock. A clean cache, nearly every start, costs no
  // lock round trips; the entries checked here stay loaded for the lock holder.
  // An entry set aside by a rebuild that a crash cut short is repaired too (healLocked puts it back first).
  if ((opts.known ?? []).length === 0) {
    const [damaged, left] = await Promise.all([store.scan(opts.checkEntries === false ? await servedFirst(store) : undefined).then((s) => s.damaged), store.setAsideLeft()]);
    if (damaged.length === 0 && left.size === 0) return { quarantined: [], rebuilt: [], unrepaired: [] };
  }
  return store.locked(() => healLocked(store, opts), opts.signal);
}

/**
 * The entries the ingest that follows may serve as they are: the running kernel's and current's.
 * Each is checked (and, damaged, rebuilt from its own archive) before that ingest, not after:
 * with no live archive (the module gone on this boot) the ingest reuses the running kernel's
 * entry, and one it found damaged it could only quarantine, leaving nothing to serve. (Checked
 * here, an intact entry stays loaded: the ingest's own check of it costs nothing more.)
 */
async function servedFirst(store: CacheStore): Promise<(id: string) => boolean> {
  // This kernel's, whatever --release says: only for it does an ingest reuse an entry with no archive at hand.
  const release = os.release();
  const pointer = await store.currentId().catch(() => null);
  return (id) => id === pointer || parseEntryId(id)?.release === release;
}

/** healCache for a store whose lock the caller holds. */
export async function healLocked(store: CacheStore, opts: HealOptions): Promise<HealReport> {
  const report: HealReport = { quarantined: [], rebuilt: [], unrepaired: [] };
  const restored = await store.restoreSetAside();
  if (restored.length > 0) opts.log?.warn({ restored }, `put back into the cache entries whose rebuild a crash cut short (${restored.join(', ')}): rebuilding them`);
  const { damaged } = await store.scan();
  const todo: DamagedEntry[] = [...damaged];
  for (const k of opts.known ?? []) {
    if (todo.some((d) => d.id === k.id)) continue;
    // Only the instance that failed: another process may have rebuilt it meanwhile.
    const now = await store.load(k.id).catch(() => undefined);
    if (!now || now.manifest.ingestedAt !== k.ingestedAt) continue;
    const error = new KheadersError('E_ENTRY_DAMAGED', `cache entry ${k.id} is damaged: ${k.reason}`, { id: k.id, reason: k.reason, ...(k.file !== undefined ? { file: k.file } : {}) });
    todo.push({ id: k.id, error, outdated: false });
  }
  for (const d of todo) {
    opts.signal?.throwIfAborted(); // what is not reached yet stays as it is, for the next heal
    await healOne(store, d, opts, report);
  }
  return report;
}

async function healOne(store: CacheStore, d: DamagedEntry, opts: HealOptions, report: HealReport): Promise<void> {
  const log = opts.log;
  const { reason, file } = damageOf(d.error);
  if (d.outdated) {
    // Not damage: rebuilt from a copy set aside in tmp/, which goes once the rebuild worked.
    log?.info({ id: d.id }, `cache entry ${d.id} is in an older format: rebuilding it`);
    const aside = await store.setAside(d.id);
    const why = await rebuildFrom(store, d.id, aside, opts).catch((stop: unknown) => putBack(store, d.id, aside, stop, log));
    if (why === undefined) {
      report.rebuilt.push(d.id);
      await rm(aside, { recursive: true, force: true });
      return;
    }
    // It cannot be rebuilt: keep it as evidence, like a damaged one.
    report.quarantined.push(await store.quarantineFrom(aside, d.id, { reason: `${reason}; it cannot be rebuilt: ${why}` }));
    report.unrepaired.push({ id: d.id, why });
    log?.warn({ id: d.id, why }, `cache entry ${d.id} is in an older format and cannot be rebuilt (${why}): moved to quarantine`);
    return;
  }
  const record = await store.quarantine(d.id, { reason, ...(file !== undefined ? { file } : {}) });
  const qdir = path.join(store.dir, QUARANTINE_DIR, record.name);
  report.quarantined.push(record);
  log?.warn({ id: d.id, reason, file, quarantine: qdir }, `${d.error.message}: moved to quarantine`);

  const why = await rebuildFrom(store, d.id, qdir, opts).catch((stop: unknown) => putBack(store, d.id, qdir, stop, log));
  if (why === undefined) {
    report.rebuilt.push(d.id);
    log?.info({ id: d.id }, 'cache entry rebuilt from its own archive');
    return;
  }
  report.unrepaired.push({ id: d.id, why });
  log?.warn({ id: d.id, why }, `cache entry ${d.id} cannot be rebuilt from its own archive (${why}); it stays in quarantine, and the running kernel's entry is built again from the live source`);
}

/**
 * A rebuild was stopped: move the entry back from `dir` (in tmp/ or quarantine/) into entries/,
 * as it was before the heal moved it, and throw the stop. Should that move fail, the entry is
 * kept in quarantine rather than left in tmp/, which the next ingest sweeps.
 */
async function putBack(store: CacheStore, id: string, dir: string, stop: unknown, log: HealOptions['log']): Promise<never> {
  const back = path.join(store.entriesDir, id);
  try {
    await rename(dir, back);
    await rm(path.join(back, REASON_FILE), { force: true }); // there when it came from quarantine/
    log?.info({ id }, `rebuilding cache entry ${id} was stopped: it is back in the cache as it was, to be repaired again`);
  } catch (err) {
    const why = `its rebuild was stopped, and it could not be put back into the cache (${errnoOf(err) ?? String(err)})`;
    if (path.dirname(dir) === store.tmpDir) await store.quarantineFrom(dir, id, { reason: why }).catch(() => {});
    log?.warn({ id, errno: errnoOf(err) }, `cache entry ${id}: ${why}; it is in quarantine`);
  }
  throw stop;
}

/**
 * Build `id` again from the archive in the directory it was moved to; undefined on success, else
 * why not. A stop (opts.signal) is no reason: it is thrown.
 */
async function rebuildFrom(store: CacheStore, id: string, dir: string, opts: HealOptions): Promise<string | undefined> {
  const parsed = parseEntryId(id);
  if (!parsed) return 'its name is not an entry id';
  let archive: Buffer;
  try {
    archive = await readFile(path.join(dir, ARCHIVE_FILE));
  } catch (err) {
    return errnoOf(err) === 'ENOENT' ? 'it has no archive.tar.xz (a vmlinux.h-only entry, or the archive is gone)' : `its archive cannot be read (${errnoOf(err) ?? String(err)})`;
  }
  if (createHash('sha256').update(archive).digest('hex') !== parsed.digest) return "its archive.tar.xz no longer has the entry's digest";
  const old = await oldManifest(dir);
  try {
    await rebuildEntry(
      store,
      { archive, release: parsed.release, digest: parsed.digest, source: old.source ?? 'rebuilt from its cached archive', buildId: old.buildId, btfDigest: old.btfDigest, ...(old.btfSource !== undefined ? { btfSource: old.btfSource } : {}), ...(old.obtained ? { obtained: old.obtained } : {}), ...(old.module ? { module: old.module } : {}) },
      opts,
    );
  } catch (err) {
    // A stop is what happened, whatever the build failed with as it was cut short.
    if (opts.signal?.aborted) throw opts.signal.reason;
    return `rebuilding failed: ${err instanceof Error ? err.message : String(err)}`;
  }
  return undefined;
}

/** What the damaged entry's manifest still says, read loosely (it may be the damaged part). */
async function oldManifest(dir: string): Promise<{ source: string | undefined; buildId: string | null; btfDigest: string | null | undefined; btfSource: string | undefined; obtained?: ArchiveOrigin; module?: ModuleFileInfo }> {
  try {
    const m = JSON.parse(await readFile(path.join(dir, MANIFEST_FILE), 'utf8')) as Record<string, unknown>;
    const btf = m['btf'] as { digest?: unknown; source?: unknown } | null | undefined;
    return {
      source: typeof m['source'] === 'string' ? m['source'] : undefined,
      buildId: typeof m['buildId'] === 'string' && /^[0-9a-f]+$/.test(m['buildId']) ? m['buildId'] : null,
      btfDigest: btf === null ? null : typeof btf?.digest === 'string' ? btf.digest : undefined,
      btfSource: typeof btf?.source === 'string' ? btf.source : undefined,
      ...(ARCHIVE_ORIGINS.find((o) => o === m['obtained']) ? { obtained: m['obtained'] as ArchiveOrigin } : {}),
      ...(isModuleFileInfo(m['module']) ? { module: m['module'] } : {}),
    };
  } catch {
    return { source: undefined, buildId: null, btfDigest: undefined, btfSource: undefined };
  }
}

const ARCHIVE_ORIGINS: readonly ArchiveOrigin[] = ['exposed', 'module-file', 'module-loaded', 'file'];

function isModuleFileInfo(v: unknown): v is ModuleFileInfo {
  if (typeof v !== 'object' || v === null) return false;
  const o = v as Record<string, unknown>;
  return typeof o['file'] === 'string' && typeof o['mtime'] === 'string' && typeof o['bootTime'] === 'string';
}

/** A one-line summary for logs and commands. */
export function describeHeal(r: HealReport): string | undefined {
  if (r.quarantined.length === 0 && r.rebuilt.length === 0 && r.unrepaired.length === 0) return undefined;
  const parts: string[] = [];
  if (r.quarantined.length > 0) parts.push(`${r.quarantined.length} damaged entr${r.quarantined.length === 1 ? 'y' : 'ies'} moved to quarantine (${r.quarantined.map((q) => `${q.id}: ${q.reason}`).join('; ')})`);
  if (r.rebuilt.length > 0) parts.push(`rebuilt from their archives: ${r.rebuilt.join(', ')}`);
  if (r.unrepaired.length > 0) parts.push(`not rebuilt: ${r.unrepaired.map((u) => `${u.id} (${u.why})`).join('; ')}`);
  return parts.join('; ');
}
