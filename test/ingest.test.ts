/**
 * Ingest of good archives: synthetic ones (every tar dialect the indexer reads, both decoders),
 * and the real 6.1 fixture, byte for byte against `tar -xJf`, from the .tar.xz and from the ELF
 * object that embeds it, read back from the pack, through `kheadersd export`, and re-ingested.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtemp, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { KheadersError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { CacheStore } from '../src/store/cache.js';
import { ARCHIVE_FILE, PACK_FILE, dataLocation, type CacheEntry } from '../src/store/entry.js';
import { ingest, type IngestOptions } from '../src/store/ingest.js';
import type { DecoderName } from '../src/store/decompress.js';
import { BtfBuilder } from './helpers/btf-builder.js';
import {
  END_OF_ARCHIVE,
  FIXTURE_ARCHIVE,
  FIXTURE_DIRS,
  FIXTURE_FILES,
  FIXTURE_OBJECT,
  FIXTURE_RELEASE,
  FIXTURE_SHA256,
  FIXTURE_SYMLINKS,
  SYNTH_RELEASE,
  fixtureMissing,
  gnuLongMember,
  goodArchive,
  goodTree,
  makeTar,
  paxBody,
  rawMember,
  runCli,
  sha256,
  snapshot,
  tempDir,
  textLike,
  treeContent,
  utsrelease,
  xz,
  xzWithLzmaNative,
  type SynthEntry,
} from './helpers/archives.js';

const silent = createLogger('silent');
const DECODERS: DecoderName[] = ['xz', 'lzma-native'];

function run(opts: IngestOptions): ReturnType<typeof ingest> {
  return ingest({ btf: 'off', log: silent, ...opts });
}

/** The bytes of one indexed file, read where the index says they are. */
async function readNode(entry: CacheEntry, p: string): Promise<Buffer> {
  const node = entry.index.resolve(p);
  assert.ok(node && node.kind === 'file', `${p} is a file in the index`);
  const { file, offset } = dataLocation(entry, node);
  const fh = await open(file, 'r');
  try {
    const buf = Buffer.alloc(node.size);
    const { bytesRead } = await fh.read(buf, 0, node.size, offset);
    assert.equal(bytesRead, node.size);
    return buf;
  } finally {
    await fh.close();
  }
}

async function writeArchive(dir: string, name: string, bytes: Buffer): Promise<string> {
  const file = path.join(dir, name);
  await writeFile(file, bytes);
  return file;
}

/** Every file entry of a synthetic tree read back from the cache equals what went in. */
async function assertEntryHolds(entry: CacheEntry, tree: readonly SynthEntry[]): Promise<void> {
  for (const e of tree) {
    const p = e.name.replace(/^\.\//, '').replace(/\/$/, '');
    if (p === '') continue;
    const node = entry.index.get(p);
    assert.ok(node, `${p} indexed`);
    if ((e.type ?? 'file') === 'file') {
      const want = Buffer.isBuffer(e.content) ? e.content : Buffer.from(e.content ?? '');
      assert.ok((await readNode(entry, p)).equals(want), `bytes of ${p}`);
      assert.equal(node.mode, e.mode ?? 0o644);
    } else if (e.type === 'symlink') assert.equal(node.target, e.linkname);
    else if (e.type === 'directory') assert.equal(node.kind, 'dir');
  }
}

for (const decoder of DECODERS) {
  test(`a synthetic archive ingests with the ${decoder} decoder`, async (t) => {
    const dir = await tempDir(t);
    const tree = goodTree();
    const tarBytes = await makeTar(tree);
    const archive = await writeArchive(dir, 'good.tar.xz', xz(tarBytes));
    const cacheDir = path.join(dir, 'cache');
    const r = await run({ cacheDir, archive, decoder });
    assert.equal(r.reused, false);
    assert.equal(r.decoder, decoder);
    const m = r.entry.manifest;
    assert.equal(m.release, SYNTH_RELEASE, 'release read from include/generated/utsrelease.h');
    assert.equal(m.digest, sha256(await readFile(archive)));
    assert.equal(m.id, `${SYNTH_RELEASE}~${m.digest}`);
    assert.equal(m.kind, 'headers');
    assert.equal(m.source, `file:${archive}`);
    assert.equal(m.files, 6);
    assert.equal(m.symlinks, 1);
    assert.equal(m.packBytes, tarBytes.length);
    assert.equal(m.archiveBytes, (await readFile(archive)).length);
    assert.equal(m.btf, null);
    assert.ok(!Number.isNaN(Date.parse(m.ingestedAt)));
    await assertEntryHolds(r.entry, tree);
    // The pack is the uncompressed tar, the archive is kept as it came.
    assert.ok((await readFile(path.join(r.entry.dir, PACK_FILE))).equals(tarBytes));
    assert.ok((await readFile(path.join(r.entry.dir, ARCHIVE_FILE))).equals(await readFile(archive)));
    assert.ok((await readNode(r.entry, 'include/dt-bindings/input/linux-event-codes.h')).equals(Buffer.from('#define KEY_A 30\n')), 'symlink followed');
    // What a fresh reader loads from disk is what ingest built.
    const store = await CacheStore.open(cacheDir);
    const loaded = await store.load(m.id);
    assert.ok(loaded.index.encode().equals(r.entry.index.encode()));
    assert.deepEqual(loaded.manifest, m);
    assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), []);
    assert.equal((await readdir(cacheDir)).includes('lock'), false, 'the lock is released');
    const st = await stat(r.entry.dir);
    assert.equal(st.mode & 0o777, 0o755, 'entry dirs are world-readable, like the headers');
  });
}

