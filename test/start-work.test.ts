/**
 * What a `serve` start with its entries cached does, done once and at once: each entry's index
 * read and checked once however many ask for it together, a clean cache checked without taking
 * the lock (while a repair still takes it, and an eviction racing the check is no damage), and the
 * archive read in parts at once and still byte for byte.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Writable } from 'node:stream';
import { createLogger } from '../src/log.js';
import { StopRequest, startDaemon } from '../src/commands/serve.js';
import { resolveConfig } from '../src/config.js';
import { readBounded } from '../src/source/locate.js';
import { CacheStore } from '../src/store/cache.js';
import { MANIFEST_FILE } from '../src/store/entry.js';
import { healCache } from '../src/store/heal.js';
import { ingest } from '../src/store/ingest.js';
import { TreeIndex } from '../src/store/tree-index.js';
import { goodTree, makeTar, sha256, tempDir, xz } from './helpers/archives.js';
import { fsp, fsSync, watch } from './helpers/fs-watch.js';
import { fuseDeviceSkipReason } from './helpers/fuse-env.js';
// Loaded now, as a daemon's bundle has them at hand: the start's import() of them is then no slower than a turn.
import '../src/serve/fuse/index.js';
import '../src/serve/fuse/kernel/index.js';

const silent = createLogger('silent');

/** A cache with one entry per release (distinct archives); returns the ids, oldest first. */
async function cacheOf(dir: string, releases: readonly string[]): Promise<{ cacheDir: string; ids: string[] }> {
  const cacheDir = path.join(dir, 'cache');
  const ids: string[] = [];
  for (const release of releases) {
    const archive = path.join(dir, `${release}.tar.xz`);
    await writeFile(archive, xz(await makeTar(goodTree(release, release))));
    const r = await ingest({ cacheDir, archive, release, btf: 'off', log: silent, keep: 10 });
    ids.push(r.entry.manifest.id);
  }
  return { cacheDir, ids };
}

/** Count the indexes decoded (read and checked in full) while `fn` runs. */
async function countingDecodes<T>(fn: () => Promise<T>): Promise<{ result: T; decodes: number }> {
  const decode = TreeIndex.decode.bind(TreeIndex);
  let decodes = 0;
  TreeIndex.decode = (...args: Parameters<typeof TreeIndex.decode>) => {
    decodes++;
    return decode(...args);
  };
  try {
    return { result: await fn(), decodes };
  } finally {
    TreeIndex.decode = decode;
  }
}

test('a load that an entry\'s drop overtakes (quarantine, eviction, a replacement on disk) does not keep what it read', async (t) => {
  const dir = await tempDir(t);
  const { cacheDir, ids } = await cacheOf(dir, ['6.90.5-drop']);
  const id = ids[0]!;
  const store = await CacheStore.open(cacheDir, { write: true });
  const reading = store.load(id);
  store.forget(id); // dropped while the load reads the entry
  const before = await reading;
  const after = await store.load(id);
  assert.notEqual(after, before, 'the copy read before the drop was kept and handed out after it');
  assert.equal(await store.load(id), after, 'a load after the drop is kept as usual');
});

test('an entry asked for by a scan and two loads at once is read and checked once, and they all get that one copy', async (t) => {
  const dir = await tempDir(t);
  const { cacheDir, ids } = await cacheOf(dir, ['6.90.1-once', '6.90.2-once']);
  const [a, b] = ids as [string, string];
  const store = await CacheStore.open(cacheDir, { write: true });
  const { result, decodes } = await countingDecodes(() => Promise.all([store.scan(), store.load(a), store.load(a), store.load(b)]));
  assert.equal(decodes, 2, 'one decode per entry');
  const [scan, a1, a2, b1] = result;
  assert.deepEqual(scan.entries.map((m) => m.id).sort(), [a, b].sort());
  assert.deepEqual(scan.damaged, []);
  assert.equal(a1, a2, 'the same instance');
  assert.equal(await store.load(a), a1, 'and later loads are that instance too');
  assert.equal(b1.manifest.id, b);
  // An entry forgotten (replaced on disk) is read again.
  store.forget(a);
  const again = await countingDecodes(() => store.load(a));
  assert.equal(again.decodes, 1);
  assert.notEqual(again.result, a1);
});

