/**
 * A stop while heal rebuilds an entry (serve stopping during its start's repair, or during a
 * repair a reader asked for). A stopped rebuild is no evidence of anything: the rebuild is
 * cancelled (its xz killed, its staging removed), the entry goes back into entries/ as it was
 * (not left in tmp/ to be swept, not kept in quarantine as "cannot be rebuilt"), the entries not
 * reached are left alone, and the next heal rebuilds them all. serve, stopped so, exits 0 at once.
 */
import assert from 'node:assert/strict';
import { readdir, readFile, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { test, type TestContext } from 'node:test';
import { createLogger, type Logger } from '../src/log.js';
import { CacheStore } from '../src/store/cache.js';
import { dataLocation, MANIFEST_FILE, PACK_FILE } from '../src/store/entry.js';
import { healCache, type KnownDamage } from '../src/store/heal.js';
import { ingest } from '../src/store/ingest.js';
import { goodTree, makeTar, tempDir, textLike, treeContent, xz } from './helpers/archives.js';
import { hangableXz, type HangableXz } from './helpers/hung-xz.js';
import { exitWithin, pollUntil, repairedAndServed, startServe, type Daemon } from './helpers/serve-child.js';

/** Under the 10 s after which a service manager kills; the daemon's own stop deadline is 6 s. */
const STOP_BOUND_MS = 5_000;
const SCHED = 'include/linux/sched.h';
const SCHED_BYTES = textLike(20_000, 42); // what goodTree puts there

interface Cached {
  archive: string;
  release: string;
  id: string;
  entryDir: string;
}

/** goodTree(release) as an archive in `dir`, ingested into `cacheDir` (by this process). */
async function cached(dir: string, cacheDir: string, release: string): Promise<Cached> {
  const archive = path.join(dir, `${release}.tar.xz`);
  await writeFile(archive, xz(await makeTar(goodTree(release))));
  const r = await ingest({ cacheDir, archive, release, btf: 'off', config: 'off', keep: 20, setCurrent: false, log: createLogger('silent') });
  const id = r.entry.manifest.id;
  await r.entry.reader.close();
  return { archive, release, id, entryDir: path.join(cacheDir, 'entries', id) };
}

/** What a heal can be given to rebuild: an entry of an older format, a cut manifest, a byte a reader found wrong. */
const DAMAGE = {
  outdated: async (c: Cached): Promise<void> => {
    const manifest = JSON.parse(await readFile(path.join(c.entryDir, MANIFEST_FILE), 'utf8')) as Record<string, unknown>;
    await writeFile(path.join(c.entryDir, MANIFEST_FILE), JSON.stringify({ ...manifest, formatVersion: 1 }));
  },
  'manifest cut': (c: Cached): Promise<void> => truncate(path.join(c.entryDir, MANIFEST_FILE), 20),
  'found by a reader': async (c: Cached): Promise<void> => {
    const store = await CacheStore.open(path.dirname(path.dirname(c.entryDir)));
    const entry = await store.load(c.id);
    const at = dataLocation(entry, entry.index.resolve(SCHED)!).offset + 1234;
    await entry.reader.close();
    const pack = await readFile(path.join(c.entryDir, PACK_FILE));
    pack[at]! ^= 0x20;
    await writeFile(path.join(c.entryDir, PACK_FILE), pack);
  },
} as const;

/** What a reader reports of `c` (the instance on disk now). */
async function readerFound(cacheDir: string, c: Cached): Promise<KnownDamage> {
  const manifest = JSON.parse(await readFile(path.join(c.entryDir, MANIFEST_FILE), 'utf8')) as { ingestedAt: string };
  return { id: c.id, ingestedAt: manifest.ingestedAt, reason: `${SCHED} does not match its digest`, file: PACK_FILE };
}

/** A logger whose lines the test reads. */
function recordingLogger(): { log: Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const out = new PassThrough();
  out.setEncoding('utf8').on('data', (s: string) => {
    for (const line of s.split('\n')) if (line.startsWith('{')) lines.push(JSON.parse(line) as Record<string, unknown>);
  });
  return { log: createLogger('info', out), lines };
}

/** Resolves once a build has staged something in tmp/ (its xz is then running, or about to). */
function whenStaging(cacheDir: string): Promise<string> {
  return pollUntil(async () => (await readdir(path.join(cacheDir, 'tmp'))).find((n) => n.startsWith('ingest-')), 'a rebuild to stage its pack', 60_000);
}

async function quarantined(cacheDir: string): Promise<string[]> {
  return readdir(path.join(cacheDir, 'quarantine')).catch(() => []);
}

/** The cache as it was before the stopped heal (`entries`, their content then): nothing staged, set aside or quarantined. */
async function assertAsItWas(cacheDir: string, entries: Map<string, string>): Promise<void> {
  assert.deepEqual(await treeContent(path.join(cacheDir, 'entries')), entries, 'the entries are not back as they were');
  assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), [], 'something was left in tmp/ (the next ingest would sweep it away)');
  assert.deepEqual(await quarantined(cacheDir), [], 'a stopped rebuild left a quarantined copy');
}

