/**
 * Ingest: archive bytes in, one immutable cache entry out, in a single streaming pass.
 *
 *   archive (in memory) ─┬─ sha256 ─ already cached? → done, no work
 *                        ├─ archive.tar.xz (kept for clients that want the whole archive)
 *                        └─ xz decoder ─ pack.tar ─ TarIndexer (checks, limits, offsets, chunk sha256) ─ TreeBuilder ─ index.bin
 *                                                   (the tree is drafted record by record while xz still decodes)
 *   BTF (if any) ─ worker thread ─ vmlinux.h (in parallel with the above)
 *   then: vmlinux.h and .config kept only if they belong to this kernel (extras.ts)
 *
 * Everything is built in <cache>/tmp/, fsynced, and renamed into entries/ in one step while the
 * cache lock is held: a crash leaves no entry or a whole one, and a failure of any kind leaves
 * the earlier entries exactly as they were. A failure also leaves nothing running and nothing
 * open (a deleted file still open keeps its space: a daemon that failed once on a full disk
 * would keep the disk full), and tmp/ empty. A kernel with BTF but no header archive gets an
 * entry holding only vmlinux.h.
 */
import { createHash } from 'node:crypto';
import { access, chmod, lstat, mkdtemp, open, readdir, rename, rm, type FileHandle } from 'node:fs/promises';
import os from 'node:os';
import { Readable } from 'node:stream';
import path from 'node:path';
import { KheadersError, diskFullErrno, errnoOf, isKheadersError } from '../errors.js';
import { recallArchive, rememberArchive, rememberedArchive, type RememberedArchive } from './source-memo.js';
import { warmLogger, type Logger } from '../log.js';
import { identifyArchive, locateArchive, readableElsewhere, releaseBytes, type ArchiveOrigin, type ArchiveSource, type ModuleFileInfo } from '../source/locate.js';
import { xzUncompressedSize } from '../source/xz.js';
import { CacheStore, entryId, fsyncDir, validRelease } from './cache.js';
import type { Decoder, DecoderChoice, DecoderName, DecoderPlan, FileDecoder } from './decompress.js';
import type { PackWriter } from './pack-writer.js';
import { ARCHIVE_FILE, CONFIG_FILE, CONFIG_PATH, ENTRY_FORMAT, INDEX_FILE, MANIFEST_FILE, PACK_FILE, type CacheEntry, type Manifest } from './entry.js';
import { damageOf, isDamage } from './entry-load.js';
// Only a build decodes, writes a pack or reads the kernel's BTF and config: decompress.js,
// pack-writer.js and extras.js (with the BTF parser) are imported when one starts, not at every
// daemon start that finds its entry cached.
import type { ConfigPaths, EntryFacts, Note } from './extras.js';
import { sha256OfFile, type LiveKernel } from './kernel-match.js';
import { readLiveBuildId } from '../source/notes.js';
import { DIGEST_BYTES } from './index-format.js';
import { DEFAULT_LIMITS, TarIndexer, type IngestLimits } from './tar-indexer.js';
import { ofRunningKernel } from './resolve.js';
import { TreeBuilder, TreeIndex, type IndexRecord } from './tree-index.js';
import { LIVE_BTF, VMLINUX_H, btfSource, provideVmlinuxH, type BtfSource } from './vmlinux-h.js';

const UTSRELEASE_H = 'include/generated/utsrelease.h';
const PROGRESS_INTERVAL_MS = 500;
/** How much more of the pack is decoded before the next flush while decoding (see buildHeadersEntry). */
const PACK_SYNC_STEP_BYTES = 4 * 1024 * 1024;
/**
 * How long the xz child may write nothing, without exiting, before it is taken for hung and
 * killed. A working xz writes every few KiB it decodes, with its whole input already piped to
 * it: a minute of silence is a broken or stopped binary, not a slow one.
 */
const DECODER_STALL_MS = 60_000;

export interface IngestProgress {
  bytes: number;
  /** Uncompressed size from the xz index, when readable. */
  total: number | undefined;
  entries: number;
  percent: number | undefined;
}

export interface IngestOptions {
  cacheDir: string;
  /**
   * The cache at `cacheDir`, already open for writing (the daemon's): entries it has loaded are
   * used as they are, not read and validated again. Default: open it.
   */
  store?: CacheStore;
  /** A file instead of the running kernel's archive (.tar.xz, kheaders.ko, vmlinux, kheaders.o). */
  archive?: string;
  /** The release of an archive that does not name one (and overrides the one it names). */
  release?: string;
  modprobe?: boolean;
  unloadModule?: boolean;
  /** Where to look for kheaders.ko (the moduleDirs setting; default: the built-in places). */
  moduleDirs?: readonly string[];
  limits?: Partial<IngestLimits>;
  decoder?: DecoderChoice;
  /**
   * BTF to make vmlinux.h from: a file, 'off', or 'auto' (default): the running kernel's
   * /sys/kernel/btf/vmlinux when the entry is the running kernel's.
   */
  btf?: string;
  /**
   * What the manifest records as the archive's origin, when the file read is only a carrier
   * (pull downloads into a temp file that is gone afterwards: the URL is what tells where it came from).
   */
  sourceLabel?: string;
  /** 'off': no .config in the entry (pull: the device's comes from the device, not this machine). Default 'auto'. */
  config?: 'auto' | 'off';
  /** Where `archive`, `release` and `btf` were set (`--btf`, `KHEADERSD_BTF`, a config file's key), for messages. */
  origins?: Partial<Record<'archive' | 'release' | 'btf', string>>;
  /**
   * The archive, already being found and hashed by locateForIngest() with these same options
   * (serve starts it early, so the reading overlaps the cache's check); its errors are ingest's
   * own. Default: found and hashed here.
   */
  located?: Promise<LocatedArchive>;
  /** Make this entry `current`. Default: when it is the running kernel's (live, or same release). */
  setCurrent?: boolean;
  /** Eviction after a successful ingest. */
  keep?: number;
  maxCacheBytes?: number;
  lockTimeoutMs?: number;
  /** How long the xz child may write nothing before it is killed as hung (default 60 s). */
  decoderStallMs?: number;
  log?: Logger;
  onProgress?: (p: IngestProgress) => void;
  /**
   * Called, with the lock released, instead of building an entry that is not cached yet (`serve`
   * builds it in a short-lived process of its own, so the daemon never holds the decode buffers).
   * The ingest then looks again, and builds here only if the entry is still missing.
   */
  buildElsewhere?: () => Promise<void>;
  /**
   * With buildElsewhere: the build elsewhere can follow a decode this process starts (serve's
   * ingest process, told over its channel). When the entry is missing and the decoder is the xz
   * binary, xz is started here, under the lock, into a staging in tmp/, from the bytes just
   * hashed, and this is called, still under the lock, to build from it; it resolves true once
   * the entry is committed, false when nothing could build it (no process could be started:
   * the decode is stopped and the entry built as buildElsewhere's fallback builds it). The
   * process it starts must not lock the cache: see StagedBuild.
   */
  buildStaged?: (staged: StagedBuild) => Promise<boolean>;
  /** Build from a staging another process made and decodes into, under the lock it holds for this one (StagedBuild). */
  staged?: StagedBuild;
  /**
   * Called when the archive is about to be read because this cache holds no digest for its
   * source (one it has not read before: almost always a new kernel's, to build), so that a
   * caller that builds elsewhere can get that ready meanwhile. Not called for a source that
   * cannot be identified (read at every start) nor when its digest is recalled.
   */
  willRead?: () => void;
  /**
   * Stops a build here at its next step (serve stopping): the decoder is killed at once, the
   * staging removed, nothing committed, and the ingest fails with the signal's reason (the cache
   * is as it was). A build that has committed is not undone.
   */
  signal?: AbortSignal;
  /**
   * Another process has looked for the archive already and logged what it found (serve's
   * ingest process: the daemon looked first): the search and a missing archive are not logged again.
   */
  locatedBefore?: boolean;
  /** false: read and hash the archive even when its source is unchanged since it was last read (source-memo.ts). */
  recall?: boolean;
  /** For tests: where the live archive, BTF, build id and configuration are looked for. */
  livePaths?: readonly string[];
  liveBtf?: string;
  notesPath?: string;
  liveConfig?: string;
  bootDir?: string;
}

