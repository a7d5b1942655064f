/**
 * Hostile and broken archives, every one built here: unsafe names and member types, escaping
 * symlinks, xz bombs, and damaged xz streams (with both decoders). Each must fail with its typed
 * error naming the offending entry, and leave the entry cached before it exactly as it was, the
 * tmp area empty and the lock released.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { once } from 'node:events';
import net from 'node:net';
import path from 'node:path';
import type { ErrorCode } from '../src/errors.js';
import { KheadersError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { CacheStore } from '../src/store/cache.js';
import type { DecoderName } from '../src/store/decompress.js';
import { dataLocation } from '../src/store/entry.js';
import { exportEntry } from '../src/store/export.js';
import { ingest, type IngestOptions } from '../src/store/ingest.js';
import type { IngestLimits } from '../src/store/tar-indexer.js';
import {
  END_OF_ARCHIVE,
  flipByte,
  goodTree,
  hasStackTrace,
  makeTar,
  rawMember,
  runCli,
  snapshot,
  tempDir,
  textLike,
  xz,
  xzCheckOffset,
  type FileSnap,
  type SynthEntry,
} from './helpers/archives.js';

const silent = createLogger('silent');
const GOOD_RELEASE = '6.99.0-good';
const BAD_RELEASE = '6.99.1-bad';

interface Cache {
  dir: string;
  cacheDir: string;
  goodId: string;
  before: Map<string, FileSnap>;
}

/** A cache holding one good entry, and a snapshot of it. */
async function cacheWithGoodEntry(t: Parameters<typeof tempDir>[0]): Promise<Cache> {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const goodFile = path.join(dir, 'good.tar.xz');
  await writeFile(goodFile, xz(await makeTar(goodTree(GOOD_RELEASE))));
  const r = await ingest({ cacheDir, archive: goodFile, btf: 'off', log: silent });
  return { dir, cacheDir, goodId: r.entry.manifest.id, before: await snapshot(path.join(cacheDir, 'entries')) };
}

/** The good entry is there, alone, byte-identical; tmp is empty; the lock is free. */
async function assertIntact(c: Cache, label: string): Promise<void> {
  assert.deepEqual(await snapshot(path.join(c.cacheDir, 'entries')), c.before, `${label}: entries unchanged (inodes, mtimes, bytes)`);
  assert.deepEqual(await readdir(path.join(c.cacheDir, 'tmp')), [], `${label}: tmp is empty`);
  assert.equal((await readdir(c.cacheDir)).includes('lock'), false, `${label}: the lock was released`);
  const store = await CacheStore.open(c.cacheDir);
  assert.deepEqual((await store.list()).map((m) => m.id), [c.goodId], `${label}: the cache lists the good entry alone`);
  const entry = await store.load(c.goodId);
  const node = entry.index.resolve('include/linux/types.h')!;
  const { file, offset } = dataLocation(entry, node);
  const bytes = (await readFile(file)).subarray(offset, offset + node.size);
  assert.equal(bytes.toString(), '/* SPDX-License-Identifier: GPL-2.0 */\ntypedef unsigned int u32;\n', `${label}: a file reads back`);
}

interface Expect {
  code: ErrorCode;
  message: RegExp;
  /** The entry the error must name (in its message and details). */
  entry?: string;
}

async function expectFailure(c: Cache, label: string, archive: Buffer, want: Expect, opts: Partial<IngestOptions> = {}): Promise<void> {
  const file = path.join(c.dir, `bad-${label.replace(/\W+/g, '-')}`);
  await writeFile(file, archive);
  await assert.rejects(ingest({ cacheDir: c.cacheDir, archive: file, btf: 'off', log: silent, ...opts }), (err: unknown) => {
    assert.ok(err instanceof KheadersError, `${label}: expected a KheadersError, got ${String(err)}`);
    assert.equal(err.code, want.code, `${label}: ${err.message}`);
    assert.match(err.message, want.message, label);
    if (want.entry !== undefined) {
      assert.ok(err.message.includes(JSON.stringify(want.entry)), `${label}: the message names ${JSON.stringify(want.entry)}: ${err.message}`);
      assert.equal(err.details.entry, want.entry, `${label}: details.entry`);
    }
    return true;
  });
  await assertIntact(c, label);
}

/** A good tree plus hostile members, xz-compressed. */
async function badArchive(extra: SynthEntry[], base = goodTree(BAD_RELEASE)): Promise<Buffer> {
  return xz(await makeTar([...base, ...extra]));
}

