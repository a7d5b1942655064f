/**
 * The floors under the start-up and ingest goals: the least any program built from the same parts
 * can take, measured beside kheadersd in the same run.
 *
 * - Start-up (spawn → the first HTTP 200, polled every 2 ms): node listening on node:http; that
 *   after reading and sha256-ing the archive (the cache key); that with pino (the chosen logger)
 *   logging one line; then `kheadersd serve` with the entry cached, no mount. (A cached start of
 *   kheadersd recalls the digest of an unchanged source and loads pino once ready: its floor is
 *   the node:http row plus its own work.)
 * - Ingest (whole process): `xz -dc` > /dev/null; a node program doing only what a crash-safe
 *   ingest cannot skip (`xz -dc` into a file while it reads and hashes the archive, fdatasync);
 *   `kheadersd ingest` into an empty cache.
 * - First boot (spawn → the first HTTP 200, empty cache): the goal (`node -e 0` + 1.3 × `xz -dc`);
 *   the ingest floor program then listening on node:http; `kheadersd serve` on an empty cache.
 *
 * Every process runs under SCHED_FIFO when `chrt` allows it (root), so other load on a shared
 * machine steals less of the figures; the runs are interleaved round by round.
 * Run: npm run build && node dist/bench/floors.js [--runs N] [--no-write]
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI, goodArchive } from '../test/helpers/archives.js';
import { freePort, statusOf } from './probe.js';
import { envNote, machineLine, median, useDeviceLikeEnvironment, writeSection } from './report.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const FIXTURE = path.resolve(REPO, '../shared/fixtures/kheaders-6.1-x86_64.tar.xz');
const argv = process.argv.slice(2);
const RUNS = Number(argv[argv.indexOf('--runs') + 1] ?? 0) || 10;
const WRITE = !argv.includes('--no-write');

/** The floor programs, written to the run's temp dir; each takes its port (or paths) as arguments. */
const PROGRAMS = {
  listen: `import http from 'node:http';
http.createServer((q, r) => r.end('ok')).listen(+process.argv[2], '127.0.0.1');
process.on('SIGTERM', () => process.exit(0));`,
  hash: `import { readFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import http from 'node:http';
createHash('sha256').update(await readFile(process.argv[3])).digest('hex');
http.createServer((q, r) => r.end('ok')).listen(+process.argv[2], '127.0.0.1');
process.on('SIGTERM', () => process.exit(0));`,
  pino: `import { createRequire } from 'node:module';
import { readFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import http from 'node:http';
const { pino } = createRequire(process.argv[4])('pino');
const log = pino({ base: { name: 'kheadersd' }, timestamp: pino.stdTimeFunctions.isoTime });
log.info({ sha256: createHash('sha256').update(await readFile(process.argv[3])).digest('hex') }, 'hashed');
http.createServer((q, r) => r.end('ok')).listen(+process.argv[2], '127.0.0.1');
process.on('SIGTERM', () => process.exit(0));`,
  // xz starts first, the archive is read and hashed while it decodes (what the cache key costs
  // overlaps it); then the one flush a crash-safe cache cannot skip. Hashing first was 50 ms
  // slower here: the least such a program takes is this order.
  ingest: `import { readFile, open } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { spawn } from 'node:child_process';
const [archive, out] = process.argv.slice(2);
const fh = await open(out, 'w');
const xz = spawn('xz', ['-dc', archive], { stdio: ['ignore', fh.fd, 'inherit'] });
const closed = new Promise((r) => xz.on('close', r));
createHash('sha256').update(await readFile(archive)).digest('hex');
const code = await closed;
await fh.datasync();
await fh.close();
process.exitCode = code;`,
  // A first boot: the same ingest, then node:http listening (what /readyz waits for).
  firstBoot: `import { readFile, open } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { spawn } from 'node:child_process';
import http from 'node:http';
const [port, archive, out] = process.argv.slice(2);
const fh = await open(out, 'w');
const xz = spawn('xz', ['-dc', archive], { stdio: ['ignore', fh.fd, 'inherit'] });
const closed = new Promise((r) => xz.on('close', r));
createHash('sha256').update(await readFile(archive)).digest('hex');
if ((await closed) !== 0) process.exit(1);
await fh.datasync();
await fh.close();
http.createServer((q, r) => r.end('ok')).listen(+port, '127.0.0.1');
process.on('SIGTERM', () => process.exit(0));`,
};

/** SCHED_FIFO for what is measured, when allowed: less of other load in the figures. */
const FIFO = spawnSync('chrt', ['-f', '10', 'true']).status === 0 ? ['chrt', '-f', '10'] : [];
const wrap = (cmd: string[]): [string, string[]] => {
  const all = [...FIFO, ...cmd];
  return [all[0]!, all.slice(1)];
};

