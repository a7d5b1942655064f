/**
 * The index of one cached header tree: every path, what it is, where its bytes live, and the
 * digests that prove those bytes.
 *
 * It is the sandbox for every reader: FUSE, HTTP, `cat` and `export` look names up here and read
 * bytes at the recorded offset of the pack file; nothing ever joins a user-supplied path onto the
 * filesystem. Pure data, no I/O: built once by ingest and encoded to `index.bin` (layout in
 * index-format.ts), then used in place by readers: decoded whole and fully validated (the
 * daemon, export), or opened lazily through a file view, each record checked as it is touched
 * (`cat`, which must not load a 200,000-entry index to print one file).
 *
 * Node ids are dense, 0 is the root, and they are stable for the life of the entry (FUSE builds
 * inode numbers on them).
 */
import { KheadersError } from '../errors.js';
import {
  B,
  BLOB_BYTES,
  DEFAULT_CHUNK_BYTES,
  DIGEST_BYTES,
  H,
  HEADER_BYTES,
  INDEX_MAGIC,
  INDEX_VERSION,
  KIND_DIR,
  KIND_FILE,
  KIND_SYMLINK,
  MemoryView,
  N,
  NODE_BYTES,
  chunkCountFor,
  sections,
  validBlobName,
  type ByteView,
  type Layout,
} from './index-format.js';
import { createHash } from 'node:crypto';

export type NodeKind = 'file' | 'dir' | 'symlink';

/** One member of the tree as ingest describes it. Offsets and sizes are in bytes of the pack. */
export interface IndexRecord {
  path: string; // normalised, relative, no leading './', '' is the root
  kind: NodeKind;
  mode: number; // permission bits as archived (readers present them read-only)
  mtime: number; // seconds since the epoch
  size: number; // file bytes; symlink target length; 0 for dirs
  offset?: number; // files in the pack: byte offset of the data
  blob?: string; // files stored beside the pack instead (e.g. 'vmlinux.h'): name in the entry dir
  sha256?: string; // blobs: the sha256 of their bytes, recorded when they were made
  target?: string; // symlinks: the target exactly as archived
}

/** A file stored beside the pack, and the digest that proves it. */
export interface BlobInfo {
  name: string;
  size: number;
  sha256: Buffer;
}

/** The pack's size and the sha256 of each of its chunks, as ingest saw the bytes go by. */
export interface PackDigests {
  packBytes: number;
  chunkBytes: number;
  /** chunkCount * 32 bytes. */
  digests: Buffer;
}

/** One node, materialised (a small object made on request; the index itself holds none). */
export interface TreeNode {
  readonly id: number;
  readonly path: string;
  readonly name: string;
  readonly parent: number;
  readonly kind: NodeKind;
  readonly mode: number;
  readonly mtime: number;
  readonly size: number;
  readonly offset?: number;
  readonly blob?: string;
  /** Files kept beside the pack: the sha256 (hex) they are proven against. */
  readonly sha256?: string;
  readonly target?: string;
}

/** The index bytes are not a well-formed index: the message says what is wrong. */
export class IndexFormatError extends Error {
  override readonly name = 'IndexFormatError';
}

/** Node records per page of a TreeBuilder (48 KiB pages). */
const PAGE_RECORDS = 1024;
/** Children a directory takes before it is first sorted (then: as many again as it holds). */
const SORT_BATCH = 32;
const MAX_SYMLINK_HOPS = 40; // the kernel's own MAXSYMLINKS
const KIND_NAMES = ['', 'dir', 'file', 'symlink'] as const;
const SLASH = 0x2f;

/**
 * Normalise an archive member name to the index's form, or say why it is unsafe.
 * `./include/x.h` → `include/x.h`; `./` → `` (root). Refuses absolute names, `..`, NUL.
 */
export function normaliseEntryPath(name: string): string {
  if (name.includes('\0')) throw unsafe(name, 'contains a NUL byte');
  if (name.startsWith('/')) throw unsafe(name, 'is an absolute path');
  const parts: string[] = [];
  for (const part of name.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') throw unsafe(name, 'has a ".." component');
    parts.push(part);
  }
  return parts.join('/');
}

/**
 * Where a symlink at `linkPath` with `target` points, as an index path; undefined if it
 * leaves the tree (or is absolute). Does not check that the target exists.
 */
export function symlinkTargetPath(linkPath: string, target: string): string | undefined {
  if (target.startsWith('/') || target.includes('\0') || target === '') return undefined;
  const parts = linkPath.split('/');
  parts.pop(); // the link's own name: targets are relative to its directory
  for (const part of target.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') {
      if (parts.length === 0) return undefined;
      parts.pop();
    } else parts.push(part);
  }
  return parts.join('/');
}

const ESCAPES = -2; // the walk left the tree
const STOPS = -1; // ENOENT, ENOTDIR or ELOOP: nothing is reached

function unsafe(entry: string, why: string): KheadersError {
  return new KheadersError('E_UNSAFE_ENTRY', `unsafe archive entry ${JSON.stringify(entry)}: ${why}`, { entry, reason: why });
}

/** A scratch buffer for encoding looked-up names (lookups are synchronous: one is enough). */
let scratch = Buffer.alloc(1024);
function encodeName(name: string): Buffer {
  if (name.length * 3 > scratch.length) scratch = Buffer.alloc(name.length * 3);
  const n = scratch.write(name, 'utf8');
  return scratch.subarray(0, n);
}

// ---- building -----------------------------------------------------------------------------------

/**
 * A directory being built. Files and symlinks stay as their records (their index in `records`):
 * at 200,000 entries an object per node would cost more than the finished index.
 */
interface DirDraft {
  name: string;
  path: string;
  mode: number;
  mtime: number;
  /** Made because a path went through it, not (yet) by its own record. */
  implicit: boolean;
  /** Record order of what made it: which of two clashing names came first. */
  seq: number;
  children: Array<DirDraft | number>;
  /** How many of `children`, from the first, are already sorted by name. */
  sorted: number;
  /** Id of its first child, once ids are given. */
  first: number;
  /** Where its name is in the builder's strings. */
  nameOff: number;
  nameLen: number;
}