/** SIGTERM once a rebuild has staged (its hung xz runs): the daemon exits 0 at once, its xz with it, and leaves the cache as it was. */
async function stopWhileRebuilding(d: Daemon, cacheDir: string, xzs: HangableXz, entries: Map<string, string>): Promise<void> {
  try {
    await whenStaging(cacheDir);
    d.child.kill('SIGTERM');
    assert.equal(await exitWithin(d, STOP_BOUND_MS), 0, `the stop during the repair: ${JSON.stringify(d.logs.slice(-4))}`);
    assert.deepEqual(await xzs.leftRunning(), [], 'the hung xz outlived the daemon');
    await assertAsItWas(cacheDir, entries);
    assert.ok(!d.logs.some((l) => /cannot be rebuilt|repairing the cache failed/.test(String(l.msg))), 'a stopped rebuild was logged as a failure');
  } finally {
    await d.stop();
    for (const pid of await xzs.leftRunning()) process.kill(pid, 'SIGKILL'); // a failed run's hung xz
  }
}

/** A directory for one test, its cache directory in it, and an xz on PATH that can be made to hang. */
async function workspace(t: TestContext, prefix: string): Promise<{ dir: string; cacheDir: string; xzs: HangableXz }> {
  const dir = await tempDir(t, prefix);
  return { dir, cacheDir: path.join(dir, 'cache'), xzs: await hangableXz(dir) };
}

/**
 * serve's arguments with `live` as the running kernel's archive: over `cacheDir`, keeping every
 * entry a test makes, HTTP on a free port, no mount, no BTF, the xz decoder (the one on PATH,
 * which can hang), and the log lines the test waits for.
 */
function serveArgs(live: Cached, cacheDir: string): string[] {
  return ['--archive', live.archive, '--release', live.release, '--cache-dir', cacheDir, '--keep', '20', '--mount', 'off', '--http', '127.0.0.1:0', '--btf', 'off', '--decoder', 'xz', '--log-level', 'info'];
}

/** Each of `entries` is served over HTTP with its archive's bytes: rebuilt, not lost. */
async function assertServed(url: string, entries: readonly Cached[]): Promise<void> {
  for (const c of entries) {
    const res = await fetch(`${url}/v1/kernels/${c.release}/files/${SCHED}`);
    assert.equal(res.status, 200, `${c.release}: ${res.status}`);
    assert.ok(Buffer.from(await res.arrayBuffer()).equals(SCHED_BYTES), `${c.release} serves the archived bytes`);
  }
}

/** Run with `process.env.PATH` set (the decoder finds xz there) until the test ends. */
function usePath(t: TestContext, PATH: string): void {
  const before = process.env.PATH;
  process.env.PATH = PATH;
  t.after(() => {
    process.env.PATH = before;
  });
}

for (const [what, damage] of Object.entries(DAMAGE)) {
  test(`heal stopped while it rebuilds (${what}): the entries are back as they were, nothing is quarantined or swept, the xz is gone; the next heal rebuilds them`, async (t) => {
    const { dir, cacheDir, xzs } = await workspace(t, 'kheadersd-heal-stop-');
    usePath(t, xzs.PATH);
    // Two entries: the stop finds one being rebuilt, and the other not reached yet.
    const entries = [await cached(dir, cacheDir, '6.93.1-heal'), await cached(dir, cacheDir, '6.93.2-heal')];
    for (const c of entries) await damage(c);
    const known = what === 'found by a reader' ? await Promise.all(entries.map((c) => readerFound(cacheDir, c))) : [];
    const before = await treeContent(path.join(cacheDir, 'entries'));

    await xzs.hang();
    const stop = new AbortController();
    const { log, lines } = recordingLogger();
    const healing = healCache({ cacheDir, btf: 'off', decoder: 'xz', log, known, signal: stop.signal });
    healing.catch(() => {});
    await whenStaging(cacheDir);
    stop.abort();
    await assert.rejects(healing, (err: Error) => err.name === 'AbortError', 'the heal rejects as stopped');

    await assertAsItWas(cacheDir, before);
    assert.ok(!lines.some((l) => /cannot be rebuilt/.test(String(l.msg))), 'a stopped rebuild was logged as one that cannot be done');
    assert.ok(lines.some((l) => /was stopped: it is back in the cache as it was/.test(String(l.msg))), 'the stop is logged as such');
    assert.deepEqual(await xzs.leftRunning(), [], 'the hung xz outlived the stop');

    await xzs.unhang();
    const report = await healCache({ cacheDir, btf: 'off', decoder: 'xz', log: createLogger('silent'), known: what === 'found by a reader' ? await Promise.all(entries.map((c) => readerFound(cacheDir, c))) : [] });
    assert.deepEqual([...report.rebuilt].sort(), entries.map((c) => c.id).sort(), 'the next heal rebuilds them');
    assert.deepEqual(report.unrepaired, []);
    const store = await CacheStore.open(cacheDir);
    for (const c of entries) {
      const entry = await store.load(c.id);
      assert.ok((await entry.reader.read(entry.index.resolveId(SCHED), 0, SCHED_BYTES.length)).equals(SCHED_BYTES), `${c.release}: rebuilt with the archive's bytes`);
      await entry.reader.close();
    }
  });
}

