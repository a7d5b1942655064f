/**
 * The one reader of a cache entry's bytes: FUSE (both backends), HTTP, `export` and `cat` all read
 * through an entry's EntryReader, so the rules live here once:
 *
 * - **Exact or an error.** A read returns exactly the bytes asked for (clipped to the file's
 *   size) or fails; a pack that ends early is damage, never silently short data.
 * - **Proven before first served.** The index records a sha256 per 32 KiB chunk of the pack and
 *   one per blob (and the entry's digest is the archive's sha256). The first time this process
 *   reads a chunk, the whole chunk is read and hashed; a match is remembered (one byte per
 *   chunk), so every later read of it is a plain pread. Why chunks and once per process: a
 *   header averages ~4.5 KiB, so hashing the chunk around it costs ~20 µs once, while a check on
 *   every read would tax the hot path that the kernel's page cache and the HTTP body cache
 *   otherwise serve for free; per-chunk digests also let any range be checked without reading
 *   a whole large file, and cost ~30 KiB per entry instead of 32 bytes per file.
 * - **A mismatch is never served.** It fails the read with E_ENTRY_DAMAGED (EIO on FUSE, 500 on
 *   HTTP, non-zero exit for cat/export) naming the entry and the file, and tells the owner
 *   (`onDamage`), which moves the entry aside and rebuilds it.
 * - Only files of the entry directory are opened (the pack, the archive, blob names the index
 *   format allows), with O_NOFOLLOW, and their size is checked against what the entry expects.
 *
 * Never synchronous I/O: FUSE callbacks and HTTP handlers share the daemon's one JS thread.
 */
import { createHash } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { Readable } from 'node:stream';
import { KheadersError, errnoOf } from '../errors.js';
import { unreadableCache } from './cache-dir.js';
import { ARCHIVE_FILE, PACK_FILE, entryFile, type CacheEntry, type Manifest } from './entry.js';
import type { TreeIndex } from './tree-index.js';

let verifyReads = true;

/**
 * Turn content verification (chunk, blob and archive digests, and the index checksum on load)
 * off or on for this process. Internal: only benchmarks turn it off, to measure what it costs.
 * Structural checks of manifests and indexes are never turned off.
 */
export function setReadVerification(on: boolean): void {
  verifyReads = on;
}

export function readVerificationEnabled(): boolean {
  return verifyReads;
}

/** Told once per entry instance when its bytes are found damaged (the error that failed the read). */
export type DamageHandler = (err: KheadersError, manifest: Manifest) => void;

const STREAM_CHUNK_BYTES = 64 * 1024;
/** Whole-file checks (blobs, the archive, large ranges) hash in pieces of this size. */
const VERIFY_PIECE_BYTES = 1024 * 1024;

interface EntryData {
  readonly manifest: Manifest;
  readonly dir: string;
  readonly index: TreeIndex;
}

/** An entry with its reader: how the store and ingest hand entries out. */
export function makeEntry(manifest: Manifest, dir: string, index: TreeIndex, onDamage?: DamageHandler): CacheEntry {
  const data: EntryData = { manifest, dir, index };
  return { ...data, reader: new EntryReader(data, onDamage) };
}

/** A file of the entry: the pack, the archive, or blob k. */
type Source = { kind: 'pack' } | { kind: 'archive' } | { kind: 'blob'; k: number };

export class EntryReader {
  private readonly chunkOk: Uint8Array;
  private readonly blobOk: Uint8Array;
  private archiveOk = false;
  /** Whole-file verifications in flight, shared by concurrent first reads. */
  private readonly verifying = new Map<string, Promise<void>>();
  private readonly handles = new Map<string, Promise<FileHandle>>();
  private busy = 0;
  private users = 0;
  private idle: Array<() => void> = [];
  private dead: KheadersError | undefined;
  private reported = false;

  constructor(
    private readonly entry: EntryData,
    private readonly onDamage?: DamageHandler,
  ) {
    this.chunkOk = new Uint8Array(entry.index.chunkCount);
    this.blobOk = new Uint8Array(entry.index.blobCount);
  }

  private get id(): string {
    return this.entry.manifest.id;
  }

  // ---- files of the tree -----------------------------------------------------------------------

