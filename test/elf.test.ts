import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { KheadersError, isKheadersError, type ErrorCode } from '../src/errors.js';
import { findEmbeddedArchive, isElf, readModinfo, releaseFromVermagic } from '../src/source/elf.js';
import { FIXTURE_ARCHIVE, FIXTURE_OBJECT, FIXTURE_SHA256, pseudoRandom, randomBytes, sha256, xz } from './helpers/archives.js';
import { buildElf, sectionHeaderOffset, ET_DYN, ET_EXEC, ET_REL, SHT_DYNSYM, SHT_NOBITS, type ElfSpec } from './helpers/elf-builder.js';

/** The archive bytes the synthetic files embed: any bytes do for the symbol path. */
const ARCHIVE = Buffer.concat([Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), randomBytes(1000, 7)]);

function expectError(fn: () => unknown, code: ErrorCode, ...patterns: RegExp[]): KheadersError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof KheadersError, `expected a KheadersError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  for (const pattern of patterns) assert.match(caught.message, pattern);
  return caught;
}

/** .rodata = padding, archive, padding; symbols bracket the archive (offsets inside .rodata). */
function relocatableSpec(bits: 32 | 64, endian: 'le' | 'be'): ElfSpec {
  return {
    bits,
    endian,
    type: ET_REL,
    sections: [
      { name: '.text', data: Buffer.alloc(36, 0xcc) },
      { name: '.rodata', data: Buffer.concat([Buffer.alloc(16, 0xaa), ARCHIVE, Buffer.alloc(8, 0xbb)]) },
      { name: '.bss', type: SHT_NOBITS, size: 4096 },
    ],
    symbols: [
      { name: 'kernel_headers_data_end', value: BigInt(16 + ARCHIVE.length), section: '.rodata' },
      { name: 'unrelated', value: 0n, section: '.text' },
      { name: 'kernel_headers_data', value: 16n, section: '.rodata' },
    ],
  };
}

// ---------------------------------------------------------------------------------------------
// The real kernel/kheaders.o
// ---------------------------------------------------------------------------------------------

test('the fixture kheaders.o yields exactly the fixture archive through its symbols', (t) => {
  if (!existsSync(FIXTURE_OBJECT) || !existsSync(FIXTURE_ARCHIVE)) return t.skip(`fixture ${FIXTURE_OBJECT} not present`);
  const object = readFileSync(FIXTURE_OBJECT);
  assert.equal(isElf(object), true);
  const archive = findEmbeddedArchive(object);
  assert.equal(archive.method, 'symbols');
  assert.equal(archive.release, undefined, 'kheaders.o has no vermagic (modpost adds it to the .ko)');
  assert.equal(archive.data.buffer, object.buffer, 'data is a view of the input, not a copy');
  assert.equal(archive.data.length, readFileSync(FIXTURE_ARCHIVE).length);
  assert.equal(sha256(archive.data), FIXTURE_SHA256);
});

test('the fixture kheaders.o without its symbols is found by the xz magic scan, to the same bytes', (t) => {
  if (!existsSync(FIXTURE_OBJECT)) return t.skip(`fixture ${FIXTURE_OBJECT} not present`);
  const object = Buffer.from(readFileSync(FIXTURE_OBJECT));
  // Rename the two symbols in .strtab so the file looks stripped of them.
  const name = Buffer.from('kernel_headers_data', 'latin1');
  let renamed = 0;
  for (let at = object.indexOf(name); at !== -1; at = object.indexOf(name, at + 1)) {
    object[at] = 'x'.charCodeAt(0);
    renamed++;
  }
  assert.ok(renamed >= 2);
  const archive = findEmbeddedArchive(object);
  assert.equal(archive.method, 'magic-scan');
  assert.equal(sha256(archive.data), FIXTURE_SHA256);
});

test('the fixture kheaders.o .modinfo holds the module strings but no vermagic', (t) => {
  if (!existsSync(FIXTURE_OBJECT)) return t.skip(`fixture ${FIXTURE_OBJECT} not present`);
  const info = readModinfo(readFileSync(FIXTURE_OBJECT));
  assert.equal(info.get('license'), 'GPL v2');
  assert.equal(info.get('author'), 'Joel Fernandes');
  assert.equal(info.has('vermagic'), false);
});

test('the fixture archive itself is not an ELF file', (t) => {
  if (!existsSync(FIXTURE_ARCHIVE)) return t.skip(`fixture ${FIXTURE_ARCHIVE} not present`);
  const archive = readFileSync(FIXTURE_ARCHIVE);
  assert.equal(isElf(archive), false);
  expectError(() => findEmbeddedArchive(archive), 'E_ELF', /not an ELF file/);
});

test('damaging the fixture never escapes as anything but a KheadersError', (t) => {
  if (!existsSync(FIXTURE_OBJECT)) return t.skip(`fixture ${FIXTURE_OBJECT} not present`);
  const original = readFileSync(FIXTURE_OBJECT);
  // Truncations: the section table is at the end, so most lengths lose it.
  for (let i = 0; i < 64; i++) {
    const length = Math.floor((original.length * i) / 64) + (i % 7);
    assertOnlyKheadersErrors(() => findEmbeddedArchive(original.subarray(0, length)));
  }
  // Random bytes in the header, the section header table, and the symbol table.
  const next = pseudoRandom(42);
  const shoff = Number(original.readBigUInt64LE(40));
  for (let i = 0; i < 300; i++) {
    const copy = Buffer.from(original);
    const symtab = [0x3d5e38, 0x3d5e38 + 0x270]; // .symtab's offset and size, from readelf -S
    const region = i % 3 === 0 ? [0, 64] : i % 3 === 1 ? [shoff, original.length] : symtab;
    for (let k = 0; k < 4; k++) copy[region[0]! + (next() % (region[1]! - region[0]!))] = next() & 0xff;
    assertOnlyKheadersErrors(() => findEmbeddedArchive(copy));
  }
});

// ---------------------------------------------------------------------------------------------
// Synthetic files: each class, byte order and file type
// ---------------------------------------------------------------------------------------------

test('isElf checks the magic only', () => {
  assert.equal(isElf(Buffer.alloc(0)), false);
  assert.equal(isElf(Buffer.from('\x7fEL', 'latin1')), false);
  assert.equal(isElf(Buffer.from('\x7fELF', 'latin1')), true);
  assert.equal(isElf(Buffer.from('#!/bin/sh\n')), false);
});

test('ELF32 big-endian relocatable: symbols are offsets inside their section', () => {
  const elf = buildElf(relocatableSpec(32, 'be'));
  const archive = findEmbeddedArchive(elf.buf);
  assert.equal(archive.method, 'symbols');
  assert.deepEqual(archive.data, ARCHIVE);
  assert.equal(archive.data.byteOffset - elf.buf.byteOffset, elf.offsets.get('.rodata')! + 16);
});

test('ELF64 little-endian relocatable and ELF32 little-endian / ELF64 big-endian also work', () => {
  for (const [bits, endian] of [[64, 'le'], [32, 'le'], [64, 'be']] as const) {
    const archive = findEmbeddedArchive(buildElf(relocatableSpec(bits, endian)).buf);
    assert.deepEqual(archive.data, ARCHIVE, `ELF${bits} ${endian}`);
  }
});

test('ELF64 little-endian executable (vmlinux): symbols are virtual addresses, high-half kernel addresses included', () => {
  const base = 0xffffffff82000000n; // beyond 2^53: must not lose precision
  const elf = buildElf({
    bits: 64,
    endian: 'le',
    type: ET_EXEC,
    sections: [
      { name: '.text', addr: 0xffffffff81000000n, data: Buffer.alloc(64, 0x90) },
      { name: '.rodata', addr: base, data: Buffer.concat([Buffer.alloc(0x40), ARCHIVE, Buffer.alloc(3)]) },
    ],
    symbols: [
      { name: 'kernel_headers_data', value: base + 0x40n, section: '.rodata' },
      { name: 'kernel_headers_data_end', value: base + 0x40n + BigInt(ARCHIVE.length), section: '.rodata' },
    ],
  });
  const archive = findEmbeddedArchive(elf.buf);
  assert.equal(archive.method, 'symbols');
  assert.deepEqual(archive.data, ARCHIVE);
});

test('ELF32 big-endian executable with a non-zero sh_addr', () => {
  const base = 0xc0800000n;
  const elf = buildElf({
    bits: 32,
    endian: 'be',
    type: ET_EXEC,
    sections: [{ name: '.rodata', addr: base, data: Buffer.concat([Buffer.alloc(4), ARCHIVE]) }],
    symbols: [
      { name: 'kernel_headers_data', value: base + 4n, section: '.rodata' },
      { name: 'kernel_headers_data_end', value: base + 4n + BigInt(ARCHIVE.length), section: '.rodata' },
    ],
  });
  assert.deepEqual(findEmbeddedArchive(elf.buf).data, ARCHIVE);
});

test('a shared object with the symbols only in .dynsym', () => {
  const spec = relocatableSpec(64, 'le');
  const elf = buildElf({ ...spec, type: ET_DYN, symtabType: SHT_DYNSYM });
  assert.deepEqual(findEmbeddedArchive(elf.buf).data, ARCHIVE);
});

test('undefined references to the symbols are not taken for their definitions', () => {
  const spec = relocatableSpec(64, 'le');
  const elf = buildElf({
    ...spec,
    symbols: [
      { name: 'kernel_headers_data', value: 0n, section: 0 }, // SHN_UNDEF: a reference
      { name: 'kernel_headers_data_end', value: 0n, section: 0 },
      ...spec.symbols!,
    ],
  });
  assert.deepEqual(findEmbeddedArchive(elf.buf).data, ARCHIVE);
});

test('a .ko-like file: release from .modinfo vermagic, and readModinfo reads every key', () => {
  const modinfo = Buffer.from('license=GPL v2\0alias=a\0alias=b\0\0\0vermagic=6.6.0-test SMP mod_unload \0name=kheaders\0', 'latin1');
  const spec = relocatableSpec(64, 'le');
  const elf = buildElf({ ...spec, sections: [...spec.sections, { name: '.modinfo', data: modinfo }] });
  const archive = findEmbeddedArchive(elf.buf);
  assert.equal(archive.release, '6.6.0-test');
  assert.deepEqual(archive.data, ARCHIVE);
  const info = readModinfo(elf.buf);
  assert.equal(info.get('vermagic'), '6.6.0-test SMP mod_unload ');
  assert.equal(info.get('name'), 'kheaders');
  assert.equal(info.get('alias'), 'a', 'the first of duplicate keys wins');
  assert.equal(info.size, 4);
});

test('readModinfo is empty without a .modinfo section', () => {
  assert.equal(readModinfo(buildElf(relocatableSpec(32, 'be')).buf).size, 0);
});

test('an implausible vermagic release is dropped, not returned', () => {
  const spec = relocatableSpec(64, 'le');
  const elf = buildElf({ ...spec, sections: [...spec.sections, { name: '.modinfo', data: Buffer.from('vermagic=../../etc SMP\0') }] });
  assert.equal(findEmbeddedArchive(elf.buf).release, undefined);
});

test('releaseFromVermagic takes the first word of the value', () => {
  assert.equal(releaseFromVermagic('vermagic=6.1.0-18-amd64 SMP preempt mod_unload modversions'), '6.1.0-18-amd64');
  assert.equal(releaseFromVermagic('6.1.0-18-amd64 SMP preempt mod_unload modversions'), '6.1.0-18-amd64');
  assert.equal(releaseFromVermagic('  5.15.0-1034-aws SMP'), '5.15.0-1034-aws');
  assert.equal(releaseFromVermagic('6.6.0-test'), '6.6.0-test');
  assert.equal(releaseFromVermagic('6.1.102-1.182.amzn2023.x86_64 SMP mod_unload '), '6.1.102-1.182.amzn2023.x86_64');
  assert.equal(releaseFromVermagic(''), '');
  assert.equal(releaseFromVermagic('vermagic='), '');
  assert.equal(releaseFromVermagic('../../x SMP'), '');
  assert.equal(releaseFromVermagic('6.1/evil SMP'), '');
});

// ---------------------------------------------------------------------------------------------
// Stripped files: the xz magic scan
// ---------------------------------------------------------------------------------------------

test('a stripped file: the xz stream is found by its header and first valid footer', () => {
  const stream = xz(randomBytes(20000, 3));
  const second = xz(Buffer.from('a second stream that must not be included\n'));
  // A decoy header magic with a wrong CRC, a stray footer magic, then the real stream and another after it.
  const decoy = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef]);
  const rodata = Buffer.concat([Buffer.from('junk YZ junk'), decoy, Buffer.alloc(5), stream, Buffer.alloc(7, 0x55), second]);
  for (const [bits, endian] of [[64, 'le'], [32, 'be']] as const) {
    const elf = buildElf({ bits, endian, type: ET_REL, sections: [{ name: '.rodata', data: rodata }] });
    const archive = findEmbeddedArchive(elf.buf);
    assert.equal(archive.method, 'magic-scan');
    assert.deepEqual(archive.data, stream);
  }
});

test('a stripped file whose xz stream lost its footer: E_ARCHIVE_NOT_FOUND that says so', () => {
  const stream = xz(randomBytes(5000, 5));
  const elf = buildElf({ bits: 64, endian: 'le', type: ET_REL, sections: [{ name: '.rodata', data: stream.subarray(0, stream.length - 12) }] });
  const err = expectError(() => findEmbeddedArchive(elf.buf), 'E_ARCHIVE_NOT_FOUND', /xz stream header at offset \d+ has no valid stream footer/);
  assert.deepEqual(err.details.orphanXzHeaders, [elf.offsets.get('.rodata')]);
});

test('a stream whose footer flags differ from its header is not accepted', () => {
  const stream = xz(Buffer.from('hello\n'));
  const crc64 = Buffer.from(stream);
  // Rewrite the header to claim CRC32 (flags 00 01) with a correct header CRC: the footer still says CRC64.
  const flags = Buffer.from([0x00, 0x01]);
  flags.copy(crc64, 6);
  crc64.writeUInt32LE(crc32Of(flags), 8);
  const elf = buildElf({ bits: 64, endian: 'le', type: ET_REL, sections: [{ name: '.rodata', data: crc64 }] });
  expectError(() => findEmbeddedArchive(elf.buf), 'E_ARCHIVE_NOT_FOUND');
});

function crc32Of(data: Buffer): number {
  let crc = 0xffffffff;
  for (const byte of data) {
    crc ^= byte;
    for (let k = 0; k < 8; k++) crc = crc & 1 ? (crc >>> 1) ^ 0xedb88320 : crc >>> 1;
  }
  return (crc ^ 0xffffffff) >>> 0;
}

test('neither symbols nor an xz stream: E_ARCHIVE_NOT_FOUND', () => {
  const elf = buildElf({ bits: 64, endian: 'le', type: ET_REL, sections: [{ name: '.rodata', data: Buffer.from('nothing to see') }], symbols: [] });
  expectError(() => findEmbeddedArchive(elf.buf), 'E_ARCHIVE_NOT_FOUND', /kernel_headers_data/, /xz stream/);
  // Only one of the two symbols is no pair either.
  const half = buildElf({ ...relocatableSpec(64, 'le'), sections: [{ name: '.rodata', data: Buffer.alloc(32) }], symbols: [{ name: 'kernel_headers_data', value: 0n, section: '.rodata' }] });
  expectError(() => findEmbeddedArchive(half.buf), 'E_ARCHIVE_NOT_FOUND');
  // An ELF with no section header table at all.
  const bare = Buffer.from(elf.buf.subarray(0, 64));
  bare.writeBigUInt64LE(0n, 40);
  expectError(() => findEmbeddedArchive(bare), 'E_ARCHIVE_NOT_FOUND');
});

test('files written by binutils (objcopy, as, ld): ELF32/64, both byte orders, .o, vmlinux-like, .so, stripped', (t) => {
  const stream = xz(randomBytes(3000, 11));
  const dir = mkdtempSync(path.join(tmpdir(), 'kheadersd-elf-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const run = (cmd: string, args: string[]): boolean => {
    try {
      execFileSync(cmd, args, { cwd: dir, stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  };
  writeFileSync(path.join(dir, 'a.xz'), stream);
  const rename = ['--rename-section', '.data=.rodata', '--redefine-sym', '_binary_a_xz_start=kernel_headers_data', '--redefine-sym', '_binary_a_xz_end=kernel_headers_data_end'];
  const made: Array<[string, 'symbols' | 'magic-scan']> = [];
  for (const format of ['elf32-big', 'elf64-big', 'elf32-little', 'elf64-little']) {
    if (run('objcopy', ['-I', 'binary', '-O', format, ...rename, 'a.xz', `${format}.o`])) made.push([`${format}.o`, 'symbols']);
  }
  // kernel/kheaders_data.S, assembled and linked at a high-half address like vmlinux.
  writeFileSync(
    path.join(dir, 'k.S'),
    '.section .rodata, "a"\n.global kernel_headers_data\nkernel_headers_data:\n.incbin "a.xz"\n.global kernel_headers_data_end\nkernel_headers_data_end:\n.text\n.global _start\n_start: ret\n',
  );
  if (run('as', ['-o', 'k.o', 'k.S']) && run('ld', ['-o', 'vmlinux', '-Ttext=0xffffffff81000000', 'k.o'])) {
    made.push(['k.o', 'symbols'], ['vmlinux', 'symbols']);
    if (run('ld', ['-shared', '-o', 'k.so', 'k.o'])) made.push(['k.so', 'symbols']);
    if (run('objcopy', ['--strip-all', 'vmlinux', 'vmlinux.stripped'])) made.push(['vmlinux.stripped', 'magic-scan']);
  }
  if (made.length === 0) return t.skip('binutils (objcopy, as, ld) not available');
  for (const [file, method] of made) {
    const archive = findEmbeddedArchive(readFileSync(path.join(dir, file)));
    assert.equal(archive.method, method, file);
    assert.deepEqual(archive.data, stream, file);
  }
});

// ---------------------------------------------------------------------------------------------
// Malformed files: E_ELF with a message that says what is wrong
// ---------------------------------------------------------------------------------------------

test('a truncated ELF header', () => {
  const elf = buildElf(relocatableSpec(64, 'le')).buf;
  expectError(() => findEmbeddedArchive(elf.subarray(0, 10)), 'E_ELF', /truncated ELF header/, /10 bytes/);
  expectError(() => findEmbeddedArchive(elf.subarray(0, 40)), 'E_ELF', /truncated ELF header/, /ELF64 header needs 64/);
  const elf32 = buildElf(relocatableSpec(32, 'be')).buf;
  expectError(() => findEmbeddedArchive(elf32.subarray(0, 51)), 'E_ELF', /ELF32 header needs 52/);
});

test('bad identification bytes', () => {
  const elf = Buffer.from(buildElf(relocatableSpec(64, 'le')).buf);
  elf[4] = 3;
  expectError(() => findEmbeddedArchive(elf), 'E_ELF', /unknown ELF class 3/);
  elf[4] = 2;
  elf[5] = 0;
  expectError(() => findEmbeddedArchive(elf), 'E_ELF', /unknown ELF byte order 0/);
});

test('a section header table past the end of the file', () => {
  const built = buildElf(relocatableSpec(64, 'le'));
  // The table sits at the end: cutting the last bytes leaves it short.
  expectError(() => findEmbeddedArchive(built.buf.subarray(0, built.buf.length - 10)), 'E_ELF', /section header table \(\d+ entries × 64 bytes at offset \d+\) ends at \d+, past the end of the file/);
  const moved = Buffer.from(built.buf);
  moved.writeBigUInt64LE(BigInt(moved.length + 1000), built.fields.shoff);
  expectError(() => findEmbeddedArchive(moved), 'E_ELF', new RegExp(`at offset ${moved.length + 1000} \\(e_shoff\\) lies past the end of the file`));
  const huge = Buffer.from(built.buf);
  huge.writeBigUInt64LE(0xffffffffffffff00n, built.fields.shoff);
  expectError(() => findEmbeddedArchive(huge), 'E_ELF', /past the end of the file/);
});

test('a bad e_shstrndx', () => {
  const built = buildElf(relocatableSpec(32, 'be'));
  const out = Buffer.from(built.buf);
  out.writeUInt16BE(200, built.fields.shstrndx);
  expectError(() => findEmbeddedArchive(out), 'E_ELF', /e_shstrndx is 200, but the file has only \d+ sections/);
  out.writeUInt16BE(built.indexes.get('.text')!, built.fields.shstrndx);
  expectError(() => findEmbeddedArchive(out), 'E_ELF', /not a string table/);
});

test('kernel_headers_data_end before kernel_headers_data', () => {
  const spec = relocatableSpec(64, 'le');
  const elf = buildElf({
    ...spec,
    symbols: [
      { name: 'kernel_headers_data', value: 100n, section: '.rodata' },
      { name: 'kernel_headers_data_end', value: 16n, section: '.rodata' },
    ],
  });
  const rodata = elf.offsets.get('.rodata')!;
  expectError(
    () => findEmbeddedArchive(elf.buf),
    'E_ELF',
    new RegExp(`kernel_headers_data_end \\(file offset ${rodata + 16}, st_value 0x10\\) comes before kernel_headers_data \\(file offset ${rodata + 100}, st_value 0x64\\)`),
  );
});

test('a symbol in a SHT_NOBITS section', () => {
  const spec = relocatableSpec(32, 'be');
  const elf = buildElf({
    ...spec,
    symbols: [
      { name: 'kernel_headers_data', value: 0n, section: '.bss' },
      { name: 'kernel_headers_data_end', value: 100n, section: '.bss' },
    ],
  });
  expectError(() => findEmbeddedArchive(elf.buf), 'E_ELF', /symbol kernel_headers_data is in section \[\d+\] \.bss, which is SHT_NOBITS/);
});

test('a symbol outside its section, and a section that runs past the end of the file', () => {
  const spec = relocatableSpec(64, 'le');
  const outside = buildElf({ ...spec, symbols: [spec.symbols![2]!, { name: 'kernel_headers_data_end', value: 0x10000n, section: '.rodata' }] });
  expectError(() => findEmbeddedArchive(outside.buf), 'E_ELF', /symbol kernel_headers_data_end \(st_value 0x10000\) lies outside section \[\d+\] \.rodata/);

  // Inflate .rodata's sh_size so the end symbol resolves past EOF.
  const pastEof = buildElf({ ...spec, symbols: [spec.symbols![2]!, { name: 'kernel_headers_data_end', value: 0x100000n, section: '.rodata' }] });
  const out = Buffer.from(pastEof.buf);
  out.writeBigUInt64LE(0x200000n, sectionHeaderOffset(pastEof, '.rodata') + 32);
  expectError(() => findEmbeddedArchive(out), 'E_ELF', /symbol kernel_headers_data_end resolves to file offset \d+, past the end of the file/);

  // A vmlinux symbol below its section's address.
  const low = buildElf({
    bits: 64,
    endian: 'le',
    type: ET_EXEC,
    sections: [{ name: '.rodata', addr: 0xffffffff82000000n, data: ARCHIVE }],
    symbols: [
      { name: 'kernel_headers_data', value: 0x1000n, section: '.rodata' },
      { name: 'kernel_headers_data_end', value: 0xffffffff82000010n, section: '.rodata' },
    ],
  });
  expectError(() => findEmbeddedArchive(low.buf), 'E_ELF', /symbol kernel_headers_data \(st_value 0x1000\) lies outside section \[1\] \.rodata \(address 0xffffffff82000000/);
});

test('symbols in different sections, in no section, or in a section that does not exist', () => {
  const spec = relocatableSpec(64, 'le');
  const split = buildElf({ ...spec, symbols: [spec.symbols![2]!, { name: 'kernel_headers_data_end', value: 4n, section: '.text' }] });
  expectError(() => findEmbeddedArchive(split.buf), 'E_ELF', /kernel_headers_data is in section \[\d+\] \.rodata but kernel_headers_data_end is in section \[\d+\] \.text/);
  const abs = buildElf({ ...spec, symbols: [spec.symbols![2]!, { name: 'kernel_headers_data_end', value: 4n, section: 0xfff1 }] });
  expectError(() => findEmbeddedArchive(abs.buf), 'E_ELF', /kernel_headers_data_end is not defined in a section \(st_shndx 0xfff1\)/);
  const missing = buildElf({ ...spec, symbols: [spec.symbols![2]!, { name: 'kernel_headers_data_end', value: 4n, section: 77 }] });
  expectError(() => findEmbeddedArchive(missing.buf), 'E_ELF', /refers to section 77, but the file has only \d+ sections/);
});

test('every truncation and random damage of a synthetic file ends in a KheadersError, never a RangeError', () => {
  const modinfo = Buffer.from('vermagic=6.6.0-test SMP\0');
  for (const [bits, endian] of [[64, 'le'], [32, 'be']] as const) {
    const spec = relocatableSpec(bits, endian);
    const { buf } = buildElf({ ...spec, sections: [...spec.sections, { name: '.modinfo', data: modinfo }] });
    for (let length = 0; length < buf.length; length++) {
      assertOnlyKheadersErrors(() => findEmbeddedArchive(buf.subarray(0, length)));
      assertOnlyKheadersErrors(() => readModinfo(buf.subarray(0, length)));
    }
    const next = pseudoRandom(bits);
    for (let i = 0; i < 3000; i++) {
      const copy = Buffer.from(buf);
      const flips = 1 + (next() % 6);
      for (let k = 0; k < flips; k++) copy[next() % copy.length] = next() & 0xff;
      assertOnlyKheadersErrors(() => findEmbeddedArchive(copy));
      assertOnlyKheadersErrors(() => readModinfo(copy));
    }
  }
});

function assertOnlyKheadersErrors(fn: () => unknown): void {
  try {
    fn();
  } catch (err) {
    assert.ok(isKheadersError(err, 'E_ELF') || isKheadersError(err, 'E_ARCHIVE_NOT_FOUND'), `unexpected ${String(err)}\n${(err as Error).stack}`);
  }
}