/** Spawn → the first 200; then SIGTERM and wait for the end. */
async function toFirst200(cmd: (port: number) => string[]): Promise<number> {
  const port = await freePort();
  const started = performance.now();
  const [file, args] = wrap(cmd(port));
  const child = spawn(file, args, { stdio: ['ignore', 'ignore', 'inherit'] });
  const deadline = started + 60_000;
  while ((await statusOf(`http://127.0.0.1:${port}/readyz`)) !== 200) {
    if (child.exitCode !== null) throw new Error(`${cmd(port).join(' ')} exited ${child.exitCode}`);
    if (performance.now() > deadline) throw new Error(`${cmd(port).join(' ')} answered nothing in 60 s`);
    await new Promise((r) => setTimeout(r, 2));
  }
  const ms = performance.now() - started;
  const closed = new Promise((r) => child.once('close', r));
  child.kill('SIGTERM');
  await closed;
  return ms;
}

/** A whole process, spawn → exit (status 0 required). */
async function whole(cmd: string[]): Promise<number> {
  const started = performance.now();
  const [file, args] = wrap(cmd);
  const code = await new Promise<number | null>((resolve) => spawn(file, args, { stdio: 'ignore' }).on('close', resolve));
  if (code !== 0) throw new Error(`${cmd.join(' ')} exited ${code}`);
  return performance.now() - started;
}