test('archives built by lzma-native\'s encoder ingest too', async (t) => {
  const dir = await tempDir(t);
  const tree = goodTree('6.99.3-lzma');
  const archive = await writeArchive(dir, 'a.tar.xz', await xzWithLzmaNative(await makeTar(tree)));
  const r = await run({ cacheDir: path.join(dir, 'cache'), archive });
  assert.equal(r.entry.manifest.release, '6.99.3-lzma');
  await assertEntryHolds(r.entry, tree);
});

test('every tar dialect the kernel scripts may produce: implicit parents, ustar prefix, pax and GNU long names', async (t) => {
  const dir = await tempDir(t);
  const deepName = 'include/' + 'very-long-directory-name/'.repeat(8) + 'x.h'; // > 155 + 100: pax or GNU only
  const prefixed = 'include/' + 'p'.repeat(90) + '/' + 'n'.repeat(60) + '.h'; // fits the ustar prefix split
  const tarBytes = Buffer.concat([
    // No directory entries at all: every parent is implicit.
    rawMember({ name: './include/generated/utsrelease.h' }, Buffer.from(utsrelease('6.99.4-dialects'))),
    rawMember({ name: 'n'.repeat(60) + '.h', prefix: './include/' + 'p'.repeat(90) }, Buffer.from('prefix')),
    rawMember({ name: 'PaxHeader', typeflag: 'x' }, paxBody([['path', './' + deepName]])),
    rawMember({ name: 'truncated-name' }, Buffer.from('pax')),
    gnuLongMember('L', './' + deepName.replace('x.h', 'gnu.h')),
    rawMember({ name: 'gnu-truncated', format: 'gnu' }, Buffer.from('gnu')),
    rawMember({ name: './include/a-dir', typeflag: '5', mode: 0o700 }),
    rawMember({ name: './include/a-dir/contig.h', typeflag: '7' }, Buffer.from('contiguous')),
    END_OF_ARCHIVE,
  ]);
  const archive = await writeArchive(dir, 'dialects.tar.xz', xz(tarBytes));
  const r = await run({ cacheDir: path.join(dir, 'cache'), archive });
  const e = r.entry;
  assert.equal(e.manifest.release, '6.99.4-dialects');
  assert.equal((await readNode(e, prefixed)).toString(), 'prefix');
  assert.equal((await readNode(e, deepName)).toString(), 'pax');
  assert.equal((await readNode(e, deepName.replace('x.h', 'gnu.h'))).toString(), 'gnu');
  assert.equal((await readNode(e, 'include/a-dir/contig.h')).toString(), 'contiguous');
  assert.equal(e.index.get('include/a-dir')?.mode, 0o700);
  assert.equal(e.index.get('include/generated')?.kind, 'dir');
  assert.equal(e.index.get('include/generated')?.mode, 0o755);
});

