/**
 * Ingest bench: the whole `kheadersd ingest` of the real 6.1 archive, as a process, against
 *
 *   xz -dc ARCHIVE > /dev/null      the physical limit: decoding alone, nothing written
 *   tar -xJf ARCHIVE -C fresh-dir   what BCC and bpftrace do with the archive today
 *   node -e 0                       node's own start-up, which every kheadersd run pays
 *
 * and kheadersd with each decoder (the xz child, the default; and lzma-native). Every command
 * runs as a whole process under /usr/bin/time (wall time measured here around the spawn, peak
 * RSS from time's %M: the largest single process of the tree, so tar's xz child and
 * kheadersd's xz child count, but are not added to their parent). Each run gets a fresh output
 * directory; the commands are interleaved round by round so background load hits them alike;
 * medians are reported. The archive is read from the page cache in every case.
 *
 * Reproduce: npm run build && node dist/bench/ingest.js   [--runs N] [--no-write]
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI } from '../test/helpers/archives.js';
import { envNote, machineLine, median, useDeviceLikeEnvironment, writeSection } from './report.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const FIXTURE = path.resolve(REPO, '../shared/fixtures/kheaders-6.1-x86_64.tar.xz');
const RELEASE = '6.1.192';
const TIME = '/usr/bin/time';

const args = process.argv.slice(2);
const RUNS = Math.max(5, Number(args[args.indexOf('--runs') + 1]) || 7);
const WRITE = !args.includes('--no-write');

interface Sample {
  wallMs: number;
  rssKiB: number;
  /** kheadersd's own "in N ms" (time inside the process, after node started). */
  innerMs?: number;
}

interface Case {
  key: string;
  label: string;
  /** argv, with OUT standing for a fresh directory made for the run. */
  argv: string[];
  needsOut: boolean;
  samples: Sample[];
  /** du -sk of one run's result. */
  diskKiB?: number;
}

