/**
 * The cache directory: who may own it, entries keyed by release and digest, eviction (--keep,
 * --max-cache-bytes, gc, never the current entry), a full filesystem, and two processes
 * ingesting into one cache at once.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { chmod, chown, copyFile, mkdir, readdir, readFile, rm, stat, symlink, utimes, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import path from 'node:path';
import { KheadersError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { CacheStore } from '../src/store/cache.js';
import { dataLocation, type Manifest } from '../src/store/entry.js';
import { ingest, type IngestOptions } from '../src/store/ingest.js';
import { withLock } from '../src/store/lock.js';
import { MODULE_HEADERS_SUBDIR, ModuleHeaders } from '../src/store/module-btf.js';
import { rememberArchive } from '../src/store/source-memo.js';
import { CLI, REPO_ROOT, cleanEnv, goodTree, hasStackTrace, makeTar, randomBytes, runCli, runProcess, sha256, snapshot, tempDir, textLike, xz, xzAsync } from './helpers/archives.js';
import { mountTmpfs } from './helpers/tmpfs.js';

const silent = createLogger('silent');
const isRoot = process.getuid?.() === 0;

function run(opts: IngestOptions): ReturnType<typeof ingest> {
  return ingest({ btf: 'off', log: silent, ...opts });
}

/** Distinct small archives: release R, content varied by salt. */
async function archiveFile(dir: string, release: string, salt = ''): Promise<string> {
  const file = path.join(dir, `${release}${salt ? '-' + salt.replace(/\W/g, '') : ''}.tar.xz`);
  await writeFile(file, xz(await makeTar(goodTree(release, salt))));
  return file;
}

const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 15)); // distinct ingestedAt

async function readVia(store: CacheStore, ref: string, p: string): Promise<string> {
  const entry = await store.resolve(ref);
  const node = entry.index.resolve(p)!;
  const { file, offset } = dataLocation(entry, node);
  return (await readFile(file)).subarray(offset, offset + node.size).toString();
}

function expectCode(code: string, ...patterns: RegExp[]): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(err instanceof KheadersError, String(err));
    assert.equal(err.code, code, err.message);
    for (const p of patterns) assert.match(err.message, p);
    return true;
  };
}

// ---------------------------------------------------------------------------------------------
// Who may own the cache

test('a fresh cache dir is created 0755 and owned by the user, whatever the umask', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'deep', 'er', 'cache');
  const old = process.umask(0o077);
  try {
    await run({ cacheDir, archive: await archiveFile(dir, '6.99.0-fresh') });
  } finally {
    process.umask(old);
  }
  for (const d of [cacheDir, path.join(cacheDir, 'entries'), path.join(cacheDir, 'tmp')]) {
    const st = await stat(d);
    assert.equal(st.mode & 0o7777, 0o755, `${d} mode`);
    assert.equal(st.uid, process.getuid!(), `${d} owner`);
  }
  const [entry] = await readdir(path.join(cacheDir, 'entries'));
  assert.equal((await stat(path.join(cacheDir, 'entries', entry!))).mode & 0o777, 0o755);
  for (const f of await readdir(path.join(cacheDir, 'entries', entry!))) {
    assert.equal((await stat(path.join(cacheDir, 'entries', entry!, f))).mode & 0o777, 0o644, f);
  }
});

/** Run the shipped CLI as `nobody` (uid and gid 65534), as a user who is not root would. */
function runCliAsNobody(args: readonly string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { uid: 65534, gid: 65534, env: cleanEnv(), timeout: 60_000 }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number | string }) | null;
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, stdout, stderr });
    });
  });
}

