import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { isKheadersError } from '../src/errors.js';
import { BtfKind, parseBtf, type Btf, type BtfType } from '../src/btf/reader.js';
import { generateVmlinuxHeader } from '../src/btf/index.js';
import { BtfBuilder } from './helpers/btf-builder.js';

/** Assert that `fn` throws E_BTF with a message matching `re`. */
function assertBtfError(fn: () => unknown, re: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(isKheadersError(err, 'E_BTF'), `expected E_BTF, got ${String(err)}`);
    assert.match(err.message, re);
    return true;
  });
}

/** One type of every kind the kernel emits. */
function allKinds(): { b: BtfBuilder; ids: Record<string, number> } {
  const b = new BtfBuilder();
  const int = b.int('int', 4, { signed: true });
  const ptr = b.ptr(int);
  const arr = b.array(int, int, 4);
  const st = b.struct('s', 8, [
    { name: 'a', type: int, bitOffset: 0 },
    { name: 'b', type: int, bitOffset: 32, bitfieldSize: 3 },
  ]);
  const un = b.union('u', 4, [{ name: 'x', type: int, bitOffset: 0 }]);
  const en = b.enum('e', 4, [['E_A', 0], ['E_B', -1]], true);
  const fwd = b.fwd('f', true);
  const td = b.typedef('t', int);
  const vol = b.volatile(int);
  const cst = b.const(int);
  const rst = b.restrict(ptr);
  const proto = b.funcProto(int, [['p', ptr], ['', 0]]);
  const fn = b.func('fn', proto, 1);
  const v = b.var('v', int, 1);
  const ds = b.datasec('.data', 4, [{ type: v, offset: 0, size: 4 }]);
  const fl = b.float('double', 8);
  const dt = b.declTag('tag', st, 1);
  const tt = b.typeTag('user', int);
  const e64 = b.enum64('e64', 8, [['BIG', 0xffffffff00000000n], ['SMALL', 1n]]);
  const e64s = b.enum64('e64s', 8, [['NEG', -2n]], true);
  return { b, ids: { int, ptr, arr, st, un, en, fwd, td, vol, cst, rst, proto, fn, v, ds, fl, dt, tt, e64, e64s } };
}

function expectedAllKinds(ids: Record<string, number>): BtfType[] {
  const { int, ptr, st, proto, v } = ids;
  return [
    { kind: BtfKind.VOID, id: 0, name: '' },
    { kind: BtfKind.INT, id: int!, name: 'int', size: 4, signed: true, char: false, bool: false, bitsOffset: 0, bits: 32 },
    { kind: BtfKind.PTR, id: ptr!, name: '', type: int! },
    { kind: BtfKind.ARRAY, id: ids.arr!, name: '', type: int!, indexType: int!, nelems: 4 },
    {
      kind: BtfKind.STRUCT,
      id: st!,
      name: 's',
      size: 8,
      members: [
        { name: 'a', type: int!, bitOffset: 0, bitfieldSize: 0 },
        { name: 'b', type: int!, bitOffset: 32, bitfieldSize: 3 },
      ],
    },
    { kind: BtfKind.UNION, id: ids.un!, name: 'u', size: 4, members: [{ name: 'x', type: int!, bitOffset: 0, bitfieldSize: 0 }] },
    {
      kind: BtfKind.ENUM,
      id: ids.en!,
      name: 'e',
      size: 4,
      signed: true,
      values: [
        { name: 'E_A', value: 0 },
        { name: 'E_B', value: -1 },
      ],
    },
    { kind: BtfKind.FWD, id: ids.fwd!, name: 'f', union: true },
    { kind: BtfKind.TYPEDEF, id: ids.td!, name: 't', type: int! },
    { kind: BtfKind.VOLATILE, id: ids.vol!, name: '', type: int! },
    { kind: BtfKind.CONST, id: ids.cst!, name: '', type: int! },
    { kind: BtfKind.RESTRICT, id: ids.rst!, name: '', type: ptr! },
    {
      kind: BtfKind.FUNC_PROTO,
      id: proto!,
      name: '',
      type: int!,
      params: [
        { name: 'p', type: ptr! },
        { name: '', type: 0 },
      ],
    },
    { kind: BtfKind.FUNC, id: ids.fn!, name: 'fn', type: proto!, linkage: 'global' },
    { kind: BtfKind.VAR, id: v!, name: 'v', type: int!, linkage: 'global' },
    { kind: BtfKind.DATASEC, id: ids.ds!, name: '.data', size: 4, vars: [{ type: v!, offset: 0, size: 4 }] },
    { kind: BtfKind.FLOAT, id: ids.fl!, name: 'double', size: 8 },
    { kind: BtfKind.DECL_TAG, id: ids.dt!, name: 'tag', type: st!, componentIdx: 1, attribute: false },
    { kind: BtfKind.TYPE_TAG, id: ids.tt!, name: 'user', type: int!, attribute: false },
    {
      kind: BtfKind.ENUM64,
      id: ids.e64!,
      name: 'e64',
      size: 8,
      signed: false,
      values: [
        { name: 'BIG', value: 0xffffffff00000000n, hi32: 0xffffffff },
        { name: 'SMALL', value: 1n, hi32: 0 },
      ],
    },
    { kind: BtfKind.ENUM64, id: ids.e64s!, name: 'e64s', size: 8, signed: true, values: [{ name: 'NEG', value: -2n, hi32: 0xffffffff }] },
  ];
}

