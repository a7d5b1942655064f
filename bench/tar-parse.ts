/**
 * Why ingest parses tar headers itself instead of using tar-stream's extract: both walk the
 * same decompressed fixture from memory (no I/O, no xz), so only the parsing cost differs.
 * Run: npm run build && node dist/bench/tar-parse.js
 */
import { execFile } from 'node:child_process';
import { access } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import tar from 'tar-stream';
import { TarIndexer } from '../src/store/tar-indexer.js';
import { machineLine, median, writeSection } from './report.js';

const FIXTURE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../shared/fixtures/kheaders-6.1-x86_64.tar.xz');
const RUNS = 7;

function chunks(buf: Buffer, size: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < buf.length; i += size) out.push(buf.subarray(i, i + size));
  return out;
}

async function withTarStream(parts: Buffer[]): Promise<number> {
  const extract = tar.extract();
  let entries = 0;
  const done = new Promise<void>((resolve, reject) => {
    extract.on('entry', (_h, stream, next) => {
      entries++;
      stream.on('end', () => next());
      stream.resume(); // every entry must be drained (see shared notes)
    });
    extract.on('finish', resolve);
    extract.on('error', reject);
  });
  for (const p of parts) extract.write(p);
  extract.end(Buffer.alloc(0));
  await done;
  return entries;
}

function withIndexer(parts: Buffer[]): number {
  const ix = new TarIndexer();
  for (const p of parts) ix.push(p);
  return ix.finish().length;
}

async function time(fn: () => Promise<number> | number): Promise<{ ms: number; entries: number }> {
  const t0 = performance.now();
  const entries = await fn();
  return { ms: performance.now() - t0, entries };
}

async function main(): Promise<void> {
  try {
    await access(FIXTURE);
  } catch {
    console.log(`fixture ${FIXTURE} not present: nothing to measure`);
    return;
  }
  const { stdout } = await promisify(execFile)('xz', ['-dc', FIXTURE], { encoding: 'buffer', maxBuffer: 1 << 30 });
  const small = chunks(stdout, 64 * 1024);
  const large = chunks(stdout, 1024 * 1024);
  const results: Record<string, number[]> = { 'tar-stream extract (64 KiB chunks)': [], 'TarIndexer (64 KiB chunks)': [], 'TarIndexer (1 MiB chunks)': [] };
  let entries = 0;
  for (let i = 0; i < RUNS; i++) {
    const a = await time(() => withTarStream(small));
    const b = await time(() => withIndexer(small));
    const c = await time(() => withIndexer(large));
    results['tar-stream extract (64 KiB chunks)']!.push(a.ms);
    results['TarIndexer (64 KiB chunks)']!.push(b.ms);
    results['TarIndexer (1 MiB chunks)']!.push(c.ms);
    if (a.entries !== b.entries || b.entries !== c.entries) throw new Error(`entry counts differ: ${a.entries} ${b.entries} ${c.entries}`);
    entries = a.entries;
  }
  const ref = median(results['tar-stream extract (64 KiB chunks)']!);
  const rows = Object.entries(results).map(([name, xs]) => `| ${name} | ${median(xs).toFixed(1)} ms | ${(median(xs) / ref).toFixed(3)} |`);
  const md = [
    '## Tar parsing: tar-stream extract vs the ingest indexer',
    '',
    `Parsing the decompressed fixture (${(stdout.length / 2 ** 20).toFixed(1)} MiB, ${entries} entries) from memory; median of ${RUNS} runs. ${machineLine()}.`,
    '',
    '| parser | time | ratio to tar-stream |',
    '| --- | --- | --- |',
    ...rows,
    '',
    'Reproduce: `npm run build && node dist/bench/tar-parse.js`',
  ].join('\n');
  await writeSection('tar-parse', md);
  console.log(md);
}

await main();
