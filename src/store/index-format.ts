/**
 * The on-disk layout of an entry's index (`index.bin`, format 2): one file of fixed-size records
 * that readers use in place, as one buffer (the daemon) or through small preads (`cat`).
 *
 *   header    96 bytes: magic, counts, section sizes, sha256 of everything after the header
 *   nodes     48 bytes per node, in breadth-first order: every directory's children are
 *             consecutive and sorted by name (bytes), so a name is found by binary search
 *   blobs     48 bytes per file stored beside the pack (vmlinux.h, ...): name, size, sha256
 *   chunks    32 bytes per CHUNK of the pack: sha256 of pack bytes [i*CHUNK, (i+1)*CHUNK)
 *   strings   UTF-8 names, symlink targets and blob names, referenced by (offset, length)
 *
 * Why this shape: a lookup touches only the records on its path (a `cat` of one file in a
 * 200,000-entry index reads a few dozen records, not the whole index); the daemon holds an
 * entry as one Buffer instead of an object and a Map per node; and the digests that let readers
 * prove the bytes they serve travel with the offsets they describe.
 *
 * Pure: no I/O. A `ByteView` supplies bytes, from memory or from a file.
 */
import { readSync } from 'node:fs';

export const INDEX_MAGIC = Buffer.from('KHIDX\0\r\n', 'latin1');
export const INDEX_VERSION = 2;
export const HEADER_BYTES = 96;
export const NODE_BYTES = 48;
export const BLOB_BYTES = 48;
export const DIGEST_BYTES = 32;
/** Pack bytes per digest: headers average ~4.5 KiB, so a chunk covers a few of them. */
export const DEFAULT_CHUNK_BYTES = 32 * 1024;

/** Header fields (byte offsets). */
export const H = {
  magic: 0,
  version: 8,
  nodeCount: 12,
  blobCount: 16,
  chunkBytes: 20,
  chunkCount: 24,
  stringsBytes: 28,
  packBytes: 32, // f64
  checksum: 64, // 32 bytes: sha256 of [HEADER_BYTES, end)
} as const;

/** Node record fields (byte offsets inside a record). */
export const N = {
  kind: 0, // u8: KIND_*
  source: 1, // u8: files: 0 = the pack, k > 0 = blob k-1
  mode: 2, // u16: permission bits as archived
  parent: 4, // u32: node id of the directory holding it (the root's is 0)
  nameOff: 8, // u32
  nameLen: 12, // u32
  mtime: 16, // f64: seconds since the epoch
  size: 24, // f64: file bytes; symlink target bytes; 0 for directories
  offset: 32, // f64: files in the pack: where their bytes start
  first: 40, // u32: dirs: first child's id; symlinks: target offset in strings
  count: 44, // u32: dirs: number of children; symlinks: target length
} as const;

/** Blob record fields. */
export const B = {
  nameOff: 0,
  nameLen: 4,
  size: 8, // f64
  sha256: 16, // 32 bytes
} as const;

export const KIND_DIR = 1;
export const KIND_FILE = 2;
export const KIND_SYMLINK = 3;

export interface Layout {
  nodeCount: number;
  blobCount: number;
  chunkBytes: number;
  chunkCount: number;
  stringsBytes: number;
  packBytes: number;
}

/** Where each section starts, and the file's total size. */
export function sections(l: Layout): { nodes: number; blobs: number; chunks: number; strings: number; total: number } {
  const nodes = HEADER_BYTES;
  const blobs = nodes + l.nodeCount * NODE_BYTES;
  const chunks = blobs + l.blobCount * BLOB_BYTES;
  const strings = chunks + l.chunkCount * DIGEST_BYTES;
  return { nodes, blobs, chunks, strings, total: strings + l.stringsBytes };
}

/** Chunks a pack of `packBytes` is cut into. */
export function chunkCountFor(packBytes: number, chunkBytes: number): number {
  return Math.ceil(packBytes / chunkBytes);
}

/**
 * Names a blob (a file stored beside the pack) may have: one plain file name, never a path, never
 * hidden, never one of the entry's own files. Whatever an index says, a blob outside the entry
 * directory cannot be named.
 */
const BLOB_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$/;
export const RESERVED_ENTRY_FILES: ReadonlySet<string> = new Set(['manifest.json', 'index.bin', 'index.json', 'pack.tar', 'archive.tar.xz']);

