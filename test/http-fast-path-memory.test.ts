/**
 * What the fast path remembers per URL stays small whatever clients send. It remembers resolved
 * file URLs by their raw text (a fleet asks for the same few hundred headers), up to 4,096 of
 * them; the query string changes nothing in the answer, yet a URL with a 15 KiB query was
 * remembered like any other, so 4,096 such requests held ~60 MiB in the daemon until the next
 * 4,096 (the body caches, by comparison, are bounded at 24 MiB together). And what it remembered
 * for an entry kept that entry (index, reader) alive after it left the cache, for as long as
 * nobody asked for the same URL again: remembered answers of an earlier catalog epoch are never
 * used, so they are forgotten.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import path from 'node:path';
import { after, before, test } from 'node:test';
import v8 from 'node:v8';
import vm from 'node:vm';
import { startHttpServer, type HttpServerHandle } from '../src/serve/http/server.js';
import { DaemonState } from '../src/serve/state.js';
import { CacheStore } from '../src/store/cache.js';
import { ingestSynth, quietLog, removeDir, request, tempDir } from './helpers/http-env.js';

let work: string;
let server: HttpServerHandle;

before(async () => {
  work = await tempDir('http-fast-path-memory');
  const cacheDir = path.join(work, 'cache');
  await ingestSynth(cacheDir, work);
  const store = await CacheStore.open(cacheDir);
  const state = new DaemonState();
  state.currentId = await store.currentId();
  state.ready = true;
  server = await startHttpServer({ listen: { host: '127.0.0.1', port: 0 }, store, state, log: quietLog() });
});

after(async () => {
  await server?.close();
  await removeDir(work);
});

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

function heapAfterGc(): number {
  gc();
  gc();
  return process.memoryUsage().heapUsed;
}

test('file URLs with long query strings are answered but not remembered', async () => {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const file = '/v1/kernels/current/files/include/linux/types.h';
  const padding = 'q'.repeat(15 * 1024);
  const urls = 1500;
  try {
    assert.equal((await request(server.port, file, { agent })).status, 200);
    const before = heapAfterGc();
    for (let i = 0; i < urls; i++) {
      const res = await request(server.port, `${file}?${i}=${padding}`, { agent });
      assert.equal(res.status, 200);
    }
    const grown = heapAfterGc() - before;
    // Remembered, the URLs alone are 1500 x 15 KiB = 22 MiB.
    assert.ok(grown < 8 * 1024 * 1024, `the heap grew by ${(grown / 1048576).toFixed(1)} MiB over ${urls} long URLs`);
  } finally {
    agent.destroy();
  }
  assert.equal(server.fastify, 'not loaded', 'the fast path answered them');
});

test('an entry that left the cache is not kept in memory by the URLs the fast path remembered for it', async () => {
  const cacheDir = path.join(work, 'cache-evicted');
  const gone = await ingestSynth(cacheDir, work, '6.5.0-old', 'b', false);
  await ingestSynth(cacheDir, work);
  const store = await CacheStore.open(cacheDir);
  const state = new DaemonState();
  state.currentId = await store.currentId();
  state.ready = true;
  const own = await startHttpServer({ listen: { host: '127.0.0.1', port: 0 }, store, state, log: quietLog() });
  try {
    const blobUrl = `/v1/blobs/${gone.manifest.digest}/files/include/linux/sched.h`;
    assert.equal((await request(own.port, blobUrl)).status, 200);
    // The instance the server's catalog serves is the store's (one per entry).
    const weak = new WeakRef(await store.load(gone.manifest.id));
    await store.remove(gone.manifest.id); // as `gc --keep` evicts it
    // Past the catalog's snapshot age, a request refreshes it: the entry is dropped.
    await new Promise((resolve) => setTimeout(resolve, 1100));
    assert.equal((await request(own.port, '/v1/kernels/current/files/include/linux/types.h')).status, 200);
    assert.equal((await request(own.port, '/v1/kernels/current/files/include/linux/sched.h')).status, 200);
    for (let i = 0; i < 5 && weak.deref() !== undefined; i++) {
      await new Promise((resolve) => setImmediate(resolve));
      gc();
    }
    assert.equal(weak.deref(), undefined, 'the evicted entry (its index, its reader) is still referenced');
  } finally {
    await own.close();
  }
});