  /** Bytes [offset, offset + length) of file node `node`, clipped to its size. */
  async read(node: number, offset: number, length: number): Promise<Buffer> {
    const { size, blob, start } = this.file(node);
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new KheadersError('E_INTERNAL', `bad read range ${offset}+${length}`, { errno: 'EINVAL' });
    }
    if (offset >= size || length === 0) return Buffer.alloc(0);
    const want = Math.min(length, size - offset);
    return this.using(async () => {
      if (blob !== undefined) {
        await this.verifyBlob(blob, node);
        return this.pread({ kind: 'blob', k: blob }, offset, want, node);
      }
      return this.readPack(start + offset, want, node);
    });
  }

  /** All of file node `node`. */
  readWhole(node: number): Promise<Buffer> {
    return this.read(node, 0, this.file(node).size);
  }

  /** Prove every byte of node `node` (before streaming it: a stream cannot take back what it sent). */
  verify(node: number): Promise<void> {
    const { size, blob, start } = this.file(node);
    return this.using(() => (blob !== undefined ? this.verifyBlob(blob, node) : this.verifyPackRange(start, start + size, node)));
  }

  /** Bytes [start, end) of node `node` as a stream of preads, proven first. */
  async stream(node: number, start: number, end: number): Promise<Readable> {
    const f = this.file(node);
    await this.verify(node);
    const from = Math.max(0, Math.min(start, f.size));
    const to = Math.max(from, Math.min(end, f.size));
    return f.blob !== undefined ? this.preadStream({ kind: 'blob', k: f.blob }, from, to, node) : this.preadStream({ kind: 'pack' }, f.start + from, f.start + to, node);
  }

  // ---- the original archive ----------------------------------------------------------------------

  /** Bytes [start, end) of archive.tar.xz, proven against the entry's digest first. */
  async streamArchive(start: number, end: number): Promise<Readable> {
    await this.using(() => this.verifyArchive());
    return this.preadStream({ kind: 'archive' }, start, end, undefined);
  }

  async readArchive(start: number, length: number): Promise<Buffer> {
    return this.using(async () => {
      await this.verifyArchive();
      return this.pread({ kind: 'archive' }, start, length, undefined);
    });
  }

  // ---- life --------------------------------------------------------------------------------------

  /** A front end serves this entry (HTTP while it is in the catalog, FUSE for the life of the mount). */
  retain(): void {
    this.users++;
  }

  /** A front end stopped serving it; with no users left, its files are closed once reads finish. */
  release(): void {
    if (this.users > 0 && --this.users === 0) void this.close();
  }

  /** Close the open files once in-flight reads finish (a later read opens them again). */
  async close(): Promise<void> {
    while (this.busy > 0) await new Promise<void>((resolve) => this.idle.push(resolve));
    const handles = [...this.handles.values()];
    this.handles.clear();
    await Promise.all(handles.map((h) => h.then((fh) => fh.close()).catch(() => {})));
  }

  /** The entry was moved aside: every later read fails with `why`. */
  async kill(why: KheadersError): Promise<void> {
    this.dead = why;
    await this.close();
  }

  // ---- internals ----------------------------------------------------------------------------------

  private file(node: number): { size: number; blob: number | undefined; start: number } {
    const index = this.entry.index;
    if (!index.has(node)) throw new KheadersError('E_NOT_FOUND', `no node ${node} in ${this.id}`, { errno: 'ENOENT' });
    const kind = index.kindOf(node);
    if (kind !== 'file') throw new KheadersError('E_NOT_FOUND', `${index.pathOf(node)} is not a regular file`, { errno: kind === 'dir' ? 'EISDIR' : 'EINVAL' });
    const d = index.dataOf(node);
    return { size: d.size, blob: d.blob, start: d.offset };
  }

  private async using<T>(fn: () => Promise<T>): Promise<T> {
    if (this.dead) throw this.dead;
    this.busy++;
    try {
      return await fn();
    } finally {
      if (--this.busy === 0) for (const wake of this.idle.splice(0)) wake();
    }
  }

  private what(node: number | undefined): string {
    return node === undefined ? ARCHIVE_FILE : this.entry.index.pathOf(node);
  }

  /** The error for damage found while reading; the owner hears about the first one. */
  private damage(reason: string, node: number | undefined): KheadersError {
    const file = this.what(node);
    const err = new KheadersError('E_ENTRY_DAMAGED', `cache entry ${this.id} is damaged: ${file}: ${reason}`, { id: this.id, file, reason, errno: 'EIO' });
    if (!this.reported) {
      this.reported = true;
      this.onDamage?.(err, this.entry.manifest);
    }
    return err;
  }

  private async readPack(start: number, len: number, node: number): Promise<Buffer> {
    const index = this.entry.index;
    const C = index.chunkBytes;
    const first = Math.floor(start / C);
    const last = Math.floor((start + len - 1) / C);
    let proven = !verifyReads;
    if (!proven) {
      proven = true;
      for (let i = first; i <= last; i++) if (this.chunkOk[i] !== 1) proven = false;
    }
    if (proven) return this.pread({ kind: 'pack' }, start, len, node);
    // Read the whole chunks around the range once, prove them, keep only the range.
    const from = first * C;
    const to = Math.min((last + 1) * C, index.packBytes);
    const buf = await this.pread({ kind: 'pack' }, from, to - from, node);
    this.prove(buf, from, node);
    return Buffer.from(buf.subarray(start - from, start - from + len));
  }

  /** Check the whole chunks in `buf` (pack bytes from `from`, a chunk boundary) against the index. */
  private prove(buf: Buffer, from: number, node: number | undefined): void {
    const index = this.entry.index;
    const C = index.chunkBytes;
    for (let at = 0; at < buf.length; at += C) {
      const i = (from + at) / C;
      if (this.chunkOk[i] === 1) continue;
      const piece = buf.subarray(at, Math.min(at + C, buf.length));
      if (!index.chunkMatches(i, createHash('sha256').update(piece).digest())) {
        throw this.damage(`pack.tar bytes ${from + at}-${from + at + piece.length - 1}, which hold it, do not match the digest recorded at ingest`, node);
      }
      this.chunkOk[i] = 1;
    }
  }

  private async verifyPackRange(start: number, end: number, node: number): Promise<void> {
    if (!verifyReads || end <= start) return;
    const index = this.entry.index;
    const C = index.chunkBytes;
    const perPiece = Math.max(1, Math.floor(VERIFY_PIECE_BYTES / C));
    const last = Math.floor((end - 1) / C);
    for (let i = Math.floor(start / C); i <= last; ) {
      if (this.chunkOk[i] === 1) {
        i++;
        continue;
      }
      const n = Math.min(perPiece, last - i + 1);
      const from = i * C;
      const to = Math.min((i + n) * C, index.packBytes);
      this.prove(await this.pread({ kind: 'pack' }, from, to - from, node), from, node);
      i += n;
    }
  }

  private verifyBlob(k: number, node: number): Promise<void> {
    if (!verifyReads || this.blobOk[k] === 1) return Promise.resolve();
    const blob = this.entry.index.blob(k);
    return this.verifyWhole(`blob:${k}`, { kind: 'blob', k }, blob.size, blob.sha256, node, () => {
      this.blobOk[k] = 1;
    });
  }

  private verifyArchive(): Promise<void> {
    if (!verifyReads || this.archiveOk) return Promise.resolve();
    const m = this.entry.manifest;
    return this.verifyWhole('archive', { kind: 'archive' }, m.archiveBytes, Buffer.from(m.digest, 'hex'), undefined, () => {
      this.archiveOk = true;
    });
  }

  /** Hash a whole file in pieces; concurrent first readers share one pass. */
  private verifyWhole(key: string, source: Source, size: number, want: Buffer, node: number | undefined, ok: () => void): Promise<void> {
    let pending = this.verifying.get(key);
    if (!pending) {
      pending = (async () => {
        const hash = createHash('sha256');
        for (let at = 0; at < size; at += VERIFY_PIECE_BYTES) hash.update(await this.pread(source, at, Math.min(VERIFY_PIECE_BYTES, size - at), node));
        if (!hash.digest().equals(want)) throw this.damage('its bytes do not match the digest recorded at ingest', node);
        ok();
      })().finally(() => this.verifying.delete(key));
      this.verifying.set(key, pending);
    }
    return pending;
  }

  private expected(source: Source): { name: string; size: number } {
    switch (source.kind) {
      case 'pack':
        return { name: PACK_FILE, size: this.entry.index.packBytes };
      case 'archive':
        return { name: ARCHIVE_FILE, size: this.entry.manifest.archiveBytes };
      case 'blob': {
        const b = this.entry.index.blob(source.k);
        return { name: b.name, size: b.size };
      }
    }
  }

  private handle(source: Source, node: number | undefined): Promise<FileHandle> {
    const { name, size } = this.expected(source);
    let p = this.handles.get(name);
    if (!p) {
      const opening = (async () => {
        let fh: FileHandle;
        try {
          // O_NOFOLLOW: a symlink planted in place of an entry file is damage, not a way out.
          fh = await open(entryFile(this.entry.dir, name), fsc.O_RDONLY | fsc.O_NOFOLLOW);
        } catch (err) {
          const code = errnoOf(err);
          if (code === 'ENOENT') throw new KheadersError('E_NOT_FOUND', `the entry ${this.id} was removed from the cache`, { id: this.id, errno: 'ENOENT' });
          if (code === 'ELOOP') throw this.damage(`${name} is a symbolic link`, node);
          if (code === 'EIO') throw this.damage(`${name} cannot be read (EIO)`, node);
          throw unreadableCache(entryFile(this.entry.dir, name), err) ?? err;
        }
        const st = await fh.stat();
        if (!st.isFile() || st.size !== size) {
          await fh.close().catch(() => {});
          throw this.damage(`${name} is ${st.isFile() ? `${st.size} bytes, not ${size}` : 'not a regular file'}`, node);
        }
        return fh;
      })();
      p = opening;
      this.handles.set(name, p);
      // A failed open is not kept: the next read tries again (and reports its own error).
      void opening.catch(() => {
        if (this.handles.get(name) === opening) this.handles.delete(name);
      });
    }
    return p;
  }

  /** Exactly `length` bytes at `position` of `source`, or an error (never fewer bytes). */
  private async pread(source: Source, position: number, length: number, node: number | undefined): Promise<Buffer> {
    const fh = await this.handle(source, node);
    let read: { buf: Buffer; got: number };
    try {
      read = await preadAll(fh, position, length);
    } catch (err) {
      if (errnoOf(err) === 'EIO') throw this.damage(`${this.expected(source).name} cannot be read (EIO)`, node);
      throw err;
    }
    if (read.got < length) throw this.damage(`${this.expected(source).name} ends at byte ${position + read.got}, before the ${length} bytes at ${position} it should hold`, node);
    return read.buf;
  }

  private preadStream(source: Source, start: number, end: number, node: number | undefined): Readable {
    if (this.dead) throw this.dead;
    // The stream counts as a read in flight for its whole life, so close() waits for it.
    this.busy++;
    let released = false;
    return new PreadStream((pos, n) => this.pread(source, pos, n, node), start, end, () => {
      if (released) return;
      released = true;
      if (--this.busy === 0) for (const wake of this.idle.splice(0)) wake();
    });
  }
}

/** Up to `length` bytes at `position`: as many preads as it takes; `got` < length only at the end of the file. */
export async function preadAll(fh: FileHandle, position: number, length: number): Promise<{ buf: Buffer; got: number }> {
  const buf = Buffer.allocUnsafe(length);
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(buf, got, length - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return { buf, got };
}

/** [start, end) of a file as a stream of exact preads (`readAt` fails rather than come up short). */
export class PreadStream extends Readable {
  constructor(
    private readonly readAt: (position: number, length: number) => Promise<Buffer>,
    private pos: number,
    private readonly end: number,
    private readonly onEnd: () => void,
  ) {
    super({ highWaterMark: STREAM_CHUNK_BYTES });
  }

  override _read(): void {
    const n = Math.min(STREAM_CHUNK_BYTES, this.end - this.pos);
    if (n <= 0) {
      this.push(null);
      return;
    }
    void this.readAt(this.pos, n).then(
      (buf) => {
        this.pos += n;
        this.push(buf);
      },
      (err: unknown) => this.destroy(err instanceof Error ? err : new Error(String(err))),
    );
  }

  override _destroy(err: Error | null, cb: (error?: Error | null) => void): void {
    this.onEnd();
    cb(err);
  }
}
