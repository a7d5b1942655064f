/**
 * Crash safety: an ingest process is kill -9ed while its pack is growing in <cache>/tmp, holding
 * the cache lock. A clean re-ingest afterwards must break the stale lock at once (even with
 * --lock-timeout 0), sweep the half-built entry, and produce a whole one; the entry cached
 * before the crash must not have changed.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createLogger } from '../src/log.js';
import { CacheStore } from '../src/store/cache.js';
import { PACK_FILE } from '../src/store/entry.js';
import { ingest } from '../src/store/ingest.js';
import { holdersUnder } from './helpers/open-files.js';
import { INGEST_CHILD, cleanEnv, goodTree, makeTar, runCli, sha256, snapshot, tempDir, textLike, xz, xzAsync } from './helpers/archives.js';

const silent = createLogger('silent');
const BIG_RELEASE = '6.99.8-big';
/** ~120 MiB of header-like text: long enough to decode (seconds) that the kill lands mid-pack. */
const FILES = 120;
const FILE_BYTES = 1024 * 1024;

interface Big {
  archive: string;
  tarSha256: string;
  tarBytes: number;
  files: Map<string, string>; // path -> sha256
}

let bigRoot: string | undefined;
let big: Promise<Big> | undefined;
after(async () => {
  if (bigRoot) await rm(bigRoot, { recursive: true, force: true });
});

function bigArchive(): Promise<Big> {
  big ??= (async () => {
    bigRoot = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-crash-'));
    const tree = goodTree(BIG_RELEASE);
    const files = new Map<string, string>();
    for (let i = 0; i < FILES; i++) {
      const content = textLike(FILE_BYTES, 1000 + i);
      const name = `include/big/part${String(i).padStart(3, '0')}.h`;
      files.set(name, sha256(content));
      tree.push({ name: `./${name}`, content });
    }
    const tarBytes = await makeTar(tree);
    const archive = path.join(bigRoot, 'big.tar.xz');
    await writeFile(archive, await xzAsync(tarBytes, 0));
    return { archive, tarSha256: sha256(tarBytes), tarBytes: tarBytes.length, files };
  })();
  return big;
}

/** Wait until an ingest-* dir in tmp holds a pack past `minBytes` and still growing; return its size. */
async function waitForGrowingPack(tmpDir: string, child: { exitCode: number | null; signalCode: string | null }, minBytes: number, deadlineMs = 120_000): Promise<{ dir: string; size: number }> {
  const deadline = Date.now() + deadlineMs;
  let last: { dir: string; size: number } | undefined;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`the ingest finished (exit ${child.exitCode}) before it could be caught mid-pack`);
    const names = await readdir(tmpDir).catch(() => [] as string[]);
    const dir = names.find((n) => n.startsWith('ingest-'));
    if (dir) {
      const size = await stat(path.join(tmpDir, dir, PACK_FILE)).then((s) => s.size, () => 0);
      if (last && last.dir === dir && size > last.size && last.size >= minBytes) return { dir, size };
      last = { dir, size };
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error('no growing pack appeared in tmp/');
}