/**
 * UTF-8 byte order of a[aStart..] and b[bStart..] without encoding them (UTF-8 bytes sort as code
 * points do; UTF-16 code units do too, except that surrogates must sort above U+E000..U+FFFF).
 */
function compareUtf8(a: string, aStart: number, b: string, bStart: number): number {
  const al = a.length - aStart;
  const bl = b.length - bStart;
  const n = Math.min(al, bl);
  for (let i = 0; i < n; i++) {
    let ca = a.charCodeAt(aStart + i);
    let cb = b.charCodeAt(bStart + i);
    if (ca === cb) continue;
    if (ca >= 0xd800) ca = ca <= 0xdfff ? ca + 0x2000 : ca - 0x800;
    if (cb >= 0xd800) cb = cb <= 0xdfff ? cb + 0x2000 : cb - 0x800;
    return ca - cb;
  }
  return al - bl;
}

/** Set by TreeIndex (which alone may construct one): a built index, checked. */
let finishBuilt: (out: Buffer, layout: Layout, symlinks: readonly number[]) => TreeIndex;

export class TreeIndex {
  readonly nodeCount: number;
  readonly blobCount: number;
  readonly chunkBytes: number;
  readonly chunkCount: number;
  readonly packBytes: number;
  private readonly at: ReturnType<typeof sections>;
  /** Lazily opened indexes check each node the first time it is touched. */
  private readonly checked: Set<number> | undefined;
  private stats: { files: number; dirs: number; symlinks: number; bytes: number } | undefined;

  private constructor(
    private readonly v: ByteView,
    layout: Layout,
    lazy: boolean,
  ) {
    this.nodeCount = layout.nodeCount;
    this.blobCount = layout.blobCount;
    this.chunkBytes = layout.chunkBytes;
    this.chunkCount = layout.chunkCount;
    this.packBytes = layout.packBytes;
    this.at = sections(layout);
    this.checked = lazy ? new Set() : undefined;
  }

  /**
   * Build from records in any order. Parent directories an archive leaves implicit are created
   * (mode 0755, mtime 0). Duplicates and paths under a non-directory are refused. Symlinks that
   * leave the tree (as the kernel would follow them) are refused.
   *
   * `pack` carries the chunk digests ingest computed; `blobs` the files stored beside the pack.
   * Without them (tests of the tree alone) the digests are zeros, which no read would accept.
   * The same as a TreeBuilder given the records one by one (ingest does that as they are decoded).
   */
  static fromRecords(records: readonly IndexRecord[], content: { pack?: PackDigests; blobs?: readonly BlobInfo[] } = {}): TreeIndex {
    const builder = new TreeBuilder();
    for (const rec of records) builder.add(rec);
    return builder.build(content);
  }

  static {
    // The one way a TreeBuilder's bytes become an index: the escape check cannot be skipped.
    finishBuilt = (out, layout, symlinks) => {
      const index = new TreeIndex(new MemoryView(out), layout, false);
      // Text alone cannot tell where a link leads: the kernel (a FUSE mount, an exported tree)
      // expands each symlink where it stands, so `up/../x` with `up -> ../..` climbs from where
      // `up` leads, not from `up`'s directory. Follow every link as the kernel will.
      const escaping = index.escapingSymlink(symlinks);
      if (escaping !== undefined) {
        const n = index.node(escaping)!;
        throw unsafe(n.path, `is a symlink to ${JSON.stringify(n.target)}, which leaves the tree through another symlink`);
      }
      return index;
    };
  }

  /**
   * An index read back from its bytes, every record and the tree's shape validated: bounds of
   * every offset and size (files inside a pack of `packBytes`), names that cannot leave their
   * directory, children sorted, symlinks that stay inside the tree, blob names the format allows,
   * and (unless `checksum` is false) the sha256 over the body. Throws IndexFormatError.
   */
  static decode(buf: Buffer, expect: { packBytes: number; checksum?: boolean; perFieldOnly?: boolean }): TreeIndex {
    const v = new MemoryView(buf);
    const layout = readLayout(v, expect.packBytes);
    if (expect.checksum !== false) {
      const sum = createHash('sha256').update(buf.subarray(HEADER_BYTES)).digest();
      if (!sum.equals(buf.subarray(H.checksum, H.checksum + DIGEST_BYTES))) throw new IndexFormatError('its checksum does not match its content');
    }
    const index = new TreeIndex(v, layout, false);
    // perFieldOnly skips the flat pass: tests hold the two to the same verdicts.
    index.validateAll(expect.perFieldOnly !== true);
    return index;
  }

  /**
   * The checks of decode() that need only the header, on a buffer of the file's length of which
   * only the header has been read: a file whose header is wrong is refused before the rest (up
   * to 512 MiB, a sparse file say) is read.
   */
  static checkHeader(buf: Buffer, expect: { packBytes: number }): void {
    readLayout(new MemoryView(buf), expect.packBytes);
  }

  /**
   * An index used in place through `view` (e.g. a FileView over index.bin), loading only the
   * records a lookup touches; each is validated when first touched. The checksum is the
   * caller's to verify (streaming, see verifyIndexChecksum in the loader).
   */
  static open(view: ByteView, expect: { packBytes: number }): TreeIndex {
    return new TreeIndex(view, readLayout(view, expect.packBytes), true);
  }

  /** The encoded bytes (only for an index held in memory). */
  encode(): Buffer {
    if (!(this.v instanceof MemoryView)) throw new Error('encode() of a lazily opened index');
    return this.v.buffer;
  }

  /** Bytes the index occupies in memory. */
  get byteLength(): number {
    return this.v instanceof MemoryView ? this.v.length : 0;
  }

  // ---- whole-tree figures ----------------------------------------------------------------------

  private counts(): { files: number; dirs: number; symlinks: number; bytes: number } {
    if (!this.stats) {
      const s = { files: 0, dirs: 0, symlinks: 0, bytes: 0 };
      for (let id = 0; id < this.nodeCount; id++) {
        const k = this.kindCode(id);
        if (k === KIND_FILE) {
          s.files++;
          s.bytes += this.sizeOf(id);
        } else if (k === KIND_DIR) s.dirs++;
        else s.symlinks++;
      }
      this.stats = s;
    }
    return this.stats;
  }

