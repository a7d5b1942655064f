/**
 * vmlinux.h generation against bpftool, measured in the same run on the same machine.
 *
 *   npm run build && node dist/bench/btf.js [BTF_FILE]
 *
 * The parent spawns itself as a child (`--child`) so that the child's peak RSS
 * (process.resourceUsage().maxRSS) covers generation only, and (`--once`) to time a whole
 * one-shot process as a user running `kheadersd btf` would. bpftool is timed as a process writing
 * to /dev/null; its peak RSS comes from /usr/bin/time -f %M when that is installed.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, openSync, closeSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { generateVmlinuxHeader, generateVmlinuxHeaderBytes } from '../src/btf/index.js';
import { machineLine, median, writeSection } from './report.js';

const RUNS = 5;
const DEFAULT_BTF = '/sys/kernel/btf/vmlinux';
const SELF = fileURLToPath(import.meta.url);

interface ChildResult {
  /** Wall times of RUNS consecutive calls in one process, the first one cold. */
  timesMs: number[];
  maxRssKb: number;
  headerBytes: number;
}

function child(btfPath: string): void {
  const blob = readFileSync(btfPath);
  const timesMs: number[] = [];
  let header = '';
  for (let i = 0; i < RUNS; i++) {
    const t0 = process.hrtime.bigint();
    header = generateVmlinuxHeader(blob);
    timesMs.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  const res: ChildResult = { timesMs, maxRssKb: process.resourceUsage().maxRSS, headerBytes: header.length };
  process.stdout.write(JSON.stringify(res));
}

/** One generation in a fresh process, header to stdout: what `kheadersd btf > vmlinux.h` costs. */
function once(btfPath: string): void {
  const out = generateVmlinuxHeaderBytes(readFileSync(btfPath));
  process.stdout.write(out);
}

function wallMs(cmd: string, args: string[]): number {
  const devnull = openSync('/dev/null', 'w');
  try {
    const t0 = process.hrtime.bigint();
    const r = spawnSync(cmd, args, { stdio: ['ignore', devnull, 'pipe'] });
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr?.toString() ?? r.error}`);
    return ms;
  } finally {
    closeSync(devnull);
  }
}

/** Peak RSS in KiB of a command, via GNU time; undefined if it is not installed. */
function peakRssKb(cmd: string, args: string[]): number | undefined {
  if (!existsSync('/usr/bin/time')) return undefined;
  const devnull = openSync('/dev/null', 'w');
  try {
    const r = spawnSync('/usr/bin/time', ['-f', '%M', cmd, ...args], { stdio: ['ignore', devnull, 'pipe'] });
    const last = r.stderr.toString().trim().split('\n').pop() ?? '';
    return r.status === 0 && /^\d+$/.test(last) ? Number(last) : undefined;
  } finally {
    closeSync(devnull);
  }
}

const fmt = (ms: number): string => `${ms.toFixed(0)} ms`;
const mib = (kb: number | undefined): string => (kb === undefined ? 'n/a' : `${(kb / 1024).toFixed(0)} MiB`);

/** Measure, print and record the `btf` section of BENCHMARKS.md. */
export async function runBtfBench(btfPath: string = DEFAULT_BTF): Promise<void> {
  if (!existsSync(btfPath)) {
    console.error(`bench btf: ${btfPath} is absent; nothing to measure`);
    return;
  }
  if (spawnSync('bpftool', ['version'], { stdio: 'ignore' }).status !== 0) {
    console.error('bench btf: bpftool is not installed; nothing to compare with');
    return;
  }
  const bpftoolArgs = ['btf', 'dump', 'file', btfPath, 'format', 'c'];
  const bpftoolVersion = spawnSync('bpftool', ['version'], { encoding: 'utf8' }).stdout.split('\n').slice(0, 2).join(', ');

  // Interleave the two so that load from elsewhere on the machine hits both alike.
  const bpftoolMs: number[] = [];
  const onceMs: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    bpftoolMs.push(wallMs('bpftool', bpftoolArgs));
    onceMs.push(wallMs(process.execPath, [SELF, '--once', btfPath]));
  }
  const r = spawnSync(process.execPath, [SELF, '--child', btfPath], { encoding: 'utf8', maxBuffer: 1 << 20 });
  if (r.status !== 0) throw new Error(`bench child failed: ${r.stderr}`);
  const c = JSON.parse(r.stdout) as ChildResult;
  const bpftoolRss = peakRssKb('bpftool', bpftoolArgs);

  const ours = median(c.timesMs);
  const theirs = median(bpftoolMs);
  const oursOnce = median(onceMs);
  const md = [
    '## vmlinux.h generation from BTF (`kheadersd btf`)',
    '',
    `Machine: ${machineLine()}. BTF: \`${btfPath}\` (${(readFileSync(btfPath).length / 2 ** 20).toFixed(1)} MiB), header ${(c.headerBytes / 2 ** 20).toFixed(1)} MiB. bpftool: ${bpftoolVersion}.`,
    '',
    '| what | ours | bpftool btf dump … format c | ratio |',
    '| --- | --- | --- | --- |',
    `| generation, median of ${RUNS} (ours: \`generateVmlinuxHeader\` in one process, runs ${c.timesMs.map((x) => x.toFixed(0)).join(' / ')} ms; bpftool: whole process > /dev/null) | ${fmt(ours)} | ${fmt(theirs)} | **${(ours / theirs).toFixed(2)}×** |`,
    `| one-shot process, median of ${RUNS} (node start-up, cold JIT, read, generate, write > /dev/null) | ${fmt(oursOnce)} | ${fmt(theirs)} | ${(oursOnce / theirs).toFixed(2)}× |`,
    `| peak RSS | ${mib(c.maxRssKb)} (child, \`process.resourceUsage().maxRSS\`) | ${mib(bpftoolRss)} (\`/usr/bin/time -f %M\`) | ${bpftoolRss ? (c.maxRssKb / bpftoolRss).toFixed(1) + '×' : 'n/a'} |`,
    '',
    'Target: generation within 2× of bpftool. The first in-process run is cold (JIT warm-up), which is what the one-shot row shows end to end.',
    '',
    'Reproduce: `npm run build && node dist/bench/btf.js`',
  ].join('\n');
  await writeSection('btf', md);
  console.log(md);
}

// Only when run as a program, so that a bench runner can import runBtfBench.
if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === SELF) {
  const mode = process.argv[2];
  if (mode === '--child') child(process.argv[3] ?? DEFAULT_BTF);
  else if (mode === '--once') once(process.argv[3] ?? DEFAULT_BTF);
  else await runBtfBench(process.argv[2] ?? DEFAULT_BTF);
}