test('parses one type of every kind', () => {
  const { b, ids } = allKinds();
  const btf = parseBtf(b.build());
  assert.equal(btf.endianness, 'little');
  assert.equal(btf.count, 21);
  assert.deepEqual(btf.types(), expectedAllKinds(ids));
  // The flat accessors agree with the model.
  assert.equal(btf.kind(ids.st!), BtfKind.STRUCT);
  assert.equal(btf.memberBitfieldSize(ids.st!, 1), 3);
  assert.equal(btf.memberBitOffset(ids.st!, 1), 32);
  assert.equal(btf.ref(ids.arr!), ids.int);
  assert.equal(btf.arrayNelems(ids.arr!), 4);
  assert.equal(btf.enumValue(ids.en!, 1), -1);
  assert.equal(btf.enum64Value(ids.e64!, 0), 0xffffffff00000000n);
  assert.equal(btf.pointerSize, 8);
});

test('big-endian blobs parse to the same model', () => {
  const { b, ids } = allKinds();
  const be = b.build({ endianness: 'big' });
  assert.equal(be.readUInt16BE(0), 0xeb9f);
  const btf = parseBtf(be);
  assert.equal(btf.endianness, 'big');
  assert.deepEqual(btf.types(), expectedAllKinds(ids));
  assert.equal(generateVmlinuxHeader(be), generateVmlinuxHeader(b.build()));
});

test('a longer (newer) header is skipped, sections counted from its end', () => {
  const { b, ids } = allKinds();
  const btf = parseBtf(b.build({ headerExtra: 8 }));
  assert.deepEqual(btf.types(), expectedAllKinds(ids));
});

test('the pointer size comes from long, as libbpf guesses it', () => {
  const b = new BtfBuilder();
  b.int('long int', 4, { signed: true });
  assert.equal(parseBtf(b.build()).pointerSize, 4);
});

test('a non-ASCII string section still decodes names (as UTF-8)', () => {
  const b = new BtfBuilder();
  const int = b.int('int', 4, { signed: true });
  b.var('caf\u00e9', int);
  const btf = parseBtf(b.build());
  assert.equal(btf.name(2), 'caf\u00e9');
});

test('bad magic', () => {
  const blob = new BtfBuilder().build({ header: { magic: 0x1234 } });
  assertBtfError(() => parseBtf(blob), /bad magic 0x1234/);
  assertBtfError(() => parseBtf(Buffer.from('hello world, not BTF at all')), /bad magic/);
});

test('truncated header', () => {
  const blob = allKinds().b.build();
  assertBtfError(() => parseBtf(blob.subarray(0, 2)), /truncated header: 2 bytes/);
  assertBtfError(() => parseBtf(blob.subarray(0, 20)), /truncated header: 20 bytes/);
  assertBtfError(() => parseBtf(new BtfBuilder().build({ header: { hdrLen: 4096 } })), /truncated header: header length 4096/);
  assertBtfError(() => parseBtf(new BtfBuilder().build({ header: { hdrLen: 16 } })), /header length 16 is shorter than 24/);
});

test('unsupported version', () => {
  assertBtfError(() => parseBtf(new BtfBuilder().build({ header: { version: 2 } })), /unsupported version 2/);
});

