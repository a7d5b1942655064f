/**
 * Run every benchmark in turn, each in its own process (so one's memory and mounts cannot skew
 * the next), and let each write its own section of BENCHMARKS.md.
 * Run: npm run bench          (or one: node dist/bench/<name>.js)
 */
import { spawn } from 'node:child_process';
import { access } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const BENCHES = ['ingest', 'tar-parse', 'fuse', 'http', 'btf'];

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
