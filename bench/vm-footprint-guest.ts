/**
 * The inside of bench/vm-footprint.ts: runs in the VM (a real kernel under qemu TCG, this
 * machine's / as its root), started by the scenario as `node vm-footprint-guest.js …`. One node
 * process does all the timing: it spawns each command, times it with performance.now() (the
 * monotonic clock) and polls /readyz itself over loopback every POLL_MS (once the port listens:
 * see listensOn), so no process start (a curl, a date) is added to what it measures; under TCG
 * one costs a good part of a second.
 *
 * No --archive anywhere: the daemon finds the running kernel's archive itself, as on a device.
 * Each round, interleaved:
 *   references  `node -e 0`; `modprobe kheaders`, `xz -dc /sys/kernel/kheaders.tar.xz`, `modprobe -r`
 *   first boot  `serve` on an empty cache with the module unloaded (as at a device's boot):
 *               spawn → /readyz 200, then Private_Dirty/Rss SETTLE after ready, SIGTERM
 *   cached      `serve` on the cache the first first boot filled: the same figures
 *   ingest      `kheadersd ingest` into an empty cache dir, the whole process; then the same with
 *               `--btf off`: the running kernel's entry gets vmlinux.h made from its BTF, which the
 *               host bench's ingest (another kernel's archive) never makes, so this is the figure
 *               to hold beside that one
 *   idle node   `node -e 'setInterval(()=>{},1e6)'`, alive the whole round: its memory at the end
 * The first first boot runs as the systemd unit does (no flags at all, the default cache
 * /var/cache/kheadersd, which the harness mounts as an empty tmpfs); the later ones get a fresh
 * --cache-dir beside it (tmpfs too), so the cached start keeps finding the first one's entry.
 *
 * Writes every figure, per round, to --out (JSON), and progress lines to fd 3 (the VM's events
 * port) when it is open. Exits non-zero, saying why, when anything fails: the host then throws.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import { stopChild } from './probe.js';

export interface GuestMem {
  privateDirtyKiB: number;
  rssKiB: number;
  hwmKiB: number;
}

export interface GuestServe {
  /** spawn → the first /readyz 200. */
  readyMs: number;
  /** spawn → the daemon logged "mounted" (undefined: it said there is no mount, or never did). */
  mountedMs: number | undefined;
  /** SETTLE after ready (the mount up when there is one). */
  idle: GuestMem;
  /** The kheaders module was loaded when the daemon had stopped. */
  moduleLoadedAfter: boolean;
  /** The daemon's own words on the entry ("kernel headers ingested", "kernel unchanged"; reused). */
  outcome: string;
  /** The build's phases (ms since it began: decoderStarted, decoded, indexed, committed, ...), when it built the entry. */
  phasesMs?: Record<string, number>;
  cacheDir: string;
}

export interface GuestRound {
  round: number;
  /** Discarded by the host: the warm-up round fills the guest's page cache from the 9p root. */
  warmup: boolean;
  nodeMs: number;
  xzMs: number;
  first: GuestServe;
  cached: GuestServe;
  ingestMs: number;
  /** The same ingest with --btf off (no vmlinux.h). */
  ingestNoBtfMs: number;
  nodeIdle: GuestMem;
}

export interface GuestResults {
  release: string;
  node: string;
  cpus: number;
  memTotalKiB: number;
  nodeOptions: string;
  settleMs: number;
  pollMs: number;
  rounds: GuestRound[];
  /** The cache's sources.json after the run: how the daemon obtained the archive (module-file, exposed, ...). */
  sources: unknown;
  /** The size of /sys/kernel/kheaders.tar.xz, the archive `xz -dc` decodes. */
  archiveBytes: number;
}

const POLL_MS = 10;
const HTTP_PORT = 7711;
const READY_TIMEOUT_MS = 300_000;
const DEFAULT_CACHE = '/var/cache/kheadersd';
const LIVE_ARCHIVE = '/sys/kernel/kheaders.tar.xz';
const READYZ = `http://127.0.0.1:${HTTP_PORT}/readyz`;

function arg(name: string): string {
  const i = process.argv.indexOf(name);
  const v = i >= 0 ? process.argv[i + 1] : undefined;
  if (v === undefined) throw new Error(`vm-footprint-guest: ${name} is required`);
  return v;
}

/** A progress line to the host (the events port, fd 3, one event per line), when this runs in the VM. */
function say(text: string): void {
  try {
    writeSync(3, `vmfoot ${text.replace(/\n+/g, ' | ')}\n`);
  } catch {
    process.stderr.write(`${text}\n`);
  }
}

