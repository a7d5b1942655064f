/**
 * The HTTP catalog's refresh while serving (at most once a second under traffic), and the first
 * serve of an entry by a request, read the cache through the thread pool, never with synchronous calls: those hold the one thread that answers
 * every other request (and the daemon's mount) for as long as the disk takes. The start's warm-up
 * keeps its synchronous reads (measured faster).
 *
 * Watched through node's own fs: its functions are wrapped (and the named imports of node:fs and
 * node:fs/promises re-bound to the wrappers with syncBuiltinESMExports), counting the calls that
 * name a path of the cache. Nothing of the daemon is replaced.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fsp, fsSync, watch } from './helpers/fs-watch.js';
import { ingestSynth, json, removeDir, request, startEnv, tempDir } from './helpers/http-env.js';

let work: string;
before(async () => {
  work = await tempDir('http-catalog-refresh');
});
after(async () => {
  await removeDir(work);
});

test('a refresh of the catalog while serving reads entries/, the manifests and `current` asynchronously, and finds what changed; so does the first serve of the new entry', async () => {
  const cacheDir = path.join(work, 'cache');
  await ingestSynth(cacheDir, work, '6.6.1-one');
  const env = await startEnv({ work, cacheDir });
  try {
    // The warm-up (synchronous, part of the start) is done once the first listing answers.
    const first = await request(env.port, '/v1/kernels');
    assert.deepEqual(
      json<Array<{ release: string }>>(first).map((k) => k.release),
      ['6.6.1-one'],
    );
    // Another process ingests meanwhile (in this one here, before the watch starts); and the
    // daemon has no `current` of its own yet, so the refresh reads the file too.
    await ingestSynth(cacheDir, work, '6.6.2-two', 'a', false);
    env.state.currentId = null;
    const sync = watch(fsSync, ['openSync', 'readdirSync', 'lstatSync', 'statSync', 'readFileSync', 'existsSync'], cacheDir);
    const async = watch(fsp, ['open', 'readdir', 'lstat', 'stat', 'readFile'], cacheDir);
    let after;
    let header;
    try {
      await new Promise((resolve) => setTimeout(resolve, 1100)); // past the snapshot's second
      after = await request(env.port, '/v1/kernels');
      // The new entry, first served by this request: its index and files are read on its path too.
      header = await request(env.port, '/v1/kernels/6.6.2-two/files/include/linux/types.h');
    } finally {
      sync.undo();
      async.undo();
    }
    assert.deepEqual(
      json<Array<{ release: string }>>(after)
        .map((k) => k.release)
        .sort(),
      ['6.6.1-one', '6.6.2-two'],
      'the refresh found the new entry',
    );
    assert.equal(header.status, 200, 'a header of the new entry is served');
    assert.deepEqual(sync.calls, [], 'synchronous calls on the cache during a request');
    for (const wanted of ['readdir entries', 'lstat entries', 'open current']) assert.ok(async.calls.includes(wanted), `${wanted} through the thread pool: ${async.calls.join(', ')}`);
    for (const file of ['manifest.json', 'index.bin']) {
      assert.ok(
        async.calls.some((c) => c.startsWith('open entries/6.6.2-two~') && c.endsWith(`/${file}`)),
        `the new entry's ${file} read through the thread pool: ${async.calls.join(', ')}`,
      );
    }
  } finally {
    await env.close();
  }
});