test('a store written under umask 077 is readable by users who are not root: `current`, sources.json, module-btf/ and reason.json are not the umask\'s choice; ls and cat work as nobody', { skip: !isRoot && 'needs root (to run the CLI as uid 65534)' }, async (t) => {
  const dir = await tempDir(t);
  await chmod(dir, 0o755); // mkdtemp made it 0700: nobody must reach the cache
  const cacheDir = path.join(dir, 'new', 'cache');
  const release = '6.99.0-umask';
  const archive = await archiveFile(dir, release);
  const other = await archiveFile(dir, '6.99.1-umask');
  const old = process.umask(0o077);
  try {
    await run({ cacheDir, archive, release, setCurrent: true });
    const second = await run({ cacheDir, archive: other, setCurrent: false });
    const store = await CacheStore.open(cacheDir, { write: true });
    await store.locked(() => store.quarantine(second.entry.manifest.id, { reason: 'a test put it here' }));
    await rememberArchive(cacheDir, 'a-key', { digest: '0'.repeat(64), total: null, source: `file:${archive}`, obtained: 'file', live: false, buildId: null });
    await ModuleHeaders.open({ dir: path.join(cacheDir, MODULE_HEADERS_SUBDIR) });
  } finally {
    process.umask(old);
  }
  const modes: Array<[string, number]> = [
    [path.join(dir, 'new'), 0o755],
    [path.join(cacheDir, 'current'), 0o644],
    [path.join(cacheDir, 'sources.json'), 0o644],
    [path.join(cacheDir, MODULE_HEADERS_SUBDIR), 0o755],
    [path.join(cacheDir, 'quarantine'), 0o755],
  ];
  const [quarantined] = await readdir(path.join(cacheDir, 'quarantine'));
  modes.push([path.join(cacheDir, 'quarantine', quarantined!, 'reason.json'), 0o644]);
  for (const [p, mode] of modes) assert.equal((await stat(p)).mode & 0o777, mode, `${p}: mode ${((await stat(p)).mode & 0o777).toString(8)}`);

  const ls = await runCliAsNobody(['ls', '--cache-dir', cacheDir]);
  assert.equal(ls.code, 0, ls.stderr);
  assert.match(ls.stdout, new RegExp(`^${release.replace(/\./g, '\\.')} .* yes `, 'm'), 'the entry, current');
  assert.match(ls.stdout, /a test put it here/, 'the quarantined entry, with its reason');
  const cat = await runCliAsNobody(['cat', 'current', 'include/generated/utsrelease.h', '--cache-dir', cacheDir]);
  assert.equal(cat.code, 0, cat.stderr);
  assert.match(cat.stdout, new RegExp(release.replace(/\./g, '\\.')));
});

test('a cache this user may not read is a clear error naming the file (exit 5), not an internal error', { skip: !isRoot && 'needs root (to run the CLI as uid 65534)' }, async (t) => {
  const dir = await tempDir(t);
  await chmod(dir, 0o755);
  const cacheDir = path.join(dir, 'cache');
  const release = '6.99.0-closed';
  const r = await run({ cacheDir, archive: await archiveFile(dir, release), release, setCurrent: true });
  // As an older kheadersd left it under umask 077, or as chmodded by hand.
  for (const file of [path.join(cacheDir, 'current'), path.join(cacheDir, 'entries', r.entry.manifest.id, 'manifest.json')]) {
    await chmod(file, 0o600);
    for (const args of [['ls'], ['cat', release, 'include/generated/utsrelease.h']]) {
      const res = await runCliAsNobody([...args, '--cache-dir', cacheDir]);
      assert.equal(res.code, 5, `${args[0]}, ${path.basename(file)} closed: ${res.stderr}`);
      assert.ok(res.stderr.includes(`kheadersd: cannot read ${file} (EACCES): the cache is not readable by this user (uid 65534)`), `${args[0]} names ${file}: ${res.stderr}`);
      assert.doesNotMatch(res.stderr, /internal error|this is a bug/);
      assert.ok(!hasStackTrace(res.stderr), res.stderr);
    }
    await chmod(file, 0o644);
  }
});

test('a cache dir writable by others is refused, with the fix in the message', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const archive = await archiveFile(dir, '6.99.0-perm');
  await run({ cacheDir, archive });
  const before = await snapshot(path.join(cacheDir, 'entries'));
  const other = await archiveFile(dir, '6.99.1-perm');
  for (const [mode, who] of [
    [0o777, /writable by everyone/],
    [0o1777, /writable by everyone/], // sticky, like /tmp: still anyone can plant an entry
    [0o775, /writable by its group/],
  ] as const) {
    await chmod(cacheDir, mode);
    await assert.rejects(run({ cacheDir, archive: other }), expectCode('E_CACHE_UNSAFE', who, new RegExp(`fix with: chmod 755 ${cacheDir}`)));
    await assert.rejects(CacheStore.open(cacheDir), expectCode('E_CACHE_UNSAFE', who), 'readers refuse it too');
    const ls = await runCli(['ls', '--cache-dir', cacheDir]);
    assert.equal(ls.code, 5, ls.stderr);
    assert.match(ls.stderr, /refusing the cache directory .* chmod 755/);
    assert.equal(hasStackTrace(ls.stderr), false);
  }
  await chmod(cacheDir, 0o755);
  assert.deepEqual(await snapshot(path.join(cacheDir, 'entries')), before, 'nothing was written meanwhile');

  // A subdirectory opened up is refused as well (a writer checks entries/ and tmp/).
  await chmod(path.join(cacheDir, 'entries'), 0o777);
  await assert.rejects(run({ cacheDir, archive: other }), expectCode('E_CACHE_UNSAFE', /entries/));
  await chmod(path.join(cacheDir, 'entries'), 0o755);
  await run({ cacheDir, archive: other, keep: 10 });
});