  get fileCount(): number {
    return this.counts().files;
  }

  get dirCount(): number {
    return this.counts().dirs;
  }

  get symlinkCount(): number {
    return this.counts().symlinks;
  }

  /** Sum of file sizes. */
  get totalBytes(): number {
    return this.counts().bytes;
  }

  // ---- one node's fields (no allocation: the hot paths use these) ------------------------------

  private rec(id: number): number {
    if (!Number.isInteger(id) || id < 0 || id >= this.nodeCount) throw new RangeError(`no node ${id}`);
    if (this.checked && !this.checked.has(id)) {
      this.checkNode(id);
      this.checked.add(id);
    }
    return this.at.nodes + id * NODE_BYTES;
  }

  private kindCode(id: number): number {
    return this.v.u8(this.rec(id) + N.kind);
  }

  has(id: number): boolean {
    return Number.isInteger(id) && id >= 0 && id < this.nodeCount;
  }

  kindOf(id: number): NodeKind {
    return KIND_NAMES[this.kindCode(id)] as NodeKind;
  }

  modeOf(id: number): number {
    return this.v.u16(this.rec(id) + N.mode);
  }

  parentOf(id: number): number {
    return this.v.u32(this.rec(id) + N.parent);
  }

  mtimeOf(id: number): number {
    return this.v.f64(this.rec(id) + N.mtime);
  }

  sizeOf(id: number): number {
    return this.v.f64(this.rec(id) + N.size);
  }

  nameOf(id: number): string {
    const r = this.rec(id);
    return this.v.bytes(this.at.strings + this.v.u32(r + N.nameOff), this.v.u32(r + N.nameLen)).toString('utf8');
  }

  /** A symlink's target exactly as archived; undefined for other kinds. */
  targetOf(id: number): string | undefined {
    const r = this.rec(id);
    if (this.v.u8(r + N.kind) !== KIND_SYMLINK) return undefined;
    return this.v.bytes(this.at.strings + this.v.u32(r + N.first), this.v.u32(r + N.count)).toString('utf8');
  }

  /** Where a file's bytes are: at `offset` in the pack, or the whole of blob `blob`. */
  dataOf(id: number): { blob: number | undefined; offset: number; size: number } {
    const r = this.rec(id);
    const source = this.v.u8(r + N.source);
    return { blob: source === 0 ? undefined : source - 1, offset: this.v.f64(r + N.offset), size: this.v.f64(r + N.size) };
  }

  /** Children of a directory: ids [first, first + count). */
  childRange(id: number): { first: number; count: number } {
    const r = this.rec(id);
    if (this.v.u8(r + N.kind) !== KIND_DIR) return { first: 0, count: 0 };
    return { first: this.v.u32(r + N.first), count: this.v.u32(r + N.count) };
  }