async function main(): Promise<void> {
  const droppedEnv = useDeviceLikeEnvironment();
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
  const root = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-bench-floors-'));
  try {
    let archive = FIXTURE;
    let label = 'the real fixture kheaders-6.1-x86_64.tar.xz (3.8 MiB, 30.1 MiB uncompressed)';
    let release = '6.1.192';
    if (!existsSync(FIXTURE)) {
      archive = path.join(root, 'generated.tar.xz');
      release = '6.6.0-bench';
      await writeFile(archive, await goodArchive(release));
      label = `the tests' generated archive (the fixture ${FIXTURE} is not present)`;
    }
    const prog: Record<keyof typeof PROGRAMS, string> = { listen: '', hash: '', pino: '', ingest: '', firstBoot: '' };
    for (const [name, text] of Object.entries(PROGRAMS)) {
      prog[name as keyof typeof PROGRAMS] = path.join(root, `${name}.mjs`);
      await writeFile(prog[name as keyof typeof PROGRAMS], text);
    }
    const cache = path.join(root, 'cache');
    await whole([process.execPath, CLI, 'ingest', '--archive', archive, '--release', release, '--cache-dir', cache, '--log-level', 'warn']);
    const pkg = path.join(REPO, 'package.json');
    const serve = (port: number): string[] => [process.execPath, CLI, 'serve', '--archive', archive, '--release', release, '--cache-dir', cache, '--mount', 'off', '--log-level', 'warn', '--http', `127.0.0.1:${port}`];

    const t: Record<string, number[]> = { node: [], listen: [], hash: [], pino: [], serve: [], xz: [], floorIngest: [], ingest: [], floorFirst: [], first: [] };
    for (let round = -1; round < RUNS; round++) {
      const keep = (k: string, v: number): void => void (round >= 0 && t[k]!.push(v));
      keep('node', await whole([process.execPath, '-e', '0']));
      keep('listen', await toFirst200((p) => [process.execPath, prog.listen, String(p)]));
      keep('hash', await toFirst200((p) => [process.execPath, prog.hash, String(p), archive]));
      keep('pino', await toFirst200((p) => [process.execPath, prog.pino, String(p), archive, pkg]));
      keep('serve', await toFirst200(serve));
      // The figure is of a start that runs with the code the warm-up start kept (code-cache.ts):
      // one that compiled its commands from source would be ~20 ms slower and not what a boot does.
      if (round === -1 && !(await readdir(path.join(cache, 'code')).catch(() => [])).some((n) => n.endsWith('.v8'))) {
        throw new Error(`the warm-up serve kept no compiled code in ${path.join(cache, 'code')}: the figures would be of starts that compile from source`);
      }
      keep('xz', await whole(['sh', '-c', `exec xz -dc "$0" > /dev/null`, archive]));
      const out = path.join(root, `pack-${round}`);
      keep('floorIngest', await whole([process.execPath, prog.ingest, archive, out]));
      await rm(out, { force: true });
      const fresh = path.join(root, `ingest-${round}`);
      keep('ingest', await whole([process.execPath, CLI, 'ingest', '--archive', archive, '--release', release, '--cache-dir', fresh, '--log-level', 'warn']));
      await rm(fresh, { recursive: true, force: true });
      const firstOut = path.join(root, `first-pack-${round}`);
      keep('floorFirst', await toFirst200((p) => [process.execPath, prog.firstBoot, String(p), archive, firstOut]));
      await rm(firstOut, { force: true });
      const empty = path.join(root, `first-${round}`);
      keep('first', await toFirst200((p) => [process.execPath, CLI, 'serve', '--archive', archive, '--release', release, '--cache-dir', empty, '--mount', 'off', '--log-level', 'warn', '--http', `127.0.0.1:${p}`]));
      await rm(empty, { recursive: true, force: true });
    }
    const m = Object.fromEntries(Object.entries(t).map(([k, v]) => [k, median(v)])) as Record<string, number>;
    const ms = (x: number): string => `${x.toFixed(0)} ms`;
    const xn = (x: number): string => `${(x / m.node!).toFixed(2)}×`;
    const xx = (x: number): string => `${(x / m.xz!).toFixed(2)}×`;
    const goalFirst = m.node! + 1.3 * m.xz!;
    const xf = (x: number): string => `${(x / (m.node! + m.xz!)).toFixed(2)}×`;
    const md = [
      '## Floors: the least the chosen parts cost, beside kheadersd',
      '',
      `Archive: ${label}. Medians of ${RUNS} interleaved rounds${FIFO.length ? ', every process under SCHED_FIFO (`chrt -f 10`)' : ''}. ${machineLine()}. Load average at the end: ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}.`,
      '',
      '| start-up: spawn → first HTTP 200 (polled every 2 ms) | time | / `node -e 0` |',
      '| --- | ---: | ---: |',
      `| \`node -e 0\` (whole process: the goal's reference) | ${ms(m.node!)} | 1.00× |`,
      `| node, \`node:http\` listening | ${ms(m.listen!)} | ${xn(m.listen!)} |`,
      `| + read and sha256 the archive (the cache key; kheadersd recalls it when the source is unchanged) | ${ms(m.hash!)} | ${xn(m.hash!)} |`,
      `| + pino, the chosen logger, and one log line (kheadersd loads it after it is ready) | ${ms(m.pino!)} | ${xn(m.pino!)} |`,
      `| \`kheadersd serve\`, entry cached, no mount | ${ms(m.serve!)} | ${xn(m.serve!)} (goal ≤ 2.5×) |`,
      '',
      '| ingest: whole process | time | / `xz -dc` |',
      '| --- | ---: | ---: |',
      `| \`xz -dc\` > /dev/null | ${ms(m.xz!)} | 1.00× |`,
      `| node: \`xz -dc\` into a file, the archive read and sha256'd meanwhile, fdatasync | ${ms(m.floorIngest!)} | ${xx(m.floorIngest!)} |`,
      `| \`kheadersd ingest\` into an empty cache | ${ms(m.ingest!)} | ${xx(m.ingest!)} (goal ≤ 1.5×) |`,
      '',
      `| first boot: spawn → first HTTP 200, empty cache | time | / (\`node -e 0\` + \`xz -dc\`) |`,
      '| --- | ---: | ---: |',
      `| the goal: \`node -e 0\` + 1.3 × \`xz -dc\` | ${ms(goalFirst)} | ${xf(goalFirst)} |`,
      `| node: the ingest floor above, then \`node:http\` listening | ${ms(m.floorFirst!)} | ${xf(m.floorFirst!)} |`,
      `| \`kheadersd serve\` on an empty cache, no mount (entry built in its ingest process) | ${ms(m.first!)} | ${xf(m.first!)} |`,
      '',
      `Runs (ms): serve ${t.serve!.map((v) => v.toFixed(0)).join(' / ')}; ingest ${t.ingest!.map((v) => v.toFixed(0)).join(' / ')}; the ingest floor ${t.floorIngest!.map((v) => v.toFixed(0)).join(' / ')}; first boot ${t.first!.map((v) => v.toFixed(0)).join(' / ')}; its floor ${t.floorFirst!.map((v) => v.toFixed(0)).join(' / ')}.`,
      '',
      'Each floor program is the least a program made of these parts must do before the figure can be taken; kheadersd does it and more (its CLI, configuration, the store, the index check, its own HTTP path; the ingest\'s tar index, chunk digests, the bomb bound and the commit).' + envNote(droppedEnv),
      '',
      'Reproduce: `npm run build && node dist/bench/floors.js` (as root for SCHED_FIFO; `--runs N`, `--no-write`).',
    ].join('\n');
    console.log(md);
    if (WRITE) await writeSection('floors', md);
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}

await main();