/** What an ingest was writing when the disk filled up (E_NO_SPACE's details.step). */
export type IngestStep = 'cache' | 'archive' | 'pack' | 'vmlinux.h' | 'config' | 'index' | 'manifest' | 'current';

export interface IngestResult {
  entry: CacheEntry;
  /** True when the digest was already cached and nothing was decoded. */
  reused: boolean;
  evicted: string[];
  decoder: DecoderName | null;
  durationMs: number;
}

/**
 * An archive's source as located: `bytes` is absent when its digest was recalled (source-memo.ts),
 * not read, or when it was read only to be hashed (LocatedArchive.released).
 */
export type LocatedSource = Omit<ArchiveSource, 'bytes'> & { bytes?: Buffer };

/** Whether the archive was read here (its bytes are in memory, to build from), not its digest recalled. */
function wasRead(source: LocatedSource): source is ArchiveSource {
  return source.bytes !== undefined;
}

/** The archive an ingest keys the cache by, and its sha256 (hex). */
export interface LocatedArchive {
  source: LocatedSource;
  digest: string;
  /** Its uncompressed size as its xz index states it (undefined when it states none). */
  total: number | undefined;
  /** What to record for a source that was read, once the cache is open: its identity's key and facts. */
  remember?: { key: string; what: RememberedArchive };
  /**
   * Read and hashed, then its bytes given back (a caller that builds elsewhere needs only its
   * digest): a build in this process after all reads it again.
   */
  released?: boolean;
  /**
   * Read, and no other process could read it again (readableElsewhere: a FIFO, a pipe,
   * /dev/stdin): built here from its bytes, even by a caller that builds elsewhere.
   */
  onlyHere?: boolean;
}

/**
 * A build handed from the process that holds the cache lock (serve's daemon) to the process that
 * builds (its ingest process), its decode already started.
 *
 * Why the daemon holds the lock for the builder, rather than the builder taking it: the staging
 * is made under the lock, and tmp/ is swept wholesale by whoever takes the lock next (leftovers
 * of a crash). Were the lock released between the lookup and the build, another kheadersd (or
 * this daemon's next SIGHUP) could sweep the staging from under xz; a sweep that spared live
 * builders' stagings would have to trust pids in names, and their reuse. Held by the daemon from
 * the lookup to its own look at the built entry, the lock covers the whole build in one owner,
 * and stays what it was: the builder neither locks nor sweeps (it runs only while the daemon
 * waits on it, and dies with it), and a daemon killed mid-build leaves a lock naming a dead pid,
 * broken as stale by the next start, whose sweep removes the staging.
 */
export interface StagedBuild {
  /** The staging directory (tmp/ingest-<daemon's pid>-…) holding the pack xz writes. */
  tmp: string;
  /** The sha256 of the archive bytes xz decodes: the builder's own read must have the same. */
  digest: string;
  /** The decoder writing `tmp`'s pack; its end is the pack's. */
  decoder: FileDecoder;
}

/**
 * Find the archive ingest() would use (the same options) and hash it; or, when its source is the
 * same as when the cache last read it (identifyArchive), recall the digest instead of reading.
 */
export async function locateForIngest(opts: IngestOptions): Promise<LocatedArchive> {
  const limits: IngestLimits = { ...DEFAULT_LIMITS, ...opts.limits };
  const where = {
    ...(opts.archive !== undefined ? { archive: opts.archive } : {}),
    ...(opts.origins?.archive !== undefined ? { archiveOrigin: opts.origins.archive } : {}),
    modprobe: opts.modprobe ?? true,
    unloadModule: opts.unloadModule ?? true,
    maxArchiveBytes: limits.maxTotalBytes,
    ...(opts.moduleDirs ? { moduleDirs: opts.moduleDirs } : {}),
    ...(opts.log && !opts.locatedBefore ? { log: opts.log } : {}),
    ...(opts.livePaths ? { livePaths: opts.livePaths } : {}),
    ...(opts.notesPath !== undefined ? { notesPath: opts.notesPath } : {}),
  };
  // Not for a carrier file (pull's download: a temp file, gone afterwards).
  const identity = opts.sourceLabel === undefined ? await identifyArchive(where).catch(() => undefined) : undefined;
  if (identity && opts.recall !== false) {
    const known = await recallArchive(opts.cacheDir, identity.key);
    if (known) {
      const { digest, total, ...source } = known;
      opts.log?.debug({ source: source.source, digest }, 'archive source unchanged since its digest was recorded: not read again');
      return { source, digest, total: total ?? undefined };
    }
  }
  // A given archive another process cannot read again (a FIFO, a pipe, /dev/stdin) is built here,
  // from the bytes read now: an ingest process reading it again would wait for good on a FIFO
  // written once, or read its own stdin (/dev/null). This daemon then holds the decode buffers
  // after the build, as it did before there was a child: the price of a rare way to start.
  const onlyHere = opts.buildElsewhere !== undefined && opts.archive !== undefined && !(await readableElsewhere(opts.archive));
  if (identity && !onlyHere) opts.willRead?.();
  // Built in another process (serve's ingest process), the archive is read here only for its
  // digest and size: its memory is given back once they are taken, not at V8's next full
  // collection, which an idle daemon may not run for many seconds (it idled 4 MiB heavier
  // after a first boot's ingest than after a cached start, the archive it had only hashed).
  const hashOnly = opts.buildElsewhere !== undefined && !onlyHere;
  let source: LocatedSource = await locateArchive({ ...where, releasable: hashOnly });
  if (opts.sourceLabel !== undefined) source = { ...source, source: opts.sourceLabel };
  const bytes = source.bytes!;
  const digest = createHash('sha256').update(bytes).digest('hex');
  const total = xzUncompressedSize(bytes);
  // Nothing else holds these bytes, and no read of them is under way: the hash and the size are
  // synchronous. Bytes that could not be given back (a FIFO's, a pipe's: no second read gives
  // them again, and one of a FIFO waits for a writer for good) are kept, for a build here after all.
  // Kept, when this process may start the decode itself (buildStaged): xz is fed these very bytes,
  // and they are given back as soon as it has taken them, or at the lookup if nothing is built.
  const released = hashOnly && opts.buildStaged === undefined && releaseBytes(bytes);
  if (released) delete source.bytes;
  // Recorded only if what was read is the identified source, unchanged while it was read.
  let remember: LocatedArchive['remember'];
  if (identity?.settled && identity.sources.includes(source.source) && (await identifyArchive(where).catch(() => undefined))?.key === identity.key) {
    remember = { key: identity.key, what: rememberedArchive({ ...source, digest, total: total ?? null }) };
  }
  return { source, digest, total, ...(remember ? { remember } : {}), ...(released ? { released: true } : {}), ...(onlyHere ? { onlyHere: true } : {}) };
}