  /** The child of directory `dir` called `name` (binary search), or -1. */
  childId(dir: number, name: string): number {
    const { first, count } = this.childRange(dir);
    if (count === 0) return -1;
    const q = encodeName(name);
    let lo = first;
    let hi = first + count - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const r = this.rec(mid);
      const c = this.v.compare(q, this.at.strings + this.v.u32(r + N.nameOff), this.v.u32(r + N.nameLen));
      if (c === 0) {
        if (this.checked && this.v.u32(r + N.parent) !== dir) throw new IndexFormatError(`node ${mid} is listed under ${dir} but names another parent`);
        return mid;
      }
      if (c < 0) hi = mid - 1;
      else lo = mid + 1;
    }
    return -1;
  }

  // ---- blobs and chunk digests -----------------------------------------------------------------

  blob(k: number): BlobInfo {
    if (!Number.isInteger(k) || k < 0 || k >= this.blobCount) throw new RangeError(`no blob ${k}`);
    const r = this.at.blobs + k * BLOB_BYTES;
    const name = this.v.bytes(this.at.strings + this.v.u32(r + B.nameOff), this.v.u32(r + B.nameLen)).toString('utf8');
    if (this.checked && !validBlobName(name)) throw new IndexFormatError(`blob ${k} has the name ${JSON.stringify(name)}, which the format does not allow`);
    return { name, size: this.v.f64(r + B.size), sha256: Buffer.from(this.v.bytes(r + B.sha256, DIGEST_BYTES)) };
  }

  /** Does `digest` equal the recorded sha256 of pack chunk `i`? */
  chunkMatches(i: number, digest: Buffer): boolean {
    if (!Number.isInteger(i) || i < 0 || i >= this.chunkCount) return false;
    return this.v.compare(digest, this.at.chunks + i * DIGEST_BYTES, DIGEST_BYTES) === 0;
  }

  // ---- nodes as objects --------------------------------------------------------------------------

  get root(): TreeNode {
    return this.node(0)!;
  }

  /** The path of node `id` (its ancestors' names joined). */
  pathOf(id: number): string {
    const names: string[] = [];
    for (let n = id, guard = 0; n !== 0; n = this.parentOf(n)) {
      if (++guard > this.nodeCount) throw new IndexFormatError(`node ${id} has a cycle of parents`);
      names.push(this.nameOf(n));
    }
    return names.reverse().join('/');
  }

  node(id: number): TreeNode | undefined {
    if (!this.has(id)) return undefined;
    const kind = this.kindOf(id);
    const base = { id, path: this.pathOf(id), name: this.nameOf(id), parent: this.parentOf(id), kind, mode: this.modeOf(id), mtime: this.mtimeOf(id), size: this.sizeOf(id) };
    if (kind === 'symlink') return { ...base, target: this.targetOf(id)! };
    if (kind === 'file') {
      const d = this.dataOf(id);
      if (d.blob === undefined) return { ...base, offset: d.offset };
      const b = this.blob(d.blob);
      return { ...base, blob: b.name, sha256: b.sha256.toString('hex') };
    }
    return base;
  }

  /** Every node, materialised (for tests and whole-tree walks such as export; not for hot paths). */
  get nodes(): TreeNode[] {
    const out: TreeNode[] = [];
    for (let id = 0; id < this.nodeCount; id++) out.push(this.node(id)!);
    return out;
  }

  /** Children in name order (readdir order is stable across calls). */
  list(dir: TreeNode | number): TreeNode[] {
    const { first, count } = this.childRange(typeof dir === 'number' ? dir : dir.id);
    const out: TreeNode[] = [];
    for (let id = first; id < first + count; id++) out.push(this.node(id)!);
    return out;
  }

  /** The child of `dir` named `name`, symlinks not followed. */
  child(dir: TreeNode | number, name: string): TreeNode | undefined {
    const id = this.childId(typeof dir === 'number' ? dir : dir.id, name);
    return id < 0 ? undefined : this.node(id);
  }

  /** The id at exactly this normalised path, symlinks not followed, or -1. */
  idOf(path: string): number {
    if (path === '') return 0;
    let id = 0;
    for (const name of path.split('/')) {
      id = this.childId(id, name);
      if (id < 0) return -1;
    }
    return id;
  }

  /** The node at exactly this normalised path, symlinks not followed. */
  get(path: string): TreeNode | undefined {
    const id = this.idOf(path);
    return id < 0 ? undefined : this.node(id);
  }

  /**
   * Resolve a path, following symlinks in every component (and the last one) exactly as the
   * kernel does, never leaving the tree. -1 when missing, looping, or escaping. Input must
   * already be normalised.
   */
  resolveId(path: string): number {
    const id = this.walk([0], path === '' ? [] : path.split('/'));
    return id < 0 ? -1 : id;
  }

  resolve(path: string): TreeNode | undefined {
    const id = this.resolveId(path);
    return id < 0 ? undefined : this.node(id);
  }

  // ---- the walk --------------------------------------------------------------------------------

  /** The directory chain from the root to node `id` (inclusive). */
  private chainTo(id: number): number[] {
    const chain: number[] = [];
    for (let n = id, guard = 0; ; n = this.parentOf(n)) {
      chain.unshift(n);
      if (n === 0) return chain;
      if (++guard > this.nodeCount) throw new IndexFormatError(`node ${id} has a cycle of parents`);
    }
  }

  /**
   * Path resolution as the kernel does it: components are taken one at a time from the current
   * directory chain; `..` pops the chain (so it climbs from where a symlink led, not from the text
   * of the path); a symlink's target is spliced in front of what remains, relative to the link's
   * own directory; at most MAX_SYMLINK_HOPS links. One walker for ingest's escape check and for
   * every reader's lookups, so `cat`, HTTP, export and FUSE agree on where a path leads.
   */
  private walk(chain: readonly number[], components: readonly string[]): number {
    const dirs = [...chain];
    const pending = [...components];
    let hops = 0;
    while (pending.length > 0) {
      const name = pending.shift()!;
      if (name === '' || name === '.') continue;
      if (name === '..') {
        if (dirs.length === 1) return ESCAPES;
        dirs.pop();
        continue;
      }
      const cur = dirs[dirs.length - 1]!;
      if (this.kindCode(cur) !== KIND_DIR) return STOPS;
      const next = this.childId(cur, name);
      if (next < 0) return STOPS;
      if (this.kindCode(next) === KIND_SYMLINK) {
        if (++hops > MAX_SYMLINK_HOPS) return STOPS;
        const target = this.targetOf(next)!;
        if (target.startsWith('/')) return ESCAPES;
        pending.unshift(...target.split('/'));
        continue;
      }
      dirs.push(next);
    }
    return dirs[dirs.length - 1]!;
  }

  /** The first symlink (of `ids`, when the caller knows where they are) that, followed as the kernel would, leads out of the tree. */
  private escapingSymlink(ids?: readonly number[]): number | undefined {
    for (const id of ids ?? this.allIds()) {
      if (this.kindCode(id) !== KIND_SYMLINK) continue;
      if (this.walk(this.chainTo(this.parentOf(id)), this.targetOf(id)!.split('/')) === ESCAPES) return id;
    }
    return undefined;
  }

  private *allIds(): Generator<number> {
    for (let id = 0; id < this.nodeCount; id++) yield id;
  }

  // ---- validation ------------------------------------------------------------------------------

  /** One record on its own: every field in range, its name a single path component. */
  private checkNode(id: number): void {
    const v = this.v;
    const r = this.at.nodes + id * NODE_BYTES;
    const bad = (why: string): IndexFormatError => new IndexFormatError(`node ${id}: ${why}`);
    const kind = v.u8(r + N.kind);
    if (kind !== KIND_DIR && kind !== KIND_FILE && kind !== KIND_SYMLINK) throw bad(`unknown kind ${kind}`);
    if (v.u16(r + N.mode) > 0o7777) throw bad('mode out of range');
    const parent = v.u32(r + N.parent);
    const nameLen = v.u32(r + N.nameLen);
    const stringsEnd = this.at.total - this.at.strings;
    const inStrings = (off: number, len: number): boolean => off <= stringsEnd && len <= stringsEnd - off;
    if (!inStrings(v.u32(r + N.nameOff), nameLen)) throw bad('name outside the string table');
    if (id === 0) {
      if (kind !== KIND_DIR || parent !== 0 || nameLen !== 0) throw bad('the root must be an unnamed directory');
    } else {
      if (parent >= id) throw bad(`parent ${parent} does not come before it`);
      const name = v.bytes(this.at.strings + v.u32(r + N.nameOff), nameLen);
      if (nameLen === 0 || name.includes(SLASH) || name.includes(0) || (nameLen <= 2 && (name.equals(DOT) || name.equals(DOTDOT)))) {
        throw bad(`name ${JSON.stringify(name.toString('utf8'))} is not one path component`);
      }
    }
    if (!Number.isFinite(v.f64(r + N.mtime))) throw bad('mtime is not a number');
    const size = v.f64(r + N.size);
    if (!Number.isSafeInteger(size) || size < 0) throw bad('size out of range');
    const source = v.u8(r + N.source);
    const offset = v.f64(r + N.offset);
    if (kind === KIND_FILE) {
      if (source > this.blobCount) throw bad(`names blob ${source - 1} of ${this.blobCount}`);
      if (source === 0) {
        if (!Number.isSafeInteger(offset) || offset < 0 || offset + size > this.packBytes) throw bad(`bytes ${offset}+${size} are not inside the pack (${this.packBytes} bytes)`);
      } else {
        const blob = this.blob(source - 1);
        if (offset !== 0 || size !== blob.size) throw bad(`size ${size} differs from its blob's ${blob.size}`);
      }
    } else if (source !== 0 || offset !== 0) throw bad('a directory or symlink with data');
    if (kind === KIND_DIR) {
      if (size !== 0) throw bad('a directory with a size');
      const first = v.u32(r + N.first);
      const count = v.u32(r + N.count);
      if (count > 0 && (first <= id || first + count > this.nodeCount)) throw bad(`children ${first}+${count} out of range`);
    }
    if (kind === KIND_SYMLINK) {
      const off = v.u32(r + N.first);
      const len = v.u32(r + N.count);
      if (!inStrings(off, len) || len === 0 || len !== size) throw bad('target outside the string table');
      const target = v.bytes(this.at.strings + off, len);
      if (target.includes(0) || target[0] === SLASH) throw bad('target is absolute or has a NUL byte');
    }
  }

  /**
   * validateAll over an index held in one buffer, as a few flat loops over its bytes: the same
   * checks, but without a call and a Buffer per field. It runs once per entry at every daemon
   * start, mostly before V8 has optimised anything, where the per-field version cost ~40 ms of
   * CPU for a 7,000-node kernel tree. True when every check passed (the whole-tree figures are
   * then known too); false sends the caller to the per-field version, which names what is wrong.
   */
  private validInMemory(buf: Buffer, symlinks: number[]): boolean {
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    const u32 = (o: number): number => dv.getUint32(o, true);
    const { nodes, strings, total } = this.at;
    const stringsEnd = total - strings;
    const { nodeCount, blobCount, packBytes } = this;
    const blobSizes: number[] = [];
    for (let k = 0; k < blobCount; k++) {
      const b = this.blob(k);
      if (!validBlobName(b.name) || !Number.isSafeInteger(b.size) || b.size < 0) return false;
      blobSizes.push(b.size);
    }
    const stats = { files: 0, dirs: 0, symlinks: 0, bytes: 0 };
    let listed = 0;
    for (let id = 0, r = nodes; id < nodeCount; id++, r += NODE_BYTES) {
      const kind = buf[r + N.kind]!;
      const parent = u32(r + N.parent);
      const nameOff = u32(r + N.nameOff);
      const nameLen = u32(r + N.nameLen);
      if (dv.getUint16(r + N.mode, true) > 0o7777) return false;
      if (nameOff > stringsEnd || nameLen > stringsEnd - nameOff) return false;
      if (id === 0) {
        if (kind !== KIND_DIR || parent !== 0 || nameLen !== 0) return false;
      } else {
        if (parent >= id || nameLen === 0) return false;
        const at = strings + nameOff;
        for (let i = at; i < at + nameLen; i++) if (buf[i] === SLASH || buf[i] === 0) return false;
        if (buf[at] === 0x2e && (nameLen === 1 || (nameLen === 2 && buf[at + 1] === 0x2e))) return false;
        // Each node lies in its parent's range of children, after its sibling in name order.
        const pr = nodes + parent * NODE_BYTES;
        const first = u32(pr + N.first);
        if (buf[pr + N.kind] !== KIND_DIR || id < first || id >= first + u32(pr + N.count)) return false;
        if (id > first) {
          const prev = r - NODE_BYTES;
          const prevAt = strings + u32(prev + N.nameOff);
          const prevLen = u32(prev + N.nameLen);
          let c = 0;
          for (let i = 0, n = Math.min(prevLen, nameLen); c === 0 && i < n; i++) c = buf[prevAt + i]! - buf[at + i]!;
          if ((c === 0 ? prevLen - nameLen : c) >= 0) return false;
        }
      }
      if (!Number.isFinite(dv.getFloat64(r + N.mtime, true))) return false;
      const size = dv.getFloat64(r + N.size, true);
      if (!Number.isSafeInteger(size) || size < 0) return false;
      const source = buf[r + N.source]!;
      const offset = dv.getFloat64(r + N.offset, true);
      if (kind === KIND_FILE) {
        if (source > blobCount) return false;
        if (source === 0) {
          if (!Number.isSafeInteger(offset) || offset < 0 || offset + size > packBytes) return false;
        } else if (offset !== 0 || size !== blobSizes[source - 1]) return false;
        stats.files++;
        stats.bytes += size;
      } else if (source !== 0 || offset !== 0) return false;
      else if (kind === KIND_DIR) {
        const first = u32(r + N.first);
        const count = u32(r + N.count);
        if (size !== 0 || (count > 0 && (first <= id || first + count > nodeCount))) return false;
        listed += count;
        stats.dirs++;
      } else if (kind === KIND_SYMLINK) {
        const off = u32(r + N.first);
        const len = u32(r + N.count);
        if (off > stringsEnd || len > stringsEnd - off || len === 0 || len !== size) return false;
        if (buf[strings + off] === SLASH) return false;
        for (let i = strings + off; i < strings + off + len; i++) if (buf[i] === 0) return false;
        stats.symlinks++;
        symlinks.push(id);
      } else return false;
    }
    // Each node but the root lies in exactly its parent's range: nothing is orphaned.
    if (listed !== nodeCount - 1) return false;
    this.stats = stats;
    return true;
  }

  /** Every record, the tree's shape (each node in its parent's range, siblings sorted) and the symlinks. */
  private validateAll(flat: boolean): void {
    const symlinks: number[] = [];
    if (flat && this.v instanceof MemoryView && this.validInMemory(this.v.buffer, symlinks)) {
      const escaping = this.escapingSymlink(symlinks);
      if (escaping !== undefined) throw new IndexFormatError(`the symlink ${this.pathOf(escaping)} leads out of the tree`);
      return;
    }
    for (let k = 0; k < this.blobCount; k++) {
      const b = this.blob(k);
      if (!validBlobName(b.name)) throw new IndexFormatError(`blob ${k} has the name ${JSON.stringify(b.name)}, which the format does not allow`);
      if (!Number.isSafeInteger(b.size) || b.size < 0) throw new IndexFormatError(`blob ${b.name} has a size out of range`);
    }
    for (let id = 0; id < this.nodeCount; id++) this.checkNode(id);
    let listed = 0;
    for (let id = 0; id < this.nodeCount; id++) {
      const { first, count } = this.childRange(id);
      listed += count;
      for (let c = first; c < first + count; c++) {
        if (this.parentOf(c) !== id) throw new IndexFormatError(`node ${c} is listed under ${id} but names parent ${this.parentOf(c)}`);
        if (c > first && Buffer.compare(this.nameBytes(c - 1), this.nameBytes(c)) >= 0) throw new IndexFormatError(`the children of node ${id} are not sorted (at ${c})`);
      }
    }
    // Each node but the root lies in exactly its parent's range: nothing is orphaned.
    if (listed !== this.nodeCount - 1) throw new IndexFormatError(`${listed} nodes are listed in directories, not ${this.nodeCount - 1}`);
    const escaping = this.escapingSymlink();
    if (escaping !== undefined) throw new IndexFormatError(`the symlink ${this.pathOf(escaping)} leads out of the tree`);
  }

  private nameBytes(id: number): Buffer {
    const r = this.rec(id);
    return this.v.bytes(this.at.strings + this.v.u32(r + N.nameOff), this.v.u32(r + N.nameLen));
  }
}