test('the release: from utsrelease.h, overridden by --release, refused when absent or unsafe', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const tree = goodTree('6.99.5-named');
  const archive = await writeArchive(dir, 'a.tar.xz', xz(await makeTar(tree)));

  const overridden = await run({ cacheDir, archive, release: '6.99.5-override' });
  assert.equal(overridden.entry.manifest.release, '6.99.5-override');

  // No utsrelease.h and no --release: the user is told to pass one.
  const anonymous = await writeArchive(dir, 'anon.tar.xz', xz(await makeTar(tree.filter((e) => !e.name.endsWith('utsrelease.h')))));
  await assert.rejects(run({ cacheDir, archive: anonymous }), (err: unknown) => {
    assert.ok(err instanceof KheadersError);
    assert.equal(err.code, 'E_USAGE');
    assert.match(err.message, /cannot tell which kernel release .* pass --release R/);
    return true;
  });
  const named = await run({ cacheDir, archive: anonymous, release: '6.99.5-given' });
  assert.equal(named.entry.manifest.release, '6.99.5-given');

  // A release that would make a path (entry ids are directory names) is refused, from either side.
  for (const bad of ['../../etc', 'a/b', '.hidden', 'x~y', '']) {
    await assert.rejects(run({ cacheDir, archive, release: bad }), (err: unknown) => err instanceof KheadersError && err.code === 'E_USAGE', `--release ${JSON.stringify(bad)}`);
  }
  const evil = await writeArchive(dir, 'evil.tar.xz', xz(await makeTar([{ name: './include/generated/utsrelease.h', content: utsrelease('../../../tmp/pwned') }])));
  await assert.rejects(run({ cacheDir, archive: evil }), (err: unknown) => {
    assert.ok(err instanceof KheadersError);
    assert.equal(err.code, 'E_ARCHIVE_CORRUPT');
    assert.match(err.message, /invalid release "\.\.\/\.\.\/\.\.\/tmp\/pwned"/);
    return true;
  });
  const store = await CacheStore.open(cacheDir);
  assert.deepEqual((await store.list()).map((m) => m.release).sort(), ['6.99.5-given', '6.99.5-override']);
  assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), []);
});

test('a file of 0 bytes, a file of exactly one block, and a large file are read back exactly', async (t) => {
  const dir = await tempDir(t);
  const big = textLike(3 * 1024 * 1024 + 17, 11);
  const tree: SynthEntry[] = [
    ...goodTree('6.99.6-sizes'),
    { name: './include/block.h', content: Buffer.alloc(512, 0x62) },
    { name: './include/big.h', content: big },
    { name: './include/one.h', content: 'x' },
  ];
  const archive = await writeArchive(dir, 'sizes.tar.xz', xz(await makeTar(tree), 1));
  for (const decoder of DECODERS) {
    const r = await run({ cacheDir: path.join(dir, `cache-${decoder}`), archive, decoder });
    await assertEntryHolds(r.entry, tree);
    assert.equal(r.entry.index.get('include/linux/empty.h')?.size, 0);
  }
});

// ---------------------------------------------------------------------------------------------
// The real archive

interface Extracted {
  dir: string;
  files: Map<string, { bytes: Buffer; mtime: number }>;
  dirs: Set<string>;
  symlinks: Map<string, string>;
}

let extracted: Promise<Extracted> | undefined;
let extractRoot: string | undefined;
after(async () => {
  if (extractRoot) await rm(extractRoot, { recursive: true, force: true });
});

/** The fixture as GNU tar extracts it: the reference every comparison is made against. */
function tarExtracted(): Promise<Extracted> {
  extracted ??= (async () => {
    extractRoot = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-tar-'));
    const dir = path.join(extractRoot, 'x');
    await import('node:fs/promises').then((fs) => fs.mkdir(dir));
    execFileSync('tar', ['-xJf', FIXTURE_ARCHIVE, '-C', dir]);
    const files = new Map<string, { bytes: Buffer; mtime: number }>();
    const dirs = new Set<string>();
    const symlinks = new Map<string, string>();
    for (const [p, s] of await snapshot(dir)) {
      if (s.kind === 'dir') dirs.add(p);
      else if (s.kind === 'symlink') symlinks.set(p, s.target!);
      else files.set(p, { bytes: await readFile(path.join(dir, p)), mtime: Math.floor((await stat(path.join(dir, p))).mtimeMs / 1000) });
    }
    return { dir, files, dirs, symlinks };
  })();
  return extracted;
}