export async function ingest(opts: IngestOptions): Promise<IngestResult> {
  const started = performance.now();
  const limits: IngestLimits = { ...DEFAULT_LIMITS, ...opts.limits };
  if (opts.release !== undefined && !validRelease(opts.release)) {
    throw new KheadersError('E_USAGE', `--release ${JSON.stringify(opts.release)} is not a valid kernel release (letters, digits, ".", "_", "+", "-")`);
  }
  let located: LocatedArchive;
  try {
    located = await (opts.located ?? locateForIngest(opts));
  } catch (err) {
    // A staged build was asked for this archive: no other entry is built instead (and none of
    // the fallbacks below may lock the cache, whose lock the asking process holds for this one).
    if (opts.staged) throw err;
    const noLiveArchive = opts.archive === undefined && isKheadersError(err, 'E_ARCHIVE_NOT_FOUND');
    // No header archive now (the module is gone, or cannot be loaded), but this kernel's headers
    // were cached on an earlier boot: they are still its headers.
    const cached = noLiveArchive ? await reuseRunningKernelEntry(opts, err, started) : undefined;
    if (cached) return cached;
    // No header archive, but the kernel has BTF: an entry with vmlinux.h alone is still useful.
    const btf = noLiveArchive ? await chooseBtf(opts, true) : undefined;
    if (!btf) throw err;
    if (!opts.locatedBefore) opts.log?.warn({ btf: btf.path }, `no header archive for this kernel (CONFIG_IKHEADERS): caching vmlinux.h generated from BTF only. ${(err as Error).message.split('\n')[1] ?? ''}`);
    return ingestBtfOnly(opts, btf, await liveKernel(opts, btf, null), started);
  }

  const { source, digest, total } = located;
  if (opts.staged && digest !== opts.staged.digest) {
    // The staging's pack is the decode of the bytes the asking process read; these are what the
    // entry would keep and be keyed by. Different bytes: the archive changed between the two reads.
    throw new KheadersError(
      'E_ARCHIVE_CHANGED',
      `the archive ${source.source} changed while it was being ingested (its sha256 was ${opts.staged.digest} when the daemon read it, ${digest} when the ingest process read it again): nothing was cached; the next start ingests it as it is then`,
      { source: source.source, digestBefore: opts.staged.digest, digestAfter: digest },
    );
  }
  if (total !== undefined && total > limits.maxTotalBytes) {
    throw new KheadersError('E_LIMIT', `the archive would expand to ${total} bytes, over the limit of ${limits.maxTotalBytes} (--max-total-bytes)`, {
      limit: 'maxTotalBytes',
      value: limits.maxTotalBytes,
    });
  }
  const locatedMs = Math.round(performance.now() - started);
  const namedRelease = opts.release ?? source.release;
  // A --btf that names no file is a mistake even when nothing is built; the BTF itself is read
  // (and the running kernel's hashed) only for a build: a cache hit needs neither.
  await givenBtfExists(opts);
  const store = await openStore(opts);

  // `elsewhere`: undefined builds here; 'ask' returns undefined instead; 'built' looks after it was.
  // A staged build runs under the lock its asking process holds for it (StagedBuild): it neither
  // takes the lock nor sweeps tmp/ (its own staging is there).
  const underLock = <T>(fn: () => Promise<T>): Promise<T> =>
    opts.staged
      ? fn()
      : store.locked(async () => {
          await sweep(store, opts.log);
          return fn();
        }, opts.signal);
  // The bytes hashed for a build elsewhere that this process may decode itself (buildStaged):
  // given back as soon as no decode here needs them, as locateForIngest gives them back otherwise.
  const giveBack = (): void => {
    if (opts.buildStaged === undefined || located.onlyHere === true || !wasRead(source)) return;
    if (releaseBytes(source.bytes)) {
      delete (source as LocatedSource).bytes;
      located.released = true;
    }
  };
  // `elsewhere`: undefined builds here; 'ask' returns undefined instead (or has it built from a
  // decode started here: buildStaged); 'built' looks after it was.
  const lookOrBuild = (elsewhere?: 'ask' | 'built'): Promise<IngestResult | undefined> => inStep('cache', underLock(async () => {
    const manifests = await store.list();
    const found = store.findByDigest(manifests, digest, namedRelease);
    const existing = found && (await usableEntry(store, found.id, opts.log));
    opts.log?.debug({ locatedMs, lockedMs: Math.round(performance.now() - started) }, opts.staged ? 'archive located, cache locked (by the daemon, for this process)' : 'archive located, cache locked');
    let entry: CacheEntry;
    let decoder: DecoderName | null = null;
    if (existing) {
      entry = existing;
      if (elsewhere !== 'built') opts.log?.info({ id: existing.manifest.id }, 'archive already cached: nothing to do');
    } else if (elsewhere === 'ask' && opts.buildStaged !== undefined && wasRead(source) && (await decodeForBuilder(store, source.bytes, digest, limits, opts, giveBack))) {
      // Built by the other process from the decode started here, all under this lock: looked up as it left it.
      const built = store.findByDigest(await store.list(), digest, namedRelease);
      const loaded = built && (await usableEntry(store, built.id, opts.log));
      if (!loaded) throw new KheadersError('E_INTERNAL', `the ingest process reported its entry committed, but the cache holds no usable entry for the archive's digest ${digest}`, { digest });
      entry = loaded;
      decoder = 'xz';
    } else if (elsewhere === 'ask' || !wasRead(source)) {
      return undefined;
    } else {
      // Decoding starts first: the BTF and the running kernel's facts are looked up while xz runs.
      const kernel = async (): Promise<KernelFacts> => {
        const btf = await chooseBtf(opts, source.live || namedRelease === os.release());
        return { btf, live: await liveKernel(opts, btf, source.live ? source.buildId : null) };
      };
      const built = await buildHeadersEntry(store, source, digest, namedRelease, total, limits, kernel, opts);
      entry = built.entry;
      decoder = built.decoder;
    }
    const makeCurrent = opts.setCurrent ?? (source.live || entry.manifest.release === os.release());
    const evicted = await finish(store, entry, makeCurrent, existing !== undefined, opts);
    return { entry, reused: existing !== undefined, evicted, decoder, durationMs: Math.round(performance.now() - started) };
  }));
  const recalled = !wasRead(source) && located.released !== true;
  const elsewhere = opts.buildElsewhere !== undefined && located.onlyHere !== true;
  const asked = await lookOrBuild(elsewhere || !wasRead(source) ? 'ask' : undefined).finally(giveBack);
  const result = asked ?? (recalled ? undefined : await builtElsewhere(opts, lookOrBuild));
  // A recalled digest whose entry is gone (evicted, damaged): read the archive after all, and build.
  if (!result) return ingest({ ...opts, located: locateForIngest({ ...opts, recall: false }) });
  // Only once the ingest has succeeded: one that fails leaves the cache as it was.
  if (located.remember) {
    await rememberArchive(store.dir, located.remember.key, located.remember.what).catch((err: unknown) =>
      opts.log?.warn({ errno: errnoOf(err) }, `cannot record the archive's digest for the next start (it will read the archive again): ${(err as Error).message}`),
    );
  }
  return result;
}

/** The entry is not cached: opts.buildElsewhere builds it, then it is looked up (and made current) here. */
async function builtElsewhere(opts: IngestOptions, lookOrBuild: (elsewhere?: 'ask' | 'built') => Promise<IngestResult | undefined>): Promise<IngestResult> {
  await opts.buildElsewhere!();
  // Still missing (no process could be started to build it): built here, from the archive read
  // again if its bytes were given back after hashing.
  const here: IngestOptions = { ...opts, recall: false };
  delete here.buildElsewhere;
  delete here.willRead;
  delete here.located;
  const result = (await lookOrBuild('built')) ?? (await ingest(here));
  return { ...result, reused: false };
}

/**
 * The entry is missing, and its build is for another process (buildStaged): start xz here on
 * `input`, the bytes whose digest keys the entry, into a staging in tmp/, and have that process
 * build from it, while this one holds the lock. False when the decoder is not the xz binary
 * (lzma-native decodes in the builder's own process, from its own read, as before) or nothing
 * could build (no process could be started): nothing is left running or staged then. `giveBack`
 * is called once xz has taken all of `input`.
 *
 * xz is fed through a pipe from this process, never from a file: if this process is killed, xz
 * reads the end of its input, and the builder, which dies with its channel, kills it first (it
 * would otherwise decode on what the pipe holds: remote-decoder.ts, DecoderIdentity).
 */
async function decodeForBuilder(store: CacheStore, input: Buffer, digest: string, limits: IngestLimits, opts: IngestOptions, giveBack: () => void): Promise<boolean> {
  const { planDecoder } = await import('./decompress.js');
  const plan = await planDecoder(opts.decoder ?? 'auto');
  if (!('xz' in plan)) return false;
  opts.signal?.throwIfAborted();
  const { tmp, decoder } = await stageDecode(store, input, plan, limits.maxTotalBytes, giveBack);
  opts.log?.debug({ tmp: path.basename(tmp) }, 'xz started in the daemon, for the ingest process to build from');
  // A stop kills xz here; the builder is killed by the same stop (ingest-process.ts).
  const stop = (): void => decoder.abort();
  opts.signal?.addEventListener('abort', stop, { once: true });
  if (opts.signal?.aborted) stop();
  try {
    return await opts.buildStaged!({ tmp, digest, decoder });
  } finally {
    opts.signal?.removeEventListener('abort', stop);
    // The builder failed, died or never started: xz is killed and waited for before that is
    // told, so nothing still writes in tmp/, and the staging goes. A committed build moved it
    // into entries/ (nothing left to remove) once its xz had exited (the builder waited for it:
    // a kill then is a no-op); one that committed nothing from it leaves nothing behind either.
    decoder.abort();
    await decoder.done.catch(() => {});
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
  }
}

