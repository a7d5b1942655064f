/**
 * The pure tar codecs: one header block (checksum, octal and GNU base-256 numbers, the ustar
 * prefix, type flags), pax records, GNU long names, and the streaming indexer built on them
 * (exact data offsets, extension headers, any chunking of the input).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { KheadersError } from '../src/errors.js';
import { BLOCK, TarHeaderError, decodeHeader, decodeLongName, decodePax, isZeroBlock, paddedSize } from '../src/store/tar-header.js';
import { TarIndexer, DEFAULT_LIMITS } from '../src/store/tar-indexer.js';
import type { IndexRecord } from '../src/store/tree-index.js';
import { END_OF_ARCHIVE, gnuLongMember, makeTar, paxBody, pseudoRandom, rawHeader, rawMember, setChecksum, textLike } from './helpers/archives.js';

test('decodeHeader reads a ustar header written by tar-stream', async () => {
  const tarBytes = await makeTar([{ name: 'include/linux/types.h', content: 'abc', mode: 0o640, mtime: new Date(1_234_567_890_000) }]);
  const h = decodeHeader(tarBytes.subarray(0, BLOCK));
  assert.equal(h.name, 'include/linux/types.h');
  assert.equal(h.size, 3);
  assert.equal(h.mode, 0o640);
  assert.equal(h.mtime, 1_234_567_890);
  assert.equal(h.type, 'file');
  assert.equal(h.linkname, '');
});

test('decodeHeader verifies the checksum', () => {
  const good = rawHeader({ name: 'a.h', size: 10 });
  assert.equal(decodeHeader(good).size, 10);
  assert.throws(() => decodeHeader(rawHeader({ name: 'a.h', size: 10, checksumDelta: 1 })), (err: unknown) => {
    assert.ok(err instanceof TarHeaderError);
    assert.match(err.message, /checksum mismatch/);
    return true;
  });
  // One flipped bit anywhere outside the checksum field is caught.
  for (const offset of [0, 100, 124, 156, 257, 345, 511]) {
    const bad = Buffer.from(good);
    bad[offset] = bad[offset]! ^ 0x01;
    assert.throws(() => decodeHeader(bad), TarHeaderError, `bit flip at ${offset}`);
  }
  // A checksum field of spaces (no digits at all) is refused, not read as 0.
  const blank = Buffer.from(good);
  blank.fill(0x20, 148, 156);
  assert.throws(() => decodeHeader(blank), /empty checksum|checksum/);
  assert.throws(() => decodeHeader(good.subarray(0, 100)), /short header block/);
});

test('decodeHeader reads octal numbers with leading spaces and either terminator', () => {
  const block = rawHeader({ name: 'x' });
  block.write('   1234 \0', 124, 'latin1'); // size, space-padded on the left, space then NUL
  block.write('  755 \0', 100, 'latin1');
  setChecksum(block);
  const h = decodeHeader(block);
  assert.equal(h.size, 0o1234);
  assert.equal(h.mode, 0o755);

  const bad = rawHeader({ name: 'x' });
  bad.write('00000000009\0', 124, 'latin1');
  setChecksum(bad);
  assert.throws(() => decodeHeader(bad), /size is not an octal number/);
});

test('decodeHeader reads GNU base-256 sizes (files over 8 GiB)', () => {
  const big = 2 ** 33 + 5; // past the 11 octal digits' 8 GiB
  const h = decodeHeader(rawHeader({ name: 'huge', size: big, base256Size: true }));
  assert.equal(h.size, big);
  const small = decodeHeader(rawHeader({ name: 'small', size: 1000, base256Size: true }));
  assert.equal(small.size, 1000);

  // Negative base-256 (0xff lead byte) is refused.
  const neg = rawHeader({ name: 'neg' });
  neg.fill(0xff, 124, 136);
  setChecksum(neg);
  assert.throws(() => decodeHeader(neg), /size out of range/);

  // Beyond 2^53: refused rather than rounded.
  const over = rawHeader({ name: 'over' });
  over.fill(0, 124, 136);
  over[124] = 0x80;
  over[128] = 0x01; // 2^56
  setChecksum(over);
  assert.throws(() => decodeHeader(over), /size out of range/);
});

test('decodeHeader does not drop the value bits of a base-256 lead byte', () => {
  // The lead byte's low 6 bits are the number's top bits: 0x81 followed by eleven zero bytes is
  // 2^88, far past 2^53. The decoder must refuse it, not silently read it as size 0 (which would
  // make kheadersd parse the member's body as headers while tar skips it).
  const block = rawHeader({ name: 'trick' });
  block.fill(0, 124, 136);
  block[124] = 0x81;
  setChecksum(block);
  assert.throws(() => decodeHeader(block), /size out of range/);
});

test('decodeHeader joins the ustar prefix, and only in ustar headers', () => {
  const h = decodeHeader(rawHeader({ name: 'sched.h', prefix: 'include/linux' }));
  assert.equal(h.name, 'include/linux/sched.h');
  // GNU headers keep atime/ctime where ustar has the prefix: never treat those bytes as a name.
  const gnu = rawHeader({ name: 'sched.h', format: 'gnu' });
  gnu.write('junk', 345, 'latin1');
  setChecksum(gnu);
  assert.equal(decodeHeader(gnu).name, 'sched.h');
  // v7 headers have no magic at all.
  assert.equal(decodeHeader(rawHeader({ name: 'old.h', format: 'v7', prefix: 'ignored' })).name, 'old.h');
  // A 100-byte name has no NUL terminator: all 100 bytes are the name.
  const long = 'd/'.repeat(49) + 'ab';
  assert.equal(long.length, 100);
  assert.equal(decodeHeader(rawHeader({ name: long })).name, long);
});

test('decodeHeader maps every type flag', () => {
  const cases: Array<[string, string]> = [
    ['0', 'file'],
    ['\0', 'file'],
    ['7', 'file'],
    ['1', 'link'],
    ['2', 'symlink'],
    ['3', 'char-device'],
    ['4', 'block-device'],
    ['5', 'directory'],
    ['6', 'fifo'],
    ['L', 'gnu-long-name'],
    ['K', 'gnu-long-link'],
    ['x', 'pax-header'],
    ['g', 'pax-global-header'],
    ['S', 'unsupported'],
    ['V', 'unsupported'],
  ];
  for (const [flag, type] of cases) {
    const block = rawHeader({ name: 'n', typeflag: flag === '\0' ? '0' : flag });
    if (flag === '\0') {
      block[156] = 0;
      setChecksum(block);
    }
    const h = decodeHeader(block);
    assert.equal(h.type, type, `flag ${JSON.stringify(flag)}`);
  }
  assert.equal(decodeHeader(rawHeader({ name: 'l', typeflag: '2', linkname: '../x.h' })).linkname, '../x.h');
});

test('decodePax reads records, including values with "=", newlines and UTF-8', () => {
  const body = paxBody([
    ['path', 'include/ünïcode/a=b.h'],
    ['linkpath', 'line1\nline2'],
    ['size', '12345'],
    ['mtime', '1700000000.123456789'],
  ]);
  const m = decodePax(body);
  assert.equal(m.get('path'), 'include/ünïcode/a=b.h');
  assert.equal(m.get('linkpath'), 'line1\nline2');
  assert.equal(m.get('size'), '12345');
  assert.equal(m.get('mtime'), '1700000000.123456789');
  // The body is padded with NULs to the block: decoding stops there.
  assert.equal(decodePax(Buffer.concat([paxBody([['path', 'x']]), Buffer.alloc(100)])).get('path'), 'x');
  // A NUL inside a value is kept (so the indexer can refuse it).
  assert.equal(decodePax(paxBody([['path', 'a\0b']])).get('path'), 'a\0b');
});

test('decodePax refuses malformed records', () => {
  assert.throws(() => decodePax(Buffer.from('12path=abc\n')), /no length|length/);
  assert.throws(() => decodePax(Buffer.from('99 path=abc\n')), /length/);
  assert.throws(() => decodePax(Buffer.from('3 path=abc\n')), /length|no "="/);
  assert.throws(() => decodePax(Buffer.from('x path=abc\n')), /length/);
  assert.throws(() => decodePax(Buffer.from('10 pathabc\n')), /no "="/);
});

test('decodeLongName, paddedSize, isZeroBlock', () => {
  assert.equal(decodeLongName(Buffer.from('a/b/c.h\0\0\0')), 'a/b/c.h');
  assert.equal(decodeLongName(Buffer.from('no-terminator')), 'no-terminator');
  assert.equal(paddedSize(0), 0);
  assert.equal(paddedSize(1), 512);
  assert.equal(paddedSize(512), 512);
  assert.equal(paddedSize(513), 1024);
  assert.equal(isZeroBlock(Buffer.alloc(512)), true);
  const b = Buffer.alloc(512);
  b[511] = 1;
  assert.equal(isZeroBlock(b), false);
});

// ---------------------------------------------------------------------------------------------
// The indexer

function indexAll(tarBytes: Buffer, chunkSizes?: () => number, limits = DEFAULT_LIMITS): { records: IndexRecord[]; indexer: TarIndexer } {
  const indexer = new TarIndexer(limits, new Set(['include/generated/utsrelease.h']));
  if (!chunkSizes) indexer.push(tarBytes);
  else for (let i = 0; i < tarBytes.length; ) {
    const n = Math.max(1, chunkSizes());
    indexer.push(tarBytes.subarray(i, i + n));
    i += n;
  }
  return { records: indexer.finish(), indexer };
}

test('TarIndexer records exact data offsets, whatever the chunking', async () => {
  const contents = new Map<string, Buffer>([
    ['include/a.h', Buffer.from('A'.repeat(511))],
    ['include/b.h', Buffer.from('B'.repeat(512))],
    ['include/c.h', Buffer.from('C'.repeat(513))],
    ['include/empty.h', Buffer.alloc(0)],
    ['include/generated/utsrelease.h', Buffer.from('#define UTS_RELEASE "6.1.0-test"\n')],
    ['include/' + 'long/'.repeat(30) + 'deep.h', textLike(5000, 3)], // over 100 bytes: pax path
  ]);
  const tarBytes = await makeTar([
    { name: './', type: 'directory' },
    { name: './include/', type: 'directory' },
    ...[...contents].map(([name, content]) => ({ name: './' + name, content })),
    { name: './include/link.h', type: 'symlink', linkname: 'a.h' },
  ]);
  const next = pseudoRandom(99);
  const chunkings: Array<[string, (() => number) | undefined]> = [
    ['whole', undefined],
    ['1 byte', () => 1],
    ['511', () => 511],
    ['513', () => 513],
    ['random', () => next() % 3000],
  ];
  let reference: IndexRecord[] | undefined;
  for (const [label, sizes] of chunkings) {
    const { records, indexer } = indexAll(tarBytes, sizes);
    assert.equal(indexer.position, tarBytes.length, label);
    for (const [name, content] of contents) {
      const rec = records.find((r) => r.path === name);
      assert.ok(rec, `${label}: ${name} indexed`);
      assert.equal(rec.kind, 'file');
      assert.equal(rec.size, content.length);
      assert.ok(tarBytes.subarray(rec.offset, rec.offset! + rec.size).equals(content), `${label}: bytes of ${name} at its offset`);
    }
    assert.deepEqual(records.find((r) => r.path === 'include/link.h'), { path: 'include/link.h', kind: 'symlink', mode: 0o644, mtime: 1_700_000_000, size: 3, target: 'a.h' });
    assert.equal(records.find((r) => r.path === '')?.kind, 'dir');
    assert.equal(indexer.captured.get('include/generated/utsrelease.h')?.toString(), '#define UTS_RELEASE "6.1.0-test"\n', label);
    if (reference) assert.deepEqual(records, reference, `${label} gives the same records`);
    else reference = records;
  }
});

test('TarIndexer applies GNU long names and long link targets to the next member only', () => {
  const longName = './include/' + 'x'.repeat(150) + '/file.h';
  const longTarget = '../' + 'y'.repeat(120) + '.h';
  const body = Buffer.from('hello');
  const tarBytes = Buffer.concat([
    gnuLongMember('L', longName),
    rawMember({ name: longName.slice(0, 99), format: 'gnu' }, body),
    gnuLongMember('L', './include/' + 'z'.repeat(120)),
    gnuLongMember('K', longTarget),
    rawMember({ name: './include/zzz', typeflag: '2', linkname: longTarget.slice(0, 99), format: 'gnu' }),
    rawMember({ name: './include/short.h', format: 'gnu' }, Buffer.from('s')),
    END_OF_ARCHIVE,
  ]);
  const { records } = indexAll(tarBytes);
  assert.deepEqual(
    records.map((r) => [r.path, r.kind, r.target]),
    [
      ['include/' + 'x'.repeat(150) + '/file.h', 'file', undefined],
      ['include/' + 'z'.repeat(120), 'symlink', longTarget],
      ['include/short.h', 'file', undefined],
    ],
  );
  const file = records[0]!;
  assert.ok(tarBytes.subarray(file.offset, file.offset! + file.size).equals(body));
});

test('TarIndexer applies pax path, linkpath, size and mtime', () => {
  const content = Buffer.from('pax sized content');
  const tarBytes = Buffer.concat([
    rawMember({ name: 'PaxHeader', typeflag: 'x' }, paxBody([['path', './include/from-pax.h'], ['size', String(content.length)], ['mtime', '1600000000.75']])),
    // The ustar size field says 0: pax size overrides it.
    Buffer.concat([rawHeader({ name: 'ignored', size: 0 }), Buffer.concat([content, Buffer.alloc(512 - content.length)])]),
    rawMember({ name: 'PaxHeader', typeflag: 'x' }, paxBody([['linkpath', 'from-pax.h']])),
    rawMember({ name: './include/l', typeflag: '2', linkname: 'ignored' }),
    rawMember({ name: 'global', typeflag: 'g' }, paxBody([['comment', 'ignored']])),
    rawMember({ name: './include/plain.h' }, Buffer.from('p')),
    END_OF_ARCHIVE,
  ]);
  const { records } = indexAll(tarBytes);
  const rec = records.find((r) => r.path === 'include/from-pax.h');
  assert.ok(rec);
  assert.equal(rec.size, content.length);
  assert.equal(rec.mtime, 1_600_000_000);
  assert.ok(tarBytes.subarray(rec.offset, rec.offset! + rec.size).equals(content));
  assert.equal(records.find((r) => r.path === 'include/l')?.target, 'from-pax.h');
  assert.ok(records.find((r) => r.path === 'include/plain.h'), 'the extension headers did not leak onto later members');
  assert.equal(records.length, 3);
});

test('TarIndexer refuses bad structure as E_ARCHIVE_CORRUPT', () => {
  const member = rawMember({ name: 'a.h' }, Buffer.from('abc'));
  const cases: Array<[string, Buffer, RegExp]> = [
    ['bad checksum', Buffer.concat([rawHeader({ name: 'a.h', checksumDelta: 3 }), END_OF_ARCHIVE]), /bad tar header at offset 0: header checksum mismatch/],
    ['ends mid-member', member.subarray(0, 600), /ends in the middle of a member/],
    ['ends mid-header', member.subarray(0, 100), /ends in the middle/],
    ['data after the end marker', Buffer.concat([member, END_OF_ARCHIVE, Buffer.from('x')]), /data after the end-of-archive marker/],
    ['lone zero block', Buffer.concat([member, Buffer.alloc(512), member, END_OF_ARCHIVE]), /lone zero block/],
    ['huge pax header', Buffer.concat([rawHeader({ name: 'p', typeflag: 'x', size: 2 * 1024 * 1024 }), END_OF_ARCHIVE]), /over 1048576/],
    ['bad pax record', Buffer.concat([rawMember({ name: 'p', typeflag: 'x' }, Buffer.from('5 a\n')), member, END_OF_ARCHIVE]), /bad pax-header member/],
    ['unreadable pax size', Buffer.concat([rawMember({ name: 'p', typeflag: 'x' }, paxBody([['size', 'many']])), member, END_OF_ARCHIVE]), /unreadable size/],
  ];
  for (const [label, bytes, pattern] of cases) {
    assert.throws(
      () => indexAll(bytes),
      (err: unknown) => {
        assert.ok(err instanceof KheadersError, `${label}: ${String(err)}`);
        assert.equal(err.code, 'E_ARCHIVE_CORRUPT', label);
        assert.match(err.message, pattern, label);
        return true;
      },
    );
  }
  // Zero padding after the end marker (tar pads to its record size) is fine; so is no marker.
  assert.equal(indexAll(Buffer.concat([member, END_OF_ARCHIVE, Buffer.alloc(8192)])).records.length, 1);
  assert.equal(indexAll(member).records.length, 1);
});

test('TarIndexer enforces the limits as bytes arrive', () => {
  const limits = { maxTotalBytes: 10 * 1024, maxEntries: 3, maxFileBytes: 1000 };
  const entries = (n: number, size: number): Buffer =>
    Buffer.concat([...Array.from({ length: n }, (_, i) => rawMember({ name: `f${i}.h` }, Buffer.alloc(size, 0x61))), END_OF_ARCHIVE]);

  const expectLimit = (bytes: Buffer, limit: string, pattern: RegExp): void => {
    assert.throws(
      () => indexAll(bytes, () => 512, limits),
      (err: unknown) => {
        assert.ok(err instanceof KheadersError);
        assert.equal(err.code, 'E_LIMIT');
        assert.equal(err.details.limit, limit);
        assert.match(err.message, pattern);
        return true;
      },
    );
  };
  expectLimit(entries(4, 10), 'maxEntries', /more than 3 entries \(--max-entries\)/);
  expectLimit(entries(1, 1001), 'maxFileBytes', /entry "f0\.h" is 1001 bytes, over the 1000-byte limit \(--max-file-bytes\)/);
  expectLimit(Buffer.concat([entries(3, 1000), Buffer.alloc(20 * 1024)]), 'maxTotalBytes', /expands past the limit of 10240 bytes \(--max-total-bytes\)/);
  // A file is refused on its header: before a byte of its body is read.
  const indexer = new TarIndexer(limits);
  assert.throws(() => indexer.push(rawHeader({ name: 'big.h', size: 5_000_000 })), /big\.h/);
  assert.equal(indexAll(entries(3, 1000), () => 700, limits).records.length, 3);
});
