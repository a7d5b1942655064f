/**
 * The swap storm, on both FUSE backends: 8 reader processes read `current/...` as fast as they
 * can while `current` flips between two builds of one release 30 times. The two builds differ in
 * bytes and in sizes. A reader must only ever see one whole build's file, with the size fstat
 * gives for it: never new bytes cut to an old size, never old bytes at a new size, never ESTALE
 * or EIO. (With libfuse2's path API this needs per-build paths: see index-model.ts.)
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { IndexFsModel } from '../src/serve/fuse/index-model.js';
import { mountFuse } from '../src/serve/fuse/index.js';
import type { CacheEntry } from '../src/store/entry.js';
import { fuseSkipReason, ingestTree, quietLog, removeDir, run, tempDir, type TarSpec } from './helpers/fuse-env.js';

const READERS = 8;
const SWAPS = 30;
const SWAP_EVERY_MS = 150;
const READER = path.join(path.dirname(fileURLToPath(import.meta.url)), 'helpers/storm-reader.js');

/** One build of release 1.0.0: `variant` decides every byte and the sizes of a.h and grow.h. */
function build(variant: 'one' | 'two'): TarSpec[] {
  const mtime = new Date('2024-01-01T00:00:00Z'); // the same in both builds, as KBUILD_BUILD_TIMESTAMP makes it
  const grow = Buffer.alloc(variant === 'one' ? 200 * 1024 : 260 * 1024, variant === 'one' ? 0x31 : 0x32);
  const same = Buffer.alloc(300 * 1024);
  for (let i = 0; i < same.length; i++) same[i] = (i * 7 + (variant === 'one' ? 1 : 2)) & 0xff;
  return [
    { name: './', type: 'directory', mtime },
    { name: './include/', type: 'directory', mtime },
    { name: './include/linux/', type: 'directory', mtime },
    { name: './include/linux/a.h', content: (variant === 'one' ? 'one\n' : 'two!\n').repeat(1000), mtime },
    { name: './include/linux/grow.h', content: grow, mtime },
    { name: './include/linux/same-size.bin', content: same, mtime },
    { name: './include/generated/', type: 'directory', mtime },
    { name: './include/generated/utsrelease.h', content: '#define UTS_RELEASE "1.0.0"\n', mtime },
  ];
}

const FILES = ['include/linux/a.h', 'include/linux/grow.h', 'include/linux/same-size.bin'];

function digestOf(tree: TarSpec[], file: string): string {
  const content = tree.find((e) => e.name === `./${file}`)!.content!;
  return createHash('sha256').update(content).digest('hex');
}

interface StormResult {
  reads: number;
  wrong: number;
  errors: Record<string, number>;
  examples: string[];
}

describe('swap storm: 8 readers, 30 swaps of one release between two builds', () => {
  let skip: string | undefined;
  let cache: string;
  let work: string;
  let A: CacheEntry;
  let A2: CacheEntry;

  before(async () => {
    skip = await fuseSkipReason();
    if (skip) return;
    cache = await tempDir('storm-cache');
    work = await tempDir('storm-work');
    A = await ingestTree(cache, work, build('one'), '1.0.0');
    A2 = await ingestTree(cache, work, build('two'), '1.0.0');
  });
  after(async () => {
    if (skip) return;
    await removeDir(cache);
    await removeDir(work);
  });

  for (const backend of ['kernel', 'native'] as const) {
    test(`${backend} backend: every read is one whole build, sized as fstat says; no ESTALE, no EIO`, { timeout: 300_000 }, async (t) => {
      if (skip) return t.skip(skip);
      const model = new IndexFsModel({ log: quietLog() });
      model.setEntries([A, A2], A.manifest.id);
      let mount;
      try {
        mount = await mountFuse({ mountpoint: path.join(work, `mnt-${backend}`), model, log: quietLog(), backend });
      } catch (err) {
        await model.close();
        if (backend === 'native') return t.skip(`fuse-native cannot mount here: ${(err as Error).message}`);
        throw err;
      }
      const stop = path.join(work, `stop-${backend}`);
      try {
        const specs = FILES.map((f) => `${path.join(mount.mountpoint, 'current', f)}=${digestOf(build('one'), f)},${digestOf(build('two'), f)}`);
        const readers = Array.from({ length: READERS }, () => run(process.execPath, [READER, stop, ...specs], { timeoutMs: 240_000 }));
        for (let i = 1; i <= SWAPS; i++) {
          await new Promise((r) => setTimeout(r, SWAP_EVERY_MS));
          model.setEntries([A, A2], (i % 2 === 1 ? A2 : A).manifest.id);
        }
        await new Promise((r) => setTimeout(r, SWAP_EVERY_MS));
        await writeFile(stop, '');
        const results = (await Promise.all(readers)).map((r) => {
          assert.equal(r.code, 0, r.stderr);
          return JSON.parse(r.stdout.trim()) as StormResult;
        });
        const reads = results.reduce((n, r) => n + r.reads, 0);
        const wrong = results.reduce((n, r) => n + r.wrong, 0);
        const errors: Record<string, number> = {};
        for (const r of results) for (const [k, v] of Object.entries(r.errors)) errors[k] = (errors[k] ?? 0) + v;
        t.diagnostic(`${backend}: ${reads} whole-file reads across ${SWAPS} swaps, ${wrong} wrong, errors ${JSON.stringify(errors)}`);
        assert.equal(wrong, 0, `reads that were no whole build: ${results.flatMap((r) => r.examples).join('; ')}`);
        assert.deepEqual(errors, {}, 'no ESTALE, no EIO, nothing');
        assert.ok(reads >= READERS * 10, `the readers really read (${reads})`);
      } finally {
        await mount.unmount();
        await model.close();
      }
    });
  }
});
