/**
 * The commands that work on the cache alone: ingest, ls, cat, export, gc. Each takes the
 * resolved configuration and where to write, and returns nothing but effects; errors are
 * KheadersErrors that cli.ts turns into a message and an exit status.
 */
import type { Config } from '../config.js';
import { KheadersError, errnoOf } from '../errors.js';
import type { Logger } from '../log.js';
import { CacheStore } from '../store/cache.js';
import { damageOf, isDamage } from '../store/entry-load.js';
import type { CacheEntry } from '../store/entry.js';
import { describeHeal, healCache, type HealReport, type KnownDamage } from '../store/heal.js';
import { ingest, locateForIngest, type IngestOptions, type IngestResult } from '../store/ingest.js';
import { readLiveKernel } from '../store/kernel-match.js';
import { IndexFormatError, normaliseEntryPath } from '../store/tree-index.js';
import { summarise, type EntrySummary } from '../store/summary.js';
import { humanBytes, progressBar, table } from './format.js';

export interface CommandIO {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream & { isTTY?: boolean };
  log: Logger;
}

/** Ingest options from the configuration (no progress output); `store`: the cache already open (the daemon's). */
function ingestOptions(cfg: Config, io: CommandIO, store?: CacheStore): IngestOptions {
  return {
    cacheDir: cfg.cacheDir,
    ...(store ? { store } : {}),
    limits: { maxTotalBytes: cfg.maxTotalBytes, maxEntries: cfg.maxEntries, maxFileBytes: cfg.maxFileBytes },
    decoder: cfg.decoder,
    btf: cfg.btf,
    lockTimeoutMs: cfg.lockTimeout * 1000,
    log: io.log,
  };
}

/**
 * Check every cached entry and repair the damaged (quarantine, rebuild from their own archive):
 * what every writer does before it ingests, so nothing on disk can make it fail. `signal`: the
 * daemon's stop, which ends the repair (heal.ts says how) and rejects with the stop.
 */
export async function healWithConfig(cfg: Config, io: CommandIO, known: readonly KnownDamage[] = [], store?: CacheStore, signal?: AbortSignal, checkEntries = true): Promise<HealReport> {
  const report = await healCache({ ...ingestOptions(cfg, io, store), known, checkEntries, ...(signal ? { signal } : {}) });
  const summary = describeHeal(report);
  if (summary !== undefined) io.log.warn({ quarantined: report.quarantined.map((q) => q.id), rebuilt: report.rebuilt, unrepaired: report.unrepaired }, `cache repaired: ${summary}`);
  return report;
}

/** What a caller adds to the configured ingest (see IngestOptions). */
export type IngestExtra = Pick<IngestOptions, 'setCurrent' | 'store' | 'buildElsewhere' | 'buildStaged' | 'willRead' | 'signal'>;

/**
 * The options of an ingest of the configured archive (or the running kernel's), with eviction
 * afterwards; a progress bar when stderr is a terminal. `store`: the cache already open (the
 * daemon's); `buildElsewhere`, `signal`: see IngestOptions.
 */
export function configuredIngest(cfg: Config, io: CommandIO, extra: IngestExtra = {}): IngestOptions {
  return {
    ...ingestOptions(cfg, io, extra.store),
    ...(cfg.archive !== undefined ? { archive: cfg.archive } : {}),
    ...(cfg.release !== undefined ? { release: cfg.release } : {}),
    modprobe: cfg.modprobe,
    unloadModule: cfg.unloadModule,
    moduleDirs: cfg.moduleDirs,
    origins: {
      ...(cfg.origins.archive !== undefined ? { archive: cfg.origins.archive } : {}),
      ...(cfg.origins.release !== undefined ? { release: cfg.origins.release } : {}),
      ...(cfg.origins.btf !== undefined ? { btf: cfg.origins.btf } : {}),
    },
    keep: cfg.keep,
    ...(cfg.maxCacheBytes !== undefined ? { maxCacheBytes: cfg.maxCacheBytes } : {}),
    ...(extra.setCurrent !== undefined ? { setCurrent: extra.setCurrent } : {}),
    ...(extra.buildElsewhere ? { buildElsewhere: extra.buildElsewhere } : {}),
    ...(extra.buildStaged ? { buildStaged: extra.buildStaged } : {}),
    ...(extra.willRead ? { willRead: extra.willRead } : {}),
    ...(extra.signal ? { signal: extra.signal } : {}),
    ...(io.stderr.isTTY === true
      ? { onProgress: (p) => io.stderr.write(progressBar(p.total ? p.bytes / p.total : undefined, `${humanBytes(p.bytes)}, ${p.entries} entries`)) }
      : {}),
  };
}

