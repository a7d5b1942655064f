/**
 * Split BTF: a module's BTF read over its base (the kernel's), as /sys/kernel/btf/<module> is,
 * and the header made from it, checked against bpftool (`-B base`) and against the sizes the BTF
 * records, on blobs built here and on the real modules of a test kernel.
 */
import { after, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { isKheadersError } from '../src/errors.js';
import { BtfKind, parseBtf, type Btf } from '../src/btf/reader.js';
import { generateVmlinuxHeader } from '../src/btf/index.js';
import { runBtfCommand } from '../src/btf/command.js';
import { BtfBuilder } from './helpers/btf-builder.js';
import { baseBtfOf, moduleBtfOf, testKernel, type TestKernel } from './helpers/kernels.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'kheaders-btf-split-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const HAVE_BPFTOOL = spawnSync('bpftool', ['version'], { stdio: 'ignore' }).status === 0;
const HAVE_CLANG = spawnSync('clang', ['--version'], { stdio: 'ignore' }).status === 0;

function run(cmd: string, args: string[], cwd?: string): string {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
  assert.equal(r.status, 0, `${cmd} ${args.join(' ')} failed:\n${(r.stderr ?? '').slice(0, 4000)}`);
  return r.stdout;
}

/** bpftool's header for split BTF over a base (bpftool v7.1 takes the base as `-B FILE`). */
function bpftoolSplit(base: string, split: string): string {
  return run('bpftool', ['-B', base, 'btf', 'dump', 'file', split, 'format', 'c']);
}

/** See btf-emitter.test.ts: the one deliberate difference from bpftool v7.1. */
function withoutModeAttrs(h: string): string {
  return h.replace(/ __attribute__\(\(mode\((byte|word)\)\)\)/g, '');
}

// ---- blobs built here -------------------------------------------------------------------------

interface Pair {
  base: Buffer;
  split: Buffer;
}

/** A small kernel and a module over it: base types used by value, by pointer and by name. */
function kernelAndModule(): Pair {
  const k = new BtfBuilder();
  const int = k.int('int', 4, { signed: true });
  const uint = k.int('unsigned int', 4);
  k.int('long int', 8, { signed: true });
  const u32 = k.typedef('u32', uint);
  const lh = k.nextId;
  k.struct('list_head', 16, [
    { name: 'next', type: lh + 1, bitOffset: 0 },
    { name: 'prev', type: lh + 1, bitOffset: 64 },
  ]);
  k.ptr(lh);
  k.struct('dup', 4, [{ name: 'x', type: int, bitOffset: 0 }]);
  const m = k.split();
  // The module's own `struct dup` clashes with the kernel's: it becomes dup___2, as in bpftool.
  const mdup = m.struct('dup', 8, [{ name: 'y', type: m.ptr(int), bitOffset: 0 }]);
  const kdup = m.ptr(lh + 2);
  const state = m.nextId;
  m.struct('mod_state', 48, [
    { name: 'node', type: lh, bitOffset: 0 },
    { name: 'flags', type: u32, bitOffset: 128 },
    { name: 'kdup', type: kdup, bitOffset: 192 },
    { name: 'mdup', type: mdup, bitOffset: 256 },
    { name: 'self', type: state + 1, bitOffset: 320 },
  ]);
  m.ptr(state);
  m.enum('mod_mode', 4, [['MOD_OFF', 0], ['MOD_ON', 1]]);
  const opaque = m.fwd('mod_opaque');
  m.struct('uses_fwd', 8, [{ name: 'o', type: m.ptr(opaque), bitOffset: 0 }]);
  return { base: k.build(), split: m.build() };
}

const SPLIT_TAIL = `struct dup___2 {
	int *y;
};

struct mod_state {
	struct list_head node;
	u32 flags;
	struct dup *kdup;
	struct dup___2 mdup;
	struct mod_state *self;
};

enum mod_mode {
	MOD_OFF = 0,
	MOD_ON = 1,
};

struct mod_opaque;

struct uses_fwd {
	struct mod_opaque *o;
};
`;

test('split BTF continues its base: ids, names and strings resolve across both', () => {
  const { base, split } = kernelAndModule();
  const kernel = parseBtf(base);
  const btf = parseBtf(split, { base: kernel });
  assert.equal(btf.firstId, kernel.count);
  assert.equal(btf.base, kernel);
  assert.equal(btf.pointerSize, kernel.pointerSize);
  const state = btf.type(kernel.count + 3); // after the module's int *, struct dup and struct dup *
  assert.equal(state.kind, BtfKind.STRUCT);
  assert.equal(state.name, 'mod_state');
  if (state.kind !== BtfKind.STRUCT) return;
  // Members refer to base types by id, and to base strings by offset.
  assert.equal(btf.name(state.members[0]!.type), 'list_head');
  assert.equal(btf.name(state.members[1]!.type), 'u32');
  assert.deepEqual(
    state.members.map((m) => m.name),
    ['node', 'flags', 'kdup', 'mdup', 'self'],
  );
  // The base alone is unchanged, and still parses without the module.
  assert.equal(parseBtf(base).count, kernel.count);
});

test('the header of split BTF is the base\'s types followed by the module\'s, as bpftool writes it', (t) => {
  const { base, split } = kernelAndModule();
  const ours = generateVmlinuxHeader(split, { base });
  const kernelOnly = generateVmlinuxHeader(base);
  const epilogueAt = kernelOnly.indexOf('#ifndef BPF_NO_PRESERVE_ACCESS_INDEX\n#pragma clang attribute pop');
  assert.equal(ours, kernelOnly.slice(0, epilogueAt) + SPLIT_TAIL + '\n' + kernelOnly.slice(epilogueAt));
  if (!HAVE_BPFTOOL) return t.skip('bpftool is not installed: compared with the expected text only');
  writeFileSync(path.join(tmp, 'kernel.btf'), base);
  writeFileSync(path.join(tmp, 'module.btf'), split);
  assert.equal(withoutModeAttrs(ours), bpftoolSplit(path.join(tmp, 'kernel.btf'), path.join(tmp, 'module.btf')));
});

function assertBtfError(fn: () => unknown, re: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(isKheadersError(err, 'E_BTF'), `expected E_BTF, got ${String(err)}`);
    assert.match(err.message, re);
    return true;
  });
}

