/**
 * Loading an entry from disk, checked before anything of it is served: the manifest's schema,
 * the index (format, checksum, every offset and size inside the pack, every name one path
 * component, blob names the format allows, symlinks confined), the counts agreeing with the
 * manifest, and the pack, archive and blobs being regular files of the expected sizes.
 *
 * Anything wrong is E_ENTRY_DAMAGED naming the entry and what is wrong (never a SyntaxError, a
 * RangeError or "internal error"): the caller moves the entry aside and rebuilds it. A
 * well-formed entry of an older format is E_ENTRY_DAMAGED with `outdated: true`: rebuilt too.
 */
import { createHash } from 'node:crypto';
import { closeSync, constants as fsc, fstatSync, lstatSync, openSync, readSync, type Stats } from 'node:fs';
import { lstat, open, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { KheadersError, errnoOf } from '../errors.js';
import { unreadableCache } from './cache-dir.js';
import { ARCHIVE_FILE, INDEX_FILE, MANIFEST_FILE, ManifestProblem, PACK_FILE, entryFile, parseManifest, type CacheEntry, type Manifest } from './entry.js';
import { DIGEST_BYTES, FileView, H, HEADER_BYTES } from './index-format.js';
import { makeEntry, readVerificationEnabled, type DamageHandler } from './reader.js';
import type { ReadMode } from './small-file.js';
import { IndexFormatError, TreeIndex } from './tree-index.js';

/** No manifest is this large; a bigger file is damage, not something to read into memory. */
const MAX_MANIFEST_BYTES = 1024 * 1024;
/** 200,000 nodes take ~10 MiB; this bounds what a corrupt size could make us allocate. */
const MAX_INDEX_BYTES = 512 * 1024 * 1024;

export function damaged(id: string, reason: string, extra: { outdated?: boolean; file?: string } = {}): KheadersError {
  return new KheadersError('E_ENTRY_DAMAGED', `cache entry ${id} is damaged: ${reason}`, { id, reason, errno: 'EIO', ...extra });
}

/** What a damage error says is wrong, and with which file (when one). */
export function damageOf(err: KheadersError): { reason: string; file?: string } {
  const reason = err.details['reason'];
  const file = err.details['file'];
  return { reason: typeof reason === 'string' ? reason : err.message, ...(typeof file === 'string' ? { file } : {}) };
}

/** Is this error an entry found damaged (or outdated) on disk? */
export function isDamage(err: unknown): err is KheadersError {
  return err instanceof KheadersError && err.code === 'E_ENTRY_DAMAGED';
}

// Synchronous calls, on purpose: what is read here is a small file of the cache directory (a
// manifest, an index), never of the mount, and a start reads a manifest four times. As promises,
// each read was five thread-pool round trips (lstat, open, fstat, read, close), which cost more
// than the reads: ~0.3 ms each against ~0.06 ms (warm), and more in a cold start.

/**
 * Whether entries/ is there; a symbolic link or anything else in its place is E_CACHE_UNSAFE.
 * Checked before every synchronous call that goes through it: those run on the thread that
 * answers the daemon's own mount, and a link may lead into the mount, where that thread would
 * wait for its own answer for good (the calls below refuse links only as their last component).
 */
export function entriesDirPresent(entriesDir: string): boolean {
  return judgeEntriesDir(entriesDir, lstatSync(entriesDir, { throwIfNoEntry: false }));
}

/** entriesDirPresent through the thread pool (ReadMode 'async'). */
export async function entriesDirPresentAsync(entriesDir: string): Promise<boolean> {
  return judgeEntriesDir(entriesDir, await lstat(entriesDir).catch(missingAsUndefined));
}

/** What lstat answered for entries/ (undefined: it is not there), judged. */
function judgeEntriesDir(entriesDir: string, st: Stats | undefined): boolean {
  if (st === undefined) return false;
  if (!st.isDirectory()) {
    const what = st.isSymbolicLink() ? 'a symbolic link' : 'not a directory';
    throw new KheadersError('E_CACHE_UNSAFE', `${entriesDir} is ${what}: the cache's entries are read from a real directory only; fix with: mv ${entriesDir} elsewhere and make it a directory`, { dir: entriesDir });
  }
  return true;
}

function missingAsUndefined(err: unknown): undefined {
  if (errnoOf(err) === 'ENOENT') return undefined;
  throw err;
}

/** The entry directory `entries/<id>`, which must be a real directory. */
function entryDir(entriesDir: string, id: string): string {
  const present = entriesDirPresent(entriesDir);
  const dir = path.join(entriesDir, id);
  let st;
  try {
    st = present ? lstatSync(dir) : undefined;
  } catch (err) {
    st = entryDirProblem(id, dir, err);
  }
  return judgeEntryDir(id, dir, st);
}

/** entryDir through the thread pool. */
async function entryDirAsync(entriesDir: string, id: string): Promise<string> {
  const present = await entriesDirPresentAsync(entriesDir);
  const dir = path.join(entriesDir, id);
  const st = present ? await lstat(dir).catch((err: unknown) => entryDirProblem(id, dir, err)) : undefined;
  return judgeEntryDir(id, dir, st);
}

/** A failed lstat of entries/<id>: missing is no such entry (undefined); anything else is thrown. */
function entryDirProblem(id: string, dir: string, err: unknown): undefined {
  if (errnoOf(err) === 'ENOENT') return undefined;
  throw unreadableCache(dir, err) ?? err;
}

function judgeEntryDir(id: string, dir: string, st: Stats | undefined): string {
  if (st === undefined) throw new KheadersError('E_NOT_FOUND', `no cache entry ${id}`, { id });
  if (!st.isDirectory()) throw damaged(id, 'it is not a directory');
  return dir;
}

/** O_NONBLOCK: a FIFO put in a file's place must not hang the thread that serves (it is refused on its fstat). */
const ENTRY_FILE_FLAGS = fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK;

/** Open a file of the entry for reading, refusing symlinks; ENOENT is "missing" damage. */
function openEntryFile(id: string, dir: string, name: string): number {
  try {
    return openSync(entryFile(dir, name), ENTRY_FILE_FLAGS);
  } catch (err) {
    throw openProblem(id, name, entryFile(dir, name), err);
  }
}

function openProblem(id: string, name: string, file: string, err: unknown): unknown {
  const code = errnoOf(err);
  if (code === 'ENOENT') return damaged(id, `${name} is missing`, { file: name });
  if (code === 'ELOOP') return damaged(id, `${name} is a symbolic link`, { file: name });
  if (code === 'EIO') return damaged(id, `${name} cannot be read (EIO)`, { file: name });
  // A socket (or a device with no driver) in the file's place: open(2) refuses it before fstat could.
  if (code === 'ENXIO' || code === 'ENODEV') return damaged(id, `${name} is not a regular file`, { file: name });
  return unreadableCache(file, err) ?? err;
}

/**
 * A file of the entry, whole: a regular file of at most `max` bytes. `head`: its first
 * `head.bytes` are read and checked first (on a buffer of the whole file's length), so that a
 * file refused on them is not read whole, on the thread that answers the mount.
 */
function readSmall(id: string, dir: string, name: string, max: number, head?: { bytes: number; check(buf: Buffer): void }): Buffer {
  const fd = openEntryFile(id, dir, name);
  try {
    const buf = bufferFor(id, name, fstatSync(fd), max);
    const readTo = (from: number, to: number): void => {
      for (let got = from; got < to; ) {
        const n = readSync(fd, buf, got, to - got, got);
        if (n === 0) throw damaged(id, `${name} shrank while it was read`, { file: name });
        got += n;
      }
    };
    const first = head !== undefined && buf.length >= head.bytes ? head.bytes : 0;
    readTo(0, first);
    if (first > 0) head!.check(buf);
    readTo(first, buf.length);
    return buf;
  } finally {
    closeSync(fd);
  }
}

/** What fstat says of a file of the entry, judged: a buffer of its size if it is a regular file of at most `max` bytes. */
function bufferFor(id: string, name: string, st: Stats, max: number): Buffer {
  if (!st.isFile()) throw damaged(id, `${name} is not a regular file`, { file: name });
  if (st.size > max) throw damaged(id, `${name} is ${st.size} bytes, more than any entry has`, { file: name });
  return Buffer.allocUnsafeSlow(st.size); // its own memory: the index keeps it
}

/** readSmall through the thread pool: the same flags, checks and damage. */
async function readSmallAsync(id: string, dir: string, name: string, max: number, head?: { bytes: number; check(buf: Buffer): void }): Promise<Buffer> {
  const fh = await open(entryFile(dir, name), ENTRY_FILE_FLAGS).catch((err: unknown) => {
    throw openProblem(id, name, entryFile(dir, name), err);
  });
  try {
    const buf = bufferFor(id, name, await fh.stat(), max);
    const readTo = async (from: number, to: number): Promise<void> => {
      for (let got = from; got < to; ) {
        const { bytesRead } = await fh.read(buf, got, to - got, got);
        if (bytesRead === 0) throw damaged(id, `${name} shrank while it was read`, { file: name });
        got += bytesRead;
      }
    };
    const first = head !== undefined && buf.length >= head.bytes ? head.bytes : 0;
    await readTo(0, first);
    if (first > 0) head!.check(buf);
    await readTo(first, buf.length);
    return buf;
  } finally {
    await fh.close();
  }
}

/**
 * Read and check manifest.json. `mode`: synchronous reads (the start's, and every command's), or
 * through the thread pool (the HTTP catalog's refresh while serving); one parser either way.
 */
export async function loadManifest(entriesDir: string, id: string, mode: ReadMode = 'sync'): Promise<Manifest> {
  const bytes =
    mode === 'sync'
      ? readSmall(id, entryDir(entriesDir, id), MANIFEST_FILE, MAX_MANIFEST_BYTES)
      : await readSmallAsync(id, await entryDirAsync(entriesDir, id), MANIFEST_FILE, MAX_MANIFEST_BYTES);
  try {
    return parseManifest(bytes.toString('utf8'), id);
  } catch (err) {
    if (err instanceof ManifestProblem) throw damaged(id, err.message, { outdated: err.outdated, file: MANIFEST_FILE });
    throw err;
  }
}

/** A regular file of exactly `size` bytes, or damage. */
function expectFile(id: string, dir: string, name: string, size: number): void {
  let st;
  try {
    st = lstatSync(entryFile(dir, name));
  } catch (err) {
    throw dataFileProblem(id, dir, name, err);
  }
  judgeDataFile(id, name, size, st);
}

/** expectFile through the thread pool. */
async function expectFileAsync(id: string, dir: string, name: string, size: number): Promise<void> {
  const st = await lstat(entryFile(dir, name)).catch((err: unknown) => {
    throw dataFileProblem(id, dir, name, err);
  });
  judgeDataFile(id, name, size, st);
}

function dataFileProblem(id: string, dir: string, name: string, err: unknown): unknown {
  if (errnoOf(err) === 'ENOENT') return damaged(id, `${name} is missing`, { file: name });
  return unreadableCache(entryFile(dir, name), err) ?? err;
}

function judgeDataFile(id: string, name: string, size: number, st: Stats): void {
  if (!st.isFile()) throw damaged(id, `${name} is not a regular file`, { file: name });
  if (st.size !== size) throw damaged(id, `${name} is ${st.size} bytes, not the ${size} it was written with`, { file: name });
}

function indexDamage(id: string, err: unknown): unknown {
  if (err instanceof IndexFormatError || err instanceof RangeError) return damaged(id, `${INDEX_FILE}: ${err.message}`, { file: INDEX_FILE });
  return err;
}

/** The files beside the index, with their sizes: the pack and archive (headers entries) and every blob. */
function dataFiles(manifest: Manifest, index: TreeIndex): Array<[string, number]> {
  const expected: Array<[string, number]> = manifest.kind === 'headers' ? [[PACK_FILE, manifest.packBytes], [ARCHIVE_FILE, manifest.archiveBytes]] : [];
  for (let k = 0; k < index.blobCount; k++) {
    const b = index.blob(k);
    expected.push([b.name, b.size]);
  }
  return expected;
}

/** Each of dataFiles() a regular file of its size. */
function checkDataFiles(id: string, dir: string, manifest: Manifest, index: TreeIndex): void {
  // The first problem in this order is the one reported.
  for (const [name, size] of dataFiles(manifest, index)) expectFile(id, dir, name, size);
}

/** checkDataFiles through the thread pool; the same order, so the same problem is reported. */
async function checkDataFilesAsync(id: string, dir: string, manifest: Manifest, index: TreeIndex): Promise<void> {
  for (const [name, size] of dataFiles(manifest, index)) await expectFileAsync(id, dir, name, size);
}

/**
 * The whole entry, every check passed. Throws E_ENTRY_DAMAGED, or E_NOT_FOUND when absent.
 * `mode`: as loadManifest's ('async' when a request of the HTTP catalog is the first to ask).
 */
export async function loadEntry(entriesDir: string, id: string, onDamage?: DamageHandler, mode: ReadMode = 'sync'): Promise<CacheEntry> {
  const manifest = await loadManifest(entriesDir, id, mode);
  const dir = path.join(entriesDir, id);
  let index: TreeIndex;
  try {
    // A sparse index.bin of 511 MiB whose header says 1 KiB was read whole before it was refused: 2.6 s on that thread.
    const head = { bytes: HEADER_BYTES, check: (b: Buffer) => TreeIndex.checkHeader(b, { packBytes: manifest.packBytes }) };
    const buf = mode === 'sync' ? readSmall(id, dir, INDEX_FILE, MAX_INDEX_BYTES, head) : await readSmallAsync(id, dir, INDEX_FILE, MAX_INDEX_BYTES, head);
    index = TreeIndex.decode(buf, { packBytes: manifest.packBytes, checksum: readVerificationEnabled() });
  } catch (err) {
    throw indexDamage(id, err);
  }
  const counts = { files: index.fileCount, dirs: index.dirCount, symlinks: index.symlinkCount, bytes: index.totalBytes };
  for (const [k, v] of Object.entries(counts)) {
    if (manifest[k as keyof typeof counts] !== v) throw damaged(id, `the manifest says ${manifest[k as keyof typeof counts]} ${k} but the index has ${v}`);
  }
  if (mode === 'sync') checkDataFiles(id, dir, manifest, index);
  else await checkDataFilesAsync(id, dir, manifest, index);
  return makeEntry(manifest, dir, index, onDamage);
}

/**
 * The entry with its index used in place (4 KiB pages read on demand): for a one-shot lookup
 * such as `cat`, which then loads only the records on its path. The index checksum is verified
 * by streaming the file (nothing of it is kept). Close it when done.
 */
export async function openEntryLazily(entriesDir: string, id: string, onDamage?: DamageHandler): Promise<{ entry: CacheEntry; close(): Promise<void> }> {
  const manifest = await loadManifest(entriesDir, id);
  const dir = path.join(entriesDir, id);
  // A FileHandle: the index is read in place, page by page, for as long as the entry is open.
  // O_NONBLOCK as openEntryFile's: a FIFO in its place held `cat` on the open for good.
  const fh = await open(entryFile(dir, INDEX_FILE), ENTRY_FILE_FLAGS).catch((err: unknown) => {
    throw openProblem(id, INDEX_FILE, entryFile(dir, INDEX_FILE), err);
  });
  try {
    const st = await fh.stat();
    if (!st.isFile() || st.size > MAX_INDEX_BYTES) throw damaged(id, `${INDEX_FILE} is not a regular file of a sane size`, { file: INDEX_FILE });
    if (readVerificationEnabled()) await verifyChecksum(fh, st.size, id);
    const index = TreeIndex.open(new FileView(fh.fd, st.size), { packBytes: manifest.packBytes });
    checkDataFiles(id, dir, manifest, index);
    const entry = makeEntry(manifest, dir, index, onDamage);
    return {
      entry,
      close: async () => {
        await entry.reader.close();
        await fh.close();
      },
    };
  } catch (err) {
    await fh.close();
    throw indexDamage(id, err);
  }
}

/** sha256 of the index body against its header, read in 64 KiB pieces. */
async function verifyChecksum(fh: FileHandle, size: number, id: string): Promise<void> {
  if (size < HEADER_BYTES) throw damaged(id, `${INDEX_FILE}: it is ${size} bytes, shorter than its header`, { file: INDEX_FILE });
  const header = Buffer.alloc(HEADER_BYTES);
  await fh.read(header, 0, HEADER_BYTES, 0);
  const hash = createHash('sha256');
  const piece = Buffer.alloc(64 * 1024);
  for (let at = HEADER_BYTES; at < size; ) {
    const { bytesRead } = await fh.read(piece, 0, Math.min(piece.length, size - at), at);
    if (bytesRead === 0) throw damaged(id, `${INDEX_FILE} shrank while it was read`, { file: INDEX_FILE });
    hash.update(piece.subarray(0, bytesRead));
    at += bytesRead;
  }
  if (!hash.digest().equals(header.subarray(H.checksum, H.checksum + DIGEST_BYTES))) throw damaged(id, `${INDEX_FILE}: its checksum does not match its content`, { file: INDEX_FILE });
}
