/**
 * The tree index every reader shares: name normalisation, implicit parents, duplicates, symlink
 * resolution (through directories, chains, loops) and the rule that nothing leads out of the tree.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { KheadersError } from '../src/errors.js';
import { TreeIndex, normaliseEntryPath, symlinkTargetPath, type IndexRecord } from '../src/store/tree-index.js';

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
