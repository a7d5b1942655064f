/**
 * Memory at the entry limit: an archive of 200,000 entries (the default --max-entries) ingested
 * by the real CLI peaks under 150 MiB of RSS, and `cat` of one file in it stays small: it reads
 * only the index records on its path, never the whole index. Measured from the process itself
 * (VmHWM, printed at exit by helpers/peak-rss.js), not guessed.
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { CLI, END_OF_ARCHIVE, rawHeader, runProcess, tempDir, xzAsync } from './helpers/archives.js';

const ENTRIES = 200_000;
const MiB = 1024;
const PEAK_RSS = path.join(path.dirname(CLI), '../test/helpers/peak-rss.js');

/** ./, ./include/, then directories of 999 files each: exactly `count` members. */
function bigTar(count: number): Buffer {
  const parts: Buffer[] = [rawHeader({ name: './', typeflag: '5', mode: 0o755 }), rawHeader({ name: './include/', typeflag: '5', mode: 0o755 })];
  let members = 2;
  for (let d = 0; members < count; d++) {
    const dir = `./include/d${String(d).padStart(3, '0')}/`;
    parts.push(rawHeader({ name: dir, typeflag: '5', mode: 0o755 }));
    members++;
    for (let f = 0; f < 999 && members < count; f++, members++) parts.push(rawHeader({ name: `${dir}f${String(f).padStart(3, '0')}.h` }));
  }
  parts.push(END_OF_ARCHIVE);
  return Buffer.concat(parts);
}

async function peakKiB(args: string[]): Promise<{ kib: number; stdout: string; stderr: string; code: number | null }> {
  const r = await runProcess(process.execPath, ['--import', PEAK_RSS, CLI, ...args], { timeoutMs: 300_000 });
  const m = /^peak-rss-kib (\d+)$/m.exec(r.stderr);
  assert.ok(m, `no peak RSS reported: ${r.stderr.slice(-2000)}`);
  return { kib: Number(m[1]), stdout: r.stdout, stderr: r.stderr, code: r.code };
}

test(`ingest of a ${ENTRIES}-entry archive peaks under 150 MiB; cat of one file in it stays small`, { timeout: 600_000 }, async (t) => {
  const dir = await tempDir(t, 'kheadersd-200k-');
  const archive = path.join(dir, 'big.tar.xz');
  await writeFile(archive, await xzAsync(bigTar(ENTRIES), 0));
  const cache = path.join(dir, 'cache');

  const ingest = await peakKiB(['ingest', '--archive', archive, '--release', '6.99.9-big', '--cache-dir', cache, '--btf', 'off', '--log-level', 'warn', '--json']);
  assert.equal(ingest.code, 0, ingest.stderr);
  assert.equal((JSON.parse(ingest.stdout) as { files: number }).files, ENTRIES - 202);
  t.diagnostic(`ingest of ${ENTRIES} entries: peak RSS ${(ingest.kib / MiB).toFixed(1)} MiB`);
  assert.ok(ingest.kib < 150 * MiB, `ingest peaked at ${(ingest.kib / MiB).toFixed(1)} MiB`);

  const cat = await peakKiB(['cat', '6.99.9-big', 'include/d150/f500.h', '--cache-dir', cache]);
  assert.equal(cat.code, 0, cat.stderr);
  const missing = await peakKiB(['cat', '6.99.9-big', 'include/d150/nope.h', '--cache-dir', cache]);
  assert.equal(missing.code, 6); // not found
  const idle = await peakKiB(['--version']);
  t.diagnostic(`cat: peak RSS ${(cat.kib / MiB).toFixed(1)} MiB (the CLI printing --version: ${(idle.kib / MiB).toFixed(1)} MiB)`);
  // The whole index is ~11 MiB; loading it (let alone as objects) would show far above this.
  assert.ok(cat.kib - idle.kib < 24 * MiB, `cat used ${((cat.kib - idle.kib) / MiB).toFixed(1)} MiB more than an idle CLI`);
});