/**
 * Repair the cache, then ingest (configuredIngest). `store`: the cache already open (the
 * daemon's), whose loaded entries the repair check and the ingest reuse. `checkEntries: false`:
 * only what a crash left set aside is repaired first; the caller checks the rest itself (serve's
 * start, which need not wait for entries other than the one it serves).
 */
export async function ingestWithConfig(cfg: Config, io: CommandIO, extra: IngestExtra & { checkEntries?: boolean } = {}): Promise<IngestResult & { healed: HealReport }> {
  const tty = io.stderr.isTTY === true;
  const opts = configuredIngest(cfg, io, extra);
  // The archive is read and hashed while the cache's entries are checked: the two wait on
  // different things (the archive's reads, the entries' reads and index checks). ingest() reports
  // what finding it went wrong, as if it had found it itself.
  const located = locateForIngest(opts);
  located.catch(() => {});
  // A repair that fails must not stop the ingest (nor serve's start): what is intact is still
  // served, and the ingest reports lock or ownership problems itself. A stopped one is a stop.
  const healed = await healWithConfig(cfg, io, [], extra.store, extra.signal, extra.checkEntries ?? true).catch((err: unknown): HealReport => {
    if (extra.signal?.aborted) throw err;
    io.log.error({ code: err instanceof KheadersError ? err.code : 'E_INTERNAL' }, `checking the cache's entries failed: ${err instanceof Error ? err.message : String(err)}`);
    return { quarantined: [], rebuilt: [], unrepaired: [] };
  });
  const result = await ingest({ ...opts, located }).finally(() => {
    if (tty) io.stderr.write('\n');
  });
  return { ...result, healed };
}

/** The exit status of a command stopped by a signal: 128 + its number, as shells report it. */
const STOPPED_EXIT = { SIGINT: 130, SIGTERM: 143 } as const;
type StopSignal = keyof typeof STOPPED_EXIT;

/**
 * SIGINT (Ctrl-C) and SIGTERM stop the command: the first aborts `signal` (an ingest kills its
 * decoder, removes its staging and releases the lock: ingest.ts, lock.ts), a second exits at once.
 * `stoppedBy` says which signal stopped it; `dispose` restores the default handling.
 */
function stopOnSignals(): { signal: AbortSignal; stoppedBy(): StopSignal | undefined; dispose(): void } {
  const controller = new AbortController();
  let by: StopSignal | undefined;
  const onSignal = (sig: StopSignal): void => {
    if (by !== undefined) process.exit(STOPPED_EXIT[sig]); // the first stop already killed the decoder
    by = sig;
    controller.abort();
  };
  const handlers = (Object.keys(STOPPED_EXIT) as StopSignal[]).map((sig) => [sig, () => onSignal(sig)] as const);
  for (const [sig, h] of handlers) process.on(sig, h);
  return {
    signal: controller.signal,
    stoppedBy: () => by,
    dispose: () => {
      for (const [sig, h] of handlers) process.off(sig, h);
    },
  };
}

