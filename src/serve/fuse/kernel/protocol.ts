/**
 * The FUSE wire protocol, as far as a read-only tree needs it: opcodes, struct layouts, and
 * pure encode/decode between kernel messages and plain objects. No I/O, no state.
 *
 * Source of truth: include/uapi/linux/fuse.h (7.38 on the build machine) and the kernel's
 * Documentation/filesystems/fuse*.rst. Every struct is naturally aligned and padded to 8 bytes,
 * little-endian on every architecture Linux runs FUSE servers on that we target (x86_64, arm64,
 * arm), and has the same layout on 32- and 64-bit userspace — so offsets here are constants.
 *
 * Old kernels send shorter structs (the protocol grows by appending fields): decoders accept any
 * body at least as long as the fields they read, and encoders shorten replies to the size the
 * negotiated minor version expects (the FUSE_COMPAT_*_SIZE constants of fuse.h).
 */
import os from 'node:os';

export const FUSE_KERNEL_VERSION = 7;
/**
 * The newest minor this codec implements. The kernel here offers 7.45; we answer with the
 * minimum of its minor and ours, and the kernel then speaks 7.38 — nothing after it (statx,
 * passthrough, io_uring, request timeouts) helps a read-only tree, and 7.38 is what the header
 * we checked the layouts against documents.
 */
export const FUSE_KERNEL_MINOR_VERSION = 38;
export const FUSE_ROOT_ID = 1;
/** The kernel refuses reads of /dev/fuse with a smaller buffer. */
export const FUSE_MIN_READ_BUFFER = 8192;
/** The kernel caps names at this (fs/fuse/fuse_i.h); longer lookups never reach us. */
export const FUSE_NAME_MAX = 1024;

export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;
export const ATTR_SIZE = 88;
export const ENTRY_OUT_SIZE = 128;
export const COMPAT_ENTRY_OUT_SIZE = 120; // minor < 9: no attr.blksize/padding
export const ATTR_OUT_SIZE = 104;
export const COMPAT_ATTR_OUT_SIZE = 96;
export const OPEN_OUT_SIZE = 16;
export const KSTATFS_SIZE = 80;
export const COMPAT_STATFS_SIZE = 48; // minor < 4
export const INIT_OUT_SIZE = 64;
export const COMPAT_22_INIT_OUT_SIZE = 24;
export const COMPAT_INIT_OUT_SIZE = 8;
export const GETXATTR_OUT_SIZE = 8;
export const DIRENT_NAME_OFFSET = 24;
export const DIRENTPLUS_NAME_OFFSET = ENTRY_OUT_SIZE + DIRENT_NAME_OFFSET;

/** enum fuse_opcode. */
export const Op = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  GETLK: 31,
  SETLK: 32,
  SETLKW: 33,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  BMAP: 37,
  DESTROY: 38,
  IOCTL: 39,
  POLL: 40,
  NOTIFY_REPLY: 41,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  READDIRPLUS: 44,
  RENAME2: 45,
  LSEEK: 46,
  COPY_FILE_RANGE: 47,
  SETUPMAPPING: 48,
  REMOVEMAPPING: 49,
  SYNCFS: 50,
  TMPFILE: 51,
  STATX: 52, // 7.39: newer kernels than the header; listed so logs name it
} as const;
export type OpName = keyof typeof Op;

const OP_NAMES = new Map<number, string>(Object.entries(Op).map(([k, v]) => [v, k.toLowerCase()]));
/** 'lookup', 'read', … or 'op<N>' for an opcode we do not know. */
export function opName(opcode: number): string {
  return OP_NAMES.get(opcode) ?? `op${opcode}`;
}

/** Opcodes that would modify the tree: answered EROFS (the mount is `ro` too, so the VFS
 * normally refuses first; this is the answer if one gets through). */
export const WRITE_OPS: ReadonlySet<number> = new Set([
  Op.SETATTR,
  Op.SYMLINK,
  Op.MKNOD,
  Op.MKDIR,
  Op.UNLINK,
  Op.RMDIR,
  Op.RENAME,
  Op.LINK,
  Op.WRITE,
  Op.SETXATTR,
  Op.REMOVEXATTR,
  Op.CREATE,
  Op.FALLOCATE,
  Op.RENAME2,
  Op.COPY_FILE_RANGE,
  Op.TMPFILE,
]);

/** Opcodes the kernel expects no reply to. */
export const NO_REPLY_OPS: ReadonlySet<number> = new Set([Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT, Op.NOTIFY_REPLY]);