async function assertMatchesTar(entry: CacheEntry): Promise<void> {
  const ref = await tarExtracted();
  assert.equal(ref.files.size, FIXTURE_FILES);
  const idx = entry.index;
  assert.equal(idx.fileCount, FIXTURE_FILES);
  assert.equal(idx.symlinkCount, FIXTURE_SYMLINKS);
  assert.equal(idx.dirCount, ref.dirs.size, 'directories, the root included');
  assert.equal(idx.dirCount, FIXTURE_DIRS);
  const indexFiles = idx.nodes.filter((n) => n.kind === 'file').map((n) => n.path).sort();
  assert.deepEqual(indexFiles, [...ref.files.keys()].sort(), 'the same file list');
  assert.deepEqual(idx.nodes.filter((n) => n.kind === 'dir').map((n) => n.path).sort(), [...ref.dirs].sort(), 'the same directories');
  assert.deepEqual(new Map(idx.nodes.filter((n) => n.kind === 'symlink').map((n) => [n.path, n.target!])), ref.symlinks, 'the same symlinks and targets');

  // Every file, byte for byte, read at its offset in the pack through one open handle.
  const fh = await open(path.join(entry.dir, PACK_FILE), 'r');
  try {
    let bytes = 0;
    for (const n of idx.nodes) {
      if (n.kind !== 'file') continue;
      const want = ref.files.get(n.path)!;
      const buf = Buffer.alloc(n.size);
      await fh.read(buf, 0, n.size, n.offset);
      assert.ok(buf.equals(want.bytes), `bytes of ${n.path}`);
      assert.equal(n.mtime, want.mtime, `mtime of ${n.path}`);
      bytes += n.size;
    }
    assert.equal(bytes, entry.manifest.bytes);
  } finally {
    await fh.close();
  }
}

for (const decoder of DECODERS) {
  test(`the real 6.1 archive (${decoder} decoder): all ${FIXTURE_FILES} files equal tar -xJf's`, async (t) => {
    const missing = fixtureMissing();
    if (missing) return t.skip(missing);
    const dir = await tempDir(t);
    const r = await run({ cacheDir: path.join(dir, 'cache'), archive: FIXTURE_ARCHIVE, decoder });
    const m = r.entry.manifest;
    assert.equal(m.release, FIXTURE_RELEASE);
    assert.equal(m.digest, FIXTURE_SHA256);
    assert.equal(m.files, FIXTURE_FILES);
    assert.equal(m.symlinks, FIXTURE_SYMLINKS);
    await assertMatchesTar(r.entry);
    // The pack is exactly what xz decodes.
    const decoded = execFileSync('xz', ['-dc', FIXTURE_ARCHIVE], { maxBuffer: 256 * 1024 ** 2 });
    assert.equal(m.packBytes, decoded.length);
    assert.equal(sha256(await readFile(path.join(r.entry.dir, PACK_FILE))), sha256(decoded));
  });
}

test('the real archive: its three symlinks and the headers BPF tools need', async (t) => {
  const missing = fixtureMissing();
  if (missing) return t.skip(missing);
  const dir = await tempDir(t);
  const r = await run({ cacheDir: path.join(dir, 'cache'), archive: FIXTURE_ARCHIVE });
  const ref = await tarExtracted();
  const links = r.entry.index.nodes.filter((n) => n.kind === 'symlink');
  assert.equal(links.length, 3);
  assert.equal(r.entry.index.get('include/dt-bindings/input/linux-event-codes.h')?.target, '../../uapi/linux/input-event-codes.h');
  for (const l of links) {
    assert.equal(l.target, ref.symlinks.get(l.path), l.path);
    const resolved = r.entry.index.resolve(l.path);
    assert.ok(resolved && resolved.kind === 'file', `${l.path} resolves to a file in the tree`);
    // Following it gives the bytes tar's symlink leads to.
    assert.ok((await readNode(r.entry, l.path)).equals(await readFile(path.join(ref.dir, l.path))), `${l.path} read through`);
  }
  for (const p of ['include/generated/autoconf.h', 'include/generated/utsrelease.h', 'include/generated/asm-offsets.h', 'arch/x86/include/generated/uapi/asm/unistd_64.h', 'include/linux/sched.h']) {
    assert.ok(r.entry.index.resolve(p)?.kind === 'file', p);
  }
  assert.match((await readNode(r.entry, 'include/generated/utsrelease.h')).toString(), /"6\.1\.192"/);
});