for (const decoder of ['lzma-native', 'xz'] as const) {
  test(`kill -9 in the middle of an ingest (${decoder} decoder), then a clean re-ingest`, { timeout: 300_000 }, async (t) => {
    const b = await bigArchive();
    const dir = await tempDir(t);
    const cacheDir = path.join(dir, 'cache');
    const tmpDir = path.join(cacheDir, 'tmp');

    // An entry that exists before the crash, and must survive it untouched.
    const goodFile = path.join(dir, 'good.tar.xz');
    await writeFile(goodFile, xz(await makeTar(goodTree('6.99.0-before'))));
    const good = await ingest({ cacheDir, archive: goodFile, btf: 'off', log: silent });
    const before = await snapshot(good.entry.dir);

    // The xz decoder runs `xz` as a grandchild: the child leads its own process group so the
    // kill takes both, as a service manager's would. lzma-native has none: the kill is the pid's.
    const child = spawn(process.execPath, [INGEST_CHILD, cacheDir, b.archive, decoder], { stdio: ['ignore', 'pipe', 'pipe'], detached: decoder === 'xz', env: cleanEnv() });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (out += s));
    const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_code, signal) => resolve(signal)));
    t.after(() => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    });

    let caught: { dir: string; size: number };
    try {
      caught = await waitForGrowingPack(tmpDir, child, Math.min(24 * 2 ** 20, b.tarBytes / 4));
    } catch (err) {
      throw new Error(`${(err as Error).message}; child output:\n${out}`, { cause: err });
    }
    if (decoder === 'xz') process.kill(-child.pid!, 'SIGKILL');
    else process.kill(child.pid!, 'SIGKILL');
    assert.equal(await exited, 'SIGKILL');
    assert.ok(caught.size < b.tarBytes, `killed with ${caught.size} of ${b.tarBytes} bytes packed`);
    t.diagnostic(`killed with ${(caught.size / 2 ** 20).toFixed(1)} MiB of ${(b.tarBytes / 2 ** 20).toFixed(1)} MiB in the pack`);

    // What the crash left: a stale lock naming the dead process, and a half-built entry.
    const lock = await readFile(path.join(cacheDir, 'lock'), 'utf8');
    assert.equal(Number(lock.trim().split(' ')[0]), child.pid, 'the lock names the killed process');
    assert.ok((await readdir(tmpDir)).includes(caught.dir), 'the half-built entry is still in tmp/');
    const store = await CacheStore.open(cacheDir);
    assert.deepEqual((await store.list()).map((m) => m.id), [good.entry.manifest.id], 'no half entry is visible');

    // A clean re-ingest, refusing to wait for any live lock holder: the stale lock must be broken.
    const r = await runCli(['ingest', '--archive', b.archive, '--cache-dir', cacheDir, '--lock-timeout', '0', '--keep', '10', '--json', '--btf', 'off', '--decoder', decoder], {
      timeoutMs: 240_000,
    });
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout) as { release: string; reused: boolean; files: number };
    assert.equal(result.reused, false);
    assert.equal(result.release, BIG_RELEASE);
    assert.match(r.stderr, /removed leftovers of an interrupted ingest/);

    assert.deepEqual(await readdir(tmpDir), [], 'tmp was swept');
    assert.equal((await readdir(cacheDir)).includes('lock'), false, 'the lock was released');
    assert.deepEqual(await snapshot(good.entry.dir), before, 'the earlier entry is untouched');

    // The new entry is whole: its pack is the tar byte for byte, and every file reads back.
    const fresh = await CacheStore.open(cacheDir);
    const manifests = await fresh.list();
    assert.equal(manifests.length, 2);
    const m = manifests.find((x) => x.release === BIG_RELEASE)!;
    const entry = await fresh.load(m.id);
    assert.equal(m.files, FILES + 6);
    assert.equal(m.packBytes, b.tarBytes);
    const packFile = path.join(entry.dir, PACK_FILE);
    assert.equal((await stat(packFile)).size, b.tarBytes);
    const fh = await open(packFile, 'r');
    try {
      const hash = (await import('node:crypto')).createHash('sha256');
      const buf = Buffer.allocUnsafe(8 * 1024 * 1024);
      for (let pos = 0; pos < b.tarBytes; ) {
        const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
        hash.update(buf.subarray(0, bytesRead));
        pos += bytesRead;
      }
      assert.equal(hash.digest('hex'), b.tarSha256, 'the pack is the tar');
      for (const [name, digest] of b.files) {
        const node = entry.index.get(name)!;
        const data = Buffer.allocUnsafe(node.size);
        await fh.read(data, 0, node.size, node.offset);
        assert.equal(sha256(data), digest, name);
      }
    } finally {
      await fh.close();
    }
  });
}

test('kill -9 of the ingesting process alone (not its group): its xz child, which writes the pack itself, stops soon after', { timeout: 300_000 }, async (t) => {
  const b = await bigArchive();
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const tmpDir = path.join(cacheDir, 'tmp');
  const child = spawn(process.execPath, [INGEST_CHILD, cacheDir, b.archive, 'xz'], { stdio: ['ignore', 'pipe', 'pipe'], env: cleanEnv() });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (out += s));
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let caught: { dir: string; size: number };
  try {
    caught = await waitForGrowingPack(tmpDir, child, Math.min(8 * 2 ** 20, b.tarBytes / 8));
  } catch (err) {
    throw new Error(`${(err as Error).message}; child output:\n${out}`, { cause: err });
  }
  child.kill('SIGKILL'); // the pid only: xz is orphaned, still holding the pack open
  await exited;
  // xz's input is a pipe from the dead process: it reads what was in flight, meets the end of
  // its input and exits. A deadline for a hung xz only; never a timing assertion on the way.
  let holders = await holdersUnder(tmpDir);
  for (let i = 0; i < 600 && holders.length > 0; i++) {
    await new Promise((r) => setTimeout(r, 50));
    holders = await holdersUnder(tmpDir);
  }
  assert.deepEqual(holders, [], 'a process still holds a file of the staging directory open 30 s after the daemon died');
  const left = (await stat(path.join(tmpDir, caught.dir, PACK_FILE))).size;
  t.diagnostic(`killed at ${(caught.size / 2 ** 20).toFixed(1)} MiB; xz had written ${(left / 2 ** 20).toFixed(1)} MiB of ${(b.tarBytes / 2 ** 20).toFixed(1)} MiB when it stopped`);
  assert.ok(left < b.tarBytes, 'the orphaned xz did not decode the whole archive');
});