/** INIT flags (fuse_init_in.flags / fuse_init_out.flags); bits 32.. live in flags2. */
export const InitFlag = {
  ASYNC_READ: 1 << 0,
  POSIX_LOCKS: 1 << 1,
  FILE_OPS: 1 << 2,
  ATOMIC_O_TRUNC: 1 << 3,
  EXPORT_SUPPORT: 1 << 4,
  BIG_WRITES: 1 << 5,
  DONT_MASK: 1 << 6,
  SPLICE_WRITE: 1 << 7,
  SPLICE_MOVE: 1 << 8,
  SPLICE_READ: 1 << 9,
  FLOCK_LOCKS: 1 << 10,
  HAS_IOCTL_DIR: 1 << 11,
  AUTO_INVAL_DATA: 1 << 12,
  DO_READDIRPLUS: 1 << 13,
  READDIRPLUS_AUTO: 1 << 14,
  ASYNC_DIO: 1 << 15,
  WRITEBACK_CACHE: 1 << 16,
  NO_OPEN_SUPPORT: 1 << 17,
  PARALLEL_DIROPS: 1 << 18,
  HANDLE_KILLPRIV: 1 << 19,
  POSIX_ACL: 1 << 20,
  ABORT_ERROR: 1 << 21,
  MAX_PAGES: 1 << 22,
  CACHE_SYMLINKS: 1 << 23,
  NO_OPENDIR_SUPPORT: 1 << 24,
  EXPLICIT_INVAL_DATA: 1 << 25,
  MAP_ALIGNMENT: 1 << 26,
  SUBMOUNTS: 1 << 27,
  HANDLE_KILLPRIV_V2: 1 << 28,
  SETXATTR_EXT: 1 << 29,
  INIT_EXT: 1 << 30,
  INIT_RESERVED: 2 ** 31, // `1 << 31` is negative in JS
} as const;

/** fuse_open_out.open_flags. */
export const FOPEN = {
  DIRECT_IO: 1 << 0,
  KEEP_CACHE: 1 << 1,
  NONSEEKABLE: 1 << 2,
  CACHE_DIR: 1 << 3,
  STREAM: 1 << 4,
  NOFLUSH: 1 << 5,
} as const;

/** enum fuse_notify_code: the `error` field of a notification's out header. */
export const Notify = {
  POLL: 1,
  INVAL_INODE: 2,
  INVAL_ENTRY: 3,
  STORE: 4,
  RETRIEVE: 5,
  DELETE: 6,
} as const;

/** The bit the kernel sets in the unique of an INTERRUPT request. */
export const FUSE_INT_REQ_BIT = 1n;

/** File types in st_mode and in dirents. */
export const S_IFMT = 0o170000;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;
export function direntType(mode: number): number {
  return (mode & S_IFMT) >>> 12; // DT_DIR 4, DT_REG 8, DT_LNK 10
}

/**
 * Errno numbers of this platform (the generic Linux numbers on x86, arm and arm64). Taken from
 * Node rather than hard-coded, with the generic values as a fallback for names Node lacks.
 */
function errno(name: string, generic: number): number {
  const table = os.constants.errno as Record<string, number | undefined>;
  return table[name] ?? generic;
}
export const Errno = {
  EPERM: errno('EPERM', 1),
  ENOENT: errno('ENOENT', 2),
  EINTR: errno('EINTR', 4),
  EIO: errno('EIO', 5),
  EBADF: errno('EBADF', 9),
  EAGAIN: errno('EAGAIN', 11),
  EACCES: errno('EACCES', 13),
  ENOTDIR: errno('ENOTDIR', 20),
  EISDIR: errno('EISDIR', 21),
  EINVAL: errno('EINVAL', 22),
  EROFS: errno('EROFS', 30),
  ERANGE: errno('ERANGE', 34),
  ENAMETOOLONG: errno('ENAMETOOLONG', 36),
  ENOSYS: errno('ENOSYS', 38),
  ENODATA: errno('ENODATA', 61),
  EPROTO: errno('EPROTO', 71),
  EOVERFLOW: errno('EOVERFLOW', 75),
} as const;

// ---------------------------------------------------------------------------------------------
// Requests (kernel → us)

export interface InHeader {
  len: number;
  opcode: number;
  /** u64, exact: it is echoed back and the kernel matches it bit for bit. */
  unique: bigint;
  /** u64 as a JS number; ids above 2^53 are never ours and read as NaN (→ ENOENT). */
  nodeid: number;
  uid: number;
  gid: number;
  pid: number;
  /** Length of trailing extensions (security contexts), in 8-byte units; 7.38+. */
  totalExtlen: number;
}