test('the real archive from its ELF object (kheaders.o): same digest, same entry', async (t) => {
  const missing = fixtureMissing(FIXTURE_OBJECT) ?? fixtureMissing();
  if (missing) return t.skip(missing);
  const dir = await tempDir(t);
  const r = await run({ cacheDir: path.join(dir, 'cache'), archive: FIXTURE_OBJECT });
  const m = r.entry.manifest;
  assert.equal(m.digest, FIXTURE_SHA256, 'the embedded stream is the .tar.xz, byte for byte');
  assert.equal(m.release, FIXTURE_RELEASE);
  assert.equal(m.source, `elf:${FIXTURE_OBJECT}`);
  assert.ok((await readFile(path.join(r.entry.dir, ARCHIVE_FILE))).equals(await readFile(FIXTURE_ARCHIVE)));
  await assertMatchesTar(r.entry);
  // The .tar.xz itself is then the same content: already cached.
  const again = await run({ cacheDir: path.join(dir, 'cache'), archive: FIXTURE_ARCHIVE });
  assert.equal(again.reused, true);
  assert.equal(again.entry.manifest.id, m.id);
});

test('re-ingesting the same archive is "reused" and touches nothing', async (t) => {
  const missing = fixtureMissing();
  if (missing) return t.skip(missing);
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const first = await run({ cacheDir, archive: FIXTURE_ARCHIVE });
  const before = await snapshot(first.entry.dir);
  const dirStat = await stat(first.entry.dir);
  await new Promise((r) => setTimeout(r, 20)); // so a rewrite would show in the mtimes
  for (const decoder of DECODERS) {
    const again = await run({ cacheDir, archive: FIXTURE_ARCHIVE, decoder });
    assert.equal(again.reused, true);
    assert.equal(again.decoder, null, 'nothing was decoded');
    assert.equal(again.entry.manifest.id, first.entry.manifest.id);
    assert.deepEqual(again.entry.manifest, first.entry.manifest);
  }
  // The CLI says so too.
  const cli = await runCli(['ingest', '--archive', FIXTURE_ARCHIVE, '--cache-dir', cacheDir, '--json', '--log-level', 'warn', '--btf', 'off']);
  assert.equal(cli.code, 0, cli.stderr);
  assert.equal((JSON.parse(cli.stdout) as { reused: boolean }).reused, true);
  const st = await stat(first.entry.dir);
  assert.equal(st.ino, dirStat.ino, 'the entry directory was not replaced');
  assert.equal(st.mtimeMs, dirStat.mtimeMs, 'nor modified');
  assert.deepEqual(await snapshot(first.entry.dir), before, 'every file keeps its inode, mtime and bytes');
  const store = await CacheStore.open(cacheDir);
  assert.equal((await store.list()).length, 1);
});

test('kheadersd ingest loads its logger only at a level that writes its lines: not at --log-level warn, at info', async (t) => {
  const dir = await tempDir(t);
  const archive = path.join(dir, 'a.tar.xz');
  await writeFile(archive, await goodArchive());
  // Says so on stderr when pino is required, as the CLI's logger loads it (createRequire).
  const hook = path.join(dir, 'pino-hook.cjs');
  await writeFile(hook, `const M = require('node:module'); const load = M._load; M._load = function (request, ...rest) { if (request === 'pino') process._rawDebug('pino required'); return load.call(this, request, ...rest); };`);
  const ingestAt = (level: string, cacheDir: string): ReturnType<typeof runCli> =>
    runCli(['ingest', '--archive', archive, '--cache-dir', path.join(dir, cacheDir), '--log-level', level, '--btf', 'off'], { env: { NODE_OPTIONS: `--require ${hook}` } });
  // warn: pino's ~25 ms of CPU (warmed while xz decodes) would be for nothing, and in one piece on
  // the thread that feeds xz its input.
  const warn = await ingestAt('warn', 'c1');
  assert.equal(warn.code, 0, warn.stderr);
  assert.match(warn.stderr, /^ingested: /m);
  assert.doesNotMatch(warn.stderr, /pino required/, 'an ingest that logs nothing loaded pino');
  const info = await ingestAt('info', 'c2');
  assert.equal(info.code, 0, info.stderr);
  assert.match(info.stderr, /pino required/, 'the hook sees pino loaded');
  assert.ok(info.stdout.split('\n').some((l) => l.startsWith('{') && (JSON.parse(l) as { msg?: string }).msg === 'ingested'), `no 'ingested' log line at info:\n${info.stdout}`);
});

