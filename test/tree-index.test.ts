/**
 * The tree index every reader shares: name normalisation, implicit parents, duplicates, symlink
 * resolution (through directories, chains, loops) and the rule that nothing leads out of the tree.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { KheadersError } from '../src/errors.js';
import { HEADER_BYTES, MemoryView, N, NODE_BYTES, sections, validBlobName, type ByteView } from '../src/store/index-format.js';
import { IndexFormatError, TreeIndex, normaliseEntryPath, symlinkTargetPath, type IndexRecord } from '../src/store/tree-index.js';
import { reseal, withBlobName } from './helpers/index-patch.js';

const file = (path: string, size = 1, offset = 512): IndexRecord => ({ path, kind: 'file', mode: 0o644, mtime: 1_700_000_000, size, offset });
const dir = (path: string, mtime = 1_700_000_000): IndexRecord => ({ path, kind: 'dir', mode: 0o755, mtime, size: 0 });
const link = (path: string, target: string): IndexRecord => ({ path, kind: 'symlink', mode: 0o777, mtime: 1_700_000_000, size: Buffer.byteLength(target), target });

function expectUnsafe(fn: () => unknown, entry: string, reason: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof KheadersError, String(err));
    assert.equal(err.code, 'E_UNSAFE_ENTRY');
    assert.equal(err.details.entry, entry);
    assert.ok(err.message.includes(JSON.stringify(entry)), `message names the entry: ${err.message}`);
    assert.match(err.message, reason);
    return true;
  });
}

test('normaliseEntryPath strips ./ and empty components', () => {
  assert.equal(normaliseEntryPath('./include/linux/sched.h'), 'include/linux/sched.h');
  assert.equal(normaliseEntryPath('include//linux/./sched.h'), 'include/linux/sched.h');
  assert.equal(normaliseEntryPath('./include/'), 'include');
  assert.equal(normaliseEntryPath('./'), '');
  assert.equal(normaliseEntryPath('.'), '');
  assert.equal(normaliseEntryPath('a..b/c...h'), 'a..b/c...h'); // dots inside a name are fine
});

test('normaliseEntryPath refuses absolute names, ".." and NUL bytes', () => {
  expectUnsafe(() => normaliseEntryPath('/etc/passwd'), '/etc/passwd', /absolute/);
  expectUnsafe(() => normaliseEntryPath('../x'), '../x', /"\.\." component/);
  expectUnsafe(() => normaliseEntryPath('./include/../../x'), './include/../../x', /"\.\." component/);
  expectUnsafe(() => normaliseEntryPath('include/..'), 'include/..', /"\.\." component/);
  expectUnsafe(() => normaliseEntryPath('a\0b'), 'a\0b', /NUL/);
});

test('symlinkTargetPath resolves relative to the link and refuses what leaves the tree', () => {
  assert.equal(symlinkTargetPath('include/dt-bindings/input/linux-event-codes.h', '../../uapi/linux/input-event-codes.h'), 'include/uapi/linux/input-event-codes.h');
  assert.equal(symlinkTargetPath('a/b', 'c'), 'a/c');
  assert.equal(symlinkTargetPath('a/b', './c/./d'), 'a/c/d');
  assert.equal(symlinkTargetPath('a/b', '..'), ''); // the root itself
  assert.equal(symlinkTargetPath('top', 'other'), 'other');
  assert.equal(symlinkTargetPath('a/b', '../..'), undefined);
  assert.equal(symlinkTargetPath('include/x', '../../etc/passwd'), undefined);
  assert.equal(symlinkTargetPath('top', '..'), undefined);
  assert.equal(symlinkTargetPath('a/b', '/etc/passwd'), undefined);
  assert.equal(symlinkTargetPath('a/b', ''), undefined);
  assert.equal(symlinkTargetPath('a/b', 'x\0y'), undefined);
});

test('fromRecords creates implicit parents and takes a later explicit header for them', () => {
  const idx = TreeIndex.fromRecords([file('include/linux/sched.h'), dir('include', 1_600_000_000), file('arch/x86/include/asm/ptrace.h')]);
  const implicit = idx.get('include/linux');
  assert.ok(implicit);
  assert.equal(implicit.kind, 'dir');
  assert.equal(implicit.mode, 0o755);
  assert.equal(implicit.mtime, 0);
  assert.equal(idx.get('include')?.mtime, 1_600_000_000, 'the explicit header arrived after the implicit creation');
  assert.equal(idx.get('arch/x86/include/asm')?.kind, 'dir');
  assert.equal(idx.fileCount, 2);
  assert.equal(idx.dirCount, 1 + 6); // root + include, include/linux, arch, arch/x86, arch/x86/include, .../asm
  assert.equal(idx.symlinkCount, 0);
  assert.equal(idx.totalBytes, 2);
  // Every node's parent lists it, ids are dense, the root is 0.
  assert.equal(idx.root.id, 0);
  for (const n of idx.nodes) {
    assert.deepEqual(idx.node(n.id), n);
    if (n.id !== 0) assert.deepEqual(idx.child(n.parent, n.name), n);
  }
});

test('fromRecords takes the root record and refuses a non-directory root', () => {
  const idx = TreeIndex.fromRecords([{ ...dir(''), mode: 0o700, mtime: 5 }, file('a')]);
  assert.equal(idx.root.mode, 0o700);
  assert.equal(idx.root.mtime, 5);
  expectUnsafe(() => TreeIndex.fromRecords([file('')]), '.', /root is not a directory/);
});

test('fromRecords refuses duplicates and a path used both as a directory and a file', () => {
  expectUnsafe(() => TreeIndex.fromRecords([file('include/a.h'), file('include/a.h')]), 'include/a.h', /appears twice/);
  expectUnsafe(() => TreeIndex.fromRecords([dir('include'), dir('include')]), 'include', /appears twice/);
  expectUnsafe(() => TreeIndex.fromRecords([file('include/a.h'), link('include/a.h', 'b.h')]), 'include/a.h', /appears twice/);
  expectUnsafe(() => TreeIndex.fromRecords([file('include'), file('include/a.h')]), 'include', /both as a directory and as a file/);
  expectUnsafe(() => TreeIndex.fromRecords([file('include/x/a.h'), file('include/x')]), 'include/x', /appears twice/);
  expectUnsafe(() => TreeIndex.fromRecords([link('include', 'other'), file('include/a.h')]), 'include', /both as a directory and as a symlink/);
});

test('fromRecords refuses symlinks that leave the tree', () => {
  expectUnsafe(() => TreeIndex.fromRecords([link('include/passwd', '../../etc/passwd')]), 'include/passwd', /leaves the tree/);
  expectUnsafe(() => TreeIndex.fromRecords([link('include/passwd', '/etc/passwd')]), 'include/passwd', /leaves the tree/);
  const noTarget = link('include/none', '');
  delete noTarget.target;
  expectUnsafe(() => TreeIndex.fromRecords([noTarget]), 'include/none', /leaves the tree/);
});

test('fromRecords refuses a symlink that escapes through another symlink', () => {
  // include/a/b/up -> ../../..  is the tree's root: fine on its own.
  // include/a/b/leak -> up/../secret  is include/a/b/secret when read as text, but the kernel
  // (and so a FUSE mount, or an exported tree) resolves `up` first and then `..` from the root:
  // it names the parent of the tree. Both must be judged as the kernel will follow them.
  expectUnsafe(
    () => TreeIndex.fromRecords([dir('include/a/b'), link('include/a/b/up', '../../..'), link('include/a/b/leak', 'up/../secret')]),
    'include/a/b/leak',
    /leaves the tree/,
  );
});

test('list sorts children by name; encode/decode round-trips', () => {
  const records = [dir('d'), file('d/b.h', 3, 1024), file('d/a.h', 2, 512), link('d/c', 'a.h'), { path: 'vmlinux.h', kind: 'file' as const, mode: 0o644, mtime: 1, size: 10, blob: 'vmlinux.h' }];
  const idx = TreeIndex.fromRecords(records);
  assert.deepEqual(idx.list(idx.get('d')!).map((n) => n.name), ['a.h', 'b.h', 'c']);
  assert.deepEqual(idx.list(idx.get('d/a.h')!), []);
  const again = TreeIndex.decode(Buffer.from(idx.encode()), { packBytes: idx.packBytes });
  assert.deepEqual(again.nodes, idx.nodes);
  assert.ok(again.encode().equals(idx.encode()));
  assert.equal(again.get('d/b.h')?.offset, 1024);
  assert.equal(again.get('vmlinux.h')?.blob, 'vmlinux.h');
  assert.equal(again.get('d/c')?.target, 'a.h');
  const future = Buffer.from(idx.encode());
  future.writeUInt32LE(3, 8); // the format version
  assert.throws(() => TreeIndex.decode(future, { packBytes: idx.packBytes }), /format 3 is not understood/);
});

test('resolve follows symlinks in every component and the last one', () => {
  const idx = TreeIndex.fromRecords([
    file('include/uapi/linux/input-event-codes.h'),
    link('include/dt-bindings/input/linux-event-codes.h', '../../uapi/linux/input-event-codes.h'),
    link('include/asm', '../arch/x86/include/asm'), // a directory symlink in the middle of paths
    file('arch/x86/include/asm/ptrace.h'),
    link('chain1', 'chain2'),
    link('chain2', 'include/asm/ptrace.h'),
    link('include/root', '..'),
  ]);
  assert.equal(idx.resolve('include/dt-bindings/input/linux-event-codes.h')?.path, 'include/uapi/linux/input-event-codes.h');
  assert.equal(idx.resolve('include/asm/ptrace.h')?.path, 'arch/x86/include/asm/ptrace.h');
  assert.equal(idx.resolve('include/asm')?.path, 'arch/x86/include/asm');
  assert.equal(idx.resolve('chain1')?.path, 'arch/x86/include/asm/ptrace.h');
  assert.equal(idx.resolve('include/root/include/root/include/asm/ptrace.h')?.path, 'arch/x86/include/asm/ptrace.h');
  assert.equal(idx.resolve('include/root')?.path, '');
  assert.equal(idx.resolve('')?.id, 0);
  // get() does not follow.
  assert.equal(idx.get('chain1')?.kind, 'symlink');
  // Missing, and a path through a file.
  assert.equal(idx.resolve('include/nope.h'), undefined);
  assert.equal(idx.resolve('arch/x86/include/asm/ptrace.h/x'), undefined);
  assert.equal(idx.resolve('include/asm/nope.h'), undefined);
});

test('resolve gives up on loops and dangling links', () => {
  const idx = TreeIndex.fromRecords([link('a', 'b'), link('b', 'a'), link('self', 'self'), link('dangling', 'nowhere/x.h'), link('d/deep', '../d/deep/x')]);
  assert.equal(idx.resolve('a'), undefined);
  assert.equal(idx.resolve('self'), undefined);
  assert.equal(idx.resolve('dangling'), undefined);
  assert.equal(idx.resolve('d/deep'), undefined);
  // 40 hops are allowed (the kernel's MAXSYMLINKS), 41 are not.
  const chain = (n: number): IndexRecord[] => [file('end'), ...Array.from({ length: n }, (_, i) => link(`l${i}`, i === n - 1 ? 'end' : `l${i + 1}`))];
  assert.equal(TreeIndex.fromRecords(chain(40)).resolve('l0')?.path, 'end');
  assert.equal(TreeIndex.fromRecords(chain(41)).resolve('l0'), undefined);
});

// ---- the encoded form: every field is checked on load ----------------------------------------

function expectDamage(buf: Buffer, packBytes: number, why: RegExp, checksum = true): void {
  assert.throws(() => TreeIndex.decode(buf, { packBytes, checksum }), (err: unknown) => {
    assert.ok(err instanceof IndexFormatError, String(err));
    assert.match(err.message, why);
    return true;
  });
}

test('decode refuses a truncated, padded, tampered or mis-sized index, and says why', () => {
  const idx = TreeIndex.fromRecords([dir('d'), file('d/a.h', 3, 512), file('d/b.h', 2, 1024), link('d/l', 'a.h')]);
  const good = (): Buffer => Buffer.from(idx.encode());
  const pack = idx.packBytes;
  assert.equal(TreeIndex.decode(good(), { packBytes: pack }).nodeCount, idx.nodeCount);
  expectDamage(good().subarray(0, 50), pack, /shorter than its header/);
  expectDamage(good().subarray(0, good().length - 1), pack, /but its header describes/);
  expectDamage(Buffer.concat([good(), Buffer.alloc(1)]), pack, /but its header describes/);
  expectDamage(Buffer.from('{"version":1,"records":[]}'.padEnd(200)), pack, /does not start with the index magic/);
  expectDamage(good(), pack + 1, /describes a pack of \d+ bytes, not/);
  const flipped = good();
  flipped[flipped.length - 1]! ^= 0x20; // a name's last byte
  expectDamage(flipped, pack, /checksum does not match/);
});

test('decode refuses records that point outside the pack or out of the tree, even with a valid checksum', () => {
  const idx = TreeIndex.fromRecords([dir('d'), file('d/a.h', 3, 512), file('d/b.h', 2, 1024), link('d/l', 'a.h')]);
  const pack = idx.packBytes;
  const rec = (id: number): number => HEADER_BYTES + id * NODE_BYTES;
  const a = idx.idOf('d/a.h');
  const b = idx.idOf('d/b.h');
  const l = idx.idOf('d/l');
  const patched = (patch: (buf: Buffer) => void): Buffer => {
    const buf = Buffer.from(idx.encode());
    patch(buf);
    return reseal(buf);
  };
  expectDamage(patched((buf) => buf.writeDoubleLE(pack, rec(a) + N.offset)), pack, /are not inside the pack/);
  expectDamage(patched((buf) => buf.writeDoubleLE(-1, rec(a) + N.offset)), pack, /are not inside the pack/);
  expectDamage(patched((buf) => buf.writeDoubleLE(2 ** 60, rec(a) + N.size)), pack, /size out of range/);
  expectDamage(patched((buf) => buf.writeUInt8(9, rec(a) + N.kind)), pack, /unknown kind/);
  expectDamage(patched((buf) => buf.writeUInt8(1, rec(a) + N.source)), pack, /names blob 0 of 0/);
  // A name that is not one component ('..', or containing '/') could walk out of its directory.
  const nameAt = (id: number, buf: Buffer): number => sections({ nodeCount: idx.nodeCount, blobCount: 0, chunkBytes: idx.chunkBytes, chunkCount: idx.chunkCount, stringsBytes: 0, packBytes: pack }).strings + buf.readUInt32LE(rec(id) + N.nameOff);
  expectDamage(
    patched((buf) => {
      buf.writeUInt32LE(2, rec(b) + N.nameLen);
      buf.write('..', nameAt(b, buf));
    }),
    pack,
    /name "\.\." is not one path component/,
  );
  expectDamage(patched((buf) => buf.write('/', nameAt(a, buf) + 1)), pack, /is not one path component/);
  expectDamage(patched((buf) => buf.writeUInt32LE(0, rec(a) + N.parent)), pack, /listed under \d+ but names parent 0/);
  // Siblings out of order: a binary search would miss names.
  expectDamage(patched((buf) => buf.write('z', nameAt(a, buf))), pack, /not sorted/);
  // A symlink whose target is made absolute, or made to climb out of the tree.
  const targetAt = (buf: Buffer): number => nameAt(0, buf) - buf.readUInt32LE(rec(0) + N.nameOff) + buf.readUInt32LE(rec(l) + N.first);
  expectDamage(patched((buf) => buf.write('/', targetAt(buf))), pack, /target is absolute/);
  const climbing = TreeIndex.fromRecords([dir('d'), file('d/a.h', 3, 512), link('d/l', 'xx/../a.h')]);
  const cl = climbing.idOf('d/l');
  const esc = Buffer.from(climbing.encode());
  const layout = { nodeCount: climbing.nodeCount, blobCount: 0, chunkBytes: climbing.chunkBytes, chunkCount: climbing.chunkCount, stringsBytes: 0, packBytes: climbing.packBytes };
  esc.write('../..', sections(layout).strings + esc.readUInt32LE(HEADER_BYTES + cl * NODE_BYTES + N.first));
  expectDamage(reseal(esc), climbing.packBytes, /the symlink d\/l leads out of the tree/);
});

test('a blob name outside the entry directory cannot be written or read back', () => {
  assert.throws(() => TreeIndex.fromRecords([{ path: 'vmlinux.h', kind: 'file', mode: 0o644, mtime: 1, size: 5, blob: '../../../etc/hostname' }]), /cannot name a file beside the pack/);
  for (const bad of ['../../../etc/hostname', '/etc/hostname', 'a/b', '.hidden', 'pack.tar', 'index.bin', 'manifest.json', 'archive.tar.xz', '', 'x'.repeat(200)]) assert.equal(validBlobName(bad), false, bad);
  for (const good of ['vmlinux.h', 'config', 'btf-nf_tables.h']) assert.equal(validBlobName(good), true, good);
  // An index whose blob table names ../../../etc/hostname (re-sealed, so only the name check stands).
  const idx = TreeIndex.fromRecords([{ path: 'vmlinux.h', kind: 'file', mode: 0o644, mtime: 1, size: 5, blob: 'vmlinux.h' }]);
  const evil = withBlobName(Buffer.from(idx.encode()), '../../../etc/hostname');
  expectDamage(evil, 0, /blob 0 has the name "\.\.\/\.\.\/\.\.\/etc\/hostname", which the format does not allow/);
  // Opened lazily (cat), the same name is refused when the blob is first touched.
  const lazy = TreeIndex.open(new MemoryView(evil), { packBytes: 0 });
  assert.throws(() => lazy.blob(0), /which the format does not allow/);
  assert.throws(() => lazy.node(lazy.idOf('vmlinux.h')), /which the format does not allow/);
});

test('a lazily opened index (cat) reads only what a lookup touches and checks it', () => {
  const records: IndexRecord[] = [];
  for (let d = 0; d < 50; d++) for (let f = 0; f < 100; f++) records.push(file(`include/d${d}/f${f}.h`, 1, 512 * (d * 100 + f + 1)));
  const idx = TreeIndex.fromRecords(records);
  const buf = Buffer.from(idx.encode());
  let touched = 0;
  const counting: ByteView = new (class extends MemoryView {
    override bytes(off: number, len: number): Buffer {
      touched += len;
      return super.bytes(off, len);
    }
    override u8(off: number): number {
      touched += 1;
      return super.u8(off);
    }
    override u32(off: number): number {
      touched += 4;
      return super.u32(off);
    }
    override f64(off: number): number {
      touched += 8;
      return super.f64(off);
    }
  })(buf);
  const lazy = TreeIndex.open(counting, { packBytes: idx.packBytes });
  const touchedBefore = touched;
  assert.equal(lazy.resolve('include/d42/f77.h')?.offset, 512 * (42 * 100 + 77 + 1));
  assert.equal(lazy.resolveId('include/d42/nope.h'), -1);
  const read = touched - touchedBefore;
  assert.ok(read < buf.length / 20, `a lookup read ${read} of the index's ${buf.length} bytes`);
});

test('the flat validation of an index in memory accepts exactly what the per-field one accepts (3,000 re-sealed byte flips)', () => {
  const idx = TreeIndex.fromRecords([
    dir('include'),
    file('include/linux/sched.h', 100, 512),
    file('include/linux/types.h', 50, 1024),
    file('include/uapi/linux/bpf.h', 0, 2048),
    link('include/linux/alias.h', 'types.h'),
    link('include/dt-bindings/input/codes.h', '../../uapi/linux/bpf.h'),
    dir('arch/x86/include/asm'),
    file('Makefile', 7, 4096),
  ]);
  const good = idx.encode();
  const packBytes = idx.packBytes;
  const verdict = (buf: Buffer, perFieldOnly: boolean): string => {
    try {
      TreeIndex.decode(buf, { packBytes, perFieldOnly });
      return 'accepted';
    } catch (err) {
      if (!(err instanceof IndexFormatError || err instanceof KheadersError)) throw err;
      return 'refused';
    }
  };
  assert.equal(verdict(Buffer.from(good), false), 'accepted');
  // A fixed seed, so a difference found is found again.
  let seed = 0x2545f491;
  const next = (n: number): number => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) % n;
  };
  const counts = { accepted: 0, refused: 0 };
  for (let round = 0; round < 3000; round++) {
    const buf = Buffer.from(good);
    // One to three bytes of the body (records, strings, blobs) changed, the checksum fixed.
    for (let k = 1 + next(3); k > 0; k--) {
      const at = HEADER_BYTES + next(buf.length - HEADER_BYTES);
      buf[at] = next(4) === 0 ? buf[at]! ^ (1 << next(8)) : next(256);
    }
    reseal(buf);
    const flat = verdict(buf, false);
    assert.equal(flat, verdict(buf, true), `round ${round}: the two validations disagree (flat: ${flat})`);
    counts[flat as 'accepted' | 'refused']++;
  }
  // Both outcomes are exercised, or the comparison proves little.
  assert.ok(counts.accepted > 100 && counts.refused > 100, JSON.stringify(counts));
});