export interface InitIn {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
  /** Bits 32..63 of the flags when the kernel sets INIT_EXT (7.36+), else 0. */
  flags2: number;
}
export interface ReadIn {
  fh: bigint;
  offset: number;
  size: number;
  readFlags: number;
  flags: number;
}
export interface ReleaseIn {
  fh: bigint;
  flags: number;
  releaseFlags: number;
}
export interface OpenIn {
  flags: number;
  openFlags: number;
}
export interface GetattrIn {
  getattrFlags: number;
  fh: bigint;
}
export interface ForgetOne {
  nodeid: number;
  nlookup: number;
}

/** A decoded request: the header plus its body, by opcode. Opcodes we only answer with an
 * error carry their raw body (`other`). */
export type FuseRequest = InHeader &
  (
    | { kind: 'init'; init: InitIn }
    | { kind: 'lookup'; name: Buffer }
    | { kind: 'forget'; nlookup: number }
    | { kind: 'batch_forget'; items: ForgetOne[] }
    | { kind: 'getattr'; getattr: GetattrIn }
    | { kind: 'readlink' }
    | { kind: 'open'; open: OpenIn }
    | { kind: 'read'; read: ReadIn }
    | { kind: 'release'; release: ReleaseIn }
    | { kind: 'statfs' }
    | { kind: 'access'; mask: number }
    | { kind: 'getxattr'; size: number; name: Buffer }
    | { kind: 'listxattr'; size: number }
    | { kind: 'flush'; fh: bigint }
    | { kind: 'interrupt'; target: bigint }
    | { kind: 'destroy' }
    | { kind: 'other'; body: Buffer }
  );

export type DecodeResult =
  | { ok: true; req: FuseRequest }
  /** `header` is set when the header itself was readable, so the request can be answered. */
  | { ok: false; reason: string; header?: InHeader };

function u64n(buf: Buffer, off: number): number {
  const lo = buf.readUInt32LE(off);
  const hi = buf.readUInt32LE(off + 4);
  return hi < 0x200000 ? hi * 0x1_0000_0000 + lo : Number.NaN;
}

/** Reads a header; undefined when the buffer is shorter than one. */
export function decodeInHeader(buf: Buffer): InHeader | undefined {
  if (buf.length < IN_HEADER_SIZE) return undefined;
  return {
    len: buf.readUInt32LE(0),
    opcode: buf.readUInt32LE(4),
    unique: buf.readBigUInt64LE(8),
    nodeid: u64n(buf, 16),
    uid: buf.readUInt32LE(24),
    gid: buf.readUInt32LE(28),
    pid: buf.readUInt32LE(32),
    totalExtlen: buf.readUInt16LE(36),
  };
}

/** A NUL-terminated name at the start of `body` (the terminator is required). */
function cName(body: Buffer, from = 0): Buffer | undefined {
  const nul = body.indexOf(0, from);
  return nul < 0 ? undefined : body.subarray(from, nul);
}

/**
 * Decode one message as read from /dev/fuse (exactly the bytes one read() returned).
 * Never throws: malformed input gives `{ ok: false }` with the reason for the log.
 */