/**
 * Make a staging directory in tmp/ and start decoding `input` into its pack with the xz `plan`,
 * for a build in another process (decodeForBuilder). This process keeps no handle on the pack:
 * xz holds its own.
 */
async function stageDecode(store: CacheStore, input: Buffer, plan: DecoderPlan, maxBytes: number, onInputTaken: () => void): Promise<{ tmp: string; decoder: FileDecoder }> {
  const tmp = await mkdtemp(path.join(store.tmpDir, `ingest-${process.pid}-`));
  try {
    const { packFh, decoding } = await startStagedDecode(tmp, input, plan, maxBytes, onInputTaken);
    await packFh.close();
    if (!('intoFile' in decoding)) throw new Error('an xz plan decodes into the file'); // startDecoder's contract
    return { tmp, decoder: decoding.intoFile };
  } catch (err) {
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
    throw err;
  }
}

/**
 * Open the pack in the staging `tmp` and start the decoder of `plan` on `input`: xz writes into
 * it itself, lzma-native is a stream for the caller to write. The pack's handle is the caller's
 * once this returns (closed here if the decoder does not start).
 */
async function startStagedDecode(
  tmp: string,
  input: Buffer,
  plan: DecoderPlan,
  maxBytes: number,
  onInputTaken?: () => void,
): Promise<{ packFh: FileHandle; decoding: { intoFile: FileDecoder } | { stream: Decoder } }> {
  const { startDecoder } = await import('./decompress.js');
  // O_APPEND ('a+'): xz writes this file as its stdout, and a write without it lands at xz's own
  // offset even after another process truncates the file, leaving a hole of zeros the reader
  // would hash, at the right final size. Appending, a truncation shrinks the pack, and its size
  // no longer matches the archive's index (refused by the build). Reads are at explicit offsets.
  const packFh = await open(path.join(tmp, PACK_FILE), 'a+', 0o644);
  try {
    return { packFh, decoding: await startDecoder(input, plan, { file: packFh, maxBytes }, onInputTaken) };
  } catch (err) {
    await packFh.close().catch(() => {});
    throw err;
  }
}

/**
 * What is known about the running kernel, for deciding what belongs to it: its build id (already
 * read with a live archive) and the digest of its BTF (already computed when that is the BTF
 * chosen). Only a BTF judged for this entry is compared with the running kernel's (judgeBtf):
 * without one, the running kernel's BTF is not read, and its digest is given as null.
 */
async function liveKernel(opts: IngestOptions, btf: BtfSource | undefined, buildId: string | null): Promise<LiveKernel> {
  const liveBtf = opts.liveBtf ?? LIVE_BTF;
  return {
    release: os.release(),
    buildId: buildId ?? (await readLiveBuildId(opts.notesPath)),
    btfDigest: btf === undefined ? null : btf.path === liveBtf ? btf.digest : await sha256OfFile(liveBtf),
  };
}

/** E_NOT_FOUND when --btf names a file that is not there (see chooseBtf). */
async function givenBtfExists(opts: IngestOptions): Promise<void> {
  if (!btfGiven(opts)) return;
  await access(opts.btf!).catch(() => {
    throw new KheadersError('E_NOT_FOUND', `${opts.origins?.btf ?? '--btf'}: no BTF file at ${opts.btf}`, { btf: opts.btf });
  });
}

function configPaths(opts: IngestOptions): ConfigPaths {
  return { ...(opts.liveConfig !== undefined ? { liveConfig: opts.liveConfig } : {}), ...(opts.bootDir !== undefined ? { bootDir: opts.bootDir } : {}) };
}

/** Whether the BTF was named by hand (--btf FILE), rather than the running kernel's chosen by `auto`. */
function btfGiven(opts: IngestOptions): boolean {
  return opts.btf !== undefined && opts.btf !== 'auto' && opts.btf !== 'off';
}

/**
 * vmlinux.h and .config for a built entry (in `tmp`), each kept only if it belongs to the entry's
 * kernel: their index records, the manifest fields, and the notes to log and record.
 */
async function addExtras(
  tmp: string,
  facts: EntryFacts,
  btf: BtfSource | undefined,
  made: { bytes: number; sha256: string } | null,
  live: LiveKernel,
  opts: IngestOptions,
): Promise<{ records: IndexRecord[]; btf: Manifest['btf']; config: NonNullable<Manifest['config']> | null; notes: string[] }> {
  const now = Math.floor(Date.now() / 1000);
  const records: IndexRecord[] = [];
  const notes: Note[] = [];
  let btfField: Manifest['btf'] = null;
  if (btf && made) {
    const { judgeBtf } = await import('./extras.js');
    const verdict = judgeBtf(btf, btfGiven(opts), facts, live);
    notes.push(...verdict.notes);
    if (verdict.keep) {
      records.push({ path: VMLINUX_H, kind: 'file', mode: 0o644, mtime: now, size: made.bytes, blob: VMLINUX_H, sha256: made.sha256 });
      btfField = { digest: btf.digest, bytes: made.bytes, source: btf.path };
    } else {
      await rm(path.join(tmp, VMLINUX_H), { force: true });
    }
  }
  const chosen = opts.config === 'off' ? { config: undefined, notes: [] } : await (await import('./extras.js')).chooseConfig(facts, live, configPaths(opts));
  notes.push(...chosen.notes);
  let config: NonNullable<Manifest['config']> | null = null;
  if (chosen.config) {
    const text = chosen.config.text;
    const fh = await open(path.join(tmp, CONFIG_FILE), 'w', 0o644);
    try {
      await inStep('config', fh.writeFile(text));
      await inStep('config', fh.sync());
    } finally {
      await fh.close();
    }
    const sha256 = createHash('sha256').update(text).digest('hex');
    records.push({ path: CONFIG_PATH, kind: 'file', mode: 0o644, mtime: now, size: text.length, blob: CONFIG_FILE, sha256 });
    config = { source: chosen.config.source, bytes: text.length, sha256 };
  }
  for (const note of notes) opts.log?.[note.warn ? 'warn' : 'info']({ release: facts.release }, note.text);
  return { records, btf: btfField, config, notes: notes.map((n) => n.text) };
}

/** What a damaged entry kept that lets it be built again. */
export interface RebuildSource {
  /** The entry's archive.tar.xz, already checked against `digest`. */
  archive: Buffer;
  release: string;
  digest: string;
  /** The original manifest's source and build id, when it could still be read. */
  source: string;
  buildId: string | null;
  /** The BTF digest its vmlinux.h was made from: null if it had none, undefined if unknown. */
  btfDigest: string | null | undefined;
  /** The BTF file it was made from, when the manifest recorded it. */
  btfSource?: string;
  /** How the archive was first obtained and from which module file, when the manifest recorded it. */
  obtained?: ArchiveOrigin;
  module?: ModuleFileInfo;
}

/**
 * Build an entry again from its own archive (heal.ts): the same decode, checks and digests as a
 * first ingest. vmlinux.h comes back when a BTF with the digest the entry recorded is at hand
 * (the file it was made from, --btf, or the running kernel's own), and passes the same checks
 * as at ingest; when that digest is unknown, as a fresh ingest with this configuration would
 * choose. Call while holding the lock.
 */
export async function rebuildEntry(store: CacheStore, from: RebuildSource, opts: IngestOptions): Promise<CacheEntry> {
  const limits: IngestLimits = { ...DEFAULT_LIMITS, ...opts.limits };
  // What the first ingest recorded of the archive's origin stays true of the same bytes; unknown reads as a file.
  const source: ArchiveSource = { bytes: from.archive, source: from.source, obtained: from.obtained ?? 'file', ...(from.module ? { module: from.module } : {}), live: false, release: from.release, buildId: from.buildId };
  const kernel = async (): Promise<KernelFacts> => {
    const btf = await rebuildBtf(opts, from);
    return { btf, live: await liveKernel(opts, btf, null) };
  };
  const built = await buildHeadersEntry(store, source, from.digest, from.release, xzUncompressedSize(from.archive), limits, kernel, opts);
  return built.entry;
}