test('truncated sections', () => {
  const blob = allKinds().b.build();
  // Cut into the string section, then into the type section.
  assertBtfError(() => parseBtf(blob.subarray(0, blob.length - 3)), /truncated string section/);
  const typeLen = blob.readUInt32LE(12);
  assertBtfError(() => parseBtf(allKinds().b.build({ header: { typeLen: typeLen + 4096 } })), /truncated type section/);
  // A record whose vlen runs past the end of the type section.
  const b = new BtfBuilder();
  b.raw([0, (4 << 24) | 5, 8, 0, 0, 0]); // STRUCT claiming 5 members, carrying 1
  assertBtfError(() => parseBtf(b.build()), /truncated type section: type \[1\] \(STRUCT, vlen 5\) needs 72 bytes, only 24 left/);
  // A section that ends in the middle of a common record.
  const c = new BtfBuilder();
  c.raw([0, 2 << 24]);
  assertBtfError(() => parseBtf(c.build()), /truncated type section: type \[1\] needs 12 bytes/);
});

test('every truncation of a valid blob is E_BTF', () => {
  const blob = allKinds().b.build();
  for (let n = 0; n < blob.length; n++) {
    assertBtfError(() => parseBtf(blob.subarray(0, n)), /./);
  }
});

test('misaligned or overlapping sections', () => {
  const blob = allKinds().b.build();
  const strOff = blob.readUInt32LE(16);
  assertBtfError(() => parseBtf(allKinds().b.build({ header: { typeOff: 2 } })), /not a multiple of 4/);
  assertBtfError(() => parseBtf(allKinds().b.build({ header: { strOff: strOff - 8, strLen: 16 } })), /overlap/);
});

test('string section must start and end with NUL', () => {
  assertBtfError(() => parseBtf(new BtfBuilder().build({ strings: Buffer.from('\0abc') })), /start and end with a NUL/);
  assertBtfError(() => parseBtf(new BtfBuilder().build({ strings: Buffer.from('x\0') })), /start and end with a NUL/);
  assertBtfError(() => parseBtf(new BtfBuilder().build({ strings: new Uint8Array(0) })), /start and end with a NUL/);
});

test('unknown kind', () => {
  const b = new BtfBuilder();
  b.raw([0, 20 << 24, 0]);
  assertBtfError(() => parseBtf(b.build()), /type \[1\] has unknown kind 20/);
});

test('out-of-range type ids', () => {
  const cases: [string, (b: BtfBuilder) => void, RegExp][] = [
    ['ptr', (b) => b.ptr(7), /type \[1\] \(PTR\) referenced type refers to type id 7, but the highest id is 1/],
    ['typedef', (b) => b.typedef('t', 99), /\(TYPEDEF\) aliased type refers to type id 99/],
    ['array element', (b) => b.array(5, 0, 1), /\(ARRAY\) element type refers to type id 5/],
    ['member', (b) => b.struct('s', 4, [{ name: 'a', type: 42, bitOffset: 0 }]), /\(STRUCT\) member 0 refers to type id 42/],
    ['parameter', (b) => b.funcProto(0, [['a', 3]]), /\(FUNC_PROTO\) parameter 0 refers to type id 3/],
    ['return', (b) => b.funcProto(9, []), /\(FUNC_PROTO\) return type refers to type id 9/],
    ['datasec', (b) => b.datasec('.d', 4, [{ type: 8, offset: 0, size: 4 }]), /\(DATASEC\) variable 0 refers to type id 8/],
    ['decl tag', (b) => b.declTag('x', 3), /\(DECL_TAG\) tagged type refers to type id 3/],
  ];
  for (const [what, add, re] of cases) {
    const b = new BtfBuilder();
    add(b);
    assertBtfError(() => parseBtf(b.build()), re);
    void what;
  }
});

test('string offsets past the end', () => {
  const b = new BtfBuilder();
  b.raw([1000, 4 << 24, 0]); // STRUCT named at offset 1000
  assertBtfError(() => parseBtf(b.build()), /type \[1\] \(STRUCT\): string offset 1000 is past the end of the string section \(1 bytes\)/);
  const c = new BtfBuilder();
  const int = c.int('int', 4);
  c.raw([0, (4 << 24) | 1, 4, 5000, int, 0]); // member name at offset 5000
  assertBtfError(() => parseBtf(c.build()), /type \[2\] \(STRUCT\) member 0: string offset 5000 is past the end/);
});