const DOT = Buffer.from('.');
const DOTDOT = Buffer.from('..');

/** The header's layout, checked against itself, the view's length and the pack's size. */
function readLayout(v: ByteView, packBytes: number): Layout {
  if (v.length < HEADER_BYTES) throw new IndexFormatError(`it is ${v.length} bytes, shorter than its header`);
  if (Buffer.compare(v.bytes(H.magic, INDEX_MAGIC.length), INDEX_MAGIC) !== 0) throw new IndexFormatError('it does not start with the index magic');
  const version = v.u32(H.version);
  if (version !== INDEX_VERSION) throw new IndexFormatError(`format ${version} is not understood (this is format ${INDEX_VERSION})`);
  const layout: Layout = {
    nodeCount: v.u32(H.nodeCount),
    blobCount: v.u32(H.blobCount),
    chunkBytes: v.u32(H.chunkBytes),
    chunkCount: v.u32(H.chunkCount),
    stringsBytes: v.u32(H.stringsBytes),
    packBytes: v.f64(H.packBytes),
  };
  if (layout.nodeCount < 1) throw new IndexFormatError('it has no root');
  if (layout.blobCount > 254) throw new IndexFormatError(`${layout.blobCount} blobs is more than the format holds`);
  if (layout.chunkBytes < 512 || layout.chunkBytes > 1 << 24 || (layout.chunkBytes & (layout.chunkBytes - 1)) !== 0) throw new IndexFormatError(`chunk size ${layout.chunkBytes} is not allowed`);
  if (layout.packBytes !== packBytes) throw new IndexFormatError(`it describes a pack of ${layout.packBytes} bytes, not ${packBytes}`);
  if (layout.chunkCount !== chunkCountFor(packBytes, layout.chunkBytes)) throw new IndexFormatError(`${layout.chunkCount} chunk digests for ${packBytes} bytes`);
  const { total } = sections(layout);
  if (total !== v.length) throw new IndexFormatError(`it is ${v.length} bytes, but its header describes ${total}`);
  return layout;
}