export async function cmdIngest(cfg: Config, io: CommandIO, json: boolean): Promise<void> {
  const stop = stopOnSignals();
  let result: IngestResult & { healed: HealReport };
  try {
    result = await ingestWithConfig(cfg, io, { signal: stop.signal });
  } catch (err) {
    // Whatever the ingest failed with as it was cut short (a decoder killed by the same Ctrl-C), the stop is what happened.
    const by = stop.stoppedBy();
    if (by === undefined) throw err;
    io.stderr.write(`kheadersd: ingest stopped by ${by}: nothing was cached (the decoder killed, its staging removed, the lock released)\n`);
    process.exitCode = STOPPED_EXIT[by];
    return;
  } finally {
    stop.dispose();
  }
  const store = await CacheStore.open(cfg.cacheDir);
  const summary = summarise(result.entry.manifest, await store.currentId(), await readLiveKernel({}, [result.entry.manifest]));
  if (json) {
    io.stdout.write(JSON.stringify({ ...summary, reused: result.reused, evicted: result.evicted, durationMs: result.durationMs }) + '\n');
    return;
  }
  const m = result.entry.manifest;
  if (m.kind === 'btf-only') {
    io.stderr.write(
      `no header archive for ${m.release} (the kernel lacks CONFIG_IKHEADERS): cached vmlinux.h only, generated from ${m.source.replace(/^btf:/, '')}.\n` +
        `CO-RE programs can use it now (kheadersd cat current vmlinux.h); for the headers, see \`kheadersd doctor\`.\n`,
    );
    return;
  }
  const extras = [m.btf ? 'vmlinux.h' : '', m.config ? '.config' : ''].filter(Boolean).join(' and ');
  io.stderr.write(
    `${result.reused ? 'already cached' : 'ingested'}: ${m.release} (sha256 ${m.digest.slice(0, 12)}), ${m.files} files, ${humanBytes(m.bytes)}` +
      `${extras ? `, with ${extras}` : ''}${summary.current ? ', current' : ''} in ${result.durationMs} ms\n`,
  );
  if (summary.runningKernel !== 'yes') {
    io.stderr.write(`note: this is not${summary.runningKernel === 'unknown' ? ' known to be' : ''} the running kernel's entry: ${summary.runningKernelNote ?? ''}${summary.current ? '' : `; \`current\` still means the running kernel: use \`${m.release}\` to name this entry`}\n`);
  }
  for (const note of m.notes ?? []) io.stderr.write(`note: ${note}\n`);
}

export async function cmdLs(cfg: Config, io: CommandIO, json: boolean): Promise<void> {
  const store = await CacheStore.open(cfg.cacheDir);
  const current = (await store.snapshot()).currentId;
  const pointer = await store.currentPointer();
  const { entries: manifests, damaged } = await store.scan();
  const live = await readLiveKernel({}, manifests);
  // The current entry also says whether this boot found it cached (reused) or decoded it.
  const entries: Array<EntrySummary & { reused?: boolean }> = manifests.map((m) => {
    const summary = summarise(m, current, live);
    return pointer !== null && m.id === pointer.id ? { ...summary, reused: pointer.reused } : summary;
  });
  if (json) {
    // The same array HTTP /v1/kernels gives (the entries that are served); doctor --json lists the rest.
    io.stdout.write(JSON.stringify(entries, null, 2) + '\n');
    return;
  }
  const quarantined = await store.quarantined();
  if (entries.length === 0) io.stdout.write(`no entries in ${store.dir}: run \`kheadersd ingest\`\n`);
  else {
    const rows = [['RELEASE', 'DIGEST', 'FILES', 'SIZE', 'BUILD-ID', 'INGESTED', 'CURRENT', 'RUNNING', 'EXTRAS', 'SOURCE']];
    for (const e of entries) {
      rows.push([
        e.release,
        e.digest.slice(0, 12),
        String(e.files),
        humanBytes(e.bytes),
        e.buildId ? e.buildId.slice(0, 12) : '-',
        e.ingestedAt.replace(/\.\d+Z$/, 'Z'),
        e.current ? (e.reused ? 'yes (reused)' : 'yes') : '',
        e.runningKernel === 'yes' ? 'yes' : e.runningKernel === 'unknown' ? '?' : 'no',
        [e.vmlinuxH ? 'vmlinux.h' : '', e.config ? '.config' : ''].filter(Boolean).join(',') || '-',
        e.kind === 'btf-only' ? `${e.source} (vmlinux.h only: no header archive)` : e.source,
      ]);
    }
    io.stdout.write(table(rows));
    const cur = entries.find((e) => e.current);
    if (cur && cur.runningKernel !== 'yes') {
      io.stdout.write(
        `\ncurrent is ${cur.release} (sha256 ${cur.digest.slice(0, 12)}), ${cur.runningKernel === 'no' ? 'NOT the running kernel' : 'not known to be the running kernel'}: ${cur.runningKernelNote ?? ''}.\n` +
          `Tools on this machine that read \`current\` get these headers, not the running kernel's (${live.release}).\n`,
      );
    } else if (!cur) {
      io.stdout.write(`\nno entry is current: the running kernel (${live.release}) is not cached\n`);
    }
  }
  if (damaged.length > 0) {
    io.stdout.write(`\ndamaged (not served; \`kheadersd ingest\` or a serve start moves them to quarantine and rebuilds them):\n`);
    for (const d of damaged) io.stdout.write(`  ${d.id}: ${damageOf(d.error).reason}\n`);
  }
  if (quarantined.length > 0) {
    const rebuilt = new Set(manifests.map((m) => m.id));
    io.stdout.write(`\nquarantined (in ${store.dir}/quarantine, newest first):\n`);
    for (const q of quarantined) {
      io.stdout.write(`  ${q.at.replace(/\.\d+Z$/, 'Z')}  ${q.id}: ${q.reason}${rebuilt.has(q.id) ? ' (rebuilt since)' : ''}\n`);
    }
  }
}