test('names that would not be C are refused', () => {
  const bad: [string, (b: BtfBuilder) => void, RegExp][] = [
    ['struct', (b) => b.struct('a b', 0, []), /\(STRUCT\): name "a b" is not a valid C identifier/],
    ['member', (b) => b.struct('s', 4, [{ name: 'x;y', type: b.int('int', 4), bitOffset: 0 }]), /member 0: name "x;y"/],
    ['enumerator', (b) => b.enum('e', 4, [['1A', 1]]), /enumerator 0: name "1A"/],
    ['typedef', (b) => b.typedef('', 0), /\(TYPEDEF\): the name is empty/],
    ['int', (b) => b.int('int}', 4), /\(INT\): name "int}" is not a C base type name/],
    ['type tag', (b) => b.typeTag('x")))int y;', 0), /\(TYPE_TAG\): name .* is not a plain attribute or tag/],
  ];
  for (const [, add, re] of bad) {
    const b = new BtfBuilder();
    add(b);
    assertBtfError(() => parseBtf(b.build()), re);
  }
});

test('impossible sizes', () => {
  const b = new BtfBuilder();
  b.int('int', 3);
  assertBtfError(() => parseBtf(b.build()), /\(INT\): size 3 is not one of 1, 2, 4, 8, 16/);
  const c = new BtfBuilder();
  c.int('int', 4, { bits: 40 });
  assertBtfError(() => parseBtf(c.build()), /40 bits at bit 0 do not fit in 4 bytes/);
  const d = new BtfBuilder();
  d.enum('e', 3, [['A', 1]]);
  assertBtfError(() => parseBtf(d.build()), /\(ENUM\): size 3/);
});

test('reference loops C cannot express are refused', () => {
  const b = new BtfBuilder();
  b.ptr(1); // a pointer to itself
  assertBtfError(() => parseBtf(b.build()), /type \[1\] \(PTR\) refers back to itself/);
  const c = new BtfBuilder();
  c.typedef('a', 2);
  c.typedef('b', 1);
  assertBtfError(() => parseBtf(c.build()), /refers back to itself without passing through a named struct or union/);
  const d = new BtfBuilder();
  d.struct('', 8, [{ name: 'self', type: 2, bitOffset: 0 }]); // anonymous struct pointing at itself
  d.ptr(1);
  assertBtfError(() => parseBtf(d.build()), /refers back to itself/);
  // A named struct breaks the loop, as in C.
  const e = new BtfBuilder();
  e.struct('list', 8, [{ name: 'next', type: 2, bitOffset: 0 }]);
  e.ptr(1);
  assert.equal(parseBtf(e.build()).count, 3);
});

test('a very deep chain is parsed iteratively and refused by the emitter with E_BTF', () => {
  const b = new BtfBuilder();
  const int = b.int('int', 4, { signed: true });
  let t = int;
  for (let i = 0; i < 100_000; i++) t = b.const(t);
  b.typedef('deep', t);
  const blob = b.build();
  const btf: Btf = parseBtf(blob);
  assert.equal(btf.count, 100_003);
  assertBtfError(() => generateVmlinuxHeader(blob), /nest more than \d+ deep/);
});

/** mulberry32: a tiny deterministic PRNG, so fuzz failures reproduce. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test('corrupted blobs give E_BTF or a header, never another error', () => {
  const blob = allKinds().b.build();
  const rand = prng(0x5eed);
  let parsed = 0;
  for (let iter = 0; iter < 3000; iter++) {
    const m = Buffer.from(blob);
    const edits = 1 + Math.floor(rand() * 4);
    for (let e = 0; e < edits; e++) {
      const at = Math.floor(rand() * m.length);
      // Half the time a small value (ids, offsets near the edges), else any byte.
      m[at] = rand() < 0.5 ? Math.floor(rand() * 32) : Math.floor(rand() * 256);
    }
    try {
      parseBtf(m);
      parsed++;
      generateVmlinuxHeader(m, { maxOutputChars: 1 << 20 });
    } catch (err) {
      assert.ok(isKheadersError(err, 'E_BTF'), `iteration ${iter}: ${String(err)}`);
    }
  }
  assert.ok(parsed > 0, 'some corruptions should still parse');
});

test('the real kernel BTF parses', (t) => {
  const path = '/sys/kernel/btf/vmlinux';
  if (!existsSync(path)) return t.skip(`${path} is absent`);
  const btf = parseBtf(readFileSync(path));
  assert.ok(btf.count > 1000);
  let structs = 0;
  for (let id = 1; id < btf.count; id++) if (btf.kind(id) === BtfKind.STRUCT) structs++;
  assert.ok(structs > 100);
  const task = btf.types().find((x) => x.kind === BtfKind.STRUCT && x.name === 'task_struct');
  assert.ok(task && task.kind === BtfKind.STRUCT && task.members.some((m) => m.name === 'real_parent'));
});