export function decodeRequest(buf: Buffer): DecodeResult {
  const h = decodeInHeader(buf);
  if (!h) return { ok: false, reason: `short read: ${buf.length} bytes, a header is ${IN_HEADER_SIZE}` };
  if (h.len !== buf.length) return { ok: false, reason: `header says ${h.len} bytes, read returned ${buf.length}`, header: h };
  const bodyEnd = h.len - h.totalExtlen * 8;
  if (bodyEnd < IN_HEADER_SIZE) return { ok: false, reason: `extension length ${h.totalExtlen * 8} exceeds the message`, header: h };
  const body = buf.subarray(IN_HEADER_SIZE, bodyEnd);
  const need = (n: number): string | undefined => (body.length < n ? `${opName(h.opcode)} body is ${body.length} bytes, needs ${n}` : undefined);
  const bad = (reason: string): DecodeResult => ({ ok: false, reason, header: h });

  switch (h.opcode) {
    case Op.INIT: {
      // 7.0–7.5 kernels sent only major/minor; max_readahead and flags came in 7.6, flags2 in 7.36.
      const short = need(8);
      if (short) return bad(short);
      const init: InitIn = {
        major: body.readUInt32LE(0),
        minor: body.readUInt32LE(4),
        maxReadahead: body.length >= 16 ? body.readUInt32LE(8) : 0,
        flags: body.length >= 16 ? body.readUInt32LE(12) : 0,
        flags2: 0,
      };
      if (body.length >= 20 && init.flags & InitFlag.INIT_EXT) init.flags2 = body.readUInt32LE(16);
      return { ok: true, req: { ...h, kind: 'init', init } };
    }
    case Op.LOOKUP: {
      const name = cName(body);
      if (!name) return bad('lookup name is not NUL-terminated');
      return { ok: true, req: { ...h, kind: 'lookup', name } };
    }
    case Op.FORGET: {
      const short = need(8);
      if (short) return bad(short);
      return { ok: true, req: { ...h, kind: 'forget', nlookup: u64n(body, 0) } };
    }
    case Op.BATCH_FORGET: {
      const short = need(8);
      if (short) return bad(short);
      const count = body.readUInt32LE(0);
      if (body.length < 8 + count * 16) return bad(`batch_forget of ${count} needs ${8 + count * 16} bytes, has ${body.length}`);
      const items: ForgetOne[] = [];
      for (let i = 0; i < count; i++) items.push({ nodeid: u64n(body, 8 + i * 16), nlookup: u64n(body, 16 + i * 16) });
      return { ok: true, req: { ...h, kind: 'batch_forget', items } };
    }
    case Op.GETATTR: {
      // Before 7.9 GETATTR had no body.
      const getattr: GetattrIn = body.length >= 16 ? { getattrFlags: body.readUInt32LE(0), fh: body.readBigUInt64LE(8) } : { getattrFlags: 0, fh: 0n };
      return { ok: true, req: { ...h, kind: 'getattr', getattr } };
    }
    case Op.READLINK:
      return { ok: true, req: { ...h, kind: 'readlink' } };
    case Op.OPEN:
    case Op.OPENDIR: {
      const short = need(4);
      if (short) return bad(short);
      const open: OpenIn = { flags: body.readUInt32LE(0), openFlags: body.length >= 8 ? body.readUInt32LE(4) : 0 };
      return { ok: true, req: { ...h, kind: 'open', open } };
    }
    case Op.READ:
    case Op.READDIR:
    case Op.READDIRPLUS: {
      // fh, offset, size, read_flags: 24 bytes in every version; lock_owner/flags came in 7.9.
      const short = need(24);
      if (short) return bad(short);
      const offset = u64n(body, 8);
      if (Number.isNaN(offset)) return bad(`${opName(h.opcode)} offset beyond 2^53`);
      const read: ReadIn = {
        fh: body.readBigUInt64LE(0),
        offset,
        size: body.readUInt32LE(16),
        readFlags: body.readUInt32LE(20),
        flags: body.length >= 40 ? body.readUInt32LE(32) : 0,
      };
      return { ok: true, req: { ...h, kind: 'read', read } };
    }
    case Op.RELEASE:
    case Op.RELEASEDIR: {
      const short = need(16);
      if (short) return bad(short);
      const release: ReleaseIn = { fh: body.readBigUInt64LE(0), flags: body.readUInt32LE(8), releaseFlags: body.readUInt32LE(12) };
      return { ok: true, req: { ...h, kind: 'release', release } };
    }
    case Op.STATFS:
      return { ok: true, req: { ...h, kind: 'statfs' } };
    case Op.ACCESS: {
      const short = need(4);
      if (short) return bad(short);
      return { ok: true, req: { ...h, kind: 'access', mask: body.readUInt32LE(0) } };
    }
    case Op.GETXATTR: {
      const short = need(9);
      if (short) return bad(short);
      const name = cName(body, 8);
      if (!name) return bad('getxattr name is not NUL-terminated');
      return { ok: true, req: { ...h, kind: 'getxattr', size: body.readUInt32LE(0), name } };
    }
    case Op.LISTXATTR: {
      const short = need(4);
      if (short) return bad(short);
      return { ok: true, req: { ...h, kind: 'listxattr', size: body.readUInt32LE(0) } };
    }
    case Op.FLUSH: {
      const short = need(8);
      if (short) return bad(short);
      return { ok: true, req: { ...h, kind: 'flush', fh: body.readBigUInt64LE(0) } };
    }
    case Op.INTERRUPT: {
      const short = need(8);
      if (short) return bad(short);
      return { ok: true, req: { ...h, kind: 'interrupt', target: body.readBigUInt64LE(0) } };
    }
    case Op.DESTROY:
      return { ok: true, req: { ...h, kind: 'destroy' } };
    default:
      return { ok: true, req: { ...h, kind: 'other', body } };
  }
}