const unsafeCases: Array<[string, SynthEntry[], Expect]> = [
  ['absolute name', [{ name: '/etc/cron.d/evil', content: 'x' }], { code: 'E_UNSAFE_ENTRY', message: /is an absolute path/, entry: '/etc/cron.d/evil' }],
  ['".." component', [{ name: './include/../../etc/evil', content: 'x' }], { code: 'E_UNSAFE_ENTRY', message: /has a "\.\." component/, entry: './include/../../etc/evil' }],
  ['".." at the start', [{ name: '../evil.h', content: 'x' }], { code: 'E_UNSAFE_ENTRY', message: /"\.\." component/, entry: '../evil.h' }],
  ['NUL byte in a pax path', [{ name: './include/nul.h', content: 'x', pax: { path: './include/a\0b.h' } }], { code: 'E_UNSAFE_ENTRY', message: /contains a NUL byte/, entry: './include/a\0b.h' }],
  ['duplicate path', [{ name: './include/linux/types.h', content: 'a second copy' }], { code: 'E_UNSAFE_ENTRY', message: /appears twice in the archive/, entry: 'include/linux/types.h' }],
  ['duplicate spelled differently', [{ name: 'include//linux/./types.h', content: 'again' }], { code: 'E_UNSAFE_ENTRY', message: /appears twice/, entry: 'include/linux/types.h' }],
  ['a file used as a directory', [{ name: './include/linux/types.h/x.h', content: 'x' }], { code: 'E_UNSAFE_ENTRY', message: /both as a directory and as a file/, entry: 'include/linux/types.h' }],
  ['hard link', [{ name: './include/hard.h', type: 'link', linkname: './include/linux/types.h' }], { code: 'E_UNSAFE_ENTRY', message: /is a hard link/, entry: './include/hard.h' }],
  ['hard link to outside', [{ name: './include/shadow', type: 'link', linkname: '/etc/shadow' }], { code: 'E_UNSAFE_ENTRY', message: /is a hard link \(to "\/etc\/shadow"\)/, entry: './include/shadow' }],
  ['character device', [{ name: './include/mem', type: 'character-device' }], { code: 'E_UNSAFE_ENTRY', message: /is a device node/, entry: './include/mem' }],
  ['block device', [{ name: './include/sda', type: 'block-device' }], { code: 'E_UNSAFE_ENTRY', message: /is a device node/, entry: './include/sda' }],
  ['FIFO', [{ name: './include/pipe', type: 'fifo' }], { code: 'E_UNSAFE_ENTRY', message: /is a FIFO/, entry: './include/pipe' }],
  ['symlink up and out', [{ name: './include/passwd', type: 'symlink', linkname: '../../etc/passwd' }], { code: 'E_UNSAFE_ENTRY', message: /symlink to "\.\.\/\.\.\/etc\/passwd", which leaves the tree/, entry: 'include/passwd' }],
  ['symlink to an absolute path', [{ name: './include/passwd', type: 'symlink', linkname: '/etc/passwd' }], { code: 'E_UNSAFE_ENTRY', message: /symlink to "\/etc\/passwd", which leaves the tree/, entry: 'include/passwd' }],
  ['symlink to the parent of the root', [{ name: './up', type: 'symlink', linkname: '..' }], { code: 'E_UNSAFE_ENTRY', message: /leaves the tree/, entry: 'up' }],
];

for (const [label, extra, want] of unsafeCases) {
  test(`unsafe entry refused: ${label}`, async (t) => {
    const c = await cacheWithGoodEntry(t);
    await expectFailure(c, label, await badArchive(extra), want);
  });
}

test('unsafe entry refused: a member type tar-stream cannot write (GNU sparse, "S")', async (t) => {
  const c = await cacheWithGoodEntry(t);
  const tarBytes = Buffer.concat([rawMember({ name: './include/sparse.h', typeflag: 'S' }, Buffer.from('x')), END_OF_ARCHIVE]);
  await expectFailure(c, 'sparse', xz(tarBytes), { code: 'E_UNSAFE_ENTRY', message: /unsupported tar type "S"/, entry: './include/sparse.h' });
});