test('a cache dir owned by another user is refused, with the fix in the message', async (t) => {
  if (!isRoot) return t.skip('needs root to chown the cache to another uid');
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  await run({ cacheDir, archive: await archiveFile(dir, '6.99.0-owner') });
  await chown(cacheDir, 65534, 65534);
  await assert.rejects(run({ cacheDir, archive: await archiveFile(dir, '6.99.1-owner') }), expectCode('E_CACHE_UNSAFE', /owned by uid 65534/));
  const ls = await runCli(['ls', '--cache-dir', cacheDir]);
  assert.equal(ls.code, 5);
  assert.match(ls.stderr, /owned by uid 65534/);
  // Saying what is wrong is half of it: the message must say how to fix it.
  assert.match(ls.stderr, /chown|--cache-dir/, `the message says how to fix it: ${ls.stderr}`);
});

test('a cache path that is a file is refused', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'not-a-dir');
  await writeFile(cacheDir, 'x');
  await assert.rejects(run({ cacheDir, archive: await archiveFile(dir, '6.99.0-file') }), expectCode('E_CACHE_UNSAFE', /not a directory/));
});

// ---------------------------------------------------------------------------------------------
// Keys

test('entries are keyed by release AND digest: one release, two builds → two entries', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const a = await run({ cacheDir, archive: await archiveFile(dir, '6.99.0-same', 'build A') });
  await tick();
  const b = await run({ cacheDir, archive: await archiveFile(dir, '6.99.0-same', 'build B') });
  assert.equal(b.reused, false);
  assert.notEqual(a.entry.manifest.digest, b.entry.manifest.digest);
  assert.notEqual(a.entry.manifest.id, b.entry.manifest.id);
  const store = await CacheStore.open(cacheDir);
  assert.deepEqual((await store.list()).map((m) => m.release), ['6.99.0-same', '6.99.0-same']);
  // The release alone names the newest build; a digest (or a prefix of it) names either one.
  assert.match(await readVia(store, '6.99.0-same', 'include/linux/types.h'), /build B/);
  assert.match(await readVia(store, a.entry.manifest.digest.slice(0, 12), 'include/linux/types.h'), /build A/);
  assert.match(await readVia(store, b.entry.manifest.digest, 'include/linux/types.h'), /build B/);
  assert.match(await readVia(store, a.entry.manifest.id, 'include/linux/types.h'), /build A/);
});

test('one archive under two --release names: two entries with one digest; re-ingests are reused', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const archive = await archiveFile(dir, '6.99.0-named');
  const x = await run({ cacheDir, archive, release: '6.99.0-x' });
  await tick();
  const y = await run({ cacheDir, archive, release: '6.99.0-y' });
  assert.equal(y.reused, false, 'a different release name is a different entry');
  assert.equal(x.entry.manifest.digest, y.entry.manifest.digest);
  assert.equal(x.entry.manifest.release, '6.99.0-x', '--release overrides what utsrelease.h says');

  const again = await run({ cacheDir, archive, release: '6.99.0-x' });
  assert.equal(again.reused, true);
  assert.equal(again.entry.manifest.id, x.entry.manifest.id);

  // Without --release, the digest alone finds a cached copy: nothing is decoded.
  const bare = await run({ cacheDir, archive });
  assert.equal(bare.reused, true);
  assert.equal(bare.decoder, null);
  assert.ok([x.entry.manifest.id, y.entry.manifest.id].includes(bare.entry.manifest.id));

  const store = await CacheStore.open(cacheDir);
  assert.equal((await store.list()).length, 2);
  // The shared digest is not "ambiguous": both entries hold the same bytes.
  assert.match(await readVia(store, x.entry.manifest.digest.slice(0, 10), 'include/linux/types.h'), /u32/);
});

// ---------------------------------------------------------------------------------------------
// Eviction

async function ingestSeries(dir: string, cacheDir: string, releases: string[], opts: Partial<IngestOptions> = {}): Promise<Manifest[]> {
  const out: Manifest[] = [];
  for (const r of releases) {
    out.push((await run({ cacheDir, archive: await archiveFile(dir, r), keep: 100, ...opts })).entry.manifest);
    await tick();
  }
  return out;
}

const entrySize = (m: Manifest): number => m.packBytes + m.archiveBytes + (m.btf?.bytes ?? 0);

test('--keep N keeps the N newest entries', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const [a, b] = await ingestSeries(dir, cacheDir, ['6.99.1-k', '6.99.2-k']);
  const c = await run({ cacheDir, archive: await archiveFile(dir, '6.99.3-k'), keep: 2 });
  assert.deepEqual(c.evicted, [a!.id]);
  await tick();
  const d = await run({ cacheDir, archive: await archiveFile(dir, '6.99.4-k'), keep: 2 });
  assert.deepEqual(d.evicted, [b!.id]);
  const store = await CacheStore.open(cacheDir);
  assert.deepEqual((await store.list()).map((m) => m.release), ['6.99.4-k', '6.99.3-k']);
  assert.deepEqual((await readdir(path.join(cacheDir, 'entries'))).sort(), [c.entry.manifest.id, d.entry.manifest.id].sort());
  assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), [], 'evicted entries are deleted, not parked in tmp');
});

