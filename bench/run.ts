/**
 * Run every benchmark in turn, each in its own process (so one's memory and mounts cannot skew
 * the next), and let each write its own section of BENCHMARKS.md.
 * Run: npm run bench          (some: npm run bench -- footprint http; or node dist/bench/<name>.js)
 */
import { spawn } from 'node:child_process';
import { access } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const ALL = ['ingest', 'tar-parse', 'fuse', 'http', 'btf', 'footprint', 'floors', 'vm-footprint'];
const asked = process.argv.slice(2);
const unknown = asked.filter((name) => !ALL.includes(name));
if (unknown.length > 0) throw new Error(`no bench ${unknown.join(', ')}; the benches are ${ALL.join(', ')}`);
const BENCHES = asked.length > 0 ? asked : ALL;

let failed = 0;
for (const name of BENCHES) {
  const file = path.join(here, `${name}.js`);
  try {
    await access(file);
  } catch {
    continue;
  }
  console.log(`\n=== bench ${name}`);
  const code = await new Promise<number>((resolve) => {
    spawn(process.execPath, [file], { stdio: 'inherit' }).on('close', (c) => resolve(c ?? 1));
  });
  if (code !== 0) {
    failed++;
    console.log(`bench ${name} failed with status ${code}`);
  }
}
process.exitCode = failed > 0 ? 1 : 0;