/**
 * A TreeIndex built one record at a time, as an archive is decoded: the directory tree is drafted
 * as records arrive, so what is left when the last one is in (sorting each directory, writing
 * the bytes) is short. `add` never throws: the first record refused is thrown by `build`, as
 * `fromRecords` over the same records would throw it, so a caller that adds while decoding
 * reports a bad archive at the same point and with the same error as one that builds at the end.
 */
export class TreeBuilder {
  private readonly records: IndexRecord[] = [];
  private readonly root: DirDraft = { name: '', path: '', mode: 0o755, mtime: 0, implicit: false, seq: -1, children: [], sorted: 0, first: 0, nameOff: 0, nameLen: 0 };
  private readonly dirs = new Map<string, DirDraft>([['', this.root]]);
  /** Where each record's own name starts in its path. */
  private readonly nameStart: number[] = [];
  /** Records of files kept beside the pack (resolved against the blobs in `build`). */
  private readonly blobRecords: number[] = [];
  private packEnd = 0;
  private refused: Error | undefined;
  /**
   * The index's strings and its file and symlink records, encoded as records arrive (parent and,
   * for files beside the pack, source are filled in by `build`), so that `build` copies them
   * rather than encodes them. Names are in the order they arrived. Records are kept in pages of
   * PAGE_RECORDS (record i in page i / PAGE_RECORDS): growing leaves no copies behind, which at
   * 200,000 entries would add megabytes to the ingest's peak.
   */
  private strings: Buffer = Buffer.alloc(64 * 1024);
  private stringsUsed = 0;
  private readonly pages: Buffer[] = [];

  get count(): number {
    return this.records.length;
  }

  add(rec: IndexRecord): void {
    if (this.refused !== undefined) return;
    const i = this.records.push(rec) - 1;
    try {
      this.draft(rec, i);
    } catch (err) {
      this.refused = err instanceof Error ? err : new Error(String(err));
    }
  }

  private putString(text: string): { nameOff: number; nameLen: number } {
    if (this.strings.length - this.stringsUsed < text.length * 3) this.strings = grown(this.strings, this.stringsUsed + text.length * 3);
    const nameLen = this.strings.write(text, this.stringsUsed, 'utf8');
    const nameOff = this.stringsUsed;
    this.stringsUsed += nameLen;
    return { nameOff, nameLen };
  }