export function validBlobName(name: string): boolean {
  return BLOB_NAME_RE.test(name) && !RESERVED_ENTRY_FILES.has(name);
}

// ---- reading bytes ------------------------------------------------------------------------------

/** Random access to an index's bytes. Reads past the end throw a RangeError. */
export interface ByteView {
  readonly length: number;
  u8(off: number): number;
  u16(off: number): number;
  u32(off: number): number;
  f64(off: number): number;
  /** The bytes [off, off + len), as a Buffer the caller must not keep if it may be reused. */
  bytes(off: number, len: number): Buffer;
  /** Compare `query` with the bytes [off, off + len), as Buffer.compare does. */
  compare(query: Buffer, off: number, len: number): number;
}

/** The whole index in one Buffer (what the daemon holds). */
export class MemoryView implements ByteView {
  constructor(private readonly buf: Buffer) {}

  get length(): number {
    return this.buf.length;
  }

  get buffer(): Buffer {
    return this.buf;
  }

  u8(off: number): number {
    return this.buf.readUInt8(off);
  }

  u16(off: number): number {
    return this.buf.readUInt16LE(off);
  }

  u32(off: number): number {
    return this.buf.readUInt32LE(off);
  }

  f64(off: number): number {
    return this.buf.readDoubleLE(off);
  }

  bytes(off: number, len: number): Buffer {
    if (off < 0 || len < 0 || off + len > this.buf.length) throw new RangeError(`bytes ${off}+${len} outside the index (${this.buf.length})`);
    return this.buf.subarray(off, off + len);
  }

  compare(query: Buffer, off: number, len: number): number {
    const buf = this.buf;
    if (off < 0 || len < 0 || off + len > buf.length) throw new RangeError(`bytes ${off}+${len} outside the index (${buf.length})`);
    // Names are short: a plain loop beats Buffer#compare's argument checks (lookups are hot).
    const n = Math.min(query.length, len);
    for (let i = 0; i < n; i++) {
      const d = query[i]! - buf[off + i]!;
      if (d !== 0) return d;
    }
    return query.length - len;
  }
}

const PAGE = 4096;
const MAX_PAGES = 64;

/**
 * An index read in 4 KiB pages through a file descriptor, a few pages kept: for one-shot
 * commands (`cat`) that look up one path and must not load the whole index to do it. Reads are
 * synchronous; use it only in a process that serves no FUSE mount.
 */
export class FileView implements ByteView {
  private readonly pages = new Map<number, Buffer>();

  constructor(
    private readonly fd: number,
    readonly length: number,
  ) {}

  private page(n: number): Buffer {
    let p = this.pages.get(n);
    if (p) return p;
    const start = n * PAGE;
    const want = Math.min(PAGE, this.length - start);
    p = Buffer.alloc(want);
    let got = 0;
    while (got < want) {
      const r = readSync(this.fd, p, got, want - got, start + got);
      if (r === 0) throw new RangeError(`the index ends at ${start + got}, before the ${this.length} bytes it had`);
      got += r;
    }
    if (this.pages.size >= MAX_PAGES) {
      const oldest = this.pages.keys().next().value as number;
      this.pages.delete(oldest);
    }
    this.pages.set(n, p);
    return p;
  }

  bytes(off: number, len: number): Buffer {
    if (off < 0 || len < 0 || off + len > this.length) throw new RangeError(`bytes ${off}+${len} outside the index (${this.length})`);
    const first = Math.floor(off / PAGE);
    const last = Math.floor((off + Math.max(len, 1) - 1) / PAGE);
    if (first === last) {
      const p = this.page(first);
      return p.subarray(off - first * PAGE, off - first * PAGE + len);
    }
    const out = Buffer.alloc(len);
    for (let n = first, at = 0; n <= last; n++) {
      const p = this.page(n);
      const from = n === first ? off - first * PAGE : 0;
      const take = Math.min(p.length - from, len - at);
      p.copy(out, at, from, from + take);
      at += take;
    }
    return out;
  }

  u8(off: number): number {
    return this.bytes(off, 1).readUInt8(0);
  }

  u16(off: number): number {
    return this.bytes(off, 2).readUInt16LE(0);
  }

  u32(off: number): number {
    return this.bytes(off, 4).readUInt32LE(0);
  }

  f64(off: number): number {
    return this.bytes(off, 8).readDoubleLE(0);
  }

  compare(query: Buffer, off: number, len: number): number {
    return Buffer.compare(query, this.bytes(off, len));
  }
}