test('the current entry is never evicted, by --keep or by --max-cache-bytes', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const current = (await run({ cacheDir, archive: await archiveFile(dir, '6.99.0-cur'), setCurrent: true })).entry.manifest;
  await tick();
  await ingestSeries(dir, cacheDir, ['6.99.1-c', '6.99.2-c', '6.99.3-c']);
  const store = await CacheStore.open(cacheDir, { write: true });
  assert.equal(await store.currentId(), current.id);
  const evicted = await store.locked(() => store.gc({ keep: 1, maxBytes: 1 }));
  assert.equal(evicted.includes(current.id), false);
  assert.deepEqual((await store.list()).map((m) => m.id), [current.id]);
  assert.match(await readVia(store, 'current', 'include/linux/types.h'), /u32/);
});

test('--keep counts the current entry: keep 1 leaves the current entry alone', async (t) => {
  // "keep at most N cache entries (default 3; the running kernel's is never evicted)": with
  // --keep 1 and the current entry older than others, only the current one may remain.
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const current = (await run({ cacheDir, archive: await archiveFile(dir, '6.99.0-cur1'), setCurrent: true })).entry.manifest;
  await tick();
  await ingestSeries(dir, cacheDir, ['6.99.1-n', '6.99.2-n']);
  const store = await CacheStore.open(cacheDir, { write: true });
  await store.locked(() => store.gc({ keep: 1 }));
  assert.deepEqual((await store.list()).map((m) => m.id), [current.id], 'at most --keep entries remain');
});

test('--max-cache-bytes evicts the oldest beyond the budget', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const ms = await ingestSeries(dir, cacheDir, ['6.99.1-b', '6.99.2-b', '6.99.3-b', '6.99.4-b']);
  const budget = entrySize(ms[3]!) + entrySize(ms[2]!) + Math.floor(entrySize(ms[1]!) / 2);
  const store = await CacheStore.open(cacheDir, { write: true });
  const evicted = await store.locked(() => store.gc({ keep: 100, maxBytes: budget }));
  assert.deepEqual(evicted.sort(), [ms[0]!.id, ms[1]!.id].sort());
  assert.deepEqual((await store.list()).map((m) => m.release), ['6.99.4-b', '6.99.3-b']);
  assert.ok((await store.totalBytes()) <= budget);
});

// ---------------------------------------------------------------------------------------------
// `current` across reboots