  /** A file's or symlink's node record, all but its parent (and a blob's source). */
  private encodeLeaf(rec: IndexRecord, i: number, nameFrom: number): void {
    const page = Math.floor(i / PAGE_RECORDS);
    while (this.pages.length <= page) this.pages.push(Buffer.alloc(PAGE_RECORDS * NODE_BYTES));
    const out = this.pages[page]!;
    const r = (i % PAGE_RECORDS) * NODE_BYTES;
    const name = this.putString(rec.path.slice(nameFrom));
    out.writeUInt32LE(name.nameOff, r + N.nameOff);
    out.writeUInt32LE(name.nameLen, r + N.nameLen);
    out.writeUInt8(rec.kind === 'file' ? KIND_FILE : KIND_SYMLINK, r + N.kind);
    out.writeUInt16LE(rec.mode & 0o7777, r + N.mode);
    out.writeDoubleLE(rec.mtime, r + N.mtime);
    if (rec.kind === 'file') {
      out.writeDoubleLE(rec.size, r + N.size);
      if (rec.blob === undefined) out.writeDoubleLE(rec.offset ?? 0, r + N.offset);
    } else {
      const target = this.putString(rec.target!);
      out.writeDoubleLE(target.nameLen, r + N.size);
      out.writeUInt32LE(target.nameOff, r + N.first);
      out.writeUInt32LE(target.nameLen, r + N.count);
    }
  }

  private draft(rec: IndexRecord, i: number): void {
    this.nameStart.push(0);
    if (rec.path === '') {
      if (rec.kind !== 'dir') throw unsafe('.', 'the root is not a directory');
      this.root.mode = rec.mode;
      this.root.mtime = rec.mtime;
      return;
    }
    if (rec.kind === 'symlink' && (rec.target === undefined || symlinkTargetPath(rec.path, rec.target) === undefined)) {
      throw unsafe(rec.path, `is a symlink to ${JSON.stringify(rec.target ?? '')}, which leaves the tree`);
    }
    const slash = rec.path.lastIndexOf('/');
    this.nameStart[i] = slash + 1;
    const parent = this.ensureDir(slash < 0 ? '' : rec.path.slice(0, slash), i);
    if (rec.kind === 'dir') {
      const existing = this.dirs.get(rec.path);
      // A directory may be named implicitly (by a child) before its own header arrives.
      if (existing && !existing.implicit) throw unsafe(rec.path, 'appears twice in the archive');
      if (existing) {
        existing.mode = rec.mode;
        existing.mtime = rec.mtime;
        existing.implicit = false;
        return;
      }
      const dir: DirDraft = { name: rec.path.slice(slash + 1), path: rec.path, mode: rec.mode, mtime: rec.mtime, implicit: false, seq: i, children: [], sorted: 0, first: 0, ...this.putString(rec.path.slice(slash + 1)) };
      this.dirs.set(rec.path, dir);
      this.adopt(parent, dir);
      return;
    }
    if (rec.kind === 'file') {
      if (rec.blob !== undefined) {
        if (!validBlobName(rec.blob)) throw new KheadersError('E_INTERNAL', `${JSON.stringify(rec.blob)} cannot name a file beside the pack`);
        if (rec.sha256 !== undefined && !/^[0-9a-f]{64}$/.test(rec.sha256)) throw new KheadersError('E_INTERNAL', `${rec.path}: ${JSON.stringify(rec.sha256)} is not a sha256`);
        this.blobRecords.push(i);
      } else this.packEnd = Math.max(this.packEnd, (rec.offset ?? 0) + rec.size);
    }
    this.encodeLeaf(rec, i, slash + 1);
    this.adopt(parent, i);
  }

  /**
   * A child into its directory. The directory is sorted whenever its unsorted tail has grown as
   * long as its sorted head (a stable merge of runs: O(n log n) in all), so most of the sorting
   * is done while the archive is still being decoded and `build` finds most directories in order.
   */
  private adopt(parent: DirDraft, child: DirDraft | number): void {
    const n = parent.children.push(child);
    if (n >= 2 * parent.sorted + SORT_BATCH) {
      parent.children.sort(this.byName);
      parent.sorted = n;
    }
  }

  /** UTF-8 byte order of two children's names (a record's name is the tail of its path: no string is made). */
  private readonly byName = (a: DirDraft | number, b: DirDraft | number): number =>
    compareUtf8(typeof a === 'number' ? this.records[a]!.path : a.name, typeof a === 'number' ? this.nameStart[a]! : 0, typeof b === 'number' ? this.records[b]!.path : b.name, typeof b === 'number' ? this.nameStart[b]! : 0);

  private ensureDir(p: string, seq: number): DirDraft {
    const existing = this.dirs.get(p);
    if (existing) return existing;
    const slash = p.lastIndexOf('/');
    const parent = this.ensureDir(slash < 0 ? '' : p.slice(0, slash), seq);
    const dir: DirDraft = { name: p.slice(slash + 1), path: p, mode: 0o755, mtime: 0, implicit: true, seq, children: [], sorted: 0, first: 0, ...this.putString(p.slice(slash + 1)) };
    this.dirs.set(p, dir);
    this.adopt(parent, dir);
    return dir;
  }

