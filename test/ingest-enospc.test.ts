/**
 * A full disk at every step of an ingest, on a small real tmpfs, in one long-lived process as the
 * daemon is: the free space is set page by page from none to enough, and one ingest runs at each
 * level. Every failure must be E_NO_SPACE naming the step it stopped at, and leave no file of the
 * mount open in this process (a deleted file held open keeps its space), every page given back
 * (statfs), tmp/ empty, the lock free and the earlier entry as it was. The first level with
 * enough space must succeed.
 */
import assert from 'node:assert/strict';
import { readdir, readFile, readlink, rm, stat, statfs, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { KheadersError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { parseCurrentPointer } from '../src/store/cache.js';
import type { DecoderName } from '../src/store/decompress.js';
import { ingest, type IngestResult, type IngestStep } from '../src/store/ingest.js';
import { goodTree, makeTar, snapshot, tempDir, xz } from './helpers/archives.js';
import { BtfBuilder } from './helpers/btf-builder.js';
import { mountTmpfs } from './helpers/tmpfs.js';

const silent = createLogger('silent');
/** Every step that writes, in the order an ingest reaches them ('cache' is the lock file). */
const STEPS: readonly IngestStep[] = ['cache', 'archive', 'pack', 'vmlinux.h', 'index', 'manifest', 'current'];

/** The files of `dir` this process holds open, as "fd -> path". */
async function openUnder(dir: string): Promise<string[]> {
  const held: string[] = [];
  for (const fd of await readdir('/proc/self/fd')) {
    const target = await readlink(`/proc/self/fd/${fd}`).catch(() => '');
    if (target.startsWith(dir + '/')) held.push(`${fd} -> ${target}`);
  }
  return held;
}

async function freeBlocks(dir: string): Promise<number> {
  return (await statfs(dir)).bavail;
}

/** Blocks held by the files under `dir` (tmpfs allocates whole pages). */
async function blocksUnder(dir: string, blockSize: number): Promise<number> {
  let blocks = 0;
  for (const name of await readdir(dir, { recursive: true })) {
    const st = await stat(path.join(dir, name));
    if (st.isFile()) blocks += Math.ceil((st.blocks * 512) / blockSize);
  }
  return blocks;
}

for (const decoder of ['xz', 'lzma-native'] as DecoderName[]) {
  test(`a full disk at every step of an ingest releases everything, and the next ingest works (${decoder} decoder)`, { timeout: 300_000 }, async (t) => {
    const mounted = await mountTmpfs(t, '4m');
    if ('skip' in mounted) return t.skip(mounted.skip);
    const mnt = mounted.dir;
    const work = await tempDir(t);
    const cacheDir = path.join(mnt, 'cache');
    const filler = path.join(mnt, 'filler');
    const blockSize = (await statfs(mnt)).bsize;

    const first = path.join(work, 'first.tar.xz');
    await writeFile(first, xz(await makeTar(goodTree('6.99.0-first'))));
    const good = await ingest({ cacheDir, archive: first, btf: 'off', setCurrent: true, log: silent });
    const entriesBefore = await snapshot(path.join(cacheDir, 'entries'));
    const currentBefore = await readFile(path.join(cacheDir, 'current'), 'utf8');

    // The archive to ingest, with BTF so that vmlinux.h is one of the files written.
    const archive = path.join(work, 'next.tar.xz');
    await writeFile(archive, xz(await makeTar(goodTree('6.99.1-next'))));
    const btf = new BtfBuilder();
    btf.struct('task_struct', 8, [{ name: 'pid', type: btf.int('int', 4, { signed: true }), bitOffset: 0 }]);
    const btfFile = path.join(work, 'vmlinux.btf');
    await writeFile(btfFile, btf.build());

    const seen = new Map<IngestStep, number[]>();
    let result: IngestResult | undefined;
    let previousStep: IngestStep | undefined;
    for (let level = 0; level < 1000 && !result; level++) {
      await rm(filler, { force: true });
      const available = await freeBlocks(mnt);
      assert.ok(available >= level, `the tmpfs has ${available} free blocks, fewer than ${level}`);
      await writeFile(filler, Buffer.alloc((available - level) * blockSize));
      assert.equal(await freeBlocks(mnt), level, 'the filler leaves exactly the blocks asked for');

      try {
        result = await ingest({ cacheDir, archive, btf: btfFile, decoder, setCurrent: true, keep: 10, log: silent });
        break;
      } catch (err) {
        assert.ok(err instanceof KheadersError, `level ${level}: ${String(err)}`);
        assert.equal(err.code, 'E_NO_SPACE', `level ${level}: ${err.message}`);
        assert.match(err.message, /the cache filesystem is full \(ENOSPC\)/);
        const step = err.details.step as IngestStep;
        assert.ok(STEPS.includes(step), `level ${level}: unknown step ${String(step)}`);
        seen.set(step, [...(seen.get(step) ?? []), level]);
        previousStep = step;
      }
      const label = `level ${level} (${previousStep})`;
      assert.deepEqual(await openUnder(mnt), [], `${label}: no file of the cache is left open`);
      assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), [], `${label}: tmp is empty`);
      assert.equal((await readdir(cacheDir)).includes('lock'), false, `${label}: the lock was released`);
      if (previousStep === 'current') {
        // The entry was made; only the pointer could not move. Every other block came back.
        const made = (await readdir(path.join(cacheDir, 'entries'))).filter((id) => id !== good.entry.manifest.id);
        assert.equal(made.length, 1, `${label}: the new entry exists`);
        assert.equal(await freeBlocks(mnt), level - (await blocksUnder(path.join(cacheDir, 'entries', made[0]!), blockSize)), `${label}: every block but the entry's came back`);
        assert.equal(await readFile(path.join(cacheDir, 'current'), 'utf8'), currentBefore, `${label}: current still names the earlier entry`);
      } else {
        assert.equal(await freeBlocks(mnt), level, `${label}: every block came back`);
        assert.deepEqual(await snapshot(path.join(cacheDir, 'entries')), entriesBefore, `${label}: the earlier entry is untouched`);
      }
    }
    t.diagnostic(`failing levels (free blocks) per step: ${JSON.stringify(Object.fromEntries(seen))}`);
    assert.ok(result, 'no level up to 1000 blocks was enough');
    for (const step of STEPS) assert.ok(seen.has(step), `no level stopped at ${step}: ${JSON.stringify(Object.fromEntries(seen))}`);
    // Space came back and the ingest went through; after a failure at `current` it reuses the entry.
    assert.equal(result.reused, previousStep === 'current');
    assert.equal(result.entry.manifest.release, '6.99.1-next');
    assert.notEqual(result.entry.manifest.btf, null, 'vmlinux.h is in the entry');
    assert.equal(parseCurrentPointer(await readFile(path.join(cacheDir, 'current'), 'utf8'))?.id, result.entry.manifest.id);
    assert.deepEqual(await openUnder(mnt), []);
  });
}