/**
 * A read found an entry damaged: repair it now if this process may write the cache (the error
 * then says so), else say who can. The read still fails: what was asked was not delivered.
 */
async function failDamaged(cfg: Config, io: CommandIO, err: KheadersError, entry: CacheEntry | undefined): Promise<never> {
  const known: KnownDamage[] = [];
  if (entry) known.push({ id: entry.manifest.id, ingestedAt: entry.manifest.ingestedAt, ...damageOf(err) });
  let outcome: string;
  try {
    await entry?.reader.close();
    const report = await healWithConfig(cfg, io, known);
    const id = typeof err.details['id'] === 'string' ? err.details['id'] : (entry?.manifest.id ?? '');
    const unrepaired = report.unrepaired.find((u) => u.id === id);
    outcome = report.rebuilt.includes(id)
      ? 'it was moved to quarantine and rebuilt from its own archive: run the command again'
      : unrepaired
        ? `it was moved to quarantine; it could not be rebuilt from its own archive (${unrepaired.why}): \`kheadersd ingest\` builds the running kernel's again`
        : 'it was moved to quarantine';
  } catch (healErr) {
    outcome = `it could not be repaired by this process (${healErr instanceof Error ? healErr.message : String(healErr)}): a serve start or \`sudo kheadersd ingest\` repairs it`;
  }
  throw new KheadersError('E_ENTRY_DAMAGED', `${err.message}; ${outcome}`, err.details, { cause: err });
}

/** Write all of `buf`, or fail: `cat` must not end with success after a short write. */
function writeAll(out: NodeJS.WritableStream, buf: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    out.write(buf, (err) => (err ? reject(err) : resolve()));
  });
}

/** A write to stdout failed: EPIPE stays itself (a reader that stopped early); anything else is E_IO. */
function outputFailure(err: unknown): unknown {
  const code = errnoOf(err);
  if (code === 'EPIPE' || code === undefined) return err;
  return new KheadersError('E_IO', `could not write the whole file to the output (${code})`, { errno: code }, { cause: err });
}

const CAT_PIECE_BYTES = 1024 * 1024;