async function rebuildBtf(opts: IngestOptions, from: RebuildSource): Promise<BtfSource | undefined> {
  const choice = opts.btf ?? 'auto';
  if (from.btfDigest === undefined) return chooseBtf(opts, from.release === os.release()).catch(() => undefined);
  if (from.btfDigest === null || choice === 'off') return undefined;
  const candidates = [...(from.btfSource !== undefined ? [from.btfSource] : []), ...(choice !== 'auto' ? [choice] : []), ...(from.release === os.release() ? [opts.liveBtf ?? LIVE_BTF] : [])];
  for (const file of candidates) {
    const btf = await btfSource(file).catch(() => undefined);
    if (btf?.digest === from.btfDigest) return btf;
  }
  return undefined;
}

/** The BTF to use: an explicit file (which must exist), or the live one when `live` allows. */
async function chooseBtf(opts: IngestOptions, live: boolean): Promise<BtfSource | undefined> {
  const choice = opts.btf ?? 'auto';
  if (choice === 'off') return undefined;
  if (choice !== 'auto') {
    const btf = await btfSource(choice);
    if (!btf) throw new KheadersError('E_NOT_FOUND', `${opts.origins?.btf ?? '--btf'}: no BTF file at ${choice}`, { btf: choice });
    return btf;
  }
  return live ? btfSource(opts.liveBtf ?? LIVE_BTF) : undefined;
}

async function openStore(opts: IngestOptions): Promise<CacheStore> {
  if (opts.store) return opts.store;
  return CacheStore.open(opts.cacheDir, { write: true, ...(opts.lockTimeoutMs !== undefined ? { lockTimeoutMs: opts.lockTimeoutMs } : {}) });
}

async function sweep(store: CacheStore, log: Logger | undefined): Promise<void> {
  const swept = await store.sweepTmp();
  if (swept.length > 0) log?.warn({ swept }, 'removed leftovers of an interrupted ingest');
}

/** `reused`: the entry was cached already (recorded in `current`, for `ls`). */
async function finish(store: CacheStore, entry: CacheEntry, makeCurrent: boolean, reused: boolean, opts: IngestOptions): Promise<string[]> {
  if (makeCurrent && (await store.currentId()) !== entry.manifest.id) await inStep('current', store.setCurrent(entry.manifest.id, { reused }), entry.manifest.id);
  const evicted = await store.gc({ keep: opts.keep ?? 3, protect: [entry.manifest.id], ...(opts.maxCacheBytes !== undefined ? { maxBytes: opts.maxCacheBytes } : {}) });
  if (evicted.length > 0) opts.log?.info({ evicted }, 'evicted old entries');
  return evicted;
}

/** Every entry that loads (vmlinux.h donors); a damaged one is skipped here, healed elsewhere. */
async function loadAll(store: CacheStore): Promise<CacheEntry[]> {
  const out: CacheEntry[] = [];
  for (const m of await store.list()) {
    const entry = await store.load(m.id).catch((err: unknown) => {
      if (isDamage(err)) return undefined;
      throw err;
    });
    if (entry) out.push(entry);
  }
  return out;
}

/**
 * The cached entry `id` if it passes its checks; a damaged one is quarantined (the caller then
 * builds it afresh). Called under the lock.
 */
async function usableEntry(store: CacheStore, id: string, log: Logger | undefined): Promise<CacheEntry | undefined> {
  try {
    return await store.load(id);
  } catch (err) {
    if (!isDamage(err)) throw err;
    const what = damageOf(err);
    log?.warn({ id, reason: what.reason }, `${err.message}: moving it to quarantine and ingesting it again`);
    await store.quarantine(id, what);
    return undefined;
  }
}

/**
 * The running kernel's headers entry, cached before (same release; its build id, or an unknown
 * one), made current again; undefined when there is none, or when --release names another kernel.
 */
async function reuseRunningKernelEntry(opts: IngestOptions, notFound: KheadersError, started: number): Promise<IngestResult | undefined> {
  const release = os.release();
  if (opts.release !== undefined && opts.release !== release) return undefined;
  const buildId = await readLiveBuildId(opts.notesPath);
  // Look before taking the lock: without a cache (or an entry) there is nothing to reuse, and the
  // caller's "no archive" error is the one to report, not a cache directory that cannot be made.
  const isCached = async (store: CacheStore): Promise<boolean> => ofRunningKernel(await store.list(), release, buildId).some((m) => m.kind === 'headers');
  const cachedBefore = await (opts.store ? Promise.resolve(opts.store) : CacheStore.open(opts.cacheDir)).then(isCached, () => false);
  if (!cachedBefore) return undefined;
  const store = await openStore(opts);
  return store.locked(async () => {
    const cached = ofRunningKernel(await store.list(), release, buildId).find((m) => m.kind === 'headers');
    if (!cached) return undefined;
    await sweep(store, opts.log);
    const entry = await usableEntry(store, cached.id, opts.log);
    if (!entry) return undefined; // damaged: quarantined, and there is nothing else to build it from
    opts.log?.warn(
      { id: cached.id, ingestedAt: cached.ingestedAt, source: cached.source, tried: notFound.details['tried'] },
      'no header archive for the running kernel now: serving its headers cached before (reused, nothing decoded)',
    );
    const evicted = await finish(store, entry, opts.setCurrent ?? true, true, opts);
    return { entry, reused: true, evicted, decoder: null, durationMs: Math.round(performance.now() - started) };
  }, opts.signal);
}

async function ingestBtfOnly(opts: IngestOptions, btf: BtfSource, live: LiveKernel, started: number): Promise<IngestResult> {
  const release = opts.release ?? os.release();
  if (!validRelease(release)) throw new KheadersError('E_INTERNAL', `the running kernel's release ${JSON.stringify(release)} cannot name a cache entry`);
  const store = await openStore(opts);
  const lookOrBuild = (elsewhere?: 'ask' | 'built'): Promise<IngestResult | undefined> => inStep('cache', store.locked(async () => {
    await sweep(store, opts.log);
    const id = entryId(release, btf.digest);
    let entry = (await store.list()).some((m) => m.id === id) ? await usableEntry(store, id, opts.log) : undefined;
    const reused = entry !== undefined;
    if (!entry && elsewhere === 'ask') return undefined;
    if (!entry) {
      const tmp = await mkdtemp(path.join(store.tmpDir, `ingest-${process.pid}-`));
      try {
        const made = await inStep('vmlinux.h', provideVmlinuxH(btf, path.join(tmp, VMLINUX_H), await loadAll(store), opts.signal));
        // The running kernel's entry, unless --release names another (then nothing of the
        // running kernel's goes in but what was given by hand and checked).
        const facts: EntryFacts = { release, live: release === live.release, buildId: release === live.release ? live.buildId : null, files: new Map() };
        const extras = await addExtras(tmp, facts, btf, made, live, opts);
        if (extras.btf === null) throw new KheadersError('E_BTF', `no vmlinux.h for ${release}: ${extras.notes.join('; ')}`, { btf: btf.path });
        const index = TreeIndex.fromRecords(extras.records);
        const manifest = makeManifest({
          id,
          release,
          digest: btf.digest,
          kind: 'btf-only',
          buildId: facts.buildId,
          source: `btf:${btf.path}`,
          obtained: 'btf',
          index,
          packBytes: 0,
          archiveBytes: 0,
          btf: extras.btf,
          live: facts.live,
          config: extras.config,
          notes: extras.notes,
        });
        opts.signal?.throwIfAborted(); // the last step that leaves nothing behind
        entry = await commitEntry(store, tmp, manifest, index, []);
      } catch (err) {
        await rm(tmp, { recursive: true, force: true }).catch(() => {});
        throw err;
      }
    }
    const evicted = await finish(store, entry, opts.setCurrent ?? true, reused, opts);
    return { entry, reused, evicted, decoder: null, durationMs: Math.round(performance.now() - started) };
  }, opts.signal));
  return (await lookOrBuild(opts.buildElsewhere ? 'ask' : undefined)) ?? builtElsewhere(opts, lookOrBuild);
}

/** The BTF to make vmlinux.h from, and what is known of the running kernel (to judge what belongs to it). */
interface KernelFacts {
  btf: BtfSource | undefined;
  live: LiveKernel;
}

