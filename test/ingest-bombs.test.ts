/**
 * xz bombs whose announced size lies (see helpers/xz-bombs.ts), against both decoders, each
 * ingest in a process of its own: the limit must stop it with memory bounded (the process's
 * peak RSS, VmHWM) and without the pack in tmp/ ever growing past the limit. An unbounded decoder
 * reaches gigabytes here: the bombs expand to 2 GiB and the limit is 128 MiB.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { KheadersError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { CacheStore } from '../src/store/cache.js';
import { DECODER_MEMLIMIT_BYTES, type DecoderName } from '../src/store/decompress.js';
import { PACK_FILE } from '../src/store/entry.js';
import { ingest } from '../src/store/ingest.js';
import { INGEST_CHILD, cleanEnv, goodTree, makeTar, snapshot, tempDir, xz } from './helpers/archives.js';
import { BOMB_KINDS, xzBomb } from './helpers/xz-bombs.js';

const silent = createLogger('silent');
const LIMIT = 128 * 1024 * 1024;
const BOMB_BYTES = 2 * 1024 * 1024 * 1024;
/** Node and the daemon's code take ~50 MiB; a normal ingest of a kernel's headers peaks near 110 MiB. */
const PEAK_RSS_BOUND = 320 * 1024 * 1024;

interface ChildOutcome {
  event: 'done' | 'error';
  code?: string;
  message?: string;
  peakRssBytes: number;
  /** The largest pack seen in tmp/ while the child ran. */
  largestPack: number;
}

/** Run one ingest as a process, watching the size of every pack it grows in tmp/. */
async function ingestInChild(cacheDir: string, archive: string, decoder: DecoderName, maxTotalBytes: number): Promise<ChildOutcome> {
  const child = spawn(process.execPath, [INGEST_CHILD, cacheDir, archive, decoder, String(maxTotalBytes)], { stdio: ['ignore', 'pipe', 'pipe'], env: cleanEnv() });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (out += s));
  // A deadline for a hung child only (it is killed and the test fails); never a timing assertion.
  const killer = setTimeout(() => child.kill('SIGKILL'), 300_000);
  const exited = new Promise<void>((resolve) => child.on('close', () => resolve()));
  let running = true;
  void exited.then(() => (running = false));
  let largestPack = 0;
  const tmpDir = path.join(cacheDir, 'tmp');
  while (running) {
    for (const name of await readdir(tmpDir).catch(() => [] as string[])) {
      const size = await stat(path.join(tmpDir, name, PACK_FILE)).then((s) => s.size, () => 0);
      largestPack = Math.max(largestPack, size);
    }
    await new Promise((r) => setTimeout(r, 2));
  }
  await exited;
  clearTimeout(killer);
  const last = out
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as Record<string, unknown>)
    .find((e) => e.event === 'done' || e.event === 'error');
  assert.ok(last, `the ingest child ended without a result (killed after 300 s?):\n${out.slice(-2000)}`);
  return { ...(last as unknown as Omit<ChildOutcome, 'largestPack'>), largestPack };
}

async function cacheWithEntry(dir: string): Promise<{ cacheDir: string; entriesBefore: Awaited<ReturnType<typeof snapshot>> }> {
  const cacheDir = path.join(dir, 'cache');
  const good = path.join(dir, 'good.tar.xz');
  await writeFile(good, xz(await makeTar(goodTree('6.99.0-good'))));
  await ingest({ cacheDir, archive: good, btf: 'off', log: silent });
  return { cacheDir, entriesBefore: await snapshot(path.join(cacheDir, 'entries')) };
}

for (const decoder of ['xz', 'lzma-native'] as DecoderName[]) {
  for (const kind of BOMB_KINDS) {
    test(`xz bomb (${kind}, ${decoder} decoder): stopped at the limit, memory bounded, nothing past the limit written`, { timeout: 400_000 }, async (t) => {
      const dir = await tempDir(t);
      const { cacheDir, entriesBefore } = await cacheWithEntry(dir);
      const bomb = path.join(dir, `${kind}.tar.xz`);
      await writeFile(bomb, await xzBomb(kind, BOMB_BYTES));

      const r = await ingestInChild(cacheDir, bomb, decoder, LIMIT);
      t.diagnostic(`peak RSS ${(r.peakRssBytes / 2 ** 20).toFixed(0)} MiB; largest pack seen ${(r.largestPack / 2 ** 20).toFixed(0)} MiB`);
      assert.equal(r.event, 'error', `the bomb was accepted: ${JSON.stringify(r)}`);
      assert.equal(r.code, 'E_LIMIT', r.message);
      // Every stream's index is read up front: a multi-stream bomb is refused before a byte is decoded.
      const refusal = kind === 'multi-stream' ? `would expand to \\d+ bytes, over the limit of ${LIMIT} \\(--max-total-bytes\\)` : `expands past the limit of ${LIMIT} bytes \\(--max-total-bytes\\)`;
      assert.match(r.message ?? '', new RegExp(refusal));
      assert.ok(r.peakRssBytes < PEAK_RSS_BOUND, `peak RSS ${r.peakRssBytes} bytes, over ${PEAK_RSS_BOUND}`);
      assert.ok(r.largestPack <= LIMIT, `a pack of ${r.largestPack} bytes reached tmp/, past the ${LIMIT}-byte limit`);
      assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), [], 'tmp is empty');
      assert.equal((await readdir(cacheDir)).includes('lock'), false, 'the lock was released');
      assert.deepEqual(await snapshot(path.join(cacheDir, 'entries')), entriesBefore, 'the earlier entry is untouched');
    });
  }

  test(`an archive whose xz dictionary is larger than the decoder may allocate is E_LIMIT (${decoder} decoder)`, async (t) => {
    const dir = await tempDir(t);
    const { cacheDir, entriesBefore } = await cacheWithEntry(dir);
    const file = path.join(dir, 'big-dictionary.tar.xz');
    const tarBytes = await makeTar(goodTree('6.99.1-dict'));
    const { execFileSync } = await import('node:child_process');
    await writeFile(file, execFileSync('xz', ['--format=xz', '--check=crc64', '--lzma2=dict=256MiB', '-T1', '-c'], { input: tarBytes }));
    await assert.rejects(ingest({ cacheDir, archive: file, btf: 'off', decoder, log: silent }), (err: unknown) => {
      assert.ok(err instanceof KheadersError, String(err));
      assert.equal(err.code, 'E_LIMIT', err.message);
      assert.match(err.message, new RegExp(`more memory to decode than the ${DECODER_MEMLIMIT_BYTES / 2 ** 20} MiB allowed`));
      assert.equal(err.details.limit, 'decoderMemory');
      return true;
    });
    assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), []);
    assert.deepEqual(await snapshot(path.join(cacheDir, 'entries')), entriesBefore);
    // xz -9, the largest preset, still decodes.
    const nine = path.join(dir, 'preset-9.tar.xz');
    await writeFile(nine, xz(tarBytes, 9));
    const ok = await ingest({ cacheDir, archive: nine, btf: 'off', decoder, log: silent, keep: 10 });
    assert.equal(ok.entry.manifest.release, '6.99.1-dict');
    assert.equal((await (await CacheStore.open(cacheDir)).list()).length, 2);
  });
}
