/**
 * The HTTP catalog when an entry is rebuilt under it (a repair, a re-ingest by another process):
 * a request that serves the new copy while a refresh is still checking the old one must keep it.
 * The refresh used to drop "the entry of this id" rather than the old copy it had checked, so it
 * took the new copy out of the catalog (the next request made a third one) and released the old
 * reader twice; the new copy's files then stayed open after the catalog closed, for good.
 */
import assert from 'node:assert/strict';
import { readdir, readlink } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { Catalog } from '../src/serve/http/catalog.js';
import { DaemonState } from '../src/serve/state.js';
import { CacheStore } from '../src/store/cache.js';
import { ingestSynth, quietLog, removeDir, tempDir } from './helpers/http-env.js';

let work: string;
before(async () => {
  work = await tempDir('http-catalog-rebuilt');
});
after(async () => {
  await removeDir(work);
});

/** Files of the cache this process holds open. */
async function openCacheFiles(cacheDir: string): Promise<string[]> {
  const out: string[] = [];
  for (const fd of await readdir('/proc/self/fd')) {
    const target = await readlink(`/proc/self/fd/${fd}`).catch(() => '');
    if (target.startsWith(cacheDir + path.sep)) out.push(target);
  }
  return out;
}

test('a rebuilt entry served during a refresh stays the one served, and its files close with the catalog', async (t) => {
  if (process.platform !== 'linux') return t.skip('reads /proc/self/fd');
  const cacheDir = path.join(work, 'cache');
  const id = (await ingestSynth(cacheDir, work)).manifest.id;
  const store = await CacheStore.open(cacheDir);
  const state = new DaemonState();
  state.currentId = id;
  state.ready = true;
  const catalog = new Catalog(store, state, quietLog(), { bodyCacheBytes: 1 << 20, bodyCacheItemBytes: 1 << 16, gzipCacheBytes: 1 << 20 });
  try {
    // The race depends on which disk read finishes first: try it a few times.
    for (let round = 0; round < 10; round++) {
      const before = await catalog.byId(id);
      assert.ok(before);
      // Rebuilt on disk: same id, another instance.
      await store.remove(id);
      await ingestSynth(cacheDir, work);
      const serving = catalog.byId(id); // a request, with the snapshot still fresh
      await new Promise((resolve) => setImmediate(resolve));
      const [served] = await Promise.all([serving, catalog.refresh()]);
      assert.ok(served && served !== before, `round ${round}: the rebuilt copy is served`);
      assert.equal(await catalog.byId(id), served, `round ${round}: the refresh dropped the copy a request had just served`);
      await served.entry.reader.readWhole(served.lookup('include/linux/types.h'));
    }
  } finally {
    await catalog.close();
  }
  // Readers close their files once released (asynchronously).
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.deepEqual(await openCacheFiles(cacheDir), [], 'files of the cache left open after the catalog closed');
});

test('the catalog epoch (what the fast path remembers per URL is valid for) moves only when names may resolve differently', async () => {
  const cacheDir = path.join(work, 'cache-epoch');
  const first = (await ingestSynth(cacheDir, work, '6.66.1')).manifest.id;
  const store = await CacheStore.open(cacheDir);
  const state = new DaemonState();
  state.currentId = first;
  state.ready = true;
  const catalog = new Catalog(store, state, quietLog(), { bodyCacheBytes: 1 << 20, bodyCacheItemBytes: 1 << 16, gzipCacheBytes: 1 << 20 });
  try {
    assert.ok(await catalog.byRef('current'));
    const settled = catalog.epoch;
    // Refreshes that find the cache as it was (one a second under traffic) keep it.
    await catalog.refresh();
    await catalog.refresh();
    assert.equal(catalog.epoch, settled, 'a refresh that changed nothing moved the epoch');
    // Another entry in the cache: a release name or a digest prefix may now mean it.
    const second = (await ingestSynth(cacheDir, work, '6.66.2', 'b', false)).manifest.id;
    await catalog.refresh();
    const withSecond = catalog.epoch;
    assert.ok(withSecond > settled, 'a new entry did not move the epoch');
    // `current` moved.
    state.currentId = second;
    await catalog.refresh();
    assert.ok(catalog.epoch > withSecond, 'a new `current` did not move the epoch');
    assert.equal((await catalog.byRef('current'))?.entry.manifest.id, second);
  } finally {
    await catalog.close();
  }
});