test('serve, SIGTERM while it rebuilds an outdated and a damaged entry its start found: exits 0 at once, both wait in entries/; the next start rebuilds and serves them', async (t) => {
  const { dir, cacheDir, xzs } = await workspace(t, 'kheadersd-heal-stop-serve-');
  const old = await cached(dir, cacheDir, '6.94.1-old');
  const cut = await cached(dir, cacheDir, '6.94.2-cut');
  const live = await cached(dir, cacheDir, '6.94.3-live');
  await DAMAGE.outdated(old);
  await DAMAGE['manifest cut'](cut);
  const before = await treeContent(path.join(cacheDir, 'entries'));
  const args = serveArgs(live, cacheDir);

  await xzs.hang();
  const first = startServe(t, args, { PATH: xzs.PATH });
  await stopWhileRebuilding(first, cacheDir, xzs, before);
  // `current` (live) is served first; the others are checked, and the damaged rebuilt, after.
  assert.ok(first.logs.some((l) => l.msg === 'HTTP listening'), 'HTTP waited for the rebuild of entries other than `current`');

  await xzs.unhang();
  const second = startServe(t, args, { PATH: xzs.PATH });
  const url = String((await second.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen')).url);
  await repairedAndServed(second);
  await assertServed(url, [old, cut, live]);
  second.child.kill('SIGTERM');
  assert.equal(await second.exited, 0);
});

test('serve, SIGTERM while it repairs an entry a read found damaged: exits 0 at once, the entry waits in entries/; the next start serves it, and repairs it at the first read of the bad bytes', async (t) => {
  const { dir, cacheDir, xzs } = await workspace(t, 'kheadersd-heal-stop-repair-');
  const flipped = await cached(dir, cacheDir, '6.95.1-read');
  await DAMAGE['found by a reader'](flipped);
  const before = await treeContent(path.join(cacheDir, 'entries'));
  const args = serveArgs(flipped, cacheDir);
  const sched = (url: string): Promise<Response> => fetch(`${url}/v1/kernels/${flipped.release}/files/${SCHED}`);

  const first = startServe(t, args, { PATH: xzs.PATH });
  const listening = String((await first.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen')).url);
  await xzs.hang();
  assert.equal((await sched(listening)).status, 500, 'the flipped byte is served');
  await stopWhileRebuilding(first, cacheDir, xzs, before);
  assert.ok(first.logs.some((l) => l.msg === 'repair stopped: the daemon is stopping'), 'the stopped repair is logged as such');

  await xzs.unhang();
  const second = startServe(t, args, { PATH: xzs.PATH });
  const url = String((await second.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen')).url);
  assert.equal((await sched(url)).status, 500, 'the bad bytes are found again, never served');
  await second.waitFor((l) => l.msg === 'cache entry rebuilt from its own archive', 'the repair');
  const res = await pollUntil(async () => {
    const r = await sched(url);
    return r.status === 200 ? r : undefined;
  }, 'the rebuilt entry to be served');
  assert.ok(Buffer.from(await res.arrayBuffer()).equals(SCHED_BYTES), 'the rebuilt entry serves the archived bytes');
  second.child.kill('SIGTERM');
  assert.equal(await second.exited, 0);
});

test('serve SIGKILLed while its start rebuilds an outdated entry: the copy set aside in tmp/ is not swept; the next start puts it back and rebuilds it', async (t) => {
  const { dir, cacheDir, xzs } = await workspace(t, 'kheadersd-heal-kill-');
  const old = await cached(dir, cacheDir, '6.96.1-old');
  const live = await cached(dir, cacheDir, '6.96.2-live');
  await DAMAGE.outdated(old);
  const args = serveArgs(live, cacheDir);

  await xzs.hang();
  const first = startServe(t, args, { PATH: xzs.PATH });
  try {
    await whenStaging(cacheDir);
    first.child.kill('SIGKILL');
    await first.exited;
  } finally {
    await first.stop();
    for (const pid of await xzs.leftRunning()) process.kill(pid, 'SIGKILL'); // its hung xz, orphaned
  }
  const tmp = await readdir(path.join(cacheDir, 'tmp'));
  assert.ok(tmp.some((n) => n.startsWith('aside-') && n.endsWith(old.id)), `the outdated entry is set aside in tmp/: ${tmp.join(', ')}`);
  assert.ok(!(await readdir(path.join(cacheDir, 'entries'))).includes(old.id), 'it was out of entries/ when the kill came');

  await xzs.unhang();
  const second = startServe(t, args, { PATH: xzs.PATH });
  const url = String((await second.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen')).url);
  await assertServed(url, [old, live]);
  second.child.kill('SIGTERM');
  assert.equal(await second.exited, 0);
  assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), [], 'tmp/ is empty again');
  const manifest = JSON.parse(await readFile(path.join(old.entryDir, MANIFEST_FILE), 'utf8')) as { formatVersion: number };
  assert.notEqual(manifest.formatVersion, 1, 'rebuilt in the current format');
});