test('no archive now (module gone), but this kernel\'s headers cached on an earlier boot: reused, not a vmlinux.h-only entry', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const live = await writeArchive(dir, 'live.tar.xz', xz(await makeTar(goodTree(os.release(), 'live'))));
  const btf = path.join(dir, 'btf');
  const b = new BtfBuilder();
  b.int('int', 4, { signed: true });
  await writeFile(btf, b.build());
  const common = { cacheDir, modprobe: false, liveBtf: btf, btf: 'auto' } as const;
  // An earlier boot: the running kernel's archive was there (the live path), and was cached.
  const first = await ingest({ ...common, livePaths: [live], log: silent });
  assert.equal(first.entry.manifest.kind, 'headers');
  assert.equal(first.entry.manifest.release, os.release());
  await writeFile(path.join(cacheDir, 'current'), `${first.entry.manifest.id}\nboot=an-earlier-boot\n`);

  // This boot: no archive at all (modprobe off, the live path absent).
  const logged: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      logged.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
      done();
    },
  });
  const log = createLogger('warn', sink);
  const again = await ingest({ ...common, livePaths: [path.join(dir, 'absent.tar.xz')], log });
  assert.equal(again.reused, true);
  assert.equal(again.decoder, null);
  assert.equal(again.entry.manifest.id, first.entry.manifest.id, 'the cached headers, not a vmlinux.h-only entry');
  const store = await CacheStore.open(cacheDir);
  assert.equal(await store.currentId(), first.entry.manifest.id);
  assert.deepEqual((await store.list()).map((m) => m.kind), ['headers']);
  assert.ok(logged.some((l) => /no header archive for the running kernel now/.test(String(l['msg']))), JSON.stringify(logged));

  // Another kernel's entry is never taken for this one's: with only it cached, the BTF-only entry is made.
  const other = path.join(dir, 'other-cache');
  await ingest({ cacheDir: other, archive: await writeArchive(dir, 'other.tar.xz', xz(await makeTar(goodTree('6.99.9-other')))), btf: 'off', log: silent });
  const btfOnly = await ingest({ cacheDir: other, modprobe: false, livePaths: [path.join(dir, 'absent.tar.xz')], liveBtf: btf, btf: 'auto', log: silent });
  assert.equal(btfOnly.entry.manifest.kind, 'btf-only');
  assert.equal(btfOnly.reused, false);
});

test('kheadersd export writes the same tree tar -xJf does', async (t) => {
  const missing = fixtureMissing();
  if (missing) return t.skip(missing);
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const ing = await runCli(['ingest', '--archive', FIXTURE_ARCHIVE, '--cache-dir', cacheDir, '--log-level', 'warn', '--btf', 'off']);
  assert.equal(ing.code, 0, ing.stderr);
  const out = path.join(dir, 'exported');
  const exp = await runCli(['export', FIXTURE_RELEASE, out, '--cache-dir', cacheDir, '--log-level', 'warn']);
  assert.equal(exp.code, 0, exp.stderr);
  assert.match(exp.stderr, new RegExp(`exported ${FIXTURE_RELEASE.replace(/\./g, '\\.')}: ${FIXTURE_FILES} files, ${FIXTURE_DIRS} directories, ${FIXTURE_SYMLINKS} symlinks`));
  assert.match(exp.stderr, /BCC_KERNEL_SOURCE=/);
  const ref = await tarExtracted();
  const [mine, theirs] = await Promise.all([treeContent(out), treeContent(ref.dir)]);
  assert.equal(mine.size, theirs.size, 'same number of paths');
  assert.deepEqual(mine, theirs, 'same paths, bytes and symlink targets');
  // File mtimes are the archive's, as tar sets them.
  const probe = 'include/linux/sched.h';
  assert.equal(Math.floor((await stat(path.join(out, probe))).mtimeMs / 1000), Math.floor((await stat(path.join(ref.dir, probe))).mtimeMs / 1000));
  // A second export to the same (non-empty) place is refused rather than mixed in.
  const again = await runCli(['export', FIXTURE_RELEASE, out, '--cache-dir', cacheDir]);
  assert.equal(again.code, 2);
  assert.match(again.stderr, /already exists and is not empty/);
});