test('a FIFO in the place of `current` or sources.json is no pointer and no memory, at once: the small files are read synchronously, and must not hang the daemon', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const a = (await run({ cacheDir, archive: await archiveFile(dir, '6.99.0-fifo'), setCurrent: true })).entry.manifest;
  for (const name of ['current', 'sources.json']) {
    await rm(path.join(cacheDir, name), { force: true });
    assert.equal(spawnSync('mkfifo', [path.join(cacheDir, name)]).status, 0);
  }
  // In a child: a read that blocked would hang this test's own process.
  const program = `
    const { CacheStore } = await import(${JSON.stringify(path.join(REPO_ROOT, 'dist/src/store/cache.js'))});
    const { recallArchive } = await import(${JSON.stringify(path.join(REPO_ROOT, 'dist/src/store/source-memo.js'))});
    const store = await CacheStore.open(process.argv[1]);
    process.stdout.write(JSON.stringify({ current: await store.currentId(), recalled: (await recallArchive(process.argv[1], 'any')) ?? null, listed: (await store.list()).map((m) => m.id) }));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', program, cacheDir], { encoding: 'utf8', timeout: 10_000 });
  assert.equal(r.status, 0, r.stderr || 'it hung');
  assert.deepEqual(JSON.parse(r.stdout), { current: null, recalled: null, listed: [a.id] });
});

test('a symbolic link, a socket or an oversized file in the place of `current` or sources.json is no pointer and no memory, never followed nor an error', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const archive = await archiveFile(dir, '6.99.0-odd');
  const a = (await run({ cacheDir, archive, setCurrent: true })).entry.manifest;
  const store = await CacheStore.open(cacheDir);
  const { recallArchive, rememberArchive } = await import('../src/store/source-memo.js');
  const recordedKey = `file:${archive}`;
  await rememberArchive(cacheDir, recordedKey, { digest: a.digest, total: null, source: `file:${archive}`, obtained: 'file', live: false, buildId: null });
  const memo = path.join(cacheDir, 'sources.json');
  assert.equal(await store.currentId(), a.id);
  assert.equal((await recallArchive(cacheDir, recordedKey))?.digest, a.digest);
  // Whole and valid copies elsewhere: a link to either was followed, and the read of a link may
  // go anywhere, the daemon's own mount included (daemon.test), from the thread that answers it.
  const [pointerCopy, memoCopy] = [path.join(dir, 'current.copy'), path.join(dir, 'sources.copy')];
  await copyFile(path.join(cacheDir, 'current'), pointerCopy);
  await copyFile(memo, memoCopy);
  const replace = async (name: string, make: (file: string) => Promise<void>): Promise<void> => {
    await rm(path.join(cacheDir, name), { force: true });
    await make(path.join(cacheDir, name));
  };
  const socketAt = async (file: string): Promise<void> => {
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(file, resolve));
    t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  };
  const oversized = async (file: string, content: string): Promise<void> => writeFile(file, content + '\n'.repeat(2 << 20));
  for (const [what, pointer, memoFile] of [
    ['a symbolic link', (f: string) => symlink(pointerCopy, f), (f: string) => symlink(memoCopy, f)],
    ['a socket', socketAt, socketAt],
    ['an oversized file', async (f: string) => oversized(f, await readFile(pointerCopy, 'utf8')), async (f: string) => oversized(f, await readFile(memoCopy, 'utf8'))],
  ] as const) {
    await replace('current', pointer);
    await replace('sources.json', memoFile);
    assert.equal(await store.currentId(), null, `current as ${what}`);
    assert.equal(await recallArchive(cacheDir, recordedKey), undefined, `sources.json as ${what}`);
  }
});

test('`current` belongs to the boot that chose it: after a reboot it names nothing until this boot chooses', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const a = (await run({ cacheDir, archive: await archiveFile(dir, '6.99.0-boot'), setCurrent: true })).entry.manifest;
  const thisBoot = await CacheStore.open(cacheDir);
  assert.equal(await thisBoot.currentId(), a.id);
  assert.match(await readFile(path.join(cacheDir, 'current'), 'utf8'), /^6\.99\.0-boot~[0-9a-f]{64}\nboot=\S+\n$/);

  // The next boot (another kernel, or another build of this release) finds the last one's pointer.
  const nextBoot = await CacheStore.open(cacheDir, { write: true, bootId: 'the-next-boot' });
  assert.equal(await nextBoot.currentId(), null, "the last boot's choice is not this boot's");
  await assert.rejects(nextBoot.resolve('current'), expectCode('E_NOT_FOUND'), 'an entry of another release is never `current`');
  assert.deepEqual((await nextBoot.gc({ keep: 0 })).length, 1, 'and it is no longer protected from eviction');

  const b = (await run({ cacheDir, archive: await archiveFile(dir, '6.99.1-boot') })).entry.manifest;
  await nextBoot.setCurrent(b.id);
  assert.equal(await nextBoot.currentId(), b.id);
  assert.equal(await thisBoot.currentId(), null, 'seen from another boot, that pointer is stale in turn');
});

test('a reboot into the same kernel: ingest reuses the entry, points `current` at it for this boot, and `ls` says reused', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const archive = await archiveFile(dir, '6.99.2-same');
  const first = (await run({ cacheDir, archive, setCurrent: true })).entry.manifest;
  const ls = async (): Promise<{ text: string; json: Array<{ current: boolean; reused?: boolean }> }> => {
    const text = await runCli(['ls', '--cache-dir', cacheDir]);
    const json = await runCli(['ls', '--json', '--cache-dir', cacheDir]);
    assert.equal(text.code, 0, text.stderr);
    return { text: text.stdout, json: JSON.parse(json.stdout) as Array<{ current: boolean; reused?: boolean }> };
  };
  const decoded = await ls();
  assert.match(decoded.text, / yes +(?:yes|no|\?) +\S+ +file:/, 'decoded in this boot: current, not reused');
  assert.equal(decoded.json[0]!.reused, false);

  await writeFile(path.join(cacheDir, 'current'), `${first.id}\nboot=an-earlier-boot\n`);
  const store = await CacheStore.open(cacheDir);
  assert.equal(await store.currentId(), null);
  assert.equal((await ls()).json[0]!.current, false, 'before this boot chose, nothing is current');
  const again = await run({ cacheDir, archive, setCurrent: true });
  assert.equal(again.reused, true);
  assert.equal(await store.currentId(), first.id, 'the pointer now names this boot');
  const reused = await ls();
  assert.match(reused.text, / yes \(reused\) +(?:yes|no|\?) +\S+ +file:/);
  assert.deepEqual([reused.json[0]!.current, reused.json[0]!.reused], [true, true]);
});

test('an ingest never evicts the entry it has just made', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  await ingestSeries(dir, cacheDir, ['6.99.1-s']);
  const r = await run({ cacheDir, archive: await archiveFile(dir, '6.99.2-s'), maxCacheBytes: 1000 });
  assert.equal(r.evicted.includes(r.entry.manifest.id), false, `evicted ${r.evicted.join(', ')}`);
  assert.ok((await stat(r.entry.dir)).isDirectory(), 'the entry ingest returned still exists');
});

test('kheadersd gc: --keep, --max-cache-bytes, --json, and sweeping tmp', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const ms = await ingestSeries(dir, cacheDir, ['6.99.1-g', '6.99.2-g', '6.99.3-g']);
  await mkdir(path.join(cacheDir, 'tmp', 'ingest-99999-leftover'));
  await writeFile(path.join(cacheDir, 'tmp', 'ingest-99999-leftover', 'pack.tar'), 'half');

  const r1 = await runCli(['gc', '--keep', '2', '--json', '--cache-dir', cacheDir]);
  assert.equal(r1.code, 0, r1.stderr);
  assert.deepEqual(JSON.parse(r1.stdout), { evicted: [ms[0]!.id], swept: ['ingest-99999-leftover'] });
  assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), []);

  const r2 = await runCli(['gc', '--keep', '5', '--max-cache-bytes', String(entrySize(ms[2]!)), '--cache-dir', cacheDir]);
  assert.equal(r2.code, 0, r2.stderr);
  assert.match(r2.stderr, new RegExp(`evicted 1: ${ms[1]!.id}`));

  const r3 = await runCli(['gc', '--cache-dir', cacheDir]);
  assert.equal(r3.code, 0);
  assert.match(r3.stderr, /nothing to evict/);
  const ls = JSON.parse((await runCli(['ls', '--json', '--cache-dir', cacheDir])).stdout) as Array<{ release: string }>;
  assert.deepEqual(ls.map((e) => e.release), ['6.99.3-g']);

  const bad = await runCli(['gc', '--keep', '0', '--cache-dir', cacheDir]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /keep must be at least 1/);
});

// ---------------------------------------------------------------------------------------------
// A full filesystem

for (const decoder of ['xz', 'lzma-native'] as const) {
  test(`a full cache filesystem gives E_NO_SPACE and changes nothing (${decoder} decoder)`, { timeout: 180_000 }, async (t) => {
    const dir = await tempDir(t);
    const mounted = await mountTmpfs(t, '8m');
    if ('skip' in mounted) return t.skip(mounted.skip);
    const cacheDir = path.join(mounted.dir, 'cache');

    const small = await run({ cacheDir, archive: await archiveFile(dir, '6.99.0-small'), decoder });
    const before = await snapshot(path.join(cacheDir, 'entries'));

    // The pack cannot fit: 12 MiB of text that xz squeezes into ~3.5 MiB.
    const packTooBig = path.join(dir, 'pack-too-big.tar.xz');
    await writeFile(packTooBig, await xzAsync(await makeTar([...goodTree('6.99.1-full'), { name: './include/big.h', content: textLike(12 * 2 ** 20, 3) }]), 1));
    // Not even the archive fits: 10 MiB of random bytes, which xz cannot shrink.
    const archiveTooBig = path.join(dir, 'archive-too-big.tar.xz');
    await writeFile(archiveTooBig, await xzAsync(await makeTar([...goodTree('6.99.2-full'), { name: './include/big.h', content: randomBytes(10 * 2 ** 20, 3) }]), 0));

    for (const archive of [packTooBig, archiveTooBig]) {
      const label = `${decoder} ${path.basename(archive)}`;
      // As a process with a deadline: a crash or a hang is a failure, not a stuck test run.
      const r = await runCli(['ingest', '--archive', archive, '--cache-dir', cacheDir, '--decoder', decoder, '--btf', 'off', '--log-level', 'warn'], { timeoutMs: 30_000 });
      assert.equal(r.signal, null, `${label}: hung and was killed`);
      assert.equal(r.code, 5, `${label}: exit 5; stderr: ${r.stderr}`);
      assert.match(r.stderr, /the cache filesystem is full \(ENOSPC\)/, label);
      assert.equal(hasStackTrace(r.stderr), false, `${label}: no stack trace`);
      assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), [], `${label}: tmp is empty`);
      assert.equal((await readdir(cacheDir)).includes('lock'), false, `${label}: lock released`);
      assert.deepEqual(await snapshot(path.join(cacheDir, 'entries')), before, `${label}: the earlier entry is intact`);
    }
    // The space was given back: a small ingest still works.
    const store = await CacheStore.open(cacheDir);
    assert.deepEqual((await store.list()).map((m) => m.id), [small.entry.manifest.id]);
    const after = await run({ cacheDir, archive: await archiveFile(dir, '6.99.3-small'), decoder, keep: 10 });
    assert.equal(after.reused, false);
  });
}

// ---------------------------------------------------------------------------------------------
// Two writers

async function bigArchive(dir: string, release: string, megabytes: number, seed: number): Promise<string> {
  const tree = goodTree(release);
  for (let i = 0; i < megabytes; i++) tree.push({ name: `./include/big/p${i}.h`, content: textLike(2 ** 20, seed * 1000 + i) });
  const file = path.join(dir, `${release}.tar.xz`);
  await writeFile(file, await xzAsync(await makeTar(tree), 0));
  return file;
}

test('two concurrent ingests into one cache both succeed, one after the other', { timeout: 180_000 }, async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const a = await bigArchive(dir, '6.99.1-par', 16, 1);
  const b = await bigArchive(dir, '6.99.2-par', 16, 2);
  const args = (archive: string): string[] => ['ingest', '--archive', archive, '--cache-dir', cacheDir, '--json', '--btf', 'off', '--log-level', 'warn', '--keep', '10'];
  const [ra, rb] = await Promise.all([runCli(args(a)), runCli(args(b))]);
  assert.equal(ra.code, 0, ra.stderr);
  assert.equal(rb.code, 0, rb.stderr);
  assert.equal((JSON.parse(ra.stdout) as { reused: boolean }).reused, false);
  assert.equal((JSON.parse(rb.stdout) as { reused: boolean }).reused, false);
  const ls = JSON.parse((await runCli(['ls', '--json', '--cache-dir', cacheDir])).stdout) as Array<{ release: string; digest: string; files: number }>;
  assert.deepEqual(ls.map((e) => e.release).sort(), ['6.99.1-par', '6.99.2-par']);
  assert.equal(ls.find((e) => e.release === '6.99.1-par')!.digest, sha256(await readFile(a)));
  assert.equal(ls.find((e) => e.release === '6.99.2-par')!.digest, sha256(await readFile(b)));
  const store = await CacheStore.open(cacheDir);
  for (const e of ls) {
    const entry = await store.load(`${e.release}~${e.digest}`);
    assert.equal(entry.index.fileCount, e.files);
    assert.equal(await readVia(store, e.release, 'include/generated/utsrelease.h'), `#define UTS_RELEASE "${e.release}"\n`);
  }
  assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), []);
  assert.equal((await readdir(cacheDir)).includes('lock'), false);
});