test('a clean cache is checked without taking the lock; a damaged entry is still repaired under it', async (t) => {
  const dir = await tempDir(t);
  const { cacheDir, ids } = await cacheOf(dir, ['6.90.3-clean', '6.90.4-clean']);
  const store = await CacheStore.open(cacheDir, { write: true });
  // The lock held by this process meanwhile: a heal that took it would wait here for ever.
  const underLock = await store.locked(() =>
    Promise.race([healCache({ cacheDir, store, btf: 'off', log: silent }), new Promise<'waited for the lock'>((r) => setTimeout(() => r('waited for the lock'), 10_000))]),
  );
  assert.deepEqual(underLock, { quarantined: [], rebuilt: [], unrepaired: [] });

  // A cut manifest: found by the check, moved to quarantine and rebuilt (the repair locks).
  const victim = ids[0]!;
  await writeFile(path.join(cacheDir, 'entries', victim, MANIFEST_FILE), '{"formatVersion": 2, "id"');
  const repaired = await healCache({ cacheDir, store: await CacheStore.open(cacheDir, { write: true }), btf: 'off', log: silent });
  assert.deepEqual(repaired.rebuilt, [victim]);
  assert.equal(repaired.quarantined.length, 1);
  assert.deepEqual((await readdir(path.join(cacheDir, 'entries'))).sort(), [...ids].sort());
  assert.equal(await readdir(cacheDir).then((names) => names.includes('lock')), false, 'no lock left behind');
});

test('an eviction racing the unlocked check is not taken for damage: nothing is quarantined, whatever the interleaving', async (t) => {
  const dir = await tempDir(t);
  const { cacheDir } = await cacheOf(dir, ['6.90.5-race', '6.90.6-race', '6.90.7-race', '6.90.8-race']);
  for (let round = 0; round < 5; round++) {
    const evicting = await CacheStore.open(cacheDir, { write: true });
    const checking = await CacheStore.open(cacheDir, { write: true });
    const [evicted, report] = await Promise.all([
      evicting.locked(() => evicting.gc({ keep: 3 - Math.min(round, 2) })),
      healCache({ cacheDir, store: checking, btf: 'off', log: silent }),
    ]);
    assert.deepEqual(report, { quarantined: [], rebuilt: [], unrepaired: [] }, `round ${round}: evicted ${evicted.join(', ')}`);
  }
  assert.deepEqual(await readdir(cacheDir).then((names) => names.filter((n) => n === 'quarantine')), []);
});

test('readBounded reads a file of known size in parts at once, byte for byte, whatever its size; a pipe in turn', async (t) => {
  const dir = await tempDir(t);
  for (const size of [1, 65_535, 65_536, 65_537, 262_144 * 4 - 1, 262_144 * 4 + 1, 3_000_001]) {
    const file = path.join(dir, `f${size}`);
    const bytes = Buffer.alloc(size);
    for (let i = 0; i < size; i++) bytes[i] = (i * 2_654_435_761) >>> 24;
    await writeFile(file, bytes);
    const got = await readBounded(file, 8 * 1024 * 1024);
    assert.equal(got.length, size);
    assert.equal(sha256(got), sha256(bytes), `${size} bytes`);
  }
  await assert.rejects(readBounded(path.join(dir, 'f3000001'), 1_000_000), /larger than 1000000 bytes/);
  // A FIFO has no size and no positions: read in turn to its end.
  const fifo = path.join(dir, 'fifo');
  const mk = spawn('mkfifo', [fifo]);
  await new Promise((r) => mk.on('close', r));
  const payload = Buffer.from('x'.repeat(200_000));
  const writer = writeFile(fifo, payload);
  const got = await readBounded(fifo, 1024 * 1024);
  await writer;
  assert.ok(got.equals(payload));
});

test('serve answers HTTP once `current` is checked; the other entries are checked next, before the start ends', async (t) => {
  const dir = await tempDir(t);
  const { cacheDir, ids } = await cacheOf(dir, ['6.90.1-other', '6.90.2-other', '6.90.3-now']);
  const [first, second, now] = ids as [string, string, string];
  // What each line says, and how many indexes had been checked when it was said.
  const said: Array<{ msg: string; decodes: number }> = [];
  let decodes = 0;
  const lines = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString().split('\n').filter(Boolean)) said.push({ msg: (JSON.parse(line) as { msg: string }).msg, decodes });
      done();
    },
  });
  const { result: daemon } = await countingDecodesWith((n) => (decodes = n), async () => {
    const cfg = resolveConfig({ flags: { cacheDir, archive: path.join(dir, '6.90.3-now.tar.xz'), release: '6.90.3-now', mount: 'off', http: '127.0.0.1:0', btf: 'off' }, env: {}, file: {}, fileName: 'none' });
    return startDaemon(cfg, { stdout: process.stdout, stderr: process.stderr, log: createLogger('info', lines) }, new StopRequest());
  });
  t.after(() => daemon.stop());
  assert.equal(daemon.state.currentId, now);
  const listening = said.find((l) => l.msg === 'HTTP listening');
  assert.ok(listening, `no "HTTP listening" line in ${JSON.stringify(said)}`);
  assert.equal(listening.decodes, 1, 'HTTP waited for entries other than `current` to be checked');
  assert.equal(decodes, 3, 'the start ended before every entry was checked');
  // Each other entry was checked once, by the start, and HTTP serves it without another check.
  const res = await fetch(`${daemon.httpUrl}/v1/kernels/6.90.1-other/files/`);
  assert.equal(res.status, 200, await res.text());
  assert.equal(decodes, 3);
  assert.ok([first, second].every((id) => id !== daemon.state.currentId));
});

