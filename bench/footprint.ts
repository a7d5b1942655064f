/**
 * Footprint bench: what the daemon costs a device that runs it all day and starts it at every
 * boot, each figure beside a reference measured in the same run, interleaved round by round:
 *
 *   idle `serve` (HTTP on loopback + the FUSE mount when /dev/fuse and root allow, 2 cached
 *     entries): Private_Dirty and RSS (/proc/PID/smaps_rollup) and VmHWM after it has settled,
 *     against an idle `node -e 'setTimeout(()=>{},1e9)'`
 *   the same `serve` idle after its own first ingest (empty cache; vmlinux.h generated from the
 *     running kernel's BTF when it has one), against the cached start's idle
 *   `serve` start → /readyz 200, the entry already cached (every boot but the first): wall and
 *     CPU (user+sys), against `node -e 0`
 *   `serve` start → /readyz 200 on an empty cache (first boot: ingest), against `node -e 0` +
 *     `xz -dc`
 *   `kheadersd ingest` as a whole process, against `xz -dc` (wall and CPU)
 *
 * Memory and CPU time are what a loaded machine hardly moves; wall times are reported too, as
 * ratios to their reference in the same round. The cached entries are the real fixture archive
 * (../shared/fixtures) under two releases when it is there, else the tests' generated archive.
 *
 * Reproduce: npm run build && node dist/bench/footprint.js   [--runs N] [--settle S] [--no-write]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI, goodArchive } from '../test/helpers/archives.js';
import { freePort, statusOf, stopChild } from './probe.js';
import { envNote, machineLine, median, useDeviceLikeEnvironment, writeSection } from './report.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const FIXTURE = path.resolve(REPO, '../shared/fixtures/kheaders-6.1-x86_64.tar.xz');
const TIME = '/usr/bin/time';
const LIVE_BTF = '/sys/kernel/btf/vmlinux';
/** A stopped daemon that has not exited by then is killed. */
const KILL_AFTER_MS = 15_000;

const args = process.argv.slice(2);
const opt = (name: string): number | undefined => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : undefined;
};
const RUNS = Math.max(1, opt('--runs') ?? 5);
const SETTLE_MS = Math.max(1, opt('--settle') ?? 5) * 1000;
const WRITE = !args.includes('--no-write');
const UNIT = path.join(REPO, 'systemd/kheadersd.service');
const FLOOR_SCRIPT = [
  "const { createRequire } = await import('node:module');",
  "const app = createRequire(process.cwd() + '/package.json')('fastify')();",
  "app.get('/', async () => 'x');",
  "await app.listen({ port: 0, host: '127.0.0.1' });",
  "for (const m of ['cli.js', 'commands/serve.js', 'serve/http/server.js', 'serve/fuse/index.js', 'serve/fuse/index-model.js', 'serve/fuse/kernel/index.js', 'commands/store-commands.js']) await import(process.cwd() + '/dist/src/' + m);",
  // What serve does once ready (no V8 flag on the command line: it would void node's code cache).
  "(await import(process.cwd() + '/dist/src/v8-flags.js')).holdYoungGeneration();",
  "process.stdout.write('up\\n');",
  'setTimeout(() => {}, 1e9);',
].join('\n');
const TICK_MS = 1000 / 100; // USER_HZ: /proc/PID/stat counts CPU time in 1/100 s on Linux

interface Mem {
  privateDirtyKiB: number;
  rssKiB: number;
  hwmKiB: number;
  /** Transparent huge pages in the anonymous memory (part of Private_Dirty). */
  anonHugeKiB: number;
}
interface Timed {
  wallMs: number;
  cpuMs: number;
}

async function memoryOf(pid: number): Promise<Mem> {
  const rollup = await readFile(`/proc/${pid}/smaps_rollup`, 'utf8');
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const field = (text: string, name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? NaN);
  return { privateDirtyKiB: field(rollup, 'Private_Dirty'), rssKiB: field(rollup, 'Rss'), hwmKiB: field(status, 'VmHWM'), anonHugeKiB: field(rollup, 'AnonHugePages') };
}

/** user+sys of a live process and of its children it has reaped (e.g. an xz decoder). */
async function cpuOf(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // Fields 14–17 of stat(5) (utime stime cutime cstime); f[0] is field 3.
  return [11, 12, 13, 14].reduce((sum, i) => sum + Number(f[i]), 0) * TICK_MS;
}

