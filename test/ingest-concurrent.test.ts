/**
 * Several processes at one cache: two `kheadersd ingest` of the same archive, of two different
 * archives, with and without waiting for the lock, and an ingest while `serve` runs on the same
 * cache. Each archive ends up as one whole entry; a process that may not wait says E_LOCKED
 * and nothing stranger; the daemon keeps serving.
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { CacheStore } from '../src/store/cache.js';
import { goodTree, makeTar, runCli, sha256, tempDir, textLike, xzAsync, type RunResult } from './helpers/archives.js';
import { startServe } from './helpers/serve-child.js';

/** An archive big enough (~8 MiB of text) that two ingests of it overlap. */
async function archiveOf(dir: string, release: string): Promise<{ file: string; big: string }> {
  const big = textLike(8 * 1024 * 1024, release.length);
  const file = path.join(dir, `${release}.tar.xz`);
  await writeFile(file, await xzAsync(await makeTar([...goodTree(release), { name: './include/big.h', content: big }]), 0));
  return { file, big: sha256(big) };
}

function ingestCli(cacheDir: string, archive: string, extra: string[] = []): Promise<RunResult> {
  return runCli(['ingest', '--archive', archive, '--cache-dir', cacheDir, '--btf', 'off', '--json', '--keep', '10', ...extra]);
}

/** Every entry of the cache loads and its include/big.h reads back (through the verifying reader) as made. */
async function assertWholeEntries(cacheDir: string, expected: Map<string, string>): Promise<void> {
  const store = await CacheStore.open(cacheDir);
  const manifests = await store.list();
  assert.deepEqual(manifests.map((m) => m.release).sort(), [...expected.keys()].sort());
  for (const m of manifests) {
    const entry = await store.load(m.id);
    const node = entry.index.get('include/big.h');
    assert.ok(node);
    try {
      assert.equal(sha256(await entry.reader.readWhole(node.id)), expected.get(m.release));
    } finally {
      await entry.reader.close();
    }
  }
}

function assertOkOrLocked(r: RunResult, what: string): void {
  if (r.code === 0) return;
  assert.equal(r.code, 5, `${what}: exit ${r.code}: ${r.stderr}`);
  assert.match(r.stderr, /the cache is locked by process \d+/, what);
  assert.match(r.stderr, /"code":"E_LOCKED"/, what);
}

test('two ingests of the same archive at once: one entry, built once, both succeed', async (t) => {
  const dir = await tempDir(t);
  const a = await archiveOf(dir, '6.99.6-same');
  const cacheDir = path.join(dir, 'cache');
  const [r1, r2] = await Promise.all([ingestCli(cacheDir, a.file), ingestCli(cacheDir, a.file)]);
  assert.equal(r1.code, 0, r1.stderr);
  assert.equal(r2.code, 0, r2.stderr);
  const reused = [r1, r2].map((r) => (JSON.parse(r.stdout) as { reused: boolean }).reused).sort();
  assert.deepEqual(reused, [false, true], 'the second waited for the first and reused its entry');
  await assertWholeEntries(cacheDir, new Map([['6.99.6-same', a.big]]));
});

test('two ingests of different archives at once, waiting and not waiting for the lock: whole entries, or E_LOCKED', async (t) => {
  const dir = await tempDir(t);
  const a = await archiveOf(dir, '6.99.7-a');
  const b = await archiveOf(dir, '6.99.7-bb');
  const waiting = path.join(dir, 'waiting');
  const [r1, r2] = await Promise.all([ingestCli(waiting, a.file), ingestCli(waiting, b.file)]);
  assert.equal(r1.code, 0, r1.stderr);
  assert.equal(r2.code, 0, r2.stderr);
  await assertWholeEntries(waiting, new Map([['6.99.7-a', a.big], ['6.99.7-bb', b.big]]));

  const impatient = path.join(dir, 'impatient');
  const results = await Promise.all([ingestCli(impatient, a.file, ['--lock-timeout', '0']), ingestCli(impatient, b.file, ['--lock-timeout', '0'])]);
  results.forEach((r, i) => assertOkOrLocked(r, `ingest ${i}`));
  const expected = new Map<string, string>();
  if (results[0].code === 0) expected.set('6.99.7-a', a.big);
  if (results[1].code === 0) expected.set('6.99.7-bb', b.big);
  assert.ok(expected.size > 0, 'neither ingest got the lock');
  await assertWholeEntries(impatient, expected);
});

test('an ingest into the cache a running serve uses: a whole entry, and serve keeps answering', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const a = await archiveOf(dir, '6.99.8-served');
  const b = await archiveOf(dir, '6.99.8-added');
  const d = startServe(t, ['--archive', a.file, '--cache-dir', cacheDir, '--mount', 'off', '--http', '127.0.0.1:0', '--btf', 'off', '--no-modprobe']);
  try {
    const url = String((await d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen')).url);
    assert.equal((await fetch(`${url}/readyz`)).status, 200);
    const r = await ingestCli(cacheDir, b.file, ['--lock-timeout', '0']);
    assertOkOrLocked(r, 'ingest beside serve');
    assert.equal(r.code, 0, 'an idle serve should not hold the cache lock');
    await assertWholeEntries(cacheDir, new Map([['6.99.8-served', a.big], ['6.99.8-added', b.big]]));
    const served = await fetch(`${url}/v1/kernels/current/files/include/big.h`);
    assert.equal(served.status, 200);
    assert.equal(sha256(Buffer.from(await served.arrayBuffer())), a.big);
  } finally {
    await d.stop();
  }
});
