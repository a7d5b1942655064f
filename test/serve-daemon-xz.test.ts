/**
 * serve's first boot with the xz binary: the daemon starts xz itself, under the cache lock it
 * holds for its ingest process, into a staging in tmp/, and the ingest process builds from that
 * staging (src/store/ingest.ts, StagedBuild; src/commands/remote-decoder.ts). Its failures are
 * the same typed errors as `kheadersd ingest`'s; a daemon killed mid-decode leaves nothing running
 * on tmp/ and a stale lock; an ingest process killed mid-decode takes xz with it and leaves the
 * cache as it was.
 */
import { spawn } from 'node:child_process';
import { mkdir, open } from 'node:fs/promises';
import { mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { FIXTURE_ARCHIVE, FIXTURE_SHA256, runCli, sha256, fixtureMissing, goodArchive, goodTree, makeTar, tempDir, textLike, xz, xzAsync } from './helpers/archives.js';
import { xzBomb } from './helpers/xz-bombs.js';
import { holdersUnder } from './helpers/open-files.js';
import { serveOnce, startServe, type Daemon } from './helpers/serve-child.js';
import { ERRORS } from '../src/errors.js';
import { PACK_FILE } from '../src/store/entry.js';
import { CacheStore } from '../src/store/cache.js';
import { createLogger } from '../src/log.js';
import { ingest } from '../src/store/ingest.js';
import { startIngestProcess } from '../src/commands/ingest-process.js';
import { resolveConfig } from '../src/config.js';
import { findXzBinary, planDecoder, startXzIntoFile } from '../src/store/decompress.js';
import { decoderIdentity } from '../src/commands/remote-decoder.js';
import type { IngestRequest } from '../src/commands/ingest-process.js';

const msgs = (d: Daemon): string[] => d.logs.map((l) => String(l.msg));
const STAGED = 'xz started in the daemon, for the ingest process to build from';

/** The failure serve logged at its start, as `kheadersd ingest` words it on stderr. */
function startFailure(d: Daemon): { code: string; message: string } {
  const failed = d.logs.find((l) => typeof l.code === 'string' && l.level === 50 && String(l.msg) !== '');
  assert.ok(failed, msgs(d).join('\n'));
  return { code: String(failed.code), message: String(failed.msg) };
}

test('serve first boot with xz: the daemon starts xz, the ingest process builds from its staging, and the entry is the one `kheadersd ingest` makes', async (t) => {
  const missing = fixtureMissing();
  if (missing) return t.skip(missing);
  const dir = await tempDir(t, 'kheadersd-daemon-xz-');
  const cache = path.join(dir, 'cache');
  const { d, code } = await serveOnce(t, ['--decoder', 'xz', '--archive', FIXTURE_ARCHIVE, '--cache-dir', cache, '--btf', 'off']);
  assert.equal(code, 0, msgs(d).join('\n'));
  assert.ok(msgs(d).includes(STAGED), msgs(d).join('\n'));
  const ingested = d.logs.find((l) => l.msg === 'ingested');
  assert.ok(ingested, msgs(d).join('\n'));
  assert.equal(ingested.decodedBy, 'daemon');
  assert.equal(ingested.decoder, 'xz');
  assert.notEqual(ingested.ingestPid, d.child.pid, 'the build itself ran in the ingest process');
  const [m] = await (await CacheStore.open(cache)).list();
  assert.equal(m?.digest, FIXTURE_SHA256);
  assert.deepEqual(await readdir(path.join(cache, 'tmp')), []);

  // The same entry, file for file, as the CLI's own build (which decodes in its own process).
  const other = path.join(dir, 'other');
  const r = await runCli(['ingest', '--archive', FIXTURE_ARCHIVE, '--cache-dir', other, '--btf', 'off', '--decoder', 'xz', '--log-level', 'warn']);
  assert.equal(r.code, 0, r.stderr);
  for (const name of ['pack.tar', 'index.bin', 'archive.tar.xz']) {
    assert.ok((await readFile(path.join(cache, 'entries', m.id, name))).equals(await readFile(path.join(other, 'entries', m.id, name))), name);
  }
});

test('serve first boot with xz, a corrupt archive and an xz bomb: the same typed errors as `kheadersd ingest`, nothing cached, nothing left in tmp/', async (t) => {
  const dir = await tempDir(t, 'kheadersd-daemon-xz-bad-');
  const release = '6.99.70-dxz';
  const good = xz(await makeTar(goodTree(release)));
  const corrupt = Buffer.from(good);
  corrupt[Math.floor(corrupt.length / 2)]! ^= 0x55; // inside the compressed data: xz's CRC or its decoder refuses it
  const cases: Array<[string, Buffer, string[]]> = [
    ['corrupt', corrupt, []],
    ['bomb', await xzBomb('hidden-index', 256 * 1024 * 1024, release), ['--max-total-bytes', String(32 * 1024 * 1024)]],
  ];
  for (const [label, bytes, extra] of cases) {
    const archive = path.join(dir, `${label}.tar.xz`);
    await writeFile(archive, bytes);
    const cache = path.join(dir, `cache-${label}`);
    const { d, code } = await serveOnce(t, ['--decoder', 'xz', '--archive', archive, '--release', release, '--cache-dir', cache, '--btf', 'off', ...extra]);
    assert.ok(msgs(d).includes(STAGED), `${label}: ${msgs(d).join('\n')}`);
    const served = startFailure(d);
    const cli = await runCli(['ingest', '--archive', archive, '--release', release, '--cache-dir', path.join(dir, `cli-${label}`), '--btf', 'off', '--decoder', 'xz', '--log-level', 'warn', ...extra]);
    const want = label === 'corrupt' ? 'E_ARCHIVE_CORRUPT' : 'E_LIMIT';
    assert.equal(served.code, want, `${label}: ${served.message}`);
    assert.equal(code, ERRORS[want].exit, label);
    assert.equal(cli.code, ERRORS[want].exit, `${label}: ${cli.stderr}`);
    assert.ok(cli.stderr.includes(served.message), `${label}: serve said "${served.message}", ingest said "${cli.stderr}"`);
    assert.deepEqual(await readdir(path.join(cache, 'entries')), [], label);
    assert.deepEqual(await readdir(path.join(cache, 'tmp')), [], label);
  }
});

/** ~120 MiB of header-like text, xz'ed: long enough to decode (seconds) that a kill lands mid-pack. */
let bigRoot: string | undefined;
let big: Promise<{ archive: string; tarBytes: number; release: string }> | undefined;
after(async () => {
  if (bigRoot) await rm(bigRoot, { recursive: true, force: true });
});
function bigArchive(): Promise<{ archive: string; tarBytes: number; release: string }> {
  big ??= (async () => {
    bigRoot = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-daemon-xz-big-'));
    const release = '6.99.71-dxzbig';
    const tree = goodTree(release);
    for (let i = 0; i < 120; i++) tree.push({ name: `./include/big/part${String(i).padStart(3, '0')}.h`, content: textLike(1024 * 1024, 2000 + i) });
    const tar = await makeTar(tree);
    const archive = path.join(bigRoot, 'big.tar.xz');
    await writeFile(archive, await xzAsync(tar, 0));
    return { archive, tarBytes: tar.length, release };
  })();
  return big;
}

/** Until the staging's pack in `tmpDir` has grown past `minBytes` (the daemon's xz at work). */
async function growingPack(tmpDir: string, d: Daemon, minBytes: number): Promise<string> {
  const deadline = Date.now() + 120_000;
  while (Date.now() < deadline) {
    if (d.child.exitCode !== null) throw new Error(`serve ended before its pack could be caught growing:\n${msgs(d).join('\n')}`);
    const staging = (await readdir(tmpDir).catch(() => [] as string[])).find((n) => n.startsWith('ingest-'));
    const size = staging ? await stat(path.join(tmpDir, staging, PACK_FILE)).then((s) => s.size, () => 0) : 0;
    if (staging && size >= minBytes) return staging;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error('no growing pack appeared in tmp/');
}

test('serve killed (-9) while its own xz decodes: xz stops, nothing holds a file of tmp/, the lock is stale and the next start breaks it and builds', { timeout: 300_000 }, async (t) => {
  const b = await bigArchive();
  const dir = await tempDir(t, 'kheadersd-daemon-xz-kill-');
  const cache = path.join(dir, 'cache');
  const tmpDir = path.join(cache, 'tmp');
  const d = startServe(t, ['--archive', b.archive, '--release', b.release, '--cache-dir', cache, '--btf', 'off', '--decoder', 'xz', '--mount', 'off', '--http', '127.0.0.1:0', '--log-level', 'debug']);
  // Logged at once, but written when the start's lines are released (at ready, or 1 s in).
  await d.waitFor((l) => l.msg === STAGED, 'xz started in the daemon');
  await growingPack(tmpDir, d, 4 * 1024 * 1024);
  d.child.kill('SIGKILL');
  await d.exited;
  // xz's input is a pipe from the dead daemon: it meets the end of its input and exits; the
  // ingest process dies with its channel. A deadline for a hung process only, not a timing.
  let holders = await holdersUnder(tmpDir);
  for (let i = 0; i < 600 && holders.length > 0; i++) {
    await new Promise((r) => setTimeout(r, 50));
    holders = await holdersUnder(tmpDir);
  }
  assert.deepEqual(holders, [], 'a process still holds a file of the staging open 30 s after the daemon died');
  const lock = await readFile(path.join(cache, 'lock'), 'utf8');
  assert.equal(Number(lock.split(' ')[0]), d.child.pid, 'the lock the daemon held for its ingest process is left, naming the dead daemon');
  assert.deepEqual(await readdir(path.join(cache, 'entries')), []);

  const again = await serveOnce(t, ['--decoder', 'xz', '--archive', b.archive, '--release', b.release, '--cache-dir', cache, '--btf', 'off']);
  assert.equal(again.code, 0, msgs(again.d).join('\n'));
  assert.ok(again.d.logs.some((l) => l.msg === 'removed leftovers of an interrupted ingest'), msgs(again.d).join('\n'));
  assert.equal((await readdir(path.join(cache, 'entries'))).length, 1);
  assert.deepEqual(await readdir(tmpDir), []);
});

test('the ingest process killed while the daemon\'s xz decodes: the daemon kills xz and waits for it, reports E_KILLED, and the last good cache is as it was', { timeout: 300_000 }, async (t) => {
  const b = await bigArchive();
  const dir = await tempDir(t, 'kheadersd-daemon-xz-child-');
  const cache = path.join(dir, 'cache');
  const tmpDir = path.join(cache, 'tmp');
  // A good entry first, current.
  const first = path.join(dir, 'first.tar.xz');
  await writeFile(first, await goodArchive('6.99.72-first'));
  const r = await runCli(['ingest', '--archive', first, '--cache-dir', cache, '--btf', 'off', '--log-level', 'warn']);
  assert.equal(r.code, 0, r.stderr);
  const store = await CacheStore.open(cache);
  const before = { ids: await store.entryIds(), current: await store.currentId() };

  const d = startServe(t, ['--archive', b.archive, '--release', b.release, '--cache-dir', cache, '--btf', 'off', '--decoder', 'xz', '--mount', 'off', '--http', '127.0.0.1:0', '--log-level', 'debug']);
  const asked = await d.waitFor((l) => l.msg === 'building the entry in a child process', 'the ingest process to be asked', 120_000);
  await growingPack(tmpDir, d, 4 * 1024 * 1024);
  const childPid = Number(asked.ingestPid);
  process.kill(childPid, 'SIGKILL');
  assert.equal(await d.exited, ERRORS.E_KILLED.exit, msgs(d).join('\n'));
  // The daemon reported only once xz was gone: nothing holds the staging at its exit, at once.
  assert.deepEqual(await holdersUnder(tmpDir), []);
  assert.ok(d.logs.some((l) => l.code === 'E_KILLED' && String(l.msg).startsWith(`the ingest process (pid ${childPid}) was killed by SIGKILL`)), msgs(d).join('\n'));
  assert.deepEqual(await readdir(tmpDir), []);
  const after = await CacheStore.open(cache);
  assert.deepEqual({ ids: await after.entryIds(), current: await after.currentId() }, before);
  assert.equal(before.ids.length, 1);
  await after.load(before.ids[0]!); // intact: it still passes its checks
});

test('the archive changed between the daemon\'s read and the ingest process\'s: E_ARCHIVE_CHANGED, nothing committed, the staging and xz gone', async (t) => {
  const dir = await tempDir(t, 'kheadersd-daemon-xz-changed-');
  const release = '6.99.73-changed';
  const archive = path.join(dir, 'k.tar.xz');
  const bytes = await goodArchive(release);
  await writeFile(archive, bytes);
  const cacheDir = path.join(dir, 'cache');
  const xzBin = await findXzBinary();
  if (!xzBin) return t.skip('no xz on PATH');
  const cfg = resolveConfig({ flags: { cacheDir, archive, release, btf: 'off', decoder: 'xz' }, env: {}, file: {}, fileName: 'none' });
  const log = createLogger('silent');
  const io = { stdout: process.stdout, stderr: process.stderr, log };
  const child = startIngestProcess(cfg, io);
  // The daemon's side, as serve runs it, except that the archive is rewritten (other bytes, the
  // same release) between this process's read and the ingest process's: deterministically, by
  // rewriting it once the decode has been started here and before the ingest process is asked.
  const err = await ingest({
    cacheDir,
    archive,
    release,
    btf: 'off',
    decoder: 'xz',
    log,
    buildElsewhere: () => child.run(),
    buildStaged: async (staged) => {
      await writeFile(archive, await goodArchive(release, 'changed'));
      return child.runStaged(staged);
    },
  }).then(
    () => assert.fail('the ingest succeeded'),
    (e: unknown) => e as { code?: string; message: string },
  );
  assert.equal(err.code, 'E_ARCHIVE_CHANGED', err.message);
  const store = await CacheStore.open(cacheDir);
  assert.deepEqual(await store.entryIds(), []);
  assert.deepEqual(await readdir(store.tmpDir), []);
  assert.deepEqual(await holdersUnder(store.tmpDir), []);
});

test('serve stopped (SIGTERM) while its own xz decodes: xz and the ingest process killed and waited for, nothing staged or locked left, exit 0', { timeout: 300_000 }, async (t) => {
  const b = await bigArchive();
  const dir = await tempDir(t, 'kheadersd-daemon-xz-stop-');
  const cache = path.join(dir, 'cache');
  const tmpDir = path.join(cache, 'tmp');
  const d = startServe(t, ['--archive', b.archive, '--release', b.release, '--cache-dir', cache, '--btf', 'off', '--decoder', 'xz', '--mount', 'off', '--http', '127.0.0.1:0', '--log-level', 'debug']);
  const asked = await d.waitFor((l) => l.msg === 'building the entry in a child process', 'the ingest process to be asked', 120_000);
  await growingPack(tmpDir, d, 4 * 1024 * 1024);
  d.child.kill('SIGTERM');
  assert.equal(await d.exited, 0, msgs(d).join('\n'));
  assert.deepEqual(await holdersUnder(tmpDir), [], 'xz outlived the stop');
  assert.throws(() => process.kill(Number(asked.ingestPid), 0), /ESRCH/, 'the ingest process outlived the stop');
  assert.deepEqual(await readdir(tmpDir), []);
  assert.deepEqual(await readdir(path.join(cache, 'entries')), []);
  await assert.rejects(readFile(path.join(cache, 'lock')), /ENOENT/);
});

test('no ingest process can be started: the decode the daemon started is stopped, and the entry built in the daemon as before', async (t) => {
  const dir = await tempDir(t, 'kheadersd-daemon-xz-nospawn-');
  const release = '6.6.0-dxz-nospawn';
  const archive = path.join(dir, 'k.tar.xz');
  await writeFile(archive, await goodArchive(release));
  const cacheDir = path.join(dir, 'cache');
  if (!(await findXzBinary())) return t.skip('no xz on PATH');
  const cfg = resolveConfig({ flags: { cacheDir, archive, release, btf: 'off' }, env: {}, file: {}, fileName: 'none' });
  const log = createLogger('silent');
  const child = startIngestProcess(cfg, { stdout: process.stdout, stderr: process.stderr, log }, path.join(dir, 'no-such-node'));
  let staged = 0;
  const result = await ingest({
    cacheDir,
    archive,
    release,
    btf: 'off',
    decoder: 'xz',
    log,
    buildElsewhere: () => child.run(),
    buildStaged: (s) => {
      staged++;
      return child.runStaged(s);
    },
  });
  assert.equal(staged, 1, 'a decode was started here for the child');
  assert.equal(result.reused, false);
  assert.equal(result.decoder, 'xz');
  const store = await CacheStore.open(cacheDir);
  assert.equal((await store.list()).length, 1);
  assert.deepEqual(await readdir(store.tmpDir), []);
});

/** The pids of `parent`'s children running `comm` (from /proc/<pid>/stat). */
async function childrenNamed(parent: number, comm: string): Promise<number[]> {
  const found: number[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
    const close = stat.lastIndexOf(')');
    if (stat.slice(stat.indexOf('(') + 1, close) !== comm) continue;
    if (Number(stat.slice(close + 2).split(' ')[1]) === parent) found.push(Number(pid));
  }
  return found;
}

test('serve killed (-9) while its own xz decodes a bomb: xz dies with the ingest process, it does not decode on into tmp/ what it had buffered', { timeout: 300_000 }, async (t) => {
  // An xz bomb decodes hundreds of MiB from the few KiB a pipe buffers: an xz orphaned by the
  // daemon's death went on writing them into a staging nobody owns any more (measured: 52 MB
  // -> 1.45 GB in 5 s), where the ingest process's own xz (the old path) died with its group.
  const dir = await tempDir(t, 'kheadersd-daemon-xz-killbomb-');
  const release = '6.99.74-dxzbomb';
  const limit = 1024 * 1024 * 1024;
  const archive = path.join(dir, 'bomb.tar.xz');
  await writeFile(archive, await xzBomb('hidden-index', limit, release));
  const cache = path.join(dir, 'cache');
  const tmpDir = path.join(cache, 'tmp');
  const d = startServe(t, ['--archive', archive, '--release', release, '--cache-dir', cache, '--btf', 'off', '--decoder', 'xz', '--mount', 'off', '--http', '127.0.0.1:0', '--log-level', 'debug', '--max-total-bytes', String(limit)]);
  const asked = await d.waitFor((l) => l.msg === 'building the entry in a child process', 'the ingest process to be asked', 120_000);
  const staging = await growingPack(tmpDir, d, 16 * 1024 * 1024);
  const [xzPid] = await childrenNamed(d.child.pid!, 'xz');
  assert.ok(xzPid, 'the daemon runs xz');
  d.child.kill('SIGKILL');
  await d.exited;
  // Deadlines for a hung process only, not timings.
  for (let i = 0; i < 600 && isAlive(Number(asked.ingestPid)); i++) await new Promise((r) => setTimeout(r, 50));
  assert.equal(isAlive(Number(asked.ingestPid)), false, 'the ingest process outlived the daemon');
  for (let i = 0; i < 600 && isAlive(xzPid); i++) await new Promise((r) => setTimeout(r, 50));
  assert.equal(isAlive(xzPid), false, 'xz outlived the daemon by 30 s');
  const size = (await stat(path.join(tmpDir, staging, PACK_FILE))).size;
  assert.ok(size < limit / 2, `xz went on decoding after the daemon died: its pack reached ${size} bytes`);
});

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

test('the ingest process whose daemon is gone from its log pipe (EPIPE) kills the daemon\'s xz and dies, not left decoding by an uncaught write error', { timeout: 300_000 }, async (t) => {
  // A daemon killed -9 closes the ingest process's stdout as well as its channel, and the ingest
  // process often logs before it reads the channel's end: that write's EPIPE was an uncaught
  // error (exit 1) that skipped the kill of the daemon's xz, which decoded on (seen in ~1 of 3
  // kills of serve early in its first boot: 21 MB -> 400 MB). Here this process is the daemon,
  // alive, with the ingest process's stdout closed at once, so that its first log line fails.
  const plan = await planDecoder('xz');
  if (!('xz' in plan)) return t.skip('no xz on PATH');
  const dir = await tempDir(t, 'kheadersd-daemon-xz-epipe-');
  const release = '6.99.75-dxzepipe';
  const limit = 1024 * 1024 * 1024;
  const bytes = await xzBomb('hidden-index', limit, release);
  const archive = path.join(dir, 'bomb.tar.xz');
  await writeFile(archive, bytes);
  const cacheDir = path.join(dir, 'cache');
  await mkdir(path.join(cacheDir, 'tmp'), { recursive: true });
  const tmp = await mkdtemp(path.join(cacheDir, 'tmp', 'ingest-test-'));
  const pack = await open(path.join(tmp, PACK_FILE), 'a+', 0o644);
  const decoder = startXzIntoFile(bytes, plan.xz, { file: pack, maxBytes: limit }, { shell: plan.shell });
  await pack.close();
  t.after(() => decoder.abort());
  const identity = decoderIdentity(decoder);
  assert.ok(identity, 'xz has a pid and a start time');
  const cfg = resolveConfig({ flags: { cacheDir, archive, release, btf: 'off', decoder: 'xz', maxTotalBytes: String(limit) }, env: {}, file: {}, fileName: 'none' });
  const main = new URL('../src/commands/ingest-process-main.js', import.meta.url);
  const child = spawn(process.execPath, [main.pathname], { stdio: ['ignore', 'pipe', 'ignore', 'ipc'], detached: true });
  child.stdout!.destroy(); // the daemon's end of the log pipe: gone
  const request: IngestRequest = { cfg, logLevel: 'debug', staged: { tmp, digest: sha256(bytes), decoder: identity } };
  child.send(request);
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('exit', (c, s) => resolve([c, s])));
  assert.equal(signal, 'SIGKILL', `the ingest process ended with status ${code}, not by the kill that takes its daemon's xz with it`);
  const err = await decoder.done.then(
    () => assert.fail('xz decoded the whole bomb'),
    (e: unknown) => e as { code?: string; message: string },
  );
  assert.equal(err.code, 'E_KILLED', `xz was not killed by the ingest process: ${err.message}`);
});