test('with --lock-timeout 0 the second writer gets E_LOCKED (exit 5) and the cache stays consistent', { timeout: 180_000 }, async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const slow = await bigArchive(dir, '6.99.1-slow', 48, 3);
  const quick = await archiveFile(dir, '6.99.2-quick');

  // The first writer: slow enough (lzma-native, 48 MiB) to still hold the lock when the second comes.
  const first = spawn(process.execPath, [CLI, 'ingest', '--archive', slow, '--cache-dir', cacheDir, '--decoder', 'lzma-native', '--json', '--btf', 'off', '--log-level', 'warn'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: cleanEnv(),
  });
  t.after(() => {
    if (first.exitCode === null && first.signalCode === null) first.kill('SIGKILL');
  });
  let firstOut = '';
  let firstErr = '';
  first.stdout.setEncoding('utf8').on('data', (s: string) => (firstOut += s));
  first.stderr.setEncoding('utf8').on('data', (s: string) => (firstErr += s));
  const firstDone = new Promise<number | null>((resolve) => first.on('close', (code) => resolve(code)));

  // It holds the lock once its build directory exists.
  const deadline = Date.now() + 60_000;
  while (!(await readdir(path.join(cacheDir, 'tmp')).catch(() => [] as string[])).some((n) => n.startsWith('ingest-'))) {
    assert.ok(Date.now() < deadline && first.exitCode === null, `the first ingest never started building: ${firstErr}`);
    await new Promise((r) => setTimeout(r, 5));
  }
  const second = await runCli(['ingest', '--archive', quick, '--cache-dir', cacheDir, '--lock-timeout', '0', '--btf', 'off']);
  assert.equal(second.code, 5, second.stderr);
  assert.match(second.stderr, new RegExp(`the cache is locked by process ${first.pid} \\(another kheadersd writing to it\\); try again when it finishes`));
  assert.equal(hasStackTrace(second.stderr), false);

  assert.equal(await firstDone, 0, firstErr);
  assert.equal((JSON.parse(firstOut) as { release: string }).release, '6.99.1-slow');
  const ls = JSON.parse((await runCli(['ls', '--json', '--cache-dir', cacheDir])).stdout) as Array<{ release: string }>;
  assert.deepEqual(ls.map((e) => e.release), ['6.99.1-slow']);
  assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), []);

  // Once the lock is free, the second one goes through.
  const retry = await runCli(['ingest', '--archive', quick, '--cache-dir', cacheDir, '--lock-timeout', '0', '--btf', 'off', '--json']);
  assert.equal(retry.code, 0, retry.stderr);
  const ls2 = JSON.parse((await runCli(['ls', '--json', '--cache-dir', cacheDir])).stdout) as Array<{ release: string }>;
  assert.deepEqual(ls2.map((e) => e.release).sort(), ['6.99.1-slow', '6.99.2-quick']);
});