function memoryOf(pid: number): GuestMem {
  const rollup = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (text: string, name: string): number => {
    const v = new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(text)?.[1];
    if (v === undefined) throw new Error(`no ${name} for pid ${pid}`);
    return Number(v);
  };
  return { privateDirtyKiB: field(rollup, 'Private_Dirty'), rssKiB: field(rollup, 'Rss'), hwmKiB: field(status, 'VmHWM') };
}

/** Run a command to its end; its wall time (spawn → exit). Fails on a non-zero status. */
async function wall(cmd: string, args: readonly string[], env: NodeJS.ProcessEnv = process.env): Promise<number> {
  let stderr = '';
  const started = performance.now();
  const code = await new Promise<number | null>((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], env });
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', reject).on('close', resolve);
  });
  const ms = performance.now() - started;
  if (code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${code}: ${stderr}`);
  return ms;
}

const moduleLoaded = (): boolean => existsSync('/sys/module/kheaders');

/** Load or unload kheaders (untimed: between measurements). */
function setModule(loaded: boolean): void {
  if (moduleLoaded() === loaded) return;
  const r = spawnSync('modprobe', loaded ? ['kheaders'] : ['-r', 'kheaders'], { encoding: 'utf8' });
  if (r.status !== 0 || moduleLoaded() !== loaded) throw new Error(`modprobe ${loaded ? '' : '-r '}kheaders failed (${r.status}): ${r.stderr}`);
}

/**
 * Whether a socket listens on 127.0.0.1:`port` (or any address), from /proc/net/tcp. Nothing can
 * answer /readyz before that, and a first boot listens only once it has ingested: polling by
 * connecting all that time would cost the guest a refused connect (a socket, an error through
 * libuv and JS) every POLL_MS, CPU taken under TCG from xz, the build and vmlinux.h on 2 vCPUs.
 * Reading this file is one small read. (Not the daemon's "HTTP listening" log line: serve holds
 * its lines until it is ready.)
 */
function listensOn(port: number): boolean {
  const hexPort = `:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  return readFileSync('/proc/net/tcp', 'utf8')
    .split('\n')
    .some((line) => {
      const f = line.trim().split(/\s+/);
      return f[1]?.endsWith(hexPort) === true && f[3] === '0A'; // 0A: TCP_LISTEN
    });
}