test('malformed split BTF is E_BTF: ids and string offsets past base and module, mixed byte order, no base', () => {
  const k = new BtfBuilder();
  k.int('int', 4, { signed: true });
  const kernel = parseBtf(k.build());
  const badId = k.split();
  badId.ptr(kernel.count + 5);
  assertBtfError(() => parseBtf(badId.build(), { base: kernel }), /refers to type id 7, but the highest id is 2/);
  const badStr = k.split();
  badStr.raw([9999, (4 << 24) >>> 0, 0]); // struct named at a string offset beyond both sections
  assertBtfError(() => parseBtf(badStr.build(), { base: kernel }), /string offset 9999 is past the end/);
  const be = k.split();
  be.struct('s', 4, [{ name: 'x', type: 1, bitOffset: 0 }]);
  assertBtfError(() => parseBtf(be.build({ endianness: 'big' }), { base: kernel }), /big-endian order over a little-endian base/);
  // Read alone, a module's blob is refused with a hint at what it is.
  assertBtfError(() => generateVmlinuxHeader(be.build()), /looks like a module's split BTF/);
});

// ---- the command ------------------------------------------------------------------------------

test('btf command: --base/--btf, and --module from a BTF directory like /sys/kernel/btf', async () => {
  const { base, split } = kernelAndModule();
  const dir = path.join(tmp, 'sysfs-btf');
  mkdirSync(dir, { recursive: true });
  writeFileSync(path.join(dir, 'vmlinux'), base);
  writeFileSync(path.join(dir, 'mymod'), split);
  const expected = generateVmlinuxHeader(split, { base });
  const collect = async (opts: Parameters<typeof runBtfCommand>[0]): Promise<string> => {
    const out = new PassThrough();
    const chunks: Buffer[] = [];
    out.on('data', (c: Buffer) => chunks.push(c));
    await runBtfCommand(opts, out);
    return Buffer.concat(chunks).toString('latin1');
  };
  assert.equal(await collect({ base: path.join(dir, 'vmlinux'), btf: path.join(dir, 'mymod') }), expected);
  assert.equal(await collect({ module: 'mymod', btfDir: dir }), expected);
  await assert.rejects(collect({ module: 'absent', btfDir: dir }), (err: unknown) => isKheadersError(err, 'E_NOT_FOUND') && /modules with BTF now: mymod/.test(err.message));
  await assert.rejects(collect({ module: '../etc', btfDir: dir }), (err: unknown) => isKheadersError(err, 'E_USAGE'));
  await assert.rejects(collect({ module: 'mymod', btf: path.join(dir, 'mymod'), btfDir: dir }), (err: unknown) => isKheadersError(err, 'E_USAGE'));
  await assert.rejects(collect({ base: path.join(dir, 'vmlinux') }), (err: unknown) => isKheadersError(err, 'E_USAGE'));
});

// ---- a real kernel's modules --------------------------------------------------------------------

const KERNEL = testKernel('x86_64-6.1.192');

/** The real kernel's base BTF and module BTF files, extracted once. */
let realFiles: { kernel: TestKernel; base: string; baseBtf: Btf; modules: Map<string, string> } | undefined;

function real(t: TestContext): typeof realFiles {
  if (typeof KERNEL === 'string') {
    t.skip(KERNEL);
    return undefined;
  }
  if (realFiles === undefined) {
    const dir = path.join(tmp, 'real');
    mkdirSync(dir, { recursive: true });
    const baseBytes = baseBtfOf(KERNEL);
    const base = path.join(dir, 'vmlinux');
    writeFileSync(base, baseBytes);
    const modules = new Map<string, string>();
    for (const name of KERNEL.modules.keys()) {
      const file = path.join(dir, name);
      writeFileSync(file, moduleBtfOf(KERNEL, name));
      modules.set(name, file);
    }
    realFiles = { kernel: KERNEL, base, baseBtf: parseBtf(baseBytes), modules };
  }
  return realFiles;
}

test("every module of a real kernel: our header is bpftool's, text for text", (t) => {
  const r = real(t);
  if (!r) return;
  if (!HAVE_BPFTOOL) return t.skip('bpftool is not installed');
  assert.ok(r.modules.size >= 5, `${r.modules.size} modules`);
  const baseBytes = readFileSync(r.base);
  for (const [name, file] of r.modules) {
    const ours = generateVmlinuxHeader(readFileSync(file), { base: baseBytes });
    const theirs = bpftoolSplit(r.base, file);
    const a = withoutModeAttrs(ours).split('\n');
    const b = theirs.split('\n');
    const first = a.findIndex((line, i) => line !== b[i]);
    assert.ok(first === -1 && a.length === b.length, `${name}: first difference at line ${first + 1}: ours ${JSON.stringify(a[first])}, bpftool ${JSON.stringify(b[first])}`);
  }
  t.diagnostic(`${r.modules.size} modules of ${r.kernel.release}: ${[...r.modules.keys()].join(', ')}`);
});

/** `_Static_assert`s of the sizes and member offsets of the module's own named structs. */
function moduleLayoutAsserts(btf: Btf): { text: string; count: number } {
  const uses = new Map<string, number>();
  for (let id = 1; id < btf.count; id++) {
    const k = btf.kind(id);
    if (k === BtfKind.STRUCT || k === BtfKind.UNION) uses.set(btf.name(id), (uses.get(btf.name(id)) ?? 0) + 1);
  }
  const lines: string[] = [];
  let count = 0;
  for (let id = btf.firstId; id < btf.count; id++) {
    const t = btf.type(id);
    // A name the kernel also uses is emitted as NAME___2: skip those rather than guess.
    if (t.kind !== BtfKind.STRUCT || t.name === '' || uses.get(t.name) !== 1) continue;
    count++;
    lines.push(`_Static_assert(sizeof(struct ${t.name}) == ${t.size}, "sizeof ${t.name}");`);
    for (const m of t.members) {
      if (m.name === '' || m.bitfieldSize !== 0) continue;
      lines.push(`_Static_assert(__builtin_offsetof(struct ${t.name}, ${m.name}) == ${m.bitOffset / 8}, "${t.name}.${m.name}");`);
    }
  }
  return { text: lines.join('\n'), count };
}

test('module headers compile for BPF and give every module struct the size its BTF records', (t) => {
  const r = real(t);
  if (!r) return;
  if (!HAVE_CLANG) return t.skip('clang is not installed');
  const baseBytes = readFileSync(r.base);
  let structs = 0;
  for (const [name, file] of r.modules) {
    const split = readFileSync(file);
    const asserts = moduleLayoutAsserts(parseBtf(split, { base: r.baseBtf }));
    if (asserts.count === 0) continue; // nothing of its own to measure (the base is measured in btf-emitter.test)
    structs += asserts.count;
    const dir = path.join(tmp, 'layout', name);
    mkdirSync(dir, { recursive: true });
    writeFileSync(path.join(dir, `${name}.h`), generateVmlinuxHeader(split, { base: baseBytes }));
    writeFileSync(path.join(dir, 'layout.c'), `#include "${name}.h"\n${asserts.text}\n`);
    run('clang', ['-target', 'bpf', '-fsyntax-only', '-Wno-everything', 'layout.c'], dir);
  }
  assert.ok(structs > 0, 'the modules define structs of their own');
  t.diagnostic(`${structs} module structs checked against their BTF sizes and offsets`);
});
