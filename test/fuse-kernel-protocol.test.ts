/**
 * The FUSE codec and the session's answers, with hand-built kernel messages and no kernel:
 * every opcode the backend handles, the byte layouts it writes (checked against fuse.h offsets),
 * and malformed input (short reads, bad lengths), which must be answered, never thrown.
 */
import assert from 'node:assert/strict';
import { access, mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { createLogger } from '../src/log.js';
import { ROOT_INO, type FsAttr, type FsDirent, type FsInvalidation, type FsModel } from '../src/serve/fuse/fs-model.js';
import type { FuseChannel } from '../src/serve/fuse/kernel/device.js';
import { detectMountFlavor, flavorFromBinary, flavorFromVersion, mountArgs, mountOptionString, onPath } from '../src/serve/fuse/kernel/mount.js';
import { prepareMountpoint } from '../src/serve/fuse/mountpoint.js';
import { fsp, watch } from './helpers/fs-watch.js';
import {
  ATTR_OUT_SIZE,
  COMPAT_ENTRY_OUT_SIZE,
  decodeOutHeader,
  decodeRequest,
  direntPlusSize,
  direntSize,
  encodeAttrOut,
  encodeDirents,
  encodeDirentsPlus,
  encodeEntryOut,
  encodeError,
  encodeInitOut,
  encodeNotifyInvalEntry,
  encodeNotifyInvalInode,
  encodeNotifyRetrieve,
  encodeOpenOut,
  encodeRequest,
  encodeStatfsOut,
  ENTRY_OUT_SIZE,
  Errno,
  FOPEN,
  FUSE_KERNEL_MINOR_VERSION,
  IN_HEADER_SIZE,
  InitFlag,
  negotiateInit,
  Notify,
  Op,
  opName,
  OUT_HEADER_SIZE,
  timeout,
  WRITE_OPS,
  type InitWants,
} from '../src/serve/fuse/kernel/protocol.js';
import { FuseSession } from '../src/serve/fuse/kernel/session.js';

const log = createLogger('silent');
const E = os.constants.errno;

// ---- message builders (what the kernel would write) ----------------------------------------

let nextUnique = 2n;
function req(opcode: number, nodeid: number, body: Buffer = Buffer.alloc(0), unique = (nextUnique += 2n)): Buffer {
  return encodeRequest({ opcode, unique, nodeid, uid: 1000, gid: 1000, pid: 4242 }, body);
}
function u32s(...v: number[]): Buffer {
  const b = Buffer.alloc(v.length * 4);
  v.forEach((x, i) => b.writeUInt32LE(x >>> 0, i * 4));
  return b;
}
function u64(v: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
}
const cstr = (s: string): Buffer => Buffer.concat([Buffer.from(s), Buffer.from([0])]);

/** fuse_init_in as a 7.45 kernel sends it: 64 bytes, every flag offered. */
function initBody(major = 7, minor = 45, flags = 0x73fffffb, flags2 = 0x5fd): Buffer {
  const b = Buffer.alloc(64);
  b.writeUInt32LE(major, 0);
  b.writeUInt32LE(minor, 4);
  b.writeUInt32LE(131072, 8);
  b.writeUInt32LE(flags >>> 0, 12);
  b.writeUInt32LE(flags2, 16);
  return b;
}
function readBody(fh: bigint, offset: number, size: number): Buffer {
  const b = Buffer.alloc(40);
  b.writeBigUInt64LE(fh, 0);
  b.writeBigUInt64LE(BigInt(offset), 8);
  b.writeUInt32LE(size, 16);
  return b;
}

// ---- a tiny model ---------------------------------------------------------------------------

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const FILE_BYTES = Buffer.from('#define HELLO 1\n');

class TinyModel implements FsModel {
  readonly listeners = new Set<(i: FsInvalidation) => void>();
  readDelay: Promise<void> | undefined;
  nodes = new Map<number, FsAttr & { parent: number; name: string; target?: string }>([
    [ROOT_INO, { ino: 1, kind: 'dir', mode: S_IFDIR | 0o555, size: 4096, nlink: 3, mtimeMs: 1_700_000_000_500, parent: 1, name: '' }],
    [2, { ino: 2, kind: 'symlink', mode: S_IFLNK | 0o777, size: 3, nlink: 1, mtimeMs: 0, parent: 1, name: 'current', target: '6.1' }],
    [16, { ino: 16, kind: 'dir', mode: S_IFDIR | 0o555, size: 4096, nlink: 2, mtimeMs: 0, parent: 1, name: '6.1' }],
    [17, { ino: 17, kind: 'file', mode: S_IFREG | 0o444, size: FILE_BYTES.length, nlink: 1, mtimeMs: 1_600_000_000_250, parent: 16, name: 'hello.h' }],
  ]);
  private attr(ino: number): FsAttr | undefined {
    const n = this.nodes.get(ino);
    return n ? { ino: n.ino, kind: n.kind, mode: n.mode, size: n.size, nlink: n.nlink, mtimeMs: n.mtimeMs } : undefined;
  }
  lookup(parentIno: number, name: string): FsAttr | undefined {
    for (const n of this.nodes.values()) if (n.parent === parentIno && n.name === name && n.ino !== ROOT_INO) return this.attr(n.ino);
    return undefined;
  }
  getattr(ino: number): FsAttr | undefined {
    return this.attr(ino);
  }
  readdir(ino: number): FsDirent[] | undefined {
    if (this.nodes.get(ino)?.kind !== 'dir') return undefined;
    return [...this.nodes.values()].filter((n) => n.parent === ino && n.ino !== ROOT_INO).map((n) => ({ name: n.name, attr: this.attr(n.ino)! }));
  }
  readlink(ino: number): string | undefined {
    return this.nodes.get(ino)?.target;
  }
  async read(ino: number, offset: number, length: number): Promise<Buffer> {
    await this.readDelay;
    if (ino !== 17) throw Object.assign(new Error('not a file'), { code: 'EISDIR' });
    return FILE_BYTES.subarray(offset, offset + length);
  }
  resolvePath(): FsAttr | undefined {
    return undefined;
  }
  statfs() {
    return { blocks: 10, files: 4, blockSize: 4096, nameMax: 255 };
  }
  onInvalidate(listener: (i: FsInvalidation) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}

class FakeChannel implements FuseChannel {
  replies: Buffer[] = [];
  notes: Buffer[] = [];
  refuse: string | undefined;
  reply(parts: readonly Buffer[]): string | undefined {
    this.replies.push(Buffer.concat(parts));
    return this.refuse;
  }
  async notify(buf: Buffer): Promise<string | undefined> {
    this.notes.push(buf);
    return undefined;
  }
  take(): Buffer {
    const r = this.replies.shift();
    assert.ok(r, 'expected a reply');
    return r;
  }
}

function setup(opts: ConstructorParameters<typeof FuseSession>[3] = {}, minor = 45) {
  const model = new TinyModel();
  const ch = new FakeChannel();
  const session = new FuseSession(model, ch, log, opts);
  session.dispatch(req(Op.INIT, 0, initBody(7, minor)));
  const init = ch.take();
  return { model, ch, session, init };
}

/** Reply header checks: length matches, error is -errno, unique echoed. */
function expectReply(buf: Buffer, unique: bigint | undefined, errno = 0): Buffer {
  const h = decodeOutHeader(buf)!;
  assert.equal(h.len, buf.length, 'out header length = bytes written');
  assert.equal(h.error, errno === 0 ? 0 : -errno);
  if (unique !== undefined) assert.equal(h.unique, unique);
  return buf.subarray(OUT_HEADER_SIZE);
}

// ---- codec ----------------------------------------------------------------------------------

describe('FUSE codec: layouts', () => {
  test('struct sizes and offsets are those of fuse.h', () => {
    assert.equal(IN_HEADER_SIZE, 40);
    assert.equal(OUT_HEADER_SIZE, 16);
    assert.equal(ENTRY_OUT_SIZE, 128);
    assert.equal(ATTR_OUT_SIZE, 104);
    assert.equal(direntSize(1), 32); // 24 + 1, aligned to 8
    assert.equal(direntSize(8), 32);
    assert.equal(direntSize(9), 40);
    assert.equal(direntPlusSize(1), 128 + 32);
  });

  test('in header decodes every field little-endian, unique exactly', () => {
    const buf = encodeRequest({ opcode: Op.GETATTR, unique: 0xfedc_ba98_7654_3210n, nodeid: 2 ** 40 + 5, uid: 1, gid: 2, pid: 3, totalExtlen: 0 }, Buffer.alloc(16));
    assert.equal(buf.readUInt32LE(0), 56);
    const r = decodeRequest(buf);
    assert.ok(r.ok);
    assert.equal(r.req.unique, 0xfedc_ba98_7654_3210n);
    assert.equal(r.req.nodeid, 2 ** 40 + 5);
    assert.deepEqual([r.req.uid, r.req.gid, r.req.pid], [1, 2, 3]);
    assert.equal(r.req.kind, 'getattr');
  });

  test('node ids above 2^53 decode as NaN, never as a different id', () => {
    const buf = req(Op.GETATTR, 0, Buffer.alloc(16));
    buf.writeBigUInt64LE(0xffff_ffff_ffff_fff0n, 16);
    const r = decodeRequest(buf);
    assert.ok(r.ok && Number.isNaN(r.req.nodeid));
  });

  test('entry_out: nodeid, timeouts, attr at offset 40', () => {
    const attr = { ino: 17, size: 1000, mode: S_IFREG | 0o444, nlink: 1, mtimeMs: 1_600_000_000_250 };
    const b = encodeEntryOut({ nodeid: 17, generation: 0, entryValid: timeout(86400), attrValid: timeout(1.5), attr }, 38);
    assert.equal(b.length, 128);
    assert.equal(b.readBigUInt64LE(0), 17n);
    assert.equal(b.readBigUInt64LE(16), 86400n);
    assert.equal(b.readBigUInt64LE(24), 1n);
    assert.equal(b.readUInt32LE(36), 500_000_000);
    const a = 40;
    assert.equal(b.readBigUInt64LE(a), 17n); // ino
    assert.equal(b.readBigUInt64LE(a + 8), 1000n); // size
    assert.equal(b.readBigUInt64LE(a + 16), 2n); // 512-byte blocks
    assert.equal(b.readBigUInt64LE(a + 32), 1_600_000_000n); // mtime
    assert.equal(b.readUInt32LE(a + 52), 250_000_000); // mtimensec
    assert.equal(b.readUInt32LE(a + 60), S_IFREG | 0o444);
    assert.equal(b.readUInt32LE(a + 64), 1); // nlink
    assert.equal(b.readUInt32LE(a + 80), 4096); // blksize
    // Pre-7.9 kernels get the compat size.
    assert.equal(encodeEntryOut({ nodeid: 1, generation: 0, entryValid: timeout(1), attrValid: timeout(1), attr }, 8).length, COMPAT_ENTRY_OUT_SIZE);
  });

  test('attr_out, open_out, statfs_out', () => {
    const a = encodeAttrOut({ ino: 1, size: 4096, mode: S_IFDIR | 0o555, nlink: 3, mtimeMs: 0 }, timeout(60), 38);
    assert.equal(a.length, 104);
    assert.equal(a.readBigUInt64LE(0), 60n);
    assert.equal(a.readUInt32LE(16 + 60), S_IFDIR | 0o555);
    const o = encodeOpenOut(7n, FOPEN.KEEP_CACHE | FOPEN.CACHE_DIR);
    assert.deepEqual([o.length, o.readBigUInt64LE(0), o.readUInt32LE(8)], [16, 7n, 0b1010]);
    const s = encodeStatfsOut({ blocks: 10, files: 4, blockSize: 4096, nameMax: 255 }, 38);
    assert.equal(s.length, 80);
    assert.deepEqual([s.readBigUInt64LE(0), s.readBigUInt64LE(8), s.readBigUInt64LE(24), s.readUInt32LE(40), s.readUInt32LE(44), s.readUInt32LE(48)], [10n, 0n, 4n, 4096, 255, 4096]);
    assert.equal(encodeStatfsOut({ blocks: 1, files: 1, blockSize: 1, nameMax: 1 }, 3).length, 48);
  });

  test('dirents: as many as fit, 8-byte aligned, off = next cookie', () => {
    const entries = ['a', 'bb', 'ccccccccc'].map((n, i) => ({ ino: 10 + i, name: Buffer.from(n), type: 8, off: i + 1 }));
    const { buf, count } = encodeDirents(entries, 1000);
    assert.equal(count, 3);
    assert.equal(buf.length, 32 + 32 + 40);
    assert.equal(buf.readBigUInt64LE(32), 11n);
    assert.equal(buf.readBigUInt64LE(32 + 8), 2n);
    assert.equal(buf.readUInt32LE(32 + 16), 2);
    assert.equal(buf.readUInt32LE(32 + 20), 8);
    assert.equal(buf.toString('latin1', 32 + 24, 32 + 26), 'bb');
    assert.equal(buf[32 + 26], 0, 'padding is zeroed');
    assert.equal(encodeDirents(entries, 64).count, 2);
    assert.equal(encodeDirents(entries, 10).count, 0);
    const plus = encodeDirentsPlus(entries.map((e) => ({ ...e, entry: { nodeid: e.ino, generation: 0, entryValid: timeout(1), attrValid: timeout(1) } })), 1000);
    assert.equal(plus.count, 3);
    assert.equal(plus.buf.readBigUInt64LE(0), 10n); // entry_out.nodeid
    assert.equal(plus.buf.readBigUInt64LE(128), 10n); // dirent.ino
    assert.equal(plus.buf.toString('latin1', 128 + 24, 128 + 25), 'a');
  });

  test('notifications: unique 0, code in the error field, NUL after the name', () => {
    const e = encodeNotifyInvalEntry(1, Buffer.from('current'));
    assert.deepEqual([e.readUInt32LE(0), e.readInt32LE(4), e.readBigUInt64LE(8)], [e.length, Notify.INVAL_ENTRY, 0n]);
    assert.equal(e.length, 16 + 16 + 7 + 1);
    assert.equal(e.readBigUInt64LE(16), 1n);
    assert.equal(e.readUInt32LE(24), 7);
    assert.equal(e[e.length - 1], 0);
    const i = encodeNotifyInvalInode(2, 0, 0);
    assert.deepEqual([i.length, i.readInt32LE(4), i.readBigUInt64LE(16)], [40, Notify.INVAL_INODE, 2n]);
    const r = encodeNotifyRetrieve(99n, 1, 0, 0);
    assert.deepEqual([r.length, r.readInt32LE(4), r.readBigUInt64LE(16), r.readBigUInt64LE(24)], [48, Notify.RETRIEVE, 99n, 1n]);
  });

  test('error replies are the header alone with -errno', () => {
    const b = encodeError(5n, Errno.ENOENT);
    assert.equal(b.length, 16);
    assert.equal(b.readInt32LE(4), -E.ENOENT);
    assert.equal(encodeError(5n, 0).readInt32LE(4), -E.EIO, 'error 0 is never sent as success');
  });

  test('opcode names', () => {
    assert.equal(opName(Op.READDIRPLUS), 'readdirplus');
    assert.equal(opName(9999), 'op9999');
  });
});

describe('FUSE codec: INIT negotiation', () => {
  const wants: InitWants = { flags: InitFlag.ASYNC_READ | InitFlag.DO_READDIRPLUS | InitFlag.MAX_PAGES | InitFlag.CACHE_SYMLINKS, maxWrite: 131072, maxPages: 256, maxBackground: 64, congestionThreshold: 48, timeGran: 1 };

  test('a newer kernel minor is answered with ours; flags are the intersection', () => {
    const d = negotiateInit({ major: 7, minor: 45, maxReadahead: 131072, flags: 0x73fffffb, flags2: 0x5fd }, wants);
    assert.equal(d.kind, 'accept');
    assert.ok(d.kind === 'accept');
    assert.equal(d.minor, FUSE_KERNEL_MINOR_VERSION);
    assert.equal(d.reply.flags, wants.flags);
    assert.equal(d.reply.maxPages, 256);
    assert.equal(d.reply.maxReadahead, 131072);
    const out = encodeInitOut(d.reply, d.minor);
    assert.equal(out.length, 64);
    assert.deepEqual([out.readUInt32LE(0), out.readUInt32LE(4), out.readUInt32LE(20), out.readUInt16LE(28)], [7, 38, 131072, 256]);
  });

  test('an older kernel keeps its minor, loses flags it lacks, gets the short init_out', () => {
    const d = negotiateInit({ major: 7, minor: 22, maxReadahead: 65536, flags: InitFlag.ASYNC_READ, flags2: 0 }, wants);
    assert.ok(d.kind === 'accept');
    assert.equal(d.minor, 22);
    assert.equal(d.reply.flags, InitFlag.ASYNC_READ);
    assert.equal(d.reply.maxPages, 0, 'no MAX_PAGES negotiated: field unused');
    assert.equal(encodeInitOut(d.reply, 22).length, 24);
    assert.equal(encodeInitOut(d.reply, 4).length, 8);
  });

  test('INIT_EXT is never echoed, max_write is at least 4096', () => {
    const d = negotiateInit({ major: 7, minor: 38, maxReadahead: 0, flags: InitFlag.INIT_EXT | InitFlag.ASYNC_READ, flags2: 1 }, { ...wants, flags: wants.flags | InitFlag.INIT_EXT, maxWrite: 100 });
    assert.ok(d.kind === 'accept');
    assert.equal(d.reply.flags & InitFlag.INIT_EXT, 0);
    assert.equal(d.reply.maxWrite, 4096);
  });

  test('major 8 asks for a retry with 7; major 6 is refused', () => {
    assert.equal(negotiateInit({ major: 8, minor: 0, maxReadahead: 0, flags: 0, flags2: 0 }, wants).kind, 'retry');
    assert.equal(negotiateInit({ major: 6, minor: 9, maxReadahead: 0, flags: 0, flags2: 0 }, wants).kind, 'refuse');
  });

  test('flags2 is read only when the kernel says INIT_EXT', () => {
    const a = decodeRequest(req(Op.INIT, 0, initBody(7, 45, InitFlag.ASYNC_READ, 7)));
    assert.ok(a.ok && a.req.kind === 'init' && a.req.init.flags2 === 0);
    const b = decodeRequest(req(Op.INIT, 0, initBody(7, 45, InitFlag.INIT_EXT, 7)));
    assert.ok(b.ok && b.req.kind === 'init' && b.req.init.flags2 === 7);
    const old = decodeRequest(req(Op.INIT, 0, u32s(7, 5)));
    assert.ok(old.ok && old.req.kind === 'init' && old.req.init.flags === 0, 'a 7.5 INIT is 8 bytes');
  });
});

describe('FUSE codec: malformed messages', () => {
  test('short read: fewer bytes than a header', () => {
    const r = decodeRequest(Buffer.alloc(39));
    assert.equal(r.ok, false);
    assert.ok(!r.ok && r.header === undefined && /short read/.test(r.reason));
  });

  test('header length disagrees with the bytes read', () => {
    const buf = req(Op.GETATTR, 1, Buffer.alloc(16));
    const longer = Buffer.concat([buf, Buffer.alloc(8)]);
    const r = decodeRequest(longer);
    assert.ok(!r.ok && r.header !== undefined && /says 56 bytes/.test(r.reason));
  });

  test('extension length beyond the message', () => {
    const buf = encodeRequest({ opcode: Op.LOOKUP, unique: 4n, nodeid: 1, uid: 0, gid: 0, pid: 0, totalExtlen: 100 }, cstr('x'));
    assert.ok(!decodeRequest(buf).ok);
  });

  test('bodies too short for their opcode', () => {
    const cases: Array<[number, Buffer]> = [
      [Op.INIT, Buffer.alloc(4)],
      [Op.FORGET, Buffer.alloc(4)],
      [Op.BATCH_FORGET, u32s(3, 0)], // says 3, carries none
      [Op.OPEN, Buffer.alloc(2)],
      [Op.READ, Buffer.alloc(16)],
      [Op.READDIR, Buffer.alloc(23)],
      [Op.RELEASE, Buffer.alloc(8)],
      [Op.ACCESS, Buffer.alloc(0)],
      [Op.GETXATTR, Buffer.alloc(8)],
      [Op.LISTXATTR, Buffer.alloc(2)],
      [Op.FLUSH, Buffer.alloc(4)],
      [Op.INTERRUPT, Buffer.alloc(4)],
    ];
    for (const [op, body] of cases) {
      const r = decodeRequest(req(op, 1, body));
      assert.equal(r.ok, false, opName(op));
      assert.ok(!r.ok && r.header?.opcode === op);
    }
  });

  test('names without their NUL terminator', () => {
    assert.ok(!decodeRequest(req(Op.LOOKUP, 1, Buffer.from('abc'))).ok);
    assert.ok(!decodeRequest(req(Op.GETXATTR, 1, Buffer.concat([u32s(0, 0), Buffer.from('user.x')]))).ok);
  });

  test('the session answers malformed requests EIO and keeps going', () => {
    const { ch, session } = setup();
    const bad = req(Op.READ, 17, Buffer.alloc(8), 77n);
    session.dispatch(bad);
    expectReply(ch.take(), 77n, E.EIO);
    session.dispatch(Buffer.alloc(12)); // no header: nothing to answer
    assert.equal(ch.replies.length, 0);
    const trunc = req(Op.GETATTR, 1, Buffer.alloc(16), 78n).subarray(0, 50);
    session.dispatch(trunc);
    expectReply(ch.take(), 78n, E.EIO);
    // FORGET takes no reply even when malformed.
    session.dispatch(req(Op.FORGET, 17, Buffer.alloc(2)));
    assert.equal(ch.replies.length, 0);
    assert.equal(session.opCounts()['malformed'], 4);
    // Still serving.
    session.dispatch(req(Op.GETATTR, 1, Buffer.alloc(16), 79n));
    expectReply(ch.take(), 79n);
  });

  test('requests before INIT are answered EIO', () => {
    const ch = new FakeChannel();
    const session = new FuseSession(new TinyModel(), ch, log);
    session.dispatch(req(Op.GETATTR, 1, Buffer.alloc(16), 80n));
    expectReply(ch.take(), 80n, E.EIO);
  });
});

// ---- session: every opcode ------------------------------------------------------------------

describe('FUSE session: answers by opcode', () => {
  test('INIT: our minor, the flags we want that the kernel offers, max_pages', async () => {
    const { session, init } = setup();
    const body = expectReply(init, undefined);
    assert.equal(body.length, 64);
    assert.equal(body.readUInt32LE(4), 38);
    const flags = body.readUInt32LE(12);
    for (const f of [InitFlag.ASYNC_READ, InitFlag.PARALLEL_DIROPS, InitFlag.CACHE_SYMLINKS, InitFlag.DO_READDIRPLUS, InitFlag.MAX_PAGES, InitFlag.NO_OPEN_SUPPORT, InitFlag.NO_OPENDIR_SUPPORT]) {
      assert.ok(flags & f, `flag 0x${f.toString(16)}`);
    }
    // READDIRPLUS for every listing buffer, not only the first (see session.ts).
    for (const f of [InitFlag.READDIRPLUS_AUTO, InitFlag.WRITEBACK_CACHE, InitFlag.POSIX_LOCKS, InitFlag.FLOCK_LOCKS, InitFlag.AUTO_INVAL_DATA, InitFlag.SPLICE_READ]) assert.equal(flags & f, 0);
    assert.equal(body.readUInt16LE(28), 256);
    assert.equal((await session.initialized()).minor, 38);
  });

  test('INIT: readdirplus off and classic opens are honoured', () => {
    const { init } = setup({ readdirplus: 'off', zeroMessageOpen: false });
    const flags = expectReply(init, undefined).readUInt32LE(12);
    assert.equal(flags & (InitFlag.DO_READDIRPLUS | InitFlag.NO_OPEN_SUPPORT | InitFlag.NO_OPENDIR_SUPPORT), 0);
  });

  test('INIT: readdirplus auto asks for the kernel\'s adaptive mode', () => {
    const { init } = setup({ readdirplus: 'auto' });
    const flags = expectReply(init, undefined).readUInt32LE(12);
    assert.equal(flags & (InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO), InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO);
  });

  test('INIT from a kernel with major 6 is refused EPROTO', () => {
    const ch = new FakeChannel();
    const session = new FuseSession(new TinyModel(), ch, log);
    session.dispatch(req(Op.INIT, 0, initBody(6, 9), 9n));
    expectReply(ch.take(), 9n, E.EPROTO);
  });

  test('LOOKUP: an entry with long timeouts; a missing name is a cached negative entry', () => {
    const { ch, session } = setup();
    session.dispatch(req(Op.LOOKUP, 1, cstr('6.1'), 10n));
    let body = expectReply(ch.take(), 10n);
    assert.equal(body.length, 128);
    assert.equal(body.readBigUInt64LE(0), 16n);
    assert.equal(body.readBigUInt64LE(16), 86400n);
    session.dispatch(req(Op.LOOKUP, 16, cstr('missing.h'), 11n));
    body = expectReply(ch.take(), 11n);
    assert.equal(body.readBigUInt64LE(0), 0n, 'nodeid 0 = negative entry');
    assert.equal(body.readBigUInt64LE(16), 86400n, 'cached for a day');
    // Under a file or an unknown node: errors, not negative entries.
    session.dispatch(req(Op.LOOKUP, 17, cstr('x'), 12n));
    expectReply(ch.take(), 12n, E.ENOTDIR);
    session.dispatch(req(Op.LOOKUP, 999, cstr('x'), 13n));
    expectReply(ch.take(), 13n, E.ENOENT);
    // Invalid UTF-8 cannot name anything: negative.
    session.dispatch(req(Op.LOOKUP, 16, Buffer.from([0xff, 0xfe, 0]), 14n));
    assert.equal(expectReply(ch.take(), 14n).readBigUInt64LE(0), 0n);
    assert.equal(session.knownNodes(), 1);
  });

  test('LOOKUP with negative entries disabled answers ENOENT', () => {
    const { ch, session } = setup({ negativeTimeoutSec: 0 });
    session.dispatch(req(Op.LOOKUP, 16, cstr('missing.h'), 15n));
    expectReply(ch.take(), 15n, E.ENOENT);
  });

  test('FORGET and BATCH_FORGET: no reply, lookup counts drop', () => {
    const { ch, session } = setup();
    for (let i = 0; i < 3; i++) session.dispatch(req(Op.LOOKUP, 16, cstr('hello.h')));
    session.dispatch(req(Op.LOOKUP, 1, cstr('6.1')));
    ch.replies = [];
    assert.equal(session.knownNodes(), 2);
    session.dispatch(req(Op.FORGET, 17, u64(2)));
    assert.equal(session.knownNodes(), 2);
    session.dispatch(req(Op.BATCH_FORGET, 0, Buffer.concat([u32s(2, 0), u64(17), u64(1), u64(16), u64(1)])));
    assert.equal(session.knownNodes(), 0);
    assert.equal(ch.replies.length, 0);
  });

  test('GETATTR and STATFS', () => {
    const { ch, session } = setup();
    session.dispatch(req(Op.GETATTR, 17, Buffer.alloc(16), 20n));
    const a = expectReply(ch.take(), 20n);
    assert.equal(a.readBigUInt64LE(0), 86400n);
    assert.equal(a.readBigUInt64LE(16 + 8), BigInt(FILE_BYTES.length));
    session.dispatch(req(Op.GETATTR, 555, Buffer.alloc(16), 21n));
    expectReply(ch.take(), 21n, E.ENOENT);
    session.dispatch(req(Op.STATFS, 1, Buffer.alloc(0), 22n));
    const s = expectReply(ch.take(), 22n);
    assert.equal(s.readBigUInt64LE(0), 10n);
  });

  test('READLINK: the target; EINVAL on a non-link', () => {
    const { ch, session } = setup();
    session.dispatch(req(Op.READLINK, 2, Buffer.alloc(0), 30n));
    assert.equal(expectReply(ch.take(), 30n).toString(), '6.1');
    session.dispatch(req(Op.READLINK, 17, Buffer.alloc(0), 31n));
    expectReply(ch.take(), 31n, E.EINVAL);
  });

  test('OPEN with zero-message opens: ENOSYS (the kernel stops sending OPEN)', () => {
    const { ch, session } = setup();
    session.dispatch(req(Op.OPEN, 17, u32s(0, 0), 40n));
    expectReply(ch.take(), 40n, E.ENOSYS);
    session.dispatch(req(Op.OPENDIR, 16, u32s(0, 0), 41n));
    expectReply(ch.take(), 41n, E.ENOSYS);
  });

  test('OPEN/OPENDIR classic: KEEP_CACHE|NOFLUSH, KEEP_CACHE|CACHE_DIR; writes EROFS; kinds checked', () => {
    const { ch, session } = setup({ zeroMessageOpen: false });
    session.dispatch(req(Op.OPEN, 17, u32s(0, 0), 42n));
    const o = expectReply(ch.take(), 42n);
    assert.equal(o.readUInt32LE(8), FOPEN.KEEP_CACHE | FOPEN.NOFLUSH);
    session.dispatch(req(Op.OPEN, 17, u32s(1, 0), 43n)); // O_WRONLY
    expectReply(ch.take(), 43n, E.EROFS);
    session.dispatch(req(Op.OPEN, 17, u32s(0o1000, 0), 44n)); // O_TRUNC
    expectReply(ch.take(), 44n, E.EROFS);
    session.dispatch(req(Op.OPEN, 16, u32s(0, 0), 45n));
    expectReply(ch.take(), 45n, E.EISDIR);
    session.dispatch(req(Op.OPENDIR, 17, u32s(0, 0), 46n));
    expectReply(ch.take(), 46n, E.ENOTDIR);
    session.dispatch(req(Op.OPENDIR, 16, u32s(0, 0), 47n));
    const d = expectReply(ch.take(), 47n);
    assert.equal(d.readUInt32LE(8), FOPEN.KEEP_CACHE | FOPEN.CACHE_DIR);
    const fh = d.readBigUInt64LE(0);
    // READDIR from that handle, then RELEASEDIR.
    session.dispatch(req(Op.READDIR, 16, readBody(fh, 0, 4096), 48n));
    const names = direntNames(expectReply(ch.take(), 48n));
    assert.deepEqual(names, ['.', '..', 'hello.h']);
    session.dispatch(req(Op.RELEASEDIR, 16, Buffer.concat([u64(fh), u32s(0, 0), u64(0)]), 49n));
    expectReply(ch.take(), 49n);
    session.dispatch(req(Op.RELEASE, 17, Buffer.concat([u64(1), u32s(0, 0), u64(0)]), 50n));
    expectReply(ch.take(), 50n);
  });

  test('READ: bytes at an offset, empty past EOF, errors for dirs', async () => {
    const { ch, session } = setup();
    session.dispatch(req(Op.READ, 17, readBody(0n, 8, 100), 60n));
    await new Promise((r) => setImmediate(r));
    assert.equal(expectReply(ch.take(), 60n).toString(), FILE_BYTES.subarray(8).toString());
    session.dispatch(req(Op.READ, 17, readBody(0n, 1000, 100), 61n));
    assert.equal(expectReply(ch.take(), 61n).length, 0);
    session.dispatch(req(Op.READ, 16, readBody(0n, 0, 100), 62n));
    expectReply(ch.take(), 62n, E.EISDIR);
  });

  test('READs are answered out of order, and an INTERRUPT answers a pending one EINTR', async () => {
    const { ch, session, model } = setup();
    let release!: () => void;
    model.readDelay = new Promise<void>((r) => (release = r));
    session.dispatch(req(Op.READ, 17, readBody(0n, 0, 4), 70n));
    session.dispatch(req(Op.READ, 17, readBody(0n, 4, 4), 72n));
    session.dispatch(req(Op.GETATTR, 1, Buffer.alloc(16), 74n));
    expectReply(ch.take(), 74n); // not held up by the pending reads
    session.dispatch(req(Op.INTERRUPT, 0, u64(70n), 75n));
    expectReply(ch.take(), 70n, E.EINTR);
    release();
    await new Promise((r) => setImmediate(r));
    assert.equal(expectReply(ch.take(), 72n).toString(), FILE_BYTES.subarray(4, 8).toString());
    assert.equal(ch.replies.length, 0, 'the interrupted read is not answered twice');
    session.dispatch(req(Op.INTERRUPT, 0, u64(99n), 77n)); // unknown: already answered
    assert.equal(ch.replies.length, 0);
  });

  test('READDIR and READDIRPLUS without a handle: pages by offset; plus counts lookups', () => {
    const { ch, session } = setup();
    session.dispatch(req(Op.READDIR, 1, readBody(0n, 0, 4096), 80n));
    assert.deepEqual(direntNames(expectReply(ch.take(), 80n)), ['.', '..', 'current', '6.1']);
    // A page too small for all: the next request resumes at the last off.
    session.dispatch(req(Op.READDIR, 1, readBody(0n, 0, 64), 81n));
    const first = expectReply(ch.take(), 81n);
    assert.deepEqual(direntNames(first), ['.', '..']);
    session.dispatch(req(Op.READDIR, 1, readBody(0n, 2, 4096), 82n));
    assert.deepEqual(direntNames(expectReply(ch.take(), 82n)), ['current', '6.1']);
    session.dispatch(req(Op.READDIR, 1, readBody(0n, 4, 4096), 83n));
    assert.equal(expectReply(ch.take(), 83n).length, 0, 'end of directory');

    session.dispatch(req(Op.READDIRPLUS, 16, readBody(0n, 0, 4096), 84n));
    const plus = expectReply(ch.take(), 84n);
    // '.', '..' with nodeid 0, then hello.h with its attributes.
    assert.equal(plus.readBigUInt64LE(0), 0n);
    const third = direntPlusSize(1) + direntPlusSize(2);
    assert.equal(plus.readBigUInt64LE(third), 17n);
    assert.equal(plus.readUInt32LE(third + 40 + 60), S_IFREG | 0o444);
    assert.equal(session.knownNodes(), 1, 'only hello.h was looked up');
    session.dispatch(req(Op.READDIR, 17, readBody(0n, 0, 4096), 85n));
    expectReply(ch.take(), 85n, E.ENOTDIR);
  });

  test('ACCESS, GETXATTR, LISTXATTR, FLUSH, DESTROY', () => {
    const { ch, session } = setup();
    session.dispatch(req(Op.ACCESS, 17, u32s(4, 0), 90n));
    expectReply(ch.take(), 90n);
    session.dispatch(req(Op.ACCESS, 17, u32s(2, 0), 91n));
    expectReply(ch.take(), 91n, E.EROFS);
    session.dispatch(req(Op.ACCESS, 999, u32s(4, 0), 92n));
    expectReply(ch.take(), 92n, E.ENOENT);
    session.dispatch(req(Op.GETXATTR, 17, Buffer.concat([u32s(0, 0), cstr('security.selinux')]), 93n));
    expectReply(ch.take(), 93n, E.ENODATA);
    session.dispatch(req(Op.LISTXATTR, 17, u32s(0, 0), 94n));
    assert.equal(expectReply(ch.take(), 94n).readUInt32LE(0), 0, 'size probe: 0 bytes of names');
    session.dispatch(req(Op.LISTXATTR, 17, u32s(256, 0), 95n));
    assert.equal(expectReply(ch.take(), 95n).length, 0);
    session.dispatch(req(Op.FLUSH, 17, Buffer.concat([u64(1), u32s(0, 0), u64(0)]), 96n));
    expectReply(ch.take(), 96n, E.ENOSYS);
    session.dispatch(req(Op.DESTROY, 0, Buffer.alloc(0), 97n));
    expectReply(ch.take(), 97n);
  });

  test('every write-type opcode is EROFS; unknown opcodes ENOSYS; NOTIFY_REPLY unanswered', () => {
    const { ch, session } = setup();
    for (const op of WRITE_OPS) {
      session.dispatch(req(op, 17, Buffer.alloc(64), 100n + BigInt(op)));
      expectReply(ch.take(), 100n + BigInt(op), E.EROFS);
    }
    for (const op of [Op.FSYNC, Op.FSYNCDIR, Op.GETLK, Op.SETLK, Op.SETLKW, Op.BMAP, Op.IOCTL, Op.POLL, Op.LSEEK, Op.SYNCFS, Op.STATX, 4096, 123456]) {
      session.dispatch(req(op, 17, Buffer.alloc(64), 300n));
      expectReply(ch.take(), 300n, E.ENOSYS);
    }
    session.dispatch(req(Op.NOTIFY_REPLY, 1, Buffer.alloc(40), 0x6b686472n));
    assert.equal(ch.replies.length, 0);
  });

  test('a refused reply (interrupted request) is survived', () => {
    const { ch, session } = setup();
    ch.refuse = 'ENOENT';
    session.dispatch(req(Op.GETATTR, 1, Buffer.alloc(16), 400n));
    ch.refuse = undefined;
    ch.replies = [];
    session.dispatch(req(Op.GETATTR, 1, Buffer.alloc(16), 401n));
    expectReply(ch.take(), 401n);
  });

  test('a model that throws is answered EIO', () => {
    const { ch, session, model } = setup();
    model.getattr = () => {
      throw new Error('boom');
    };
    session.dispatch(req(Op.GETATTR, 1, Buffer.alloc(16), 402n));
    expectReply(ch.take(), 402n, E.EIO);
  });

  test('invalidations become INVAL_ENTRY + INVAL_INODE notifications', () => {
    const { ch, session, model } = setup();
    for (const l of model.listeners) l({ parentIno: 1, name: 'current', oldIno: 2 });
    assert.deepEqual(
      ch.notes.map((n) => n.readInt32LE(4)),
      [Notify.INVAL_ENTRY, Notify.INVAL_INODE, Notify.INVAL_INODE],
    );
    assert.equal(ch.notes[0]!.subarray(32, 39).toString(), 'current');
    assert.equal(ch.notes[1]!.readBigUInt64LE(16), 2n);
    assert.equal(ch.notes[2]!.readBigUInt64LE(16), 1n);
    session.end('test');
    for (const l of model.listeners) l({ parentIno: 1, name: 'x' });
    assert.equal(ch.notes.length, 3, 'no notifications after the session ended');
  });

  test('no notifications before INIT', () => {
    const model = new TinyModel();
    const ch = new FakeChannel();
    new FuseSession(model, ch, log);
    for (const l of model.listeners) l({ parentIno: 1, name: 'current' });
    assert.equal(ch.notes.length, 0);
  });
});

describe('mount command line', () => {
  test('util-linux and busybox get -i, toybox does not', () => {
    const o = { mountpoint: '/mnt/k', allowOther: true, uid: 0, gid: 0 };
    assert.deepEqual(mountArgs('util-linux', o).slice(0, 3), ['-i', '-t', 'fuse.kheadersd']);
    assert.equal(mountArgs('toybox', o)[0], '-t');
    assert.deepEqual(mountArgs('busybox', o).slice(-2), ['kheadersd', '/mnt/k']);
    assert.equal(mountOptionString({ fd: 3, allowOther: false, uid: 0, gid: 0 }), 'fd=3,rootmode=40000,user_id=0,group_id=0,ro,nosuid,nodev,noatime,default_permissions');
    assert.match(mountOptionString({ fd: 3, allowOther: true, uid: 0, gid: 0 }), /,allow_other$/);
  });
  test('flavour from mount --version', () => {
    assert.equal(flavorFromVersion('mount from util-linux 2.38.1 (libmount 2.38.1: selinux)'), 'util-linux');
    assert.equal(flavorFromVersion('toybox 0.8.9-android'), 'toybox');
    assert.equal(flavorFromVersion("mount: unrecognized option '--version'\nBusyBox v1.36.1"), 'busybox');
  });
  test('flavour from the binary itself, without running it', async (t) => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'kh-flavor-'));
    t.after(() => rm(dir, { recursive: true, force: true }));
    const file = async (name: string, text: string, mode = 0o755): Promise<string> => {
      await writeFile(path.join(dir, name), `\x7fELF\0\0${text}\0\0`, { mode });
      return path.join(dir, name);
    };
    // Multi-call binaries by the name a link leads to (Android: /system/bin/mount -> toybox), whatever they hold.
    await file('toybox', 'mount umount ls');
    await symlink('toybox', path.join(dir, 'mount'));
    assert.equal(await flavorFromBinary(path.join(dir, 'mount')), 'toybox');
    await file('busybox', 'nothing to see');
    await symlink('busybox', path.join(dir, 'bbmount'));
    assert.equal(await flavorFromBinary(path.join(dir, 'bbmount')), 'busybox');
    // Anything else by the one name its bytes hold.
    assert.equal(await flavorFromBinary(await file('ul', 'usage: mount ... util-linux 2.38.1')), 'util-linux');
    assert.equal(await flavorFromBinary(await file('bb', 'BusyBox v1.36.1 multi-call binary')), 'busybox');
    // None, or more than one: undefined, and the caller asks --version.
    assert.equal(await flavorFromBinary(await file('plain', 'mount from somewhere')), undefined);
    assert.equal(await flavorFromBinary(await file('both', 'toybox, not util-linux')), undefined);
    assert.equal(await flavorFromBinary(path.join(dir, 'missing')), undefined);
    // A bare name is found on PATH, in PATH's order, as a child would find it.
    const bin2 = path.join(dir, 'second');
    await mkdir(bin2);
    await writeFile(path.join(bin2, 'mymount'), 'util-linux', { mode: 0o755 });
    await writeFile(path.join(dir, 'mymount'), 'toybox', { mode: 0o755 });
    const saved = process.env['PATH'];
    t.after(() => (process.env['PATH'] = saved));
    process.env['PATH'] = `/nonexistent:${dir}:${bin2}`;
    assert.equal(await flavorFromBinary('mymount'), 'toybox');
    process.env['PATH'] = `${bin2}:${dir}`;
    assert.equal(await flavorFromBinary('mymount'), 'util-linux');
  });
  test('`mount` is looked for in the system directories on this thread; only other PATH directories ahead of them go through the pool', async (t) => {
    if (!(await access('/usr/bin/mount').then(() => true, () => false))) return t.skip('no /usr/bin/mount here');
    const dir = await mkdtemp(path.join(os.tmpdir(), 'kh-onpath-'));
    t.after(() => rm(dir, { recursive: true, force: true }));
    const saved = process.env['PATH'];
    t.after(() => (process.env['PATH'] = saved));
    const system = watch(fsp, ['access'], '/usr/bin');
    const other = watch(fsp, ['access'], dir);
    t.after(() => (system.undo(), other.undo()));
    // At a start each probe was a thread-pool round trip ahead of the mount's own steps.
    process.env['PATH'] = `/usr/bin:${dir}`;
    assert.equal(await onPath('mount'), '/usr/bin/mount');
    process.env['PATH'] = `${dir}:/nonexistent-kh:/usr/local/bin:/usr/bin`;
    assert.equal(await onPath('mount'), '/usr/bin/mount');
    assert.deepEqual(system.calls, [], 'a system directory was probed through the pool');
    assert.deepEqual(other.calls, ['access mount'], 'the directory ahead of the system ones was not probed');
    // PATH's order still decides: an executable ahead of the system one wins, a file that is not executable does not.
    await writeFile(path.join(dir, 'mount'), 'not executable', { mode: 0o644 });
    if (process.getuid?.() !== 0) assert.equal(await onPath('mount'), '/usr/bin/mount');
    await writeFile(path.join(dir, 'mymount'), '#!/bin/sh\n', { mode: 0o755 });
    await symlink('/usr/bin/mount', path.join(dir, 'mount2'));
    process.env['PATH'] = `${dir}:/usr/bin`;
    assert.equal(await onPath('mount2'), path.join(dir, 'mount2'));
    process.env['PATH'] = `/usr/bin:${dir}`;
    assert.equal(await onPath('mymount'), path.join(dir, 'mymount'));
    assert.equal(await onPath('no-such-kh-binary'), undefined);
    process.env['PATH'] = `${path.join(dir, 'mymount')}:/usr/bin`; // a PATH entry that is no directory
    assert.equal(await onPath('mount'), '/usr/bin/mount');
  });
  test('prepareMountpoint reads the mount table on this thread, and still refuses a mount point', async () => {
    const table = watch(fsp, ['readFile'], '/proc/self/mountinfo');
    try {
      await assert.rejects(prepareMountpoint('/proc', createLogger('silent')), /already a mount point/);
      assert.deepEqual(table.calls, [], 'the mount table was read through the thread pool');
    } finally {
      table.undo();
    }
  });
  test('detectMountFlavor knows this machine\'s mount without running it', async (t) => {
    // The real `mount` here is util-linux's; what --version says and what the file says agree.
    const { execFile } = await import('node:child_process');
    const said = await new Promise<string>((resolve) => execFile('mount', ['--version'], (_e, out, err) => resolve(`${out}\n${err}`)));
    if (!/util-linux/.test(said)) return t.skip('this machine\'s mount is not util-linux');
    assert.equal(await flavorFromBinary('mount'), 'util-linux');
    assert.equal(await detectMountFlavor('mount'), 'util-linux');
  });
});

function direntNames(buf: Buffer): string[] {
  const names: string[] = [];
  for (let off = 0; off < buf.length; ) {
    const len = buf.readUInt32LE(off + 16);
    names.push(buf.toString('utf8', off + 24, off + 24 + len));
    off += direntSize(len);
  }
  return names;
}