// ---------------------------------------------------------------------------------------------
// Replies (us → kernel)

/** What a reply needs of a node; FsAttr (fs-model.ts) satisfies it. */
export interface AttrFields {
  ino: number;
  size: number;
  mode: number;
  nlink: number;
  mtimeMs: number;
}

/** Ownership and block size every node shows (the tree is root's and read-only). */
export interface AttrDefaults {
  uid: number;
  gid: number;
  blksize: number;
}
export const DEFAULT_ATTR: AttrDefaults = { uid: 0, gid: 0, blksize: 4096 };

/** A cache timeout, split as the kernel wants it. */
export interface Timeout {
  sec: number;
  nsec: number;
}
export function timeout(seconds: number): Timeout {
  const sec = Math.max(0, Math.floor(seconds));
  return { sec, nsec: Math.max(0, Math.min(999_999_999, Math.round((seconds - sec) * 1e9))) };
}

function writeU64(buf: Buffer, off: number, v: number | bigint): void {
  if (typeof v === 'bigint') buf.writeBigUInt64LE(v, off);
  else {
    buf.writeUInt32LE(v % 0x1_0000_0000 >>> 0, off);
    buf.writeUInt32LE(Math.floor(v / 0x1_0000_0000) >>> 0, off + 4);
  }
}

/** struct fuse_attr at `off`; before 7.9 it ends at blksize (80 bytes). */
export function writeAttr(buf: Buffer, off: number, a: AttrFields, d: AttrDefaults = DEFAULT_ATTR, compat = false): void {
  const ms = Number.isFinite(a.mtimeMs) && a.mtimeMs > 0 ? a.mtimeMs : 0;
  const sec = Math.floor(ms / 1000);
  const nsec = Math.round((ms - sec * 1000) * 1e6) % 1_000_000_000;
  writeU64(buf, off + 0, a.ino);
  writeU64(buf, off + 8, a.size);
  writeU64(buf, off + 16, Math.ceil(a.size / 512)); // st_blocks is in 512-byte units
  writeU64(buf, off + 24, sec); // atime: nothing is ever accessed in a way we record
  writeU64(buf, off + 32, sec);
  writeU64(buf, off + 40, sec); // ctime: the tree never changes after the build
  buf.writeUInt32LE(nsec, off + 48);
  buf.writeUInt32LE(nsec, off + 52);
  buf.writeUInt32LE(nsec, off + 56);
  buf.writeUInt32LE(a.mode >>> 0, off + 60);
  buf.writeUInt32LE(a.nlink >>> 0, off + 64);
  buf.writeUInt32LE(d.uid >>> 0, off + 68);
  buf.writeUInt32LE(d.gid >>> 0, off + 72);
  buf.writeUInt32LE(0, off + 76); // rdev
  if (!compat) {
    buf.writeUInt32LE(d.blksize >>> 0, off + 80);
    buf.writeUInt32LE(0, off + 84); // flags
  }
}

/** out header + body, as one buffer (the kernel wants a reply in a single write). */
export function encodeReply(unique: bigint, body?: Buffer): Buffer {
  const len = OUT_HEADER_SIZE + (body?.length ?? 0);
  const out = Buffer.allocUnsafe(len);
  out.writeUInt32LE(len, 0);
  out.writeInt32LE(0, 4);
  out.writeBigUInt64LE(unique, 8);
  if (body) body.copy(out, OUT_HEADER_SIZE);
  return out;
}

/** Just the out header for a reply whose body is written after it (writev). */
export function encodeOutHeader(unique: bigint, bodyLength: number, error = 0): Buffer {
  const out = Buffer.allocUnsafe(OUT_HEADER_SIZE);
  out.writeUInt32LE(OUT_HEADER_SIZE + bodyLength, 0);
  out.writeInt32LE(error === 0 ? 0 : -Math.abs(error), 4);
  out.writeBigUInt64LE(unique, 8);
  return out;
}

/** An error reply: the header alone, error negated as the kernel expects. */
export function encodeError(unique: bigint, errnoValue: number): Buffer {
  return encodeOutHeader(unique, 0, errnoValue === 0 ? Errno.EIO : errnoValue);
}

export interface EntryParams {
  /** 0 for a negative entry: "no such name", cached for entryValid. */
  nodeid: number;
  generation: number;
  entryValid: Timeout;
  attrValid: Timeout;
  attr?: AttrFields;
}