/** A whole command under /usr/bin/time: wall (ours), CPU user+sys (time's, children included). */
async function timed(argv: string[]): Promise<Timed> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-bench-fp-'));
  const out = path.join(tmp, 'time');
  try {
    const started = performance.now();
    let stderr = '';
    const code = await new Promise<number | null>((resolve, reject) => {
      const child = spawn(TIME, ['-f', '%U %S', '-o', out, ...argv], { stdio: ['ignore', 'ignore', 'pipe'] });
      child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
      child.on('error', reject).on('close', resolve);
    });
    const wallMs = performance.now() - started;
    if (code !== 0) throw new Error(`${argv.join(' ')} exited ${code}: ${stderr}`);
    const [user, sys] = (await readFile(out, 'utf8')).trim().split(/\s+/).slice(-2).map(Number);
    return { wallMs, cpuMs: (user! + sys!) * 1000 };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

interface Served {
  child: ChildProcess;
  /** spawn → first /readyz 200, with the process's CPU time (and its reaped children's) then. */
  ready: Timed;
  /** spawn → the mount lists the release asked for (when one was). */
  mountedMs: number | undefined;
  logs: () => string;
}

/**
 * Poll `mountpoint` every 5 ms until it lists `release`: what a tool on the device waits for.
 * Asynchronous reads, on the bench's side: the daemon answers them.
 */
async function mountListing(mountpoint: string, release: string, started: number, gone: () => boolean): Promise<number | undefined> {
  while (!gone() && performance.now() - started < 120_000) {
    const names = await readdir(mountpoint).catch(() => [] as string[]);
    if (names.includes(release)) return performance.now() - started;
    await new Promise((r) => setTimeout(r, 5));
  }
  return undefined;
}

/** Start `kheadersd serve …` and poll /readyz until it answers 200 (and, given `mount`, the mount until it lists a release). */
async function startServe(serveArgs: string[], nodeOptions: string, mount?: { dir: string; release: string }): Promise<Served> {
  const port = await freePort();
  let logs = '';
  const started = performance.now();
  const env = { ...process.env, NODE_OPTIONS: nodeOptions };
  const child = spawn(process.execPath, [CLI, 'serve', ...serveArgs, '--http', `127.0.0.1:${port}`], { stdio: ['ignore', 'pipe', 'pipe'], env });
  child.stdout.setEncoding('utf8').on('data', (s: string) => (logs += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (logs += s));
  const listed = mount ? mountListing(mount.dir, mount.release, started, () => child.exitCode !== null) : Promise.resolve(undefined);
  const deadline = started + 120_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`serve exited ${child.exitCode}:\n${logs}`);
    if ((await statusOf(`http://127.0.0.1:${port}/readyz`)) === 200) break;
    if (performance.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`serve not ready in 120 s:\n${logs}`);
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  const wallMs = performance.now() - started;
  const ready = { wallMs, cpuMs: await cpuOf(child.pid!) };
  return { child, ready, mountedMs: await listed, logs: () => logs };
}

/** Wait until the FUSE mount is up (the daemon logs it), so idle memory includes it. */
async function mounted(served: Served): Promise<boolean> {
  for (let i = 0; i < 600; i++) {
    if (/"msg":"mounted"/.test(served.logs())) return true;
    if (/no FUSE mount/.test(served.logs())) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

const mib = (kib: number): string => `${(kib / 1024).toFixed(1)} MiB`;
const ms = (x: number): string => `${x.toFixed(0)} ms`;
const x = (a: number, b: number): string => `${(a / b).toFixed(2)}×`;
const verdict = (ok: boolean): string => (ok ? 'met' : '**not met**');

async function main(): Promise<void> {
  const droppedEnv = useDeviceLikeEnvironment();
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
  for (const tool of [TIME, '/usr/bin/xz']) {
    if (!existsSync(tool)) {
      console.log(`bench footprint: skipped: ${tool} is not installed`);
      return;
    }
  }
  const root = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-bench-footprint-'));
  try {
    // The archive: the real one when present, else the tests' generated one.
    let archive = FIXTURE;
    let archiveLabel = 'the real fixture kheaders-6.1-x86_64.tar.xz (3.8 MiB, 6,691 entries, 30.1 MiB uncompressed)';
    let release = '6.1.192';
    if (!existsSync(FIXTURE)) {
      archive = path.join(root, 'generated.tar.xz');
      release = '6.6.0-bench';
      await writeFile(archive, await goodArchive(release));
      archiveLabel = `the tests' generated archive (the fixture ${FIXTURE} is not present)`;
    }
    const cache = path.join(root, 'cache');
    const ingestArgs = (dir: string, rel: string): string[] => [CLI, 'ingest', '--archive', archive, '--release', rel, '--cache-dir', dir, '--log-level', 'warn'];
    // Two cached entries: the archive under its own release and under a second one.
    for (const rel of [`${release}-second`, release]) await timed([process.execPath, ...ingestArgs(cache, rel)]);

    // The daemon as shipped runs with the unit's NODE_OPTIONS (V8's memory flags); idle memory
    // is also measured without them, to show what they buy.
    const shipped = /^Environment="NODE_OPTIONS=([^"]+)"$/m.exec(await readFile(UNIT, 'utf8'))?.[1] ?? '';
    const fuseOk = process.getuid?.() === 0 && existsSync('/dev/fuse');
    const mountDir = path.join(root, 'mnt');
    await mkdir(mountDir);
    const serveArgs = (dir: string, mount: boolean): string[] => ['--archive', archive, '--release', release, '--cache-dir', dir, '--mount', mount ? mountDir : 'off', '--log-level', 'info'];
    // A first boot on a device makes vmlinux.h from the running kernel's BTF: made here too when
    // there is one (judged another kernel's than the archive's and left out, but generated all the same).
    const btfArgs = existsSync(LIVE_BTF) ? ['--btf', LIVE_BTF] : [];

    const idle: Mem[] = [];
    const idleFirst: Mem[] = [];
    const idlePlain: Mem[] = [];
    const floor: Mem[] = [];
    const nodeIdle: Mem[] = [];
    const warm: Timed[] = [];
    /** The same starts, spawn → the mount lists the second (not current) release. */
    const warmMounted: number[] = [];
    const first: Timed[] = [];
    const ingests: Timed[] = [];
    const nodeStart: Timed[] = [];
    const xz: Timed[] = [];
    let mountedOk = false;

    for (let round = -1; round < RUNS; round++) {
      const keep = round >= 0;
      // Idle memory, the daemon and node side by side, settled for the same time.
      const idleNode = spawn(process.execPath, ['-e', 'setTimeout(()=>{},1e9)'], { stdio: 'ignore' });
      for (const asShipped of [true, false]) {
        const served = await startServe(serveArgs(cache, fuseOk), asShipped ? shipped : '', fuseOk ? { dir: mountDir, release: `${release}-second` } : undefined);
        if (keep && asShipped) warm.push(served.ready);
        if (keep && asShipped && served.mountedMs !== undefined) warmMounted.push(served.mountedMs);
        if (fuseOk) mountedOk = await mounted(served);
        await new Promise((r) => setTimeout(r, SETTLE_MS));
        const mServe = await memoryOf(served.child.pid!);
        if (keep) (asShipped ? idle : idlePlain).push(mServe);
        await stopChild(served.child, KILL_AFTER_MS);
      }
      // The same daemon idle after it ingested on its own start (an empty cache: a new kernel's first boot).
      const emptyIdle = await mkdtemp(path.join(root, 'first-idle-'));
      const fresh = await startServe([...serveArgs(emptyIdle, fuseOk), ...btfArgs], shipped);
      if (fuseOk) await mounted(fresh);
      await new Promise((r) => setTimeout(r, SETTLE_MS));
      if (keep) idleFirst.push(await memoryOf(fresh.child.pid!));
      await stopChild(fresh.child, KILL_AFTER_MS);
      await rm(emptyIdle, { recursive: true, force: true });
      if (keep) nodeIdle.push(await memoryOf(idleNode.pid!));
      await stopChild(idleNode, KILL_AFTER_MS);
      // The floor: node with the shipped flags, fastify listening and the daemon's modules
      // loaded, serving nothing: what any daemon built from these parts costs before its data.
      const floorProc = spawn(process.execPath, ['--input-type=module', '-e', FLOOR_SCRIPT], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, NODE_OPTIONS: shipped }, cwd: REPO });
      await new Promise((r) => floorProc.stdout.once('data', r));
      await new Promise((r) => setTimeout(r, SETTLE_MS));
      if (keep) floor.push(await memoryOf(floorProc.pid!));
      await stopChild(floorProc, KILL_AFTER_MS);

      // References, then first boot and ingest on empty caches.
      const n = await timed([process.execPath, '-e', '0']);
      const z = await timed(['xz', '-dc', archive]);
      const emptyFirst = await mkdtemp(path.join(root, 'first-'));
      const boot = await startServe(serveArgs(emptyFirst, false), shipped);
      await stopChild(boot.child, KILL_AFTER_MS);
      const emptyIngest = await mkdtemp(path.join(root, 'ingest-'));
      const ing = await timed([process.execPath, ...ingestArgs(emptyIngest, release)]);
      await rm(emptyFirst, { recursive: true, force: true });
      await rm(emptyIngest, { recursive: true, force: true });
      if (keep) {
        nodeStart.push(n);
        xz.push(z);
        first.push(boot.ready);
        ingests.push(ing);
        process.stdout.write(`round ${round + 1}/${RUNS} done\n`);
      }
    }

    const med = (xs: readonly number[]): number => median(xs);
    const pd = med(idle.map((m) => m.privateDirtyKiB));
    const rss = med(idle.map((m) => m.rssKiB));
    const hwm = med(idle.map((m) => m.hwmKiB));
    const ahp = med(idle.map((m) => m.anonHugeKiB));
    const pdFirst = med(idleFirst.map((m) => m.privateDirtyKiB));
    const rssFirst = med(idleFirst.map((m) => m.rssKiB));
    const ahpFirst = med(idleFirst.map((m) => m.anonHugeKiB));
    const pdPlain = med(idlePlain.map((m) => m.privateDirtyKiB));
    const rssPlain = med(idlePlain.map((m) => m.rssKiB));
    const pdFloor = med(floor.map((m) => m.privateDirtyKiB));
    const rssFloor = med(floor.map((m) => m.rssKiB));
    const pdNode = med(nodeIdle.map((m) => m.privateDirtyKiB));
    const rssNode = med(nodeIdle.map((m) => m.rssKiB));
    const wall = (t: readonly Timed[]): number => med(t.map((s) => s.wallMs));
    const cpu = (t: readonly Timed[]): number => med(t.map((s) => s.cpuMs));
    const nodeW = wall(nodeStart);
    const nodeC = cpu(nodeStart);
    const xzW = wall(xz);
    const xzC = cpu(xz);
    const warmRatios = warm.map((s, i) => s.wallMs / nodeStart[i]!.wallMs);
    const servedWhat = fuseOk ? (mountedOk ? 'HTTP on loopback + FUSE mount (kernel backend)' : 'HTTP on loopback; the FUSE mount failed') : 'HTTP on loopback only (no /dev/fuse or not root)';

    const md = [
      '## Footprint: idle memory, start-up and ingest, each against node itself',
      '',
      `Cache: 2 entries, ${archiveLabel} cached under two releases; \`serve\` given that archive (so a start finds it cached). Served: ${servedWhat}. \`serve\` runs as shipped, with systemd/kheadersd.service's \`NODE_OPTIONS=${shipped}\` (one row without). ${RUNS} rounds, interleaved (each round: idle pair, idle after a first boot, references, first boot, ingest); medians. ${machineLine()}. Load average at the end: ${os.loadavg().map((l) => l.toFixed(2)).join(' ')} (shared machine: read memory, CPU time and the ratios).`,
      '',
      '| figure | kheadersd | reference (same rounds) | ratio | goal |',
      '| --- | ---: | ---: | ---: | --- |',
      `| idle \`serve\`, Private_Dirty (anonymous memory) after ${SETTLE_MS / 1000} s | ${mib(pd)} | idle \`node -e\`: ${mib(pdNode)} | ${x(pd, pdNode)} | ≤ 20 MiB: ${verdict(pd <= 20 * 1024)} |`,
      `| idle \`serve\`, RSS (VmHWM: peak) | ${mib(rss)} (${mib(hwm)}) | idle \`node -e\`: ${mib(rssNode)} | ${x(rss, rssNode)} | ≤ 64 MiB: ${verdict(rss <= 64 * 1024)} |`,
      `| idle \`serve\` after its own first ingest (empty cache${btfArgs.length > 0 ? `, vmlinux.h made from ${LIVE_BTF}` : ''}): Private_Dirty, RSS (AnonHugePages) | ${mib(pdFirst)}, ${mib(rssFirst)} (${mib(ahpFirst)}) | the cached start's idle: ${mib(pd)}, ${mib(rss)} (${mib(ahp)}) | ${x(pdFirst, pd)}, ${x(rssFirst, rss)} | ≤ 20 MiB, ≤ 64 MiB: ${verdict(pdFirst <= 20 * 1024 && rssFirst <= 64 * 1024)} |`,
      `| the same without the unit's NODE_OPTIONS: Private_Dirty, RSS | ${mib(pdPlain)}, ${mib(rssPlain)} | idle \`node -e\`: ${mib(pdNode)}, ${mib(rssNode)} | ${x(pdPlain, pdNode)}, ${x(rssPlain, rssNode)} | |`,
      `| the floor: node with the same flags, fastify listening, the daemon's modules loaded, nothing served: Private_Dirty, RSS | ${mib(pdFloor)}, ${mib(rssFloor)} | idle \`node -e\`: ${mib(pdNode)}, ${mib(rssNode)} | ${x(pdFloor, pdNode)}, ${x(rssFloor, rssNode)} | |`,
      `| \`serve\` start → /readyz 200, entry cached: wall | ${ms(wall(warm))} | \`node -e 0\`: ${ms(nodeW)} | ${x(wall(warm), nodeW)} of the medians; ${med(warmRatios).toFixed(2)}× the median of the rounds' own ratios (per round: ${warmRatios.map((r) => r.toFixed(1)).join(', ')}), which the goal is judged on | ≤ 2.5×: ${verdict(med(warmRatios) <= 2.5)} |`,
      `| the same, CPU user+sys | ${ms(cpu(warm))} | \`node -e 0\`: ${ms(nodeC)} | ${x(cpu(warm), nodeC)} | |`,
      ...(warmMounted.length > 0
        ? [`| the same starts, spawn → the mount lists the other cached release (what a tool on the device waits for) | ${ms(med(warmMounted))} | \`node -e 0\`: ${ms(nodeW)} | ${x(med(warmMounted), nodeW)} (per round: ${warmMounted.map((m, i) => (m / nodeStart[i]!.wallMs).toFixed(1)).join(', ')}) | |`]
        : []),
      `| \`serve\` start → /readyz 200, first boot (ingest): wall | ${ms(wall(first))} | \`node -e 0\` + \`xz -dc\`: ${ms(nodeW + xzW)} | ${x(wall(first), nodeW + xzW)} | ≤ node + 1.3 × xz = ${ms(nodeW + 1.3 * xzW)}: ${verdict(wall(first) <= nodeW + 1.3 * xzW)} |`,
      `| the same, CPU user+sys (xz child included) | ${ms(cpu(first))} | ${ms(nodeC + xzC)} | ${x(cpu(first), nodeC + xzC)} | |`,
      `| \`kheadersd ingest\`, whole process: wall | ${ms(wall(ingests))} | \`xz -dc\`: ${ms(xzW)} | ${x(wall(ingests), xzW)} | ≤ 1.5×: ${verdict(wall(ingests) <= 1.5 * xzW)} |`,
      `| the same, CPU user+sys (xz child included) | ${ms(cpu(ingests))} | \`xz -dc\`: ${ms(xzC)} | ${x(cpu(ingests), xzC)} | |`,
      '',
      `Runs: idle Private_Dirty ${idle.map((m) => mib(m.privateDirtyKiB)).join(' / ')}; after its own first ingest ${idleFirst.map((m) => mib(m.privateDirtyKiB)).join(' / ')}; warm start ${warm.map((s) => s.wallMs.toFixed(0)).join(' / ')} ms${warmMounted.length > 0 ? ` (the mount listing the other release: ${warmMounted.map((m) => m.toFixed(0)).join(' / ')} ms)` : ''}; first boot ${first.map((s) => s.wallMs.toFixed(0)).join(' / ')} ms; ingest ${ingests.map((s) => s.wallMs.toFixed(0)).join(' / ')} ms; \`xz -dc\` ${xz.map((s) => s.wallMs.toFixed(0)).join(' / ')} ms; \`node -e 0\` ${nodeStart.map((s) => s.wallMs.toFixed(0)).join(' / ')} ms.`,
      '',
      'How: memory from `/proc/PID/smaps_rollup` (Private_Dirty, Rss) and `/proc/PID/status` (VmHWM) of the running processes. Start-up is spawn → the first 200 from `/readyz` (polled every 5 ms), the CPU time then from `/proc/PID/stat` (utime+stime+cutime+cstime, 10 ms ticks); the references and `ingest` run under `/usr/bin/time` (user+sys, children included). The FUSE mount is begun once HTTP listens and answers once every entry is checked, so /readyz does not wait for it; the idle figures are taken with it mounted.' + envNote(droppedEnv),
      '',
      'Reproduce: `npm run build && node dist/bench/footprint.js` (as root for the mount; `--runs N`, `--settle S`, `--no-write`), or `npm run bench -- footprint`.',
    ].join('\n');
    console.log(md);
    if (WRITE) await writeSection('footprint', md);
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}

await main();