async function buildHeadersEntry(
  store: CacheStore,
  source: ArchiveSource,
  digest: string,
  namedRelease: string | undefined,
  total: number | undefined,
  limits: IngestLimits,
  kernel: () => Promise<KernelFacts>,
  opts: IngestOptions,
): Promise<{ entry: CacheEntry; decoder: DecoderName }> {
  const t0 = performance.now();
  const phases: Record<string, number> = {};
  const mark = (name: string): void => {
    phases[name] = Math.round(performance.now() - t0);
  };
  // A staged build's decoder was planned and started by the process that made its staging.
  const staged = opts.staged;
  // Which decoder (an xz on PATH, a shell) is looked up while its output file is made, not after.
  const plan = staged ? undefined : import('./decompress.js').then((m) => m.planDecoder(opts.decoder ?? 'auto'));
  plan?.catch(() => {}); // awaited below; failing first must not be an unhandled rejection
  const tmp = staged?.tmp ?? (await mkdtemp(path.join(store.tmpDir, `ingest-${process.pid}-`)));
  // Everything that holds a file in tmp/ open or may still write there; a failure waits for all
  // of it before tmp/ goes, so nothing is left open (holding the space of deleted files) or recreated.
  const handles: FileHandle[] = [];
  const running: Array<Promise<unknown>> = plan ? [plan] : [];
  let decoder: { name: DecoderName; done: Promise<void>; abort(): void } | undefined;
  let progressTimer: NodeJS.Timeout | undefined;
  let followed: { pack: FileHandle; indexer: TarIndexer } | undefined;
  // A stop kills the decoder (whichever it is): the decode fails, and the failure below cleans up.
  const stop = (): void => decoder?.abort();
  opts.signal?.addEventListener('abort', stop, { once: true });
  try {
    opts.signal?.throwIfAborted();
    // The decoder first: everything below runs while it decodes on the other core.
    let packFh: FileHandle;
    let decoding: { intoFile: FileDecoder } | { stream: Decoder };
    if (staged) {
      // xz writes the pack through the other process's handle; this one reads it at explicit
      // offsets and flushes it (fsync needs no write access), as its own.
      packFh = await open(path.join(tmp, PACK_FILE), 'r');
      handles.push(packFh);
      mark('setup');
      decoding = { intoFile: staged.decoder };
    } else {
      const planned = await plan!;
      mark('setup');
      ({ packFh, decoding } = await startStagedDecode(tmp, source.bytes, planned, limits.maxTotalBytes));
      handles.push(packFh);
    }
    decoder = 'intoFile' in decoding ? decoding.intoFile : decoding.stream;
    if (opts.signal?.aborted) decoder.abort(); // stopped while it started
    mark('decoderStarted');
    if ('intoFile' in decoding) void decoding.intoFile.whenExited().then(() => mark('decoderExited'));
    // The logger's own start-up (a CLI's is deferred) is paid now, while xz decodes, rather than
    // by the line logged when the entry is made; not at all when the level drops that line and the
    // progress lines (info), as nothing else may need pino. Loading it is ~25 ms of CPU in one
    // piece on the thread that feeds xz its input, which starved xz once the pipe had drained
    // (`kheadersd ingest --log-level warn`, interleaved, 10 rounds: paired 0.946).
    setImmediate(() => warmLogger(opts.log, 'info'));

    const { FACT_FILES } = await import('./extras.js');
    const indexer = new TarIndexer(limits, new Set([UTSRELEASE_H, ...FACT_FILES]));
    // xz's pack is read back from the file: a failure may be the file's doing (stagingChangedOr).
    if ('intoFile' in decoding) followed = { pack: packFh, indexer };
    // The tree is drafted as records are decoded (node's thread is mostly idle while xz decodes
    // on the other core), so little of the index is left to build after xz's last byte.
    const tree = new TreeBuilder();
    const draftNew = (): void => {
      for (let i = tree.count; i < indexer.records.length; i++) tree.add(indexer.records[i]!);
    };
    // The pack goes to disk while it is decoded, one flush at a time every few MiB, so that the
    // commit's own flush finds only the last few MiB to write, not the whole pack. Every flush is
    // awaited before the commit: an error a flush reports is not reported again to the next one.
    const packSyncs: Array<Promise<void>> = [];
    let packSyncedTo = 0;
    let packSyncing = false;
    const syncPackAhead = (): void => {
      if (packSyncing || indexer.position - packSyncedTo < PACK_SYNC_STEP_BYTES) return;
      packSyncing = true;
      packSyncedTo = indexer.position;
      const sync = inStep('pack', packFh.datasync());
      packSyncs.push(sync);
      running.push(sync);
      sync.then(
        () => (packSyncing = false),
        () => {}, // no more flushes; the failure is reported before the commit
      );
    };
    const take = (chunk: Buffer): void => {
      indexer.push(chunk);
      draftNew();
      syncPackAhead();
    };
    const report = (): void => {
      const p: IngestProgress = {
        bytes: indexer.position,
        total,
        entries: indexer.entryCount,
        percent: total ? Math.min(100, Math.round((indexer.position / total) * 1000) / 10) : undefined,
      };
      opts.onProgress?.(p);
      opts.log?.info({ progress: p }, 'ingesting');
    };
    progressTimer = setInterval(report, PROGRESS_INTERVAL_MS);

    const archiveFh = await open(path.join(tmp, ARCHIVE_FILE), 'w', 0o644);
    handles.push(archiveFh);
    // Written and flushed while xz decodes; awaited with the pack's flush before the commit.
    const archiveWritten = inStep('archive', archiveFh.writeFile(source.bytes));
    const archiveSynced = archiveWritten.then(() => inStep('archive', archiveFh.datasync()));
    running.push(archiveSynced);
    archiveSynced.catch(() => {}); // awaited below; failing first must not be an unhandled rejection

    const { btf, live } = await kernel();
    // vmlinux.h is generated on a worker thread while xz decodes; a BTF problem costs only
    // vmlinux.h, but a full disk fails the ingest (an entry must not lack it for that reason).
    const vmlinux = btf
      ? inStep('vmlinux.h', provideVmlinuxH(btf, path.join(tmp, VMLINUX_H), await loadAll(store), opts.signal)).then(
          (made) => made,
          (err: unknown) => {
            if (isKheadersError(err, 'E_NO_SPACE') || opts.signal?.aborted) throw err; // a stop is no BTF problem
            opts.log?.warn({ btf: btf.path }, `no vmlinux.h for this entry: ${(err as Error).message}`);
            return null;
          },
        )
      : Promise.resolve(null);
    running.push(vmlinux);
    vmlinux.catch(() => {}); // awaited below; failing first must not be an unhandled rejection

    try {
      if ('intoFile' in decoding) {
        await followDecoder(decoding.intoFile, take, packFh, opts.decoderStallMs ?? DECODER_STALL_MS);
      } else {
        // The pack's first write waits for the archive's (done long before 1 MiB is decoded).
        const { PackWriter } = await import('./pack-writer.js');
        await decodeInto(decoding.stream, take, new PackWriter(packFh, archiveWritten), limits);
      }
    } catch (err) {
      // Both files grow at once: when the disk fills up, the archive's failure names the file
      // it really stopped at (the pack, written by xz, may have taken the last block first).
      await archiveWritten;
      throw err;
    }
    const records = indexer.finish();
    // XZ Utils and liblzma check the decoded sizes against the archive's own indexes: a decoder
    // that succeeded with another count is not a working xz (one that stops early at a member
    // boundary, or adds members, would otherwise pass every tar check).
    if (total !== undefined && indexer.position !== total) {
      throw new KheadersError(
        'E_INTERNAL',
        `the decoder (${decoder.name}) gave ${indexer.position} bytes, but the archive's xz index records ${total}: it is not a working xz decoder; nothing was cached (try --decoder lzma-native)`,
        { decoder: decoder.name, decodedBytes: indexer.position, indexBytes: total },
      );
    }
    draftNew();
    await archiveWritten;
    mark('decoded');
    // The pack and archive go to disk while the index is built: the commit's fsync then finds
    // little left to write. Its failure is awaited (an error a sync reports is reported once).
    const flushed = settleAll([...packSyncs, inStep('pack', packFh.datasync()), archiveSynced]);
    running.push(flushed);
    flushed.catch(() => {}); // awaited below; failing first must not be an unhandled rejection

    const archived = releaseFromUtsrelease(indexer.captured.get(UTSRELEASE_H));
    if (namedRelease !== undefined && archived !== undefined && archived !== namedRelease) {
      opts.log?.warn({ named: namedRelease, archived }, `the archive's ${UTSRELEASE_H} says ${archived}, but it is cached as ${namedRelease} (as named)`);
    }
    const release = namedRelease ?? archived;
    if (release === undefined) {
      throw new KheadersError('E_USAGE', `cannot tell which kernel release ${source.source} is for (no vermagic, no ${UTSRELEASE_H}): pass --release R`);
    }
    if (!validRelease(release)) throw new KheadersError('E_ARCHIVE_CORRUPT', `the archive names an invalid release ${JSON.stringify(release)}`);
    const made = await vmlinux;
    const facts: EntryFacts = { release, live: source.live, buildId: source.buildId, files: indexer.captured };
    const extras = await addExtras(tmp, facts, btf, made, live, opts);
    // An archive that carries a file of the same name keeps its own.
    for (const r of extras.records) if (!records.some((have) => have.path === r.path)) tree.add(r);
    // Refuses duplicates and escaping symlinks (the first refused record, as TreeIndex.fromRecords
    // would); carries the digests readers prove bytes with.
    const index = tree.build({ pack: indexer.packDigests() });
    const manifest = makeManifest({
      id: entryId(release, digest),
      release,
      digest,
      kind: 'headers',
      buildId: source.buildId,
      source: source.source,
      obtained: source.obtained,
      ...(source.module ? { module: source.module } : {}),
      index,
      packBytes: indexer.position,
      archiveBytes: source.bytes.length,
      btf: index.get(VMLINUX_H)?.blob !== undefined ? extras.btf : null,
      live: source.live,
      config: index.get(CONFIG_PATH)?.blob !== undefined ? extras.config : null,
      notes: extras.notes,
    });
    mark('indexed');
    await flushed;
    opts.signal?.throwIfAborted(); // the last step that leaves nothing behind
    const entry = await commitEntry(store, tmp, manifest, index, handles);
    mark('committed');
    report();
    // decodedBy: which process ran the decoder ('daemon': serve's, for its ingest process).
    opts.log?.info({ id: manifest.id, files: manifest.files, bytes: manifest.bytes, decoder: decoder.name, decodedBy: staged ? 'daemon' : 'self', vmlinuxH: manifest.btf !== null, phasesMs: phases }, 'ingested');
    return { entry, decoder: decoder.name };
  } catch (err) {
    decoder?.abort();
    await Promise.allSettled([...running, decoder?.done]);
    const failure = followed ? await stagingChangedOr(err, followed.pack, followed.indexer) : err;
    await Promise.allSettled(handles.map((h) => h.close())); // a handle already closed resolves at once
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
    // A decoder killed by the stop fails as killed: the stop is what happened.
    opts.signal?.throwIfAborted();
    throw failure;
  } finally {
    clearInterval(progressTimer);
    opts.signal?.removeEventListener('abort', stop);
  }
}