test('the cache lock excludes: 6 processes x 40 locked read-modify-writes lose no increment, and no lock is left', { timeout: 120_000 }, async (t) => {
  const dir = await tempDir(t);
  const lockPath = path.join(dir, 'lock');
  const counter = path.join(dir, 'counter');
  await writeFile(counter, '0\n');
  const child = path.join(REPO_ROOT, 'dist/test/helpers/lock-child.js');
  const results = await Promise.all(Array.from({ length: 6 }, () => runProcess(process.execPath, [child, lockPath, counter, '40'], { timeoutMs: 110_000 })));
  for (const r of results) assert.equal(r.code, 0, r.stderr);
  assert.equal(Number(await readFile(counter, 'utf8')), 240);
  assert.deepEqual(await readdir(dir), ['counter']);
});

test('a dead owner\'s lock (and a breaker that died mid-break) are cleared once, with 6 waiters racing to break them', { timeout: 120_000 }, async (t) => {
  const dir = await tempDir(t);
  const lockPath = path.join(dir, 'lock');
  const counter = path.join(dir, 'counter');
  await writeFile(counter, '0\n');
  const dead = spawnSync('true').pid;
  await writeFile(lockPath, `${dead} 12345\n`);
  await writeFile(`${lockPath}.break`, `${dead} 12345\n`);
  const old = new Date(Date.now() - 60_000);
  await utimes(`${lockPath}.break`, old, old);
  const child = path.join(REPO_ROOT, 'dist/test/helpers/lock-child.js');
  const results = await Promise.all(Array.from({ length: 6 }, () => runProcess(process.execPath, [child, lockPath, counter, '40'], { timeoutMs: 110_000 })));
  for (const r of results) assert.equal(r.code, 0, r.stderr);
  assert.equal(Number(await readFile(counter, 'utf8')), 240);
  assert.deepEqual(await readdir(dir), ['counter']);
});