/** struct fuse_entry_out (LOOKUP reply, and the first half of a direntplus). */
export function writeEntryOut(buf: Buffer, off: number, e: EntryParams, d: AttrDefaults = DEFAULT_ATTR, compat = false): void {
  writeU64(buf, off + 0, e.nodeid);
  writeU64(buf, off + 8, e.generation);
  writeU64(buf, off + 16, e.entryValid.sec);
  writeU64(buf, off + 24, e.attrValid.sec);
  buf.writeUInt32LE(e.entryValid.nsec, off + 32);
  buf.writeUInt32LE(e.attrValid.nsec, off + 36);
  if (e.attr) writeAttr(buf, off + 40, e.attr, d, compat);
  else buf.fill(0, off + 40, off + 40 + (compat ? ATTR_SIZE - 8 : ATTR_SIZE));
}

export function encodeEntryOut(e: EntryParams, minor: number, d: AttrDefaults = DEFAULT_ATTR): Buffer {
  const compat = minor < 9;
  const buf = Buffer.alloc(compat ? COMPAT_ENTRY_OUT_SIZE : ENTRY_OUT_SIZE);
  writeEntryOut(buf, 0, e, d, compat);
  return buf;
}

/** struct fuse_attr_out (GETATTR reply). */
export function encodeAttrOut(attr: AttrFields, valid: Timeout, minor: number, d: AttrDefaults = DEFAULT_ATTR): Buffer {
  const compat = minor < 9;
  const buf = Buffer.alloc(compat ? COMPAT_ATTR_OUT_SIZE : ATTR_OUT_SIZE);
  writeU64(buf, 0, valid.sec);
  buf.writeUInt32LE(valid.nsec, 8);
  writeAttr(buf, 16, attr, d, compat);
  return buf;
}

/** struct fuse_open_out (OPEN / OPENDIR reply). */
export function encodeOpenOut(fh: bigint, openFlags: number): Buffer {
  const buf = Buffer.alloc(OPEN_OUT_SIZE);
  buf.writeBigUInt64LE(fh, 0);
  buf.writeUInt32LE(openFlags >>> 0, 8);
  return buf;
}

export interface StatfsFields {
  blocks: number;
  files: number;
  blockSize: number;
  nameMax: number;
}

/** struct fuse_statfs_out: nothing is free, the tree is read-only. */
export function encodeStatfsOut(s: StatfsFields, minor: number): Buffer {
  const buf = Buffer.alloc(KSTATFS_SIZE);
  writeU64(buf, 0, s.blocks);
  writeU64(buf, 8, 0); // bfree
  writeU64(buf, 16, 0); // bavail
  writeU64(buf, 24, s.files);
  writeU64(buf, 32, 0); // ffree
  buf.writeUInt32LE(s.blockSize >>> 0, 40);
  buf.writeUInt32LE(s.nameMax >>> 0, 44);
  buf.writeUInt32LE(s.blockSize >>> 0, 48); // frsize
  return minor < 4 ? buf.subarray(0, COMPAT_STATFS_SIZE) : buf;
}

/** struct fuse_getxattr_out: the size probe of GETXATTR/LISTXATTR with size 0. */
export function encodeXattrSizeOut(size: number): Buffer {
  const buf = Buffer.alloc(GETXATTR_OUT_SIZE);
  buf.writeUInt32LE(size >>> 0, 0);
  return buf;
}

// --- INIT ------------------------------------------------------------------------------------

export interface InitWants {
  /** INIT flags we would like; the reply carries those the kernel also offers. */
  flags: number;
  maxWrite: number;
  /** Pages per request (READ size); only sent when MAX_PAGES is negotiated. */
  maxPages: number;
  maxBackground: number;
  congestionThreshold: number;
  /** Cap on the kernel's readahead; undefined takes what it offers. */
  maxReadahead?: number;
  timeGran: number;
}

export interface InitOut {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  timeGran: number;
  maxPages: number;
  flags2: number;
}

export type InitDecision =
  /** Answer with `reply` encoded for `minor`; the session then speaks that minor. */
  | { kind: 'accept'; reply: InitOut; minor: number }
  /** The kernel's major is newer: answer with our major alone and expect another INIT. */
  | { kind: 'retry'; reply: InitOut }
  /** The kernel is too old (major < 7): answer EPROTO. */
  | { kind: 'refuse'; reason: string };