  /** The index of every record added; throws what `fromRecords` would. Call once. */
  build(content: { pack?: PackDigests; blobs?: readonly BlobInfo[] } = {}): TreeIndex {
    if (this.refused !== undefined) throw this.refused;
    const { records, nameStart, root, packEnd } = this;
    this.dirs.clear();
    const blobs: BlobInfo[] = [...(content.blobs ?? [])];
    /** Files kept beside the pack: record → 1 + its blob's index (0, the default, is the pack). */
    const source = new Map<number, number>();
    for (const i of this.blobRecords) {
      const rec = records[i]!;
      let k = blobs.findIndex((b) => b.name === rec.blob);
      const sha256 = rec.sha256 !== undefined ? Buffer.from(rec.sha256, 'hex') : Buffer.alloc(DIGEST_BYTES);
      if (k < 0) k = blobs.push({ name: rec.blob!, size: rec.size, sha256 }) - 1;
      if (blobs[k]!.size !== rec.size) throw new KheadersError('E_INTERNAL', `${rec.path} is ${rec.size} bytes but its blob ${rec.blob} is ${blobs[k]!.size}`);
      source.set(i, k + 1);
    }

    // A child's name is the tail of its record's path (no string made for it while sorting).
    const compareNames = this.byName;
    const nameOfChild = (c: DirDraft | number): string => (typeof c === 'number' ? records[c]!.path.slice(nameStart[c]) : c.name);
    const seqOf = (c: DirDraft | number): number => (typeof c === 'number' ? c : c.seq);
    const kindOfChild = (c: DirDraft | number): NodeKind => (typeof c === 'number' ? records[c]!.kind : 'dir');

    // Breadth-first ids: each directory's children consecutive, sorted by name bytes. Two
    // children of one name are the archive naming a path twice (or as a file and a directory).
    const order: Array<DirDraft | number> = [root];
    const parentOf: number[] = [0];
    /** Node ids of the symlinks: the only nodes the escape check must follow. */
    const symlinks: number[] = [];
    for (let i = 0; i < order.length; i++) {
      const d = order[i]!;
      if (typeof d === 'number') continue;
      if (d.sorted < d.children.length) d.children.sort(compareNames);
      for (let c = 1; c < d.children.length; c++) {
        if (compareNames(d.children[c - 1]!, d.children[c]!) !== 0) continue;
        const [earlier, later] = seqOf(d.children[c - 1]!) < seqOf(d.children[c]!) ? [d.children[c - 1]!, d.children[c]!] : [d.children[c]!, d.children[c - 1]!];
        const clash = d.path === '' ? nameOfChild(later) : `${d.path}/${nameOfChild(later)}`;
        if (typeof later !== 'number' && later.implicit && typeof earlier === 'number') throw unsafe(clash, `is used both as a directory and as a ${kindOfChild(earlier)}`);
        throw unsafe(clash, 'appears twice in the archive');
      }
      d.first = order.length;
      for (const c of d.children) {
        if (typeof c === 'number' && records[c]!.kind === 'symlink') symlinks.push(order.length);
        order.push(c);
        parentOf.push(i);
      }
    }

    const pack = content.pack ?? { packBytes: packEnd, chunkBytes: DEFAULT_CHUNK_BYTES, digests: Buffer.alloc(chunkCountFor(packEnd, DEFAULT_CHUNK_BYTES) * DIGEST_BYTES) };
    if (packEnd > pack.packBytes) throw new KheadersError('E_INTERNAL', `a file ends at ${packEnd}, past the pack's ${pack.packBytes} bytes`);
    const layout: Layout = {
      nodeCount: order.length,
      blobCount: blobs.length,
      chunkBytes: pack.chunkBytes,
      chunkCount: chunkCountFor(pack.packBytes, pack.chunkBytes),
      stringsBytes: 0,
      packBytes: pack.packBytes,
    };
    if (pack.digests.length !== layout.chunkCount * DIGEST_BYTES) throw new KheadersError('E_INTERNAL', `${pack.digests.length / DIGEST_BYTES} chunk digests for a pack of ${layout.chunkCount} chunks`);
    layout.stringsBytes = this.stringsUsed;
    for (const b of blobs) layout.stringsBytes += Buffer.byteLength(b.name);

    const at = sections(layout);
    const out = Buffer.alloc(at.total);
    INDEX_MAGIC.copy(out, H.magic);
    out.writeUInt32LE(INDEX_VERSION, H.version);
    out.writeUInt32LE(layout.nodeCount, H.nodeCount);
    out.writeUInt32LE(layout.blobCount, H.blobCount);
    out.writeUInt32LE(layout.chunkBytes, H.chunkBytes);
    out.writeUInt32LE(layout.chunkCount, H.chunkCount);
    out.writeUInt32LE(layout.stringsBytes, H.stringsBytes);
    out.writeDoubleLE(layout.packBytes, H.packBytes);

    this.strings.copy(out, at.strings, 0, this.stringsUsed);
    let str = at.strings + this.stringsUsed;
    const putString = (s: string): [number, number] => {
      const len = out.write(s, str, 'utf8');
      const off = str - at.strings;
      str += len;
      return [off, len];
    };
    for (let id = 0; id < order.length; id++) {
      const d = order[id]!;
      const r = at.nodes + id * NODE_BYTES;
      if (typeof d === 'number') {
        const from = (d % PAGE_RECORDS) * NODE_BYTES;
        this.pages[Math.floor(d / PAGE_RECORDS)]!.copy(out, r, from, from + NODE_BYTES);
        const k = source.get(d);
        if (k !== undefined) out.writeUInt8(k, r + N.source);
      } else {
        out.writeUInt32LE(d.nameOff, r + N.nameOff);
        out.writeUInt32LE(d.nameLen, r + N.nameLen);
        out.writeUInt8(KIND_DIR, r + N.kind);
        out.writeUInt16LE(d.mode & 0o7777, r + N.mode);
        out.writeDoubleLE(d.mtime, r + N.mtime);
        if (d.children.length > 0) {
          out.writeUInt32LE(d.first, r + N.first);
          out.writeUInt32LE(d.children.length, r + N.count);
        }
      }
      out.writeUInt32LE(parentOf[id]!, r + N.parent);
    }
    blobs.forEach((b, k) => {
      const r = at.blobs + k * BLOB_BYTES;
      const [off, len] = putString(b.name);
      out.writeUInt32LE(off, r + B.nameOff);
      out.writeUInt32LE(len, r + B.nameLen);
      out.writeDoubleLE(b.size, r + B.size);
      b.sha256.copy(out, r + B.sha256, 0, DIGEST_BYTES);
    });
    pack.digests.copy(out, at.chunks);
    createHash('sha256').update(out.subarray(HEADER_BYTES)).digest().copy(out, H.checksum);

    return finishBuilt(out, layout, symlinks);
  }
}

/** A copy of `buf` with room for at least `need` bytes (doubling: appends cost O(1) each). */
function grown(buf: Buffer, need: number): Buffer {
  const bigger = Buffer.alloc(Math.max(need, buf.length * 2));
  buf.copy(bigger);
  return bigger;
}