/** A process that holds `lockPath` until killed (test/helpers/lock-holder.ts); resolves once it holds it. */
async function holdLock(t: TestContext, lockPath: string): Promise<ChildProcess> {
  const holder = spawn(process.execPath, [path.join(REPO_ROOT, 'dist/test/helpers/lock-holder.js'), lockPath], { stdio: ['pipe', 'pipe', 'inherit'] });
  t.after(() => {
    if (holder.exitCode === null && holder.signalCode === null) holder.kill('SIGKILL');
  });
  const [line] = (await once(holder.stdout.setEncoding('utf8'), 'data')) as [string];
  assert.equal(line, 'held\n');
  // Not what keeps this process alive: it exits when its stdin closes with this process.
  holder.stdout.destroy();
  holder.unref();
  (holder.stdin as unknown as { unref(): void }).unref();
  return holder;
}

test('a stop while waiting for a lock another process holds: rejects at once with the stop, touches no lock file, and the queue behind it still works', { timeout: 60_000 }, async (t) => {
  const dir = await tempDir(t);
  const lockPath = path.join(dir, 'lock');
  const holder = await holdLock(t, lockPath);
  const held = await readFile(lockPath, 'utf8');

  const stop = new AbortController();
  let ran = 0;
  const waiting = withLock(lockPath, { timeoutMs: 10_000, signal: stop.signal }, async () => void ran++);
  // Queued behind it in this process: one with the same stop, one without.
  const queuedStopped = withLock(lockPath, { timeoutMs: 10_000, signal: stop.signal }, async () => void ran++);
  const after = withLock(lockPath, { timeoutMs: 30_000 }, async () => readFile(lockPath, 'utf8'));
  waiting.catch(() => {});
  queuedStopped.catch(() => {});
  await new Promise((r) => setTimeout(r, 300)); // waiting on the other process's lock by now
  const t0 = performance.now();
  stop.abort();
  await assert.rejects(waiting, (err: Error) => err.name === 'AbortError', 'the wait rejects with the stop');
  await assert.rejects(queuedStopped, (err: Error) => err.name === 'AbortError', 'a wait in the queue too');
  const ms = performance.now() - t0;
  assert.ok(ms < 200, `the stop took ${Math.round(ms)} ms`);
  assert.equal(ran, 0, 'a stopped wait never runs its work');
  assert.equal(await readFile(lockPath, 'utf8'), held, 'the holder\'s lock is untouched');

  // The holder dies: the caller queued without a stop takes the lock (the queue is consistent).
  holder.kill('SIGKILL');
  const mine = await after;
  assert.equal(mine.split(' ')[0], String(process.pid), 'the lock was ours while the queued caller ran');
  assert.equal(await withLock(lockPath, { timeoutMs: 5_000, signal: new AbortController().signal }, async () => 'again'), 'again', 'and a later withLock on the path works');
  assert.deepEqual(await readdir(dir), [], 'no lock file (or scratch file) of ours is left');
});

test('a stop that has already happened: withLock rejects without taking the lock', async (t) => {
  const dir = await tempDir(t);
  const lockPath = path.join(dir, 'lock');
  const stop = new AbortController();
  stop.abort();
  await assert.rejects(withLock(lockPath, { timeoutMs: 1_000, signal: stop.signal }, async () => 'ran'), (err: Error) => err.name === 'AbortError');
  assert.deepEqual(await readdir(dir), []);
});