/** Pure negotiation: what to answer to the kernel's INIT. */
export function negotiateInit(init: InitIn, wants: InitWants): InitDecision {
  const empty: InitOut = { major: FUSE_KERNEL_VERSION, minor: FUSE_KERNEL_MINOR_VERSION, maxReadahead: 0, flags: 0, maxBackground: 0, congestionThreshold: 0, maxWrite: 0, timeGran: 0, maxPages: 0, flags2: 0 };
  if (init.major > FUSE_KERNEL_VERSION) return { kind: 'retry', reply: empty };
  if (init.major < FUSE_KERNEL_VERSION) return { kind: 'refuse', reason: `kernel FUSE protocol ${init.major}.${init.minor} is older than 7.x` };
  const minor = Math.min(init.minor, FUSE_KERNEL_MINOR_VERSION);
  // INIT_EXT is about the layout of this very message: never echo it, we send no flags2.
  const flags = (init.flags & wants.flags & ~InitFlag.INIT_EXT) >>> 0;
  const maxReadahead = wants.maxReadahead === undefined ? init.maxReadahead : Math.min(init.maxReadahead, wants.maxReadahead);
  const reply: InitOut = {
    major: FUSE_KERNEL_VERSION,
    minor,
    maxReadahead,
    flags,
    maxBackground: Math.min(0xffff, wants.maxBackground),
    congestionThreshold: Math.min(0xffff, wants.congestionThreshold),
    // The kernel raises anything smaller to 4096 anyway.
    maxWrite: Math.max(4096, wants.maxWrite),
    timeGran: wants.timeGran,
    maxPages: flags & InitFlag.MAX_PAGES ? Math.min(0xffff, Math.max(1, wants.maxPages)) : 0,
    flags2: 0,
  };
  return { kind: 'accept', reply, minor };
}

/** struct fuse_init_out, cut to the size the negotiated minor knows. */
export function encodeInitOut(o: InitOut, minor: number): Buffer {
  const buf = Buffer.alloc(INIT_OUT_SIZE);
  buf.writeUInt32LE(o.major, 0);
  buf.writeUInt32LE(o.minor, 4);
  buf.writeUInt32LE(o.maxReadahead >>> 0, 8);
  buf.writeUInt32LE(o.flags >>> 0, 12);
  buf.writeUInt16LE(o.maxBackground, 16);
  buf.writeUInt16LE(o.congestionThreshold, 18);
  buf.writeUInt32LE(o.maxWrite >>> 0, 20);
  buf.writeUInt32LE(o.timeGran >>> 0, 24);
  buf.writeUInt16LE(o.maxPages, 28);
  buf.writeUInt16LE(0, 30); // map_alignment (DAX only)
  buf.writeUInt32LE(o.flags2 >>> 0, 32);
  if (minor < 5) return buf.subarray(0, COMPAT_INIT_OUT_SIZE);
  if (minor < 23) return buf.subarray(0, COMPAT_22_INIT_OUT_SIZE);
  return buf;
}

// --- READDIR / READDIRPLUS -------------------------------------------------------------------

function align8(n: number): number {
  return (n + 7) & ~7;
}

export interface DirentIn {
  ino: number;
  name: Buffer;
  /** DT_* type. */
  type: number;
  /** The cookie of the *next* entry (what READDIR's offset resumes from). */
  off: number;
}

export interface DirentPlusIn extends DirentIn {
  entry: EntryParams;
}

export function direntSize(nameLength: number): number {
  return align8(DIRENT_NAME_OFFSET + nameLength);
}
export function direntPlusSize(nameLength: number): number {
  return align8(DIRENTPLUS_NAME_OFFSET + nameLength);
}

function writeDirent(buf: Buffer, off: number, d: DirentIn): void {
  writeU64(buf, off, d.ino);
  writeU64(buf, off + 8, d.off);
  buf.writeUInt32LE(d.name.length, off + 16);
  buf.writeUInt32LE(d.type, off + 20);
  d.name.copy(buf, off + DIRENT_NAME_OFFSET);
  buf.fill(0, off + DIRENT_NAME_OFFSET + d.name.length, off + direntSize(d.name.length));
}

/**
 * As many records as fit in `size` bytes, in order, each written by `write` at its offset.
 * `count` says how many were taken: the kernel resumes from the `off` of the last one.
 */
function packRecords<T extends { name: Buffer }>(entries: readonly T[], size: number, recordSize: (nameLength: number) => number, write: (buf: Buffer, off: number, e: T) => void): { buf: Buffer; count: number } {
  let total = 0;
  let count = 0;
  for (const e of entries) {
    const n = recordSize(e.name.length);
    if (total + n > size) break;
    total += n;
    count++;
  }
  const buf = Buffer.allocUnsafe(total);
  let off = 0;
  for (let i = 0; i < count; i++) {
    const e = entries[i]!;
    write(buf, off, e);
    off += recordSize(e.name.length);
  }
  return { buf, count };
}