function makeManifest(m: {
  id: string;
  release: string;
  digest: string;
  kind: Manifest['kind'];
  buildId: string | null;
  source: string;
  obtained: NonNullable<Manifest['obtained']>;
  module?: Manifest['module'];
  index: TreeIndex;
  packBytes: number;
  archiveBytes: number;
  btf: Manifest['btf'];
  live: boolean;
  config: Manifest['config'];
  notes: string[];
}): Manifest {
  return {
    formatVersion: ENTRY_FORMAT,
    id: m.id,
    release: m.release,
    digest: m.digest,
    kind: m.kind,
    buildId: m.buildId,
    source: m.source,
    obtained: m.obtained,
    ...(m.module ? { module: m.module } : {}),
    ingestedAt: new Date().toISOString(),
    files: m.index.fileCount,
    dirs: m.index.dirCount,
    symlinks: m.index.symlinkCount,
    bytes: m.index.totalBytes,
    packBytes: m.packBytes,
    archiveBytes: m.archiveBytes,
    btf: m.btf,
    live: m.live,
    config: m.config ?? null,
    notes: m.notes,
  };
}

/**
 * Make a built directory a cache entry: index and manifest written, every file's mode set, then
 * every file and the directory fsynced (together, so the filesystem can commit them in one
 * journal transaction), then one rename. The caller still owns `files` (it closes them again on
 * failure; closing twice is harmless).
 */
async function commitEntry(store: CacheStore, tmp: string, manifest: Manifest, index: TreeIndex, files: readonly FileHandle[]): Promise<CacheEntry> {
  const all = [...files];
  const metadata = [
    ['index', INDEX_FILE, index.encode()],
    ['manifest', MANIFEST_FILE, JSON.stringify(manifest, null, 2) + '\n'],
  ] as const;
  try {
    // One after the other, so a full disk names the file it stopped at.
    for (const [step, name, text] of metadata) {
      const fh = await open(path.join(tmp, name), 'w', 0o644);
      all.push(fh);
      await inStep(step, fh.writeFile(text));
    }
    // The modes before the flush, so that it makes them durable with the rest: set after it, they
    // took a flush of the directory of their own (one more journal commit) before the rename.
    await Promise.all((await readdir(tmp)).map((f) => chmod(path.join(tmp, f), 0o644))); // the umask must not decide who can read
    await chmod(tmp, 0o755); // mkdtemp made it 0700; entries are world-readable like the headers
    await settleAll([...all.map((h) => inStep('cache', h.sync())), fsyncDir(tmp)]);
  } catch (err) {
    await Promise.allSettled(all.map((h) => h.close()));
    throw err;
  }
  await settleAll(all.map((h) => h.close()));
  const finalDir = path.join(store.entriesDir, manifest.id);
  await moveAsideUnusable(store, manifest.id);
  await rename(tmp, finalDir);
  await fsyncDir(store.entriesDir);
  return store.adopt(manifest, finalDir, index);
}

/**
 * Wait for every one of `work`, then fail with the first failure: a sibling still writing when
 * the caller cleans up would recreate a file in a directory being removed, or keep it open.
 */