test('unsafe entry refused: a symlink that escapes through a symlink to the root', async (t) => {
  // include/a/b/up -> ../../.. (the root: allowed), include/a/b/leak -> up/../secret. Read as text
  // the second is include/a/b/secret; followed by the kernel (FUSE, or the exported tree) it is
  // the parent of the tree. Without the check, `kheadersd export` hands BCC a link out of its dir.
  const c = await cacheWithGoodEntry(t);
  const archive = await badArchive([
    { name: './include/a/', type: 'directory' },
    { name: './include/a/b/', type: 'directory' },
    { name: './include/a/b/up', type: 'symlink', linkname: '../../..' },
    { name: './include/a/b/leak', type: 'symlink', linkname: 'up/../secret' },
  ]);
  const file = path.join(c.dir, 'escape.tar.xz');
  await writeFile(file, archive);
  await writeFile(path.join(c.dir, 'secret'), 'outside the tree\n');
  let escaped: string | undefined;
  try {
    const r = await ingest({ cacheDir: c.cacheDir, archive: file, btf: 'off', log: silent });
    // Accepted: show what that means on disk.
    const out = path.join(c.dir, 'tree'); // its parent holds the secret
    await exportEntry(r.entry, out);
    escaped = await readFile(path.join(out, 'include/a/b/leak'), 'utf8').catch(() => undefined);
  } catch (err) {
    assert.ok(err instanceof KheadersError, String(err));
    assert.equal(err.code, 'E_UNSAFE_ENTRY');
    assert.equal(err.details.entry, 'include/a/b/leak');
    return assertIntact(c, 'escape through a symlink');
  }
  assert.fail(`the archive was accepted${escaped !== undefined ? `, and the exported link reads ${JSON.stringify(escaped)} from outside the export` : ''}`);
});

// ---------------------------------------------------------------------------------------------
// xz bombs

const SMALL: IngestLimits = { maxTotalBytes: 1024 ** 3, maxEntries: 200_000, maxFileBytes: 64 * 1024 ** 2 };

test('xz bomb: total uncompressed size, refused from the xz index before decoding', async (t) => {
  const c = await cacheWithGoodEntry(t);
  const archive = await badArchive([{ name: './include/zeros.h', content: Buffer.alloc(4 * 1024 * 1024) }]);
  assert.ok(archive.length < 1024 * 1024);
  await expectFailure(c, 'total (index)', archive, { code: 'E_LIMIT', message: /would expand to \d+ bytes, over the limit of 2097152 \(--max-total-bytes\)/ }, {
    limits: { ...SMALL, maxTotalBytes: 2 * 1024 * 1024 },
  });
});

test('xz bomb: total uncompressed size, refused while decoding when the xz index is unreadable', async (t) => {
  // Stream padding after the footer is valid xz, but hides the index from the up-front check:
  // the limit must still hold as bytes arrive.
  const c = await cacheWithGoodEntry(t);
  const archive = Buffer.concat([await badArchive([{ name: './include/zeros.h', content: Buffer.alloc(4 * 1024 * 1024) }]), Buffer.alloc(4)]);
  await expectFailure(c, 'total (stream)', archive, { code: 'E_LIMIT', message: /expands past the limit of 2097152 bytes \(--max-total-bytes\)/ }, {
    limits: { ...SMALL, maxTotalBytes: 2 * 1024 * 1024 },
  });
});

test('xz bomb: entry count', async (t) => {
  const c = await cacheWithGoodEntry(t);
  const many = Array.from({ length: 100 }, (_, i): SynthEntry => ({ name: `./include/many/f${i}.h`, content: '' }));
  await expectFailure(c, 'entries', await badArchive(many), { code: 'E_LIMIT', message: /more than 50 entries \(--max-entries\)/ }, { limits: { ...SMALL, maxEntries: 50 } });
});

test('xz bomb: single file size, refused on its header', async (t) => {
  const c = await cacheWithGoodEntry(t);
  const archive = await badArchive([{ name: './include/huge.h', content: Buffer.alloc(3 * 1024 * 1024) }]);
  await expectFailure(
    c,
    'file size',
    archive,
    { code: 'E_LIMIT', message: /entry "include\/huge\.h" is 3145728 bytes, over the 1048576-byte limit \(--max-file-bytes\)/, entry: 'include/huge.h' },
    { limits: { ...SMALL, maxFileBytes: 1024 * 1024 } },
  );
});