test('serve begins the mount once HTTP listens: nothing of it runs ahead of the listen', { skip: await fuseDeviceSkipReason() }, async (t) => {
  const dir = await tempDir(t);
  const { cacheDir } = await cacheOf(dir, ['6.90.4-now']);
  // Ahead of the listen, the mount's first step (its /dev/fuse check) held /readyz up.
  const watched = watch(fsp, ['access'], '/dev/fuse');
  t.after(() => watched.undo());
  const said: Array<{ msg: string; mountSteps: number }> = [];
  const lines = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString().split('\n').filter(Boolean)) said.push({ msg: (JSON.parse(line) as { msg: string }).msg, mountSteps: watched.calls.length });
      done();
    },
  });
  const mnt = path.join(dir, 'mnt');
  const cfg = resolveConfig({ flags: { cacheDir, archive: path.join(dir, '6.90.4-now.tar.xz'), release: '6.90.4-now', mount: mnt, fuseBackend: 'kernel', http: '127.0.0.1:0', btf: 'off' }, env: {}, file: {}, fileName: 'none' });
  const daemon = await startDaemon(cfg, { stdout: process.stdout, stderr: process.stderr, log: createLogger('info', lines) }, new StopRequest());
  try {
    assert.equal(daemon.state.mountpoint, mnt, `no mount: ${daemon.state.mountError}`);
    const listening = said.find((l) => l.msg === 'HTTP listening');
    assert.ok(listening, `no "HTTP listening" line in ${JSON.stringify(said)}`);
    assert.equal(listening.mountSteps, 0, 'the mount began before HTTP listened');
    assert.ok(watched.calls.length > 0, 'the mount never checked /dev/fuse: the watch saw nothing');
    assert.deepEqual(await readdir(path.join(mnt, '6.90.4-now', 'include')), await readdir(path.join(mnt, 'current', 'include')));
  } finally {
    // Before the temporary directory is removed (t.after), the mount in it must be gone.
    await daemon.stop();
  }
});

test('a refresh while serving (SIGHUP) reads another process\'s new entry through the thread pool, never synchronously', async (t) => {
  const dir = await tempDir(t);
  const { cacheDir } = await cacheOf(dir, ['6.90.6-now']);
  const cfg = resolveConfig({ flags: { cacheDir, archive: path.join(dir, '6.90.6-now.tar.xz'), release: '6.90.6-now', mount: 'off', http: '127.0.0.1:0', btf: 'off' }, env: {}, file: {}, fileName: 'none' });
  const daemon = await startDaemon(cfg, { stdout: process.stdout, stderr: process.stderr, log: silent }, new StopRequest());
  t.after(() => daemon.stop());
  // Another process ingests a new release meanwhile (here, before the watch starts).
  const [newId] = (await cacheOf(dir, ['6.90.7-new'])).ids as [string];
  const sync = watch(fsSync, ['openSync', 'readdirSync', 'readFileSync'], cacheDir);
  const async = watch(fsp, ['open', 'readdir', 'readFile'], cacheDir);
  try {
    await daemon.refresh('test');
  } finally {
    sync.undo();
    async.undo();
  }
  // The refresh's ingest (the same kernel: nothing to do) checks only the served entries, and
  // still lists the manifests synchronously (small files); the publish after it reads and checks
  // the index it has never seen through the pool. Before, the ingest read every index synchronously.
  const ofNew = (calls: string[]): string[] => calls.filter((c) => c.includes(`entries/${newId}/`));
  assert.deepEqual(ofNew(sync.calls).filter((c) => c.endsWith('/index.bin')), [], 'the new entry\'s index read synchronously on the serving thread');
  for (const file of ['manifest.json', 'index.bin']) assert.ok(ofNew(async.calls).some((c) => c.endsWith(`/${file}`)), `${file} through the thread pool: ${async.calls.join(', ')}`);
  const res = await fetch(`${daemon.httpUrl}/v1/kernels/6.90.7-new/files/`);
  assert.equal(res.status, 200, await res.text());
});

/** countingDecodes, reporting the count as it grows (to be read at a moment during `fn`). */
async function countingDecodesWith<T>(onDecode: (n: number) => void, fn: () => Promise<T>): Promise<{ result: T; decodes: number }> {
  const decode = TreeIndex.decode.bind(TreeIndex);
  let decodes = 0;
  TreeIndex.decode = (...args: Parameters<typeof TreeIndex.decode>) => {
    onDecode(++decodes);
    return decode(...args);
  };
  try {
    return { result: await fn(), decodes };
  } finally {
    TreeIndex.decode = decode;
  }
}
