/**
 * Ingest: archive bytes in, one immutable cache entry out, in a single streaming pass.
 *
 *   archive (in memory) ─┬─ sha256 ─ already cached? → done, no work
 *                        ├─ archive.tar.xz (kept for clients that want the whole archive)
 *                        └─ xz decoder ─ TarIndexer (checks, limits, offsets) ─ pack.tar
 *                                                        └─ index.json, manifest.json
 *
 * Everything is built in <cache>/tmp/, fsynced, and renamed into entries/ in one step while the
 * cache lock is held: a crash leaves no entry or a whole one, and a failure of any kind leaves
 * the earlier entries exactly as they were.
 */
import { createHash } from 'node:crypto';
import { chmod, mkdtemp, open, rename, rm, type FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { KheadersError, errnoOf, isKheadersError } from '../errors.js';
import type { Logger } from '../log.js';
import { locateArchive, type ArchiveSource } from '../source/locate.js';
import { xzUncompressedSize } from '../source/xz.js';
import { CacheStore, entryId, fsyncDir, validRelease } from './cache.js';
import { startDecoder, type Decoder, type DecoderChoice, type DecoderName } from './decompress.js';
import { ARCHIVE_FILE, INDEX_FILE, MANIFEST_FILE, PACK_FILE, type CacheEntry, type Manifest } from './entry.js';
import { DEFAULT_LIMITS, TarIndexer, type IngestLimits } from './tar-indexer.js';
import { TreeIndex } from './tree-index.js';

const UTSRELEASE_H = 'include/generated/utsrelease.h';
const PROGRESS_INTERVAL_MS = 500;

export interface IngestProgress {
  bytes: number;
  /** Uncompressed size from the xz index, when readable. */
  total: number | undefined;
  entries: number;
  percent: number | undefined;
}

export interface IngestOptions {
  cacheDir: string;
  /** A file instead of the running kernel's archive (.tar.xz, kheaders.ko, vmlinux, kheaders.o). */
  archive?: string;
  /** The release of an archive that does not name one (and overrides the one it names). */
  release?: string;
  modprobe?: boolean;
  unloadModule?: boolean;
  limits?: Partial<IngestLimits>;
  decoder?: DecoderChoice;
  /** Make this entry `current`. Default: when it is the running kernel's (live, or same release). */
  setCurrent?: boolean;
  /** Eviction after a successful ingest. */
  keep?: number;
  maxCacheBytes?: number;
  lockTimeoutMs?: number;
  log?: Logger;
  onProgress?: (p: IngestProgress) => void;
  /** For tests: where the live archive is looked for. */
  livePaths?: readonly string[];
}

export interface IngestResult {
  entry: CacheEntry;
  /** True when the digest was already cached and nothing was decoded. */
  reused: boolean;
  evicted: string[];
  decoder: DecoderName | null;
  durationMs: number;
}

export async function ingest(opts: IngestOptions): Promise<IngestResult> {
  const started = performance.now();
  const limits: IngestLimits = { ...DEFAULT_LIMITS, ...opts.limits };
  if (opts.release !== undefined && !validRelease(opts.release)) {
    throw new KheadersError('E_USAGE', `--release ${JSON.stringify(opts.release)} is not a valid kernel release (letters, digits, ".", "_", "+", "-")`);
  }
  const source = await locateArchive({
    ...(opts.archive !== undefined ? { archive: opts.archive } : {}),
    modprobe: opts.modprobe ?? true,
    unloadModule: opts.unloadModule ?? true,
    maxArchiveBytes: limits.maxTotalBytes,
    ...(opts.log ? { log: opts.log } : {}),
    ...(opts.livePaths ? { livePaths: opts.livePaths } : {}),
  });
  const total = xzUncompressedSize(source.bytes);
  if (total !== undefined && total > limits.maxTotalBytes) {
    throw new KheadersError('E_LIMIT', `the archive would expand to ${total} bytes, over the limit of ${limits.maxTotalBytes} (--max-total-bytes)`, {
      limit: 'maxTotalBytes',
      value: limits.maxTotalBytes,
    });
  }
  const digest = createHash('sha256').update(source.bytes).digest('hex');
  const store = await CacheStore.open(opts.cacheDir, { write: true, ...(opts.lockTimeoutMs !== undefined ? { lockTimeoutMs: opts.lockTimeoutMs } : {}) });
  const namedRelease = opts.release ?? source.release;

  return store.locked(async () => {
    const swept = await store.sweepTmp();
    if (swept.length > 0) opts.log?.warn({ swept }, 'removed leftovers of an interrupted ingest');

    const existing = store.findByDigest(await store.list(), digest, namedRelease);
    let entry: CacheEntry;
    let decoder: DecoderName | null = null;
    if (existing) {
      entry = await store.load(existing.id);
      opts.log?.info({ id: existing.id }, 'archive already cached: nothing to do');
    } else {
      const built = await buildEntry(store, source, digest, namedRelease, total, limits, opts);
      entry = built.entry;
      decoder = built.decoder;
    }
    const makeCurrent = opts.setCurrent ?? (source.live || entry.manifest.release === os.release());
    if (makeCurrent && (await store.currentId()) !== entry.manifest.id) await store.setCurrent(entry.manifest.id);
    const evicted = await store.gc({ keep: opts.keep ?? 3, ...(opts.maxCacheBytes !== undefined ? { maxBytes: opts.maxCacheBytes } : {}) });
    if (evicted.length > 0) opts.log?.info({ evicted }, 'evicted old entries');
    return { entry, reused: existing !== undefined, evicted, decoder, durationMs: Math.round(performance.now() - started) };
  });
}

async function buildEntry(
  store: CacheStore,
  source: ArchiveSource,
  digest: string,
  namedRelease: string | undefined,
  total: number | undefined,
  limits: IngestLimits,
  opts: IngestOptions,
): Promise<{ entry: CacheEntry; decoder: DecoderName }> {
  const tmp = await mkdtemp(path.join(store.tmpDir, `ingest-${process.pid}-`));
  const handles: FileHandle[] = [];
  const progressTimer = setInterval(() => report(), PROGRESS_INTERVAL_MS);
  const indexer = new TarIndexer(limits, new Set([UTSRELEASE_H]));
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
  try {
    const archiveFh = await open(path.join(tmp, ARCHIVE_FILE), 'w', 0o644);
    handles.push(archiveFh);
    const archiveWritten = archiveFh.writeFile(source.bytes);
    const packFh = await open(path.join(tmp, PACK_FILE), 'w', 0o644);
    handles.push(packFh);

    const decoder = await startDecoder(source.bytes, path.join(tmp, PACK_FILE), opts.decoder);
    await decodeInto(decoder, indexer, packFh, limits);
    const records = indexer.finish();
    await archiveWritten;

    const release = namedRelease ?? releaseFromUtsrelease(indexer.captured.get(UTSRELEASE_H));
    if (release === undefined) {
      throw new KheadersError('E_USAGE', `cannot tell which kernel release ${source.source} is for (no vermagic, no ${UTSRELEASE_H}): pass --release R`);
    }
    if (!validRelease(release)) throw new KheadersError('E_ARCHIVE_CORRUPT', `the archive names an invalid release ${JSON.stringify(release)}`);
    const index = TreeIndex.fromRecords(records); // refuses duplicates and escaping symlinks
    const id = entryId(release, digest);
    const manifest: Manifest = {
      formatVersion: 1,
      id,
      release,
      digest,
      kind: 'headers',
      buildId: source.buildId,
      source: source.source,
      ingestedAt: new Date().toISOString(),
      files: index.fileCount,
      dirs: index.dirCount,
      symlinks: index.symlinkCount,
      bytes: index.totalBytes,
      packBytes: indexer.position,
      archiveBytes: source.bytes.length,
      btf: null,
    };
    // Every file is fsynced before the rename makes the entry visible; the fsyncs run together
    // so the filesystem can commit them in one journal transaction instead of one each.
    await Promise.all([
      writeSynced(path.join(tmp, INDEX_FILE), JSON.stringify(index.toJSON())),
      writeSynced(path.join(tmp, MANIFEST_FILE), JSON.stringify(manifest, null, 2) + '\n'),
      packFh.sync(),
      archiveFh.sync(),
    ]);
    await Promise.all(handles.splice(0).map((h) => h.close()));
    await chmod(tmp, 0o755); // mkdtemp made it 0700; entries are world-readable like the headers
    await fsyncDir(tmp);

    const finalDir = path.join(store.entriesDir, id);
    await rename(tmp, finalDir).catch(async (err: unknown) => {
      // Same content under the same release appeared meanwhile (only possible without the lock).
      if (errnoOf(err) === 'ENOTEMPTY' || errnoOf(err) === 'EEXIST') await rm(tmp, { recursive: true, force: true });
      else throw err;
    });
    await fsyncDir(store.entriesDir);
    report();
    opts.log?.info({ id, files: manifest.files, bytes: manifest.bytes, decoder: decoder.name }, 'ingested');
    return { entry: store.remember({ manifest, dir: finalDir, index }), decoder: decoder.name };
  } catch (err) {
    await Promise.all(handles.map((h) => h.close().catch(() => {})));
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
    throw asIngestError(err);
  } finally {
    clearInterval(progressTimer);
  }
}

/**
 * Pump decoded bytes through the indexer into the pack. When the tar looks corrupt, keep
 * draining (within the size limit) to learn whether xz itself fails: a CRC error is the real
 * cause of garbage tar headers and the more useful message.
 */
async function decodeInto(decoder: Decoder, indexer: TarIndexer, pack: FileHandle, limits: IngestLimits): Promise<void> {
  let tarError: KheadersError | undefined;
  let drained = 0;
  try {
    for await (const chunk of decoder.chunks) {
      if (tarError) {
        drained += chunk.length;
        if (drained > limits.maxTotalBytes) break;
        continue;
      }
      try {
        indexer.push(chunk);
      } catch (err) {
        if (isKheadersError(err, 'E_ARCHIVE_CORRUPT')) {
          tarError = err;
          continue;
        }
        throw err;
      }
      if (!decoder.writesPack) await pack.write(chunk);
    }
  } catch (err) {
    decoder.abort();
    await decoder.done.catch(() => {});
    throw err;
  }
  if (tarError) {
    decoder.abort();
    await decoder.done.catch((xzError: unknown) => {
      if (isKheadersError(xzError, 'E_ARCHIVE_CORRUPT')) throw xzError;
    });
    throw tarError;
  }
  await decoder.done;
}

function releaseFromUtsrelease(content: Buffer | undefined): string | undefined {
  return content?.toString('utf8').match(/#define\s+UTS_RELEASE\s+"([^"]+)"/)?.[1];
}

async function writeSynced(file: string, content: string): Promise<void> {
  const fh = await open(file, 'w', 0o644);
  try {
    await fh.writeFile(content);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

function asIngestError(err: unknown): unknown {
  const code = errnoOf(err);
  if (code === 'ENOSPC' || code === 'EDQUOT') {
    return new KheadersError('E_NO_SPACE', `the cache filesystem is full (${code}); nothing was changed and the earlier entries are intact. Free space, or lower --keep / --max-cache-bytes and run \`kheadersd gc\``, {}, { cause: err });
  }
  return err;
}