test('xz bomb limits from the command line: --max-file-bytes, --max-entries, --max-total-bytes', async (t) => {
  const c = await cacheWithGoodEntry(t);
  const file = path.join(c.dir, 'bomb.tar.xz');
  await writeFile(file, await badArchive([{ name: './include/huge.h', content: Buffer.alloc(3 * 1024 * 1024) }]));
  const cases: Array<[string[], RegExp]> = [
    [['--max-file-bytes', '1M'], /entry "include\/huge\.h" is 3145728 bytes, over the 1048576-byte limit \(--max-file-bytes\)/],
    [['--max-entries', '5'], /more than 5 entries \(--max-entries\)/],
    [['--max-total-bytes', '2M'], /over the limit of 2097152 \(--max-total-bytes\)/],
  ];
  for (const [flags, pattern] of cases) {
    const r = await runCli(['ingest', '--archive', file, '--cache-dir', c.cacheDir, '--btf', 'off', ...flags]);
    assert.equal(r.code, 4, `${flags.join(' ')}: exit 4 (bad archive); stderr: ${r.stderr}`);
    assert.match(r.stderr, pattern, flags.join(' '));
    assert.equal(hasStackTrace(r.stderr), false);
    await assertIntact(c, flags.join(' '));
  }
  const ls = await runCli(['ls', '--cache-dir', c.cacheDir]);
  assert.equal(ls.code, 0);
  assert.match(ls.stdout, new RegExp(`^${GOOD_RELEASE.replace(/\./g, '\\.')} `, 'm'));
  const cat = await runCli(['cat', GOOD_RELEASE, 'include/linux/types.h', '--cache-dir', c.cacheDir]);
  assert.equal(cat.code, 0);
  assert.match(cat.stdout, /typedef unsigned int u32;/);
});

test('the lzma-native decoder stops on an unsafe entry or a limit instead of hanging', async (t) => {
  // Run as processes with a deadline: a decoder whose abort() never settles `done` would hang
  // an in-process test (and with it the daemon, holding the cache lock) for good.
  const c = await cacheWithGoodEntry(t);
  const hard = path.join(c.dir, 'hard.tar.xz');
  await writeFile(hard, await badArchive([{ name: './include/hard.h', type: 'link', linkname: './include/linux/types.h' }]));
  const big = path.join(c.dir, 'big.tar.xz');
  await writeFile(big, await badArchive([{ name: './include/huge.h', content: Buffer.alloc(3 * 1024 * 1024) }]));
  const cases: Array<[string, string[], RegExp]> = [
    [hard, [], /is a hard link/],
    [big, ['--max-file-bytes', '1M'], /over the 1048576-byte limit/],
  ];
  for (const [file, flags, pattern] of cases) {
    const r = await runCli(['ingest', '--archive', file, '--cache-dir', c.cacheDir, '--btf', 'off', '--decoder', 'lzma-native', ...flags], { timeoutMs: 30_000 });
    assert.equal(r.signal, null, `${path.basename(file)}: the ingest hung and was killed after 30 s`);
    assert.equal(r.code, 4, r.stderr);
    assert.match(r.stderr, pattern);
  }
  await assertIntact(c, 'lzma-native');
});

// ---------------------------------------------------------------------------------------------
// Damaged xz streams, with both decoders

for (const decoder of ['xz', 'lzma-native'] as DecoderName[]) {
  test(`damaged xz streams are E_ARCHIVE_CORRUPT (${decoder} decoder)`, async (t) => {
    const c = await cacheWithGoodEntry(t);
    // Big enough that the damage is not all in the first buffer the decoder sees.
    const good = await badArchive([{ name: './include/body.h', content: textLike(2 * 1024 * 1024, 5) }]);
    const check = xzCheckOffset(good);
    const cases: Array<[string, Buffer, RegExp]> = [
      ['truncated at the end', good.subarray(0, good.length - 40), /xz stream does not decode/],
      ['truncated in the middle', good.subarray(0, good.length >> 1), /xz stream does not decode|ends in the middle/],
      ['failed CRC64 (check field flipped)', flipByte(good, check), /xz stream does not decode/],
      ['compressed data flipped', flipByte(good, good.length >> 1), /xz stream does not decode|bad tar header/],
      ['trailing garbage', Buffer.concat([good, Buffer.from('trailing garbage!')]), /xz stream does not decode/],
      ['a second, foreign stream appended', Buffer.concat([good, xz(Buffer.from('not a tar at all'))]), /data after the end-of-archive marker|does not decode/],
    ];
    for (const [label, bytes, pattern] of cases) {
      await expectFailure(c, `${decoder} ${label}`, bytes, { code: 'E_ARCHIVE_CORRUPT', message: pattern }, { decoder });
    }
  });
}