/** READDIR records (fuse_dirent), as many as fit in `size` bytes. */
export function encodeDirents(entries: readonly DirentIn[], size: number): { buf: Buffer; count: number } {
  return packRecords(entries, size, direntSize, writeDirent);
}

/**
 * READDIRPLUS records (entry_out + dirent). Every record with a non-zero nodeid counts as one
 * lookup of that node in the kernel (it will FORGET it later); '.' and '..' carry nodeid 0.
 */
export function encodeDirentsPlus(entries: readonly DirentPlusIn[], size: number, d: AttrDefaults = DEFAULT_ATTR): { buf: Buffer; count: number } {
  return packRecords(entries, size, direntPlusSize, (buf, off, e) => {
    // READDIRPLUS exists only since 7.21, so the entry is never the pre-7.9 compat size.
    writeEntryOut(buf, off, e.entry, d);
    writeDirent(buf, off + ENTRY_OUT_SIZE, e);
  });
}

// --- Notifications (unsolicited writes: unique 0, the code in the error field) ---------------

function notification(code: number, body: Buffer): Buffer {
  const out = Buffer.allocUnsafe(OUT_HEADER_SIZE + body.length);
  out.writeUInt32LE(out.length, 0);
  out.writeInt32LE(code, 4);
  out.writeBigUInt64LE(0n, 8);
  body.copy(out, OUT_HEADER_SIZE);
  return out;
}

/** Drop the kernel's cached dentry `name` in directory `parent` (7.12+). */
export function encodeNotifyInvalEntry(parent: number, name: Buffer): Buffer {
  const body = Buffer.alloc(16 + name.length + 1); // the kernel requires the trailing NUL
  writeU64(body, 0, parent);
  body.writeUInt32LE(name.length, 8);
  body.writeUInt32LE(0, 12); // flags: 0 = invalidate (not FUSE_EXPIRE_ONLY)
  name.copy(body, 16);
  return notification(Notify.INVAL_ENTRY, body);
}

/** Drop an inode's cached attributes and its cached pages from `offset` (len <= 0: to the end). */
export function encodeNotifyInvalInode(ino: number, offset = 0, length = 0): Buffer {
  const body = Buffer.alloc(24);
  writeU64(body, 0, ino);
  body.writeBigInt64LE(BigInt(offset), 8);
  body.writeBigInt64LE(BigInt(length), 16);
  return notification(Notify.INVAL_INODE, body);
}

/**
 * Ask the kernel to send back (as a NOTIFY_REPLY request) `size` cached bytes of `nodeid`.
 * Used with size 0 on the root purely to make a request appear on /dev/fuse, which wakes a
 * reader blocked in read() so it can see that it should stop (7.15+).
 */
export function encodeNotifyRetrieve(notifyUnique: bigint, nodeid: number, offset: number, size: number): Buffer {
  const body = Buffer.alloc(32);
  body.writeBigUInt64LE(notifyUnique, 0);
  writeU64(body, 8, nodeid);
  writeU64(body, 16, offset);
  body.writeUInt32LE(size >>> 0, 24);
  return notification(Notify.RETRIEVE, body);
}

// --- Decoding replies (for tests and for anyone checking what we send) -----------------------

export interface OutHeader {
  len: number;
  error: number;
  unique: bigint;
}
export function decodeOutHeader(buf: Buffer): OutHeader | undefined {
  if (buf.length < OUT_HEADER_SIZE) return undefined;
  return { len: buf.readUInt32LE(0), error: buf.readInt32LE(4), unique: buf.readBigUInt64LE(8) };
}

/** Builds a request as the kernel would (tests, and the bench's self-checks). */
export function encodeRequest(h: Omit<InHeader, 'len' | 'totalExtlen'> & { totalExtlen?: number }, body: Buffer = Buffer.alloc(0)): Buffer {
  const buf = Buffer.alloc(IN_HEADER_SIZE + body.length);
  buf.writeUInt32LE(buf.length, 0);
  buf.writeUInt32LE(h.opcode, 4);
  buf.writeBigUInt64LE(h.unique, 8);
  writeU64(buf, 16, h.nodeid);
  buf.writeUInt32LE(h.uid, 24);
  buf.writeUInt32LE(h.gid, 28);
  buf.writeUInt32LE(h.pid, 32);
  buf.writeUInt16LE(h.totalExtlen ?? 0, 36);
  body.copy(buf, IN_HEADER_SIZE);
  return buf;
}