/** Run one command under /usr/bin/time; returns wall time (ours) and peak RSS (time's %M). */
async function measure(argv: string[]): Promise<Sample & { stderr: string }> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-bench-time-'));
  const timeFile = path.join(tmp, 'time');
  try {
    const started = performance.now();
    const { code, stderr } = await new Promise<{ code: number | null; stderr: string }>((resolve, reject) => {
      const child = spawn(TIME, ['-f', '%e %M', '-o', timeFile, ...argv], { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      child.stderr.setEncoding('utf8').on('data', (s: string) => (err += s));
      child.on('error', reject);
      child.on('close', (c) => resolve({ code: c, stderr: err }));
    });
    const wallMs = performance.now() - started;
    if (code !== 0) throw new Error(`${argv.join(' ')} exited ${code}: ${stderr}`);
    const [, rss] = (await readFile(timeFile, 'utf8')).trim().split(/\s+/).slice(-2);
    const inner = /in (\d+) ms/.exec(stderr)?.[1];
    return { wallMs, rssKiB: Number(rss), stderr, ...(inner ? { innerMs: Number(inner) } : {}) };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

function du(dir: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn('du', ['-sk', dir], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    child.on('error', reject);
    child.on('close', () => resolve(Number(out.split(/\s+/)[0])));
  });
}

const ms = (x: number): string => `${x.toFixed(0)} ms`;
const mib = (kib: number): string => `${(kib / 1024).toFixed(1)} MiB`;
const ratio = (a: number, b: number): string => `${(a / b).toFixed(2)}×`;

async function main(): Promise<void> {
  const droppedEnv = useDeviceLikeEnvironment();
  if (!existsSync(FIXTURE)) {
    console.log(`bench ingest: skipped: fixture ${FIXTURE} not present`);
    return;
  }
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
  for (const tool of [TIME, '/usr/bin/xz', '/usr/bin/tar']) {
    if (!existsSync(tool)) {
      console.log(`bench ingest: skipped: ${tool} is not installed`);
      return;
    }
  }

  const kheadersd = (decoder: string[]): string[] => [process.execPath, CLI, 'ingest', '--archive', FIXTURE, '--release', RELEASE, '--cache-dir', 'OUT', '--log-level', 'warn', ...decoder];
  const cases: Case[] = [
    { key: 'node', label: '`node -e 0` (start-up alone)', argv: [process.execPath, '-e', '0'], needsOut: false, samples: [] },
    { key: 'xz', label: '`xz -dc` > /dev/null', argv: ['xz', '-dc', FIXTURE], needsOut: false, samples: [] },
    { key: 'tar', label: '`tar -xJf` into a fresh dir', argv: ['tar', '-xJf', FIXTURE, '-C', 'OUT'], needsOut: true, samples: [] },
    { key: 'kh-xz', label: '`kheadersd ingest` (default decoder: xz child)', argv: kheadersd([]), needsOut: true, samples: [] },
    { key: 'kh-lzma', label: '`kheadersd ingest --decoder lzma-native`', argv: kheadersd(['--decoder', 'lzma-native']), needsOut: true, samples: [] },
  ];

  // One warm-up of each (page cache, node's compile cache), not counted.
  const root = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-bench-ingest-'));
  try {
    for (let round = -1; round < RUNS; round++) {
      for (const c of cases) {
        const out = c.needsOut ? await mkdtemp(path.join(root, `${c.key}-`)) : undefined;
        const argv = c.argv.map((a) => (a === 'OUT' ? out! : a));
        const s = await measure(argv);
        if (round >= 0) c.samples.push(s);
        if (out) {
          if (round === RUNS - 1) c.diskKiB = await du(out);
          await rm(out, { recursive: true, force: true });
        }
      }
      if (round >= 0) process.stdout.write(`round ${round + 1}/${RUNS} done\n`);
    }
  } finally {
    await rm(root, { recursive: true, force: true });
  }

  const get = (key: string): Case => cases.find((c) => c.key === key)!;
  const wall = (key: string): number => median(get(key).samples.map((s) => s.wallMs));
  const rss = (key: string): number => Math.max(...get(key).samples.map((s) => s.rssKiB));
  const inner = (key: string): number | undefined => {
    const xs = get(key).samples.flatMap((s) => (s.innerMs !== undefined ? [s.innerMs] : []));
    return xs.length ? median(xs) : undefined;
  };
  const xz = wall('xz');
  const tar = wall('tar');
  const node = wall('node');

  const rows = cases.map((c) => {
    const w = wall(c.key);
    const runs = c.samples.map((s) => s.wallMs.toFixed(0)).join(' / ');
    const i = inner(c.key);
    return `| ${c.label} | ${ms(w)}${i !== undefined ? ` (${i} ms inside)` : ''} | ${ratio(w, xz)} | ${ratio(w, tar)} | ${mib(rss(c.key))} | ${c.diskKiB !== undefined ? mib(c.diskKiB) : '–'} | ${runs} |`;
  });
  const kh = wall('kh-xz');
  const verdict = (ok: boolean): string => (ok ? 'met' : '**not met**');
  const md = [
    '## Ingest: the whole `kheadersd ingest` process vs `xz -dc` and `tar -xJf`',
    '',
    `The real archive (kheaders-6.1-x86_64.tar.xz: 3.8 MiB, 6,691 entries, 30.1 MiB uncompressed), median of ${RUNS} runs of each command as a whole process, interleaved round by round, each into a fresh directory. ${machineLine()}.`,
    '',
    '| command | wall (median) | / xz -dc | / tar -xJf | peak RSS (max of runs) | disk (du -sk) | runs (ms) |',
    '| --- | --- | --- | --- | --- | --- | --- |',
    ...rows,
    '',
    `Targets for the default decoder: within 1.25× of \`xz -dc\`: ${ratio(kh, xz)}, ${verdict(kh <= 1.25 * xz)}; faster than \`tar -xJf\`: ${ratio(kh, tar)}, ${verdict(kh < tar)}; peak RSS under 100 MiB: ${mib(rss('kh-xz'))}, ${verdict(rss('kh-xz') < 100 * 1024)}.`,
    `Node's start-up (\`node -e 0\`, ${ms(node)}) is part of every kheadersd run; without it kheadersd takes ${ms(kh - node)}, ${ratio(kh - node, xz)} of \`xz -dc\`.`,
    '',
    'Notes: peak RSS is GNU time\'s `%M`, the largest single process of the tree (tar\'s and kheadersd\'s `xz` children are counted, not added to their parents). kheadersd fsyncs its entry before making it visible and keeps the compressed archive beside the pack (its disk figure is pack + archive + index); tar does neither, so on a disk under writeback load kheadersd pays for durability that tar does not offer. The "inside" figure is kheadersd\'s own reported duration (after node started and the CLI loaded).' + envNote(droppedEnv),
    '',
    'Reproduce: `npm run build && node dist/bench/ingest.js` (`--runs N`, `--no-write` to print only).',
  ].join('\n');
  console.log(md);
  if (WRITE) await writeSection('ingest', md);
}

await main();