test('not an archive at all: a text file, an empty file, a tar without xz, a directory, a missing file', async (t) => {
  const c = await cacheWithGoodEntry(t);
  await expectFailure(c, 'text', Buffer.from('#!/bin/sh\necho hello\n'), { code: 'E_ARCHIVE_CORRUPT', message: /neither an xz archive nor an ELF file \(it starts with 2321/ });
  await expectFailure(c, 'empty', Buffer.alloc(0), { code: 'E_ARCHIVE_CORRUPT', message: /it is empty/ });
  await expectFailure(c, 'plain tar', await makeTar(goodTree(BAD_RELEASE)), { code: 'E_ARCHIVE_CORRUPT', message: /neither an xz archive/ });
  await expectFailure(c, 'xz magic only', Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), { code: 'E_ARCHIVE_CORRUPT', message: /does not decode/ });
  for (const target of [c.dir, path.join(c.dir, 'nope.tar.xz')]) {
    await assert.rejects(ingest({ cacheDir: c.cacheDir, archive: target, btf: 'off', log: silent }), (err: unknown) => {
      assert.ok(err instanceof KheadersError);
      assert.equal(err.code, 'E_ARCHIVE_NOT_FOUND');
      assert.ok(err.message.includes(target));
      return true;
    });
  }
  // A socket (what /dev/stdin is under a supervisor's socketpair) cannot be opened: said so, not an internal error.
  const socketPath = path.join(c.dir, 'archive.sock');
  const server = net.createServer().listen(socketPath);
  await once(server, 'listening');
  t.after(() => server.close());
  await assert.rejects(ingest({ cacheDir: c.cacheDir, archive: socketPath, btf: 'off', log: silent }), (err: unknown) => {
    assert.ok(err instanceof KheadersError);
    assert.equal(err.code, 'E_ARCHIVE_NOT_FOUND');
    assert.match(err.message, /archive\.sock: it is a socket/);
    return true;
  });
  // A symlink to the archive is followed like any path the user names.
  const link = path.join(c.dir, 'link.tar.xz');
  await writeFile(path.join(c.dir, 'real.tar.xz'), xz(await makeTar(goodTree('6.99.7-linked'))));
  await symlink('real.tar.xz', link);
  const r = await ingest({ cacheDir: c.cacheDir, archive: link, btf: 'off', log: silent, keep: 10 });
  assert.equal(r.entry.manifest.release, '6.99.7-linked');
});

test('a corrupt tar inside a valid xz stream is E_ARCHIVE_CORRUPT (both decoders)', async (t) => {
  const c = await cacheWithGoodEntry(t);
  const tarBytes = await makeTar(goodTree(BAD_RELEASE));
  const broken = Buffer.from(tarBytes);
  broken[512 * 3 + 10] = broken[512 * 3 + 10]! ^ 0xff; // inside a header block: its checksum fails
  for (const decoder of ['xz', 'lzma-native'] as DecoderName[]) {
    await expectFailure(c, `tar checksum ${decoder}`, xz(broken), { code: 'E_ARCHIVE_CORRUPT', message: /bad tar header at offset \d+: header checksum mismatch/ }, { decoder });
    await expectFailure(c, `tar truncated ${decoder}`, xz(tarBytes.subarray(0, tarBytes.length - 1024 - 700)), { code: 'E_ARCHIVE_CORRUPT', message: /ends in the middle of a member/ }, { decoder });
  }
});

test('bad archives through the CLI exit 4 with one clear line and no stack trace', async (t) => {
  const c = await cacheWithGoodEntry(t);
  const cases: Array<[string, Buffer, RegExp]> = [
    ['evil.tar.xz', await badArchive([{ name: './include/passwd', type: 'symlink', linkname: '../../etc/passwd' }]), /unsafe archive entry "include\/passwd": is a symlink to "\.\.\/\.\.\/etc\/passwd", which leaves the tree/],
    ['trunc.tar.xz', (await badArchive([])).subarray(0, 200), /corrupt archive/],
    ['empty.tar.xz', Buffer.alloc(0), /it is empty/],
  ];
  for (const [name, bytes, pattern] of cases) {
    const file = path.join(c.dir, name);
    await writeFile(file, bytes);
    for (const decoder of ['xz', 'lzma-native']) {
      const r = await runCli(['ingest', '--archive', file, '--cache-dir', c.cacheDir, '--btf', 'off', '--decoder', decoder], { timeoutMs: 30_000 });
      assert.equal(r.code, 4, `${name} ${decoder}: ${r.stderr}`);
      assert.match(r.stderr, pattern);
      assert.match(r.stderr, /^kheadersd: /m);
      assert.equal(hasStackTrace(r.stderr + r.stdout), false, `${name}: no stack trace`);
    }
  }
  await assertIntact(c, 'cli');
});