async function settleAll(work: ReadonlyArray<Promise<unknown>>): Promise<void> {
  const failed = (await Promise.allSettled(work)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

/**
 * Index and hash the pack as the xz child writes it (follow-file.ts): the same checks and chunk
 * digests as for a decoded stream, over the bytes as they are in the file. A limit or an unsafe
 * entry stops xz at once. When the tar looks corrupt, xz is left to finish (its output is
 * bounded by its file-size limit) to learn whether it fails itself: a CRC error is the real cause
 * of garbage tar headers and the more useful message.
 */
async function followDecoder(decoder: FileDecoder, index: (chunk: Buffer) => void, pack: FileHandle, stallMs: number): Promise<void> {
  const { followFile } = await import('./follow-file.js');
  let tarError: KheadersError | undefined;
  let stopped: Error | undefined;
  const take = (chunk: Buffer): boolean => {
    try {
      index(chunk);
      return true;
    } catch (err) {
      if (isKheadersError(err, 'E_ARCHIVE_CORRUPT')) tarError = err;
      else stopped = asError(err);
      return false;
    }
  };
  try {
    await inStep('pack', followFile(pack, decoder, take, { stallMs }));
    if (stopped !== undefined) throw stopped;
  } catch (err) {
    decoder.abort();
    await decoder.done.catch(() => {});
    throw err;
  }
  if (tarError) {
    await decoder.done.catch((xzError: unknown) => {
      if (isKheadersError(xzError, 'E_ARCHIVE_CORRUPT')) throw xzError;
    });
    throw tarError;
  }
  // A full disk reaches xz, not node: its error carries the errno, named here as the pack's.
  await inStep('pack', decoder.done);
}

/**
 * `err`, the failure of a build whose pack xz wrote, unless the pack changed under the build:
 * then that is the failure. xz is the pack's only writer and appends to it (O_APPEND), so what
 * was read of it never changes: a pack now shorter than what was read, or a chunk that no longer
 * has the digest it had when read, was truncated or written by another process. What was read
 * after that was not xz's output in order, so the bad tar headers or the short count it caused
 * are neither the archive's fault (xz checked it) nor the decoder's. Call once xz has exited.
 */
async function stagingChangedOr(err: unknown, pack: FileHandle, indexer: TarIndexer): Promise<unknown> {
  // A full disk, a killed xz or a stop are what they say, whatever happened to the file; so is a
  // pack past --max-total-bytes (a truncation only ever makes less to read), which is not read again.
  if (!isKheadersError(err) || err.code === 'E_NO_SPACE' || err.code === 'E_KILLED' || err.details.limit === 'maxTotalBytes') return err;
  const change = await stagedPackChange(pack, indexer).catch(() => undefined);
  if (change === undefined) return err;
  return new KheadersError(
    'E_STAGING_CHANGED',
    `the staged copy of the decoded archive (${PACK_FILE} in the cache's tmp/) changed while xz wrote it: ${change.what}. Another process truncated or wrote it; the archive was not at fault. Nothing was cached and the earlier entries are intact: find what writes to the cache's tmp/, and ingest again`,
    { file: PACK_FILE, ...change.details, readError: err.code },
    { cause: err },
  );
}

/** How the pack differs from what was read of it (see stagingChangedOr), or undefined if it does not. */
async function stagedPackChange(pack: FileHandle, indexer: TarIndexer): Promise<{ what: string; details: Record<string, number> } | undefined> {
  const read = indexer.position;
  const { size } = await pack.stat();
  if (size < read) return { what: `it is ${size} bytes long, but ${read} had been read from it`, details: { packBytes: size, readBytes: read } };
  // Only whole chunks wholly read are compared: the indexer may have hashed part of a chunk it
  // then refused, past `position`. (Its digests are finished here: the build has failed.)
  const { chunkBytes, digests } = indexer.packDigests();
  const chunk = Buffer.allocUnsafe(chunkBytes);
  for (let i = 0; (i + 1) * chunkBytes <= read; i++) {
    const { bytesRead } = await pack.read(chunk, 0, chunkBytes, i * chunkBytes);
    const digest = createHash('sha256').update(chunk.subarray(0, bytesRead)).digest();
    if (!digest.equals(digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES))) {
      return { what: `its bytes at offset ${i * chunkBytes} are not those read there before`, details: { changedAt: i * chunkBytes, readBytes: read } };
    }
  }
  return undefined;
}

/**
 * Read decoded bytes through the indexer, which applies every limit and safety rule, and only
 * then into the pack: the pack never holds a byte past a limit, and since the decoder is pulled,
 * neither does memory. When the tar looks corrupt, keep draining (within the size limit, writing
 * nothing) to learn whether xz itself fails: a CRC error is the real cause of garbage tar headers
 * and the more useful message.
 */
async function decodeInto(decoder: Decoder, index: (chunk: Buffer) => void, writer: PackWriter, limits: IngestLimits): Promise<void> {
  let tarError: KheadersError | undefined;
  let drained = 0;
  /** One decoded chunk; false: stop reading. */
  const take = (chunk: Buffer): boolean | Promise<boolean> => {
    if (tarError) {
      drained += chunk.length;
      return drained <= limits.maxTotalBytes;
    }
    try {
      index(chunk);
    } catch (err) {
      if (isKheadersError(err, 'E_ARCHIVE_CORRUPT')) {
        tarError = err;
        return true;
      }
      throw err;
    }
    return writer.write(chunk).then(() => true);
  };
  const readAll = async (): Promise<void> => {
    await eachChunk(decoder.chunks, take);
    if (!tarError) await writer.end();
  };
  try {
    await inStep('pack', readAll());
  } catch (err) {
    decoder.abort();
    await Promise.allSettled([decoder.done, writer.settle()]);
    throw err;
  }
  await writer.settle();
  if (tarError) {
    decoder.abort();
    await decoder.done.catch((xzError: unknown) => {
      if (isKheadersError(xzError, 'E_ARCHIVE_CORRUPT')) throw xzError;
    });
    throw tarError;
  }
  await decoder.done;
}

/**
 * Feed every chunk of `source` to `take` until it ends or `take` says stop. A stream (the xz
 * child's stdout) is read through 'data' events, paused only while `take` waits (the pack writer
 * is busy): some 2,000 chunks of a kernel archive, each of which an async iterator would have
 * taken through several promises (~100 ms of CPU per ingest in the profile).
 */
function eachChunk(source: AsyncIterable<Buffer>, take: (chunk: Buffer) => boolean | Promise<boolean>): Promise<void> {
  if (!(source instanceof Readable)) {
    return (async () => {
      for await (const chunk of source) if (!(await take(chunk))) break;
    })();
  }
  const stream = source;
  return new Promise<void>((resolve, reject) => {
    let settled = false;
    const finish = (err?: Error): void => {
      if (settled) return;
      settled = true;
      stream.off('data', onData).off('end', onEnd).off('error', onError).off('close', onClose);
      if (err === undefined) resolve();
      else reject(err);
    };
    const stop = (): void => {
      finish();
      stream.destroy(); // what breaking out of for-await does: the decoder is told to stop
    };
    const onData = (chunk: Buffer): void => {
      let more: boolean | Promise<boolean>;
      try {
        more = take(chunk);
      } catch (err) {
        finish(asError(err));
        stream.destroy();
        return;
      }
      if (more === true) return;
      if (more === false) return stop();
      stream.pause();
      more.then(
        (go) => {
          if (!go) stop();
          else if (!settled) stream.resume();
        },
        (err: unknown) => {
          finish(asError(err));
          stream.destroy();
        },
      );
    };
    const onEnd = (): void => finish();
    const onError = (err: Error): void => finish(err);
    // Destroyed before its end (abort(), xz killed): as for-await, a premature close is an error.
    const onClose = (): void => finish(Object.assign(new Error('Premature close'), { code: 'ERR_STREAM_PREMATURE_CLOSE' }));
    stream.on('data', onData).on('end', onEnd).on('error', onError).on('close', onClose);
  });
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

function releaseFromUtsrelease(content: Buffer | undefined): string | undefined {
  return content?.toString('utf8').match(/#define\s+UTS_RELEASE\s+"([^"]+)"/)?.[1];
}

/**
 * An entry directory of this id that was not found as a cached entry is one that does not load
 * (a truncated manifest, say): quarantine it, or the rename onto it would fail (ENOTEMPTY) on
 * every ingest, forever. Called under the lock.
 */
async function moveAsideUnusable(store: CacheStore, id: string): Promise<void> {
  const exists = await lstat(path.join(store.entriesDir, id)).then(
    () => true,
    () => false,
  );
  if (!exists) return;
  const why = await store.load(id).then(
    () => undefined,
    (err: unknown) => (err instanceof Error ? err.message : String(err)),
  );
  await store.quarantine(id, { reason: why ?? 'replaced by a new ingest of the same archive' });
}

/**
 * Await one step of an ingest; a full disk there becomes E_NO_SPACE naming the step. Every step
 * but `current` fails before the entry exists: the earlier entries are untouched, and the next
 * ingest works as soon as there is space.
 */
async function inStep<T>(step: IngestStep, work: Promise<T>, entryId?: string): Promise<T> {
  try {
    return await work;
  } catch (err) {
    const code = diskFullErrno(err);
    // Not a full disk, or one an inner step already named.
    if (code === undefined || (isKheadersError(err) && err.details.step !== undefined)) throw err;
    const fix = 'Free space, or lower --keep / --max-cache-bytes and run `kheadersd gc`';
    const message =
      step === 'current'
        ? `the cache filesystem is full (${code}) while pointing \`current\` at ${entryId ?? 'the new entry'}: the entry is cached, but \`current\` still names the one before. ${fix}, then ingest again (it reuses the entry)`
        : `the cache filesystem is full (${code}) while writing ${STEP_WHAT[step]}; nothing was changed and the earlier entries are intact. ${fix}`;
    throw new KheadersError('E_NO_SPACE', message, { step, errno: code }, { cause: err });
  }
}

const STEP_WHAT: Record<IngestStep, string> = {
  cache: 'to the cache directory',
  archive: ARCHIVE_FILE,
  pack: PACK_FILE,
  'vmlinux.h': VMLINUX_H,
  config: CONFIG_FILE,
  index: INDEX_FILE,
  manifest: MANIFEST_FILE,
  current: 'current',
};