function statusOf(url: string): Promise<number> {
  return new Promise((resolve) => {
    const req = http.get(url, { agent: false }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', () => resolve(0));
    req.setTimeout(5000, () => req.destroy());
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The daemon's JSON log lines (pino), others skipped. */
function logLines(logs: string): Array<Record<string, unknown>> {
  const lines: Array<Record<string, unknown>> = [];
  for (const line of logs.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      lines.push(JSON.parse(line) as Record<string, unknown>);
    } catch {
      // not a log line
    }
  }
  return lines;
}

/**
 * What the daemon logged of the entry it serves: "kernel headers ingested" or "kernel unchanged"
 * (and whether it reused one), and, when it built the entry, its "ingested" line's phasesMs.
 */
function outcomeOf(logs: string): { outcome: string; phasesMs?: Record<string, number> } {
  const lines = logLines(logs);
  const said = lines.find((o) => o['msg'] === 'kernel headers ingested' || o['msg'] === 'kernel unchanged');
  const outcome = said ? `${String(said['msg'])}${said['reused'] === true ? ', reused' : ''}` : 'no ingest logged';
  const phases = lines.find((o) => o['msg'] === 'ingested')?.['phasesMs'];
  return phases !== null && typeof phases === 'object' ? { outcome, phasesMs: phases as Record<string, number> } : { outcome };
}

/** `kheadersd serve [args]` as the unit runs it: spawn → /readyz 200, the mount, idle memory, stop. */
async function serve(cli: string, nodeOptions: string, settleMs: number, cacheDir: string): Promise<GuestServe> {
  const args = cacheDir === DEFAULT_CACHE ? [] : ['--cache-dir', cacheDir];
  let logs = '';
  const started = performance.now();
  const child = spawn(process.execPath, [cli, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NODE_OPTIONS: nodeOptions } });
  let mountedMs: number | undefined;
  let noMount = false;
  let listening = false;
  const onLog = (s: string): void => {
    logs += s;
    if (mountedMs === undefined && logs.includes('"msg":"mounted"')) mountedMs = performance.now() - started;
    if (logs.includes('no FUSE mount')) noMount = true;
  };
  child.stdout.setEncoding('utf8').on('data', onLog);
  child.stderr.setEncoding('utf8').on('data', onLog);
  try {
    for (;;) {
      if (child.exitCode !== null) throw new Error(`serve exited ${child.exitCode} before /readyz answered 200:\n${logs}`);
      // Until the port listens, a look at /proc/net/tcp instead of a connect: see listensOn.
      listening ||= listensOn(HTTP_PORT);
      if (listening && (await statusOf(READYZ)) === 200) break;
      if (performance.now() - started > READY_TIMEOUT_MS) throw new Error(`serve not ready after ${READY_TIMEOUT_MS / 1000} s:\n${logs}`);
      await sleep(POLL_MS);
    }
    const readyMs = performance.now() - started;
    const readyAt = performance.now();
    while (mountedMs === undefined && !noMount && performance.now() - readyAt < 120_000) await sleep(50);
    await sleep(Math.max(0, settleMs - (performance.now() - readyAt)));
    const idle = memoryOf(child.pid!);
    await stopChild(child, 60_000);
    return { readyMs, mountedMs, idle, moduleLoadedAfter: moduleLoaded(), ...outcomeOf(logs), cacheDir };
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}

async function main(): Promise<void> {
  const cli = arg('--cli');
  const runs = Number(arg('--runs'));
  const warmups = Number(arg('--warmup'));
  const settleMs = Number(arg('--settle-ms'));
  const nodeOptions = arg('--node-options');
  const out = arg('--out');
  if (existsSync(`${DEFAULT_CACHE}/current`)) throw new Error(`${DEFAULT_CACHE} is not empty: the first boot needs an empty cache`);
  setModule(false);
  const archiveBytes = await (async (): Promise<number> => {
    setModule(true);
    const bytes = (await readFile(LIVE_ARCHIVE)).length;
    setModule(false);
    return bytes;
  })();
  const rounds: GuestRound[] = [];
  let firstDone = false;
  for (let r = -warmups; r < runs; r++) {
    const label = r < 0 ? `warm-up ${r + warmups + 1}/${warmups}` : `round ${r + 1}/${runs}`;
    const idleNode = spawn(process.execPath, ['-e', 'setInterval(()=>{},1e6)'], { stdio: 'ignore' });
    try {
      const nodeMs = await wall(process.execPath, ['-e', '0']);
      setModule(true);
      const xzMs = await wall('xz', ['-dc', LIVE_ARCHIVE]);
      setModule(false);
      const firstDir = firstDone ? `${DEFAULT_CACHE}-first` : DEFAULT_CACHE;
      if (firstDone) await mkdir(firstDir, { mode: 0o755 });
      const first = await serve(cli, nodeOptions, settleMs, firstDir);
      if (firstDone) await rm(firstDir, { recursive: true, force: true });
      firstDone = true;
      setModule(false);
      const cached = await serve(cli, nodeOptions, settleMs, DEFAULT_CACHE);
      setModule(false);
      const ingestDir = `${DEFAULT_CACHE}-ingest`;
      await mkdir(ingestDir, { mode: 0o755 });
      const ingestMs = await wall(process.execPath, [cli, 'ingest', '--cache-dir', ingestDir, '--log-level', 'warn']);
      await rm(ingestDir, { recursive: true, force: true });
      await mkdir(ingestDir, { mode: 0o755 });
      const ingestNoBtfMs = await wall(process.execPath, [cli, 'ingest', '--cache-dir', ingestDir, '--btf', 'off', '--log-level', 'warn']);
      await rm(ingestDir, { recursive: true, force: true });
      setModule(false);
      const nodeIdle = memoryOf(idleNode.pid!);
      rounds.push({ round: r, warmup: r < 0, nodeMs, xzMs, first, cached, ingestMs, ingestNoBtfMs, nodeIdle });
      say(`${label}: node -e 0 ${nodeMs.toFixed(0)} ms, xz -dc ${xzMs.toFixed(0)} ms, first boot ${first.readyMs.toFixed(0)} ms (${first.outcome}), cached ${cached.readyMs.toFixed(0)} ms (${cached.outcome}), ingest ${ingestMs.toFixed(0)} ms (--btf off ${ingestNoBtfMs.toFixed(0)} ms)`);
    } finally {
      await stopChild(idleNode, 60_000);
    }
  }
  // Absent or unreadable: the report then says "not recorded".
  const sources: unknown = await readFile(`${DEFAULT_CACHE}/sources.json`, 'utf8').then((t) => JSON.parse(t) as unknown, () => null);
  const results: GuestResults = {
    release: os.release(),
    node: process.version,
    cpus: os.cpus().length,
    memTotalKiB: Math.round(os.totalmem() / 1024),
    nodeOptions,
    settleMs,
    pollMs: POLL_MS,
    rounds,
    sources,
    archiveBytes,
  };
  await writeFile(out, JSON.stringify(results, null, 2));
}

main().catch((err: unknown) => {
  say(`failed: ${err instanceof Error ? err.message.slice(0, 2000) : String(err)}`);
  process.stderr.write(`vm-footprint-guest: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exitCode = 1;
});