export async function cmdCat(cfg: Config, io: CommandIO, ref: string, file: string): Promise<void> {
  const store = await CacheStore.open(cfg.cacheDir);
  const manifest = (await store.snapshot()).resolve(ref);
  const rel = userPath(file);
  let opened: Awaited<ReturnType<CacheStore['lazy']>> | undefined;
  // stdout errors arrive as events too (a file on a full disk): without a listener they would crash.
  let outputError: unknown;
  const onError = (err: unknown): void => {
    outputError ??= err;
  };
  io.stdout.on('error', onError);
  try {
    // Only the records on this path are read from the index (a 200,000-entry index stays on disk).
    opened = await store.lazy(manifest.id);
    const { entry } = opened;
    const id = entry.index.resolveId(rel);
    const where = `${manifest.release} (${manifest.digest.slice(0, 12)})`;
    if (id < 0) throw new KheadersError('E_NOT_FOUND', `${file}: no such file in ${where}`, { path: file });
    if (entry.index.kindOf(id) !== 'file') throw new KheadersError('E_USAGE', `${file.replace(/\/+$/, '')} is a directory`, { path: file });
    // Like the kernel: a trailing slash asks for a directory, and a file is not one.
    if (file.endsWith('/')) throw new KheadersError('E_NOT_FOUND', `${file}: not a directory (${rel} is a file in ${where})`, { path: file });
    const size = entry.index.sizeOf(id);
    for (let at = 0; at < size; at += CAT_PIECE_BYTES) {
      const piece = await entry.reader.read(id, at, CAT_PIECE_BYTES);
      await writeAll(io.stdout, piece).catch((err: unknown) => {
        throw outputFailure(err);
      });
    }
    if (outputError !== undefined) throw outputFailure(outputError);
  } catch (err) {
    if (err instanceof IndexFormatError || err instanceof RangeError) {
      const reason = `index.bin: ${err.message}`;
      return failDamaged(cfg, io, new KheadersError('E_ENTRY_DAMAGED', `cache entry ${manifest.id} is damaged: ${reason}`, { id: manifest.id, reason, file: 'index.bin' }), opened?.entry);
    }
    if (isDamage(err)) return failDamaged(cfg, io, err, opened?.entry);
    throw err;
  } finally {
    io.stdout.off('error', onError);
    await opened?.close();
  }
}

/** A path the user typed: one inside the tree, or a usage error (not a bad archive). */
function userPath(file: string): string {
  try {
    return normaliseEntryPath(file);
  } catch {
    throw new KheadersError('E_USAGE', `${JSON.stringify(file)} is not a path inside the header tree (no "..", not absolute)`, { path: file });
  }
}

export async function cmdExport(cfg: Config, io: CommandIO, ref: string, dir: string): Promise<void> {
  const store = await CacheStore.open(cfg.cacheDir);
  const manifest = (await store.snapshot()).resolve(ref);
  let entry: CacheEntry | undefined;
  let result;
  try {
    entry = await store.load(manifest.id);
    // Imported here: `serve` loads this module for its ingest, and never exports.
    const { exportEntry } = await import('../store/export.js');
    result = await exportEntry(entry, dir);
  } catch (err) {
    if (isDamage(err)) return failDamaged(cfg, io, err, entry);
    throw err;
  } finally {
    await entry?.reader.close();
  }
  io.stderr.write(`exported ${entry.manifest.release}: ${result.files} files, ${result.dirs} directories, ${result.symlinks} symlinks to ${result.dir}\n`);
  io.stderr.write(`use it with: export BCC_KERNEL_SOURCE=${result.dir} BPFTRACE_KERNEL_SOURCE=${result.dir}\n`);
}

export async function cmdGc(cfg: Config, io: CommandIO, json: boolean): Promise<void> {
  const store = await CacheStore.open(cfg.cacheDir, { write: true, lockTimeoutMs: cfg.lockTimeout * 1000 });
  const { swept, evicted } = await store.locked(async () => {
    await store.pruneQuarantine();
    return {
      swept: await store.sweepTmp(),
      evicted: await store.gc({ keep: cfg.keep, ...(cfg.maxCacheBytes !== undefined ? { maxBytes: cfg.maxCacheBytes } : {}) }),
    };
  });
  if (json) io.stdout.write(JSON.stringify({ evicted, swept }) + '\n');
  else io.stderr.write(evicted.length ? `evicted ${evicted.length}: ${evicted.join(', ')}\n` : 'nothing to evict\n');
}
