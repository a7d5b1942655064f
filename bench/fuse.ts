/**
 * Both FUSE backends (the kernel-protocol one in its variants, and fuse-native) against a plain
 * `tar -xJf` directory of the same archive:
 *
 *   compile   one BCC-style compile of a BPF program (linux/sched.h, linux/bpf.h, net/sock.h),
 *             cold (fresh mount, `echo 3 > drop_caches`) and warm (back to back, sides
 *             interleaved round by round so background load hits every side alike);
 *   find      `find ROOT/ | wc -l` over the whole tree, cold and warm;
 *   read all  `find ROOT/ -type f -exec cat {} +`, cold and warm;
 *   requests  FUSE requests that reached the daemon per compile;
 *   start     the server process from fork to a mounted tree (loading and checking the entry).
 *
 * Verification (bytes proven against the index's chunk digests before first served, the index
 * checksum on load) is measured side by side: each backend also runs as `<backend>-unverified`
 * with it turned off (setReadVerification(false)), in the same rounds.
 *
 * Each mount is served by its own child process (this file with --serve), as the daemon serves
 * it: clang never shares a process, a threadpool or an inherited descriptor with the server.
 * Kernel-backend variants: the default (event-loop reader, zero-message open, lookup prefetch,
 * READDIRPLUS always), classic OPEN (every open(2) reaches the daemon, with KEEP_CACHE|NOFLUSH),
 * the reader thread, and the default without the lookup prefetch and with the kernel's adaptive
 * READDIRPLUS (what those two pay, in the same rounds).
 *
 * References (bench/fuse-ref.ts): the same tree served by mature C FUSE servers, bindfs over the
 * plain directory and squashfuse_ll over a squashfs image of it, in the same rounds: what any
 * FUSE server pays for the round trips on this machine, beside what ours pays. The FUSE requests
 * of one more cold compile per mount are counted from the kernel's tracepoints (bpftrace), with
 * the time they spent between the kernel sending them and the reply.
 *
 * --pinned: clang (and every process the bench runs) SCHED_FIFO on CPU 0, each server's threads
 * SCHED_RR on CPU 1, so that on a shared machine no other process runs between a request and its
 * reply; on a quiet machine it shows the floor without the compiler and the server competing.
 *
 * Reproduce (root: it mounts and drops caches):
 *   sudo sh -c 'npx tsc -p . && node dist/bench/fuse.js'        (from the checkout)
 * Options: --runs N (warm rounds, default 7), --cold N (default 3), --no-native, --no-unverified,
 * --no-reference (no C servers), --no-trace (no bpftrace counts), --pinned, --no-write,
 * --only a,b (these columns only, e.g. kernel,bindfs,squashfuse; implies --no-write),
 * --cold-only (only the cold compile and its requests; implies --no-write),
 * --baseline DIST/bench/fuse.js (adds 'kernel-base': the default backend served by another build,
 * e.g. main's, in the same rounds).
 */
import { fork, type ChildProcess } from 'node:child_process';
import { access, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createLogger } from '../src/log.js';
import { IndexFsModel } from '../src/serve/fuse/index-model.js';
import { mountKernel, type SessionOptions } from '../src/serve/fuse/kernel/index.js';
import type { PrefetchStats } from '../src/serve/fuse/prefetch.js';
import type { FuseMount, FuseOpCounts } from '../src/serve/fuse/types.js';
import { CacheStore } from '../src/store/cache.js';
import { setReadVerification } from '../src/store/reader.js';
import {
  BPF_PROGRAM,
  bpfCompile,
  clangResourceInclude,
  clangTaskStructSize,
  extractFixture,
  fixtureSkipReason,
  ingestFixture,
  removeDir,
  run,
  runOk,
  tempDir,
  toolSkipReason,
} from '../test/helpers/fuse-env.js';
import { pinClient, pinServer, REFERENCE_LABEL, ReferenceServer, REFERENCES, makeSquashfsImage, referenceSkipReason, traceRequests, traceSkipReason, type Reference, type TracedRequests } from './fuse-ref.js';
import { machineLine, median, writeSection } from './report.js';

type Backend = 'kernel' | 'kernel-base' | 'kernel-classic-open' | 'kernel-thread' | 'kernel-adaptive' | 'native' | 'kernel-unverified' | 'native-unverified';
const LABEL: Record<Backend, string> = {
  kernel: 'kernel (default)',
  'kernel-base': 'kernel (default), baseline build',
  'kernel-classic-open': 'kernel, OPEN per open(2)',
  'kernel-thread': 'kernel, reader thread',
  'kernel-adaptive': 'kernel, no lookup prefetch, adaptive READDIRPLUS',
  native: 'fuse-native',
  'kernel-unverified': 'kernel, verification off',
  'native-unverified': 'fuse-native, verification off',
};

type Side = 'plain' | Backend | Reference;
const isReference = (side: Side): side is Reference => (REFERENCES as readonly string[]).includes(side);
const sideLabel = (side: Backend | Reference): string => (isReference(side) ? REFERENCE_LABEL[side] : LABEL[side]);

type ServerMsg = { type: 'ready'; mountpoint: string } | { type: 'counts'; counts: FuseOpCounts; prefetched: number; prefetch?: PrefetchStats } | { type: 'rss'; rssKiB: number; hwmKiB: number } | { type: 'error'; message: string };

// ---- child: the daemon's half -----------------------------------------------------------------

async function serve(backend: Backend, cacheDir: string, id: string, mountpoint: string): Promise<void> {
  const log = createLogger('warn', process.stderr);
  // Internal switch: only benchmarks turn verification off, to measure what it costs.
  setReadVerification(!backend.endsWith('-unverified'));
  const store = await CacheStore.open(cacheDir);
  const entry = await store.load(id);
  const model = new IndexFsModel({ log });
  model.setEntries([entry], id);
  let mount: FuseMount;
  let prefetched = (): number => 0;
  let prefetchStats = (): PrefetchStats | undefined => undefined;
  if (backend === 'native' || backend === 'native-unverified') {
    const { mountNative } = await import('../src/serve/fuse/native.js');
    mount = await mountNative({ mountpoint, model, log });
  } else {
    const session: SessionOptions = backend === 'kernel-classic-open' ? { zeroMessageOpen: false } : backend === 'kernel-adaptive' ? { prefetch: false, readdirplus: 'auto' } : {};
    const km = await mountKernel({ mountpoint, model, log, session, reader: backend === 'kernel-thread' ? 'thread' : 'auto' });
    prefetched = () => km.prefetchCounts().used;
    prefetchStats = () => km.prefetchCounts();
    mount = km;
  }
  const send = (m: ServerMsg): void => {
    process.send!(m);
  };
  process.on('message', (msg: string) => {
    void (async () => {
      if (msg === 'counts') {
        const stats = prefetchStats();
        send({ type: 'counts', counts: mount.opCounts?.() ?? {}, prefetched: prefetched(), ...(stats ? { prefetch: stats } : {}) });
      } else if (msg === 'rss') {
        const status = await readFile('/proc/self/status', 'utf8');
        const kib = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0);
        send({ type: 'rss', rssKiB: kib('VmRSS'), hwmKiB: kib('VmHWM') });
      } else if (msg === 'stop') {
        await mount.unmount();
        await model.close();
        process.exit(0);
      }
    })().catch((err: unknown) => send({ type: 'error', message: String(err) }));
  });
  process.on('disconnect', () => {
    void mount.unmount().finally(() => process.exit(0));
  });
  send({ type: 'ready', mountpoint: mount.mountpoint });
}

// ---- parent: the compiler's half --------------------------------------------------------------

class Server {
  private constructor(
    private readonly child: ChildProcess,
    readonly mountpoint: string,
    /** From fork to mounted: node's start, loading and checking the entry, the mount. */
    readonly startMs: number,
  ) {}

  get pid(): number {
    return this.child.pid!;
  }

  static async start(backend: Backend, cacheDir: string, id: string, mountpoint: string, baseline?: string): Promise<Server> {
    const t0 = performance.now();
    // 'kernel-base': the default backend as another build serves it (--baseline), for A/B in the same rounds.
    const [script, as] = backend === 'kernel-base' ? [baseline!, 'kernel'] : [fileURLToPath(import.meta.url), backend];
    const child = fork(script, ['--serve', as, cacheDir, id, mountpoint], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const ready = await new Promise<ServerMsg>((resolve, reject) => {
      child.once('message', (m: ServerMsg) => resolve(m));
      child.once('exit', (code) => reject(new Error(`${backend} server exited ${code} before mounting`)));
    });
    if (ready.type !== 'ready') throw new Error(`${backend} server: ${JSON.stringify(ready)}`);
    return new Server(child, ready.mountpoint, performance.now() - t0);
  }

  private ask<T extends ServerMsg['type']>(msg: string, want: T): Promise<Extract<ServerMsg, { type: T }>> {
    return new Promise((resolve, reject) => {
      this.child.once('message', (m: ServerMsg) => (m.type === want ? resolve(m as Extract<ServerMsg, { type: T }>) : reject(new Error(JSON.stringify(m)))));
      this.child.send(msg);
    });
  }

  counts(): Promise<FuseOpCounts> {
    return this.ask('counts', 'counts').then((m) => ({ ...m.counts, prefetched: m.prefetched, ...(m.prefetch ? { [FOLLOWED]: m.prefetch.followed, [READY]: m.prefetch.ready } : {}) }));
  }

  rss(): Promise<{ rssKiB: number; hwmKiB: number }> {
    return this.ask('rss', 'rss');
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null) return;
    const exited = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
    this.child.send('stop');
    await exited;
  }
}

/** Not a request: READs (already counted) that were answered from the lookup prefetch. */
const PREFETCHED = 'prefetched';
/** Not requests: included headers read ahead, and READs whose prefetched bytes were already in hand. */
const FOLLOWED = 'prefetch-followed';
const READY = 'prefetch-ready';
/** Not requests: the LOOKUPs (already counted) answered with a negative entry (include-path misses). */
const NEGATIVE = 'lookup-negative';
const NOT_REQUESTS = new Set([PREFETCHED, FOLLOWED, READY, NEGATIVE]);

function diff(after: FuseOpCounts, before: FuseOpCounts): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(after)) {
    if (NOT_REQUESTS.has(k)) continue;
    const d = v - (before[k] ?? 0);
    if (d > 0) out[k] = d;
  }
  return out;
}
const total = (c: Record<string, number>): number => Object.values(c).reduce((a, b) => a + b, 0);
const fmtCounts = (c: Record<string, number>): string => {
  const parts = Object.entries(c)
    .sort((a, b) => b[1] - a[1])
    .map(([k, v]) => `${k} ${v}`);
  return parts.length ? `${total(c)} (${parts.join(', ')})` : '0';
};

/** Verified vs unverified, per transport: median ratios of warm compile, cold compile and start. */
function verificationLine(backends: readonly Backend[], data: { warm: Record<string, number[]>; cold: Record<string, number[]>; start: Record<string, number[]> }): string {
  const parts: string[] = [];
  for (const base of ['kernel', 'native'] as const) {
    const off = `${base}-unverified` as const;
    if (!backends.includes(base) || !backends.includes(off)) continue;
    const ratio = (k: keyof typeof data): string => {
      const on = data[k][base]!;
      const unv = data[k][off]!;
      return median(on.map((x, i) => x / unv[Math.min(i, unv.length - 1)]!)).toFixed(2);
    };
    parts.push(`${LABEL[base]}: warm compile ${ratio('warm')}×, cold compile ${ratio('cold')}×, start ${ratio('start')}× of the same with verification off`);
  }
  return parts.length > 0 ? parts.join('; ') : 'not measured (--no-unverified)';
}

async function dropCaches(): Promise<void> {
  await runOk('sync', []);
  await writeFile('/proc/sys/vm/drop_caches', '3\n');
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

async function nativeAvailable(): Promise<string | undefined> {
  try {
    await access(fileURLToPath(new URL('../src/serve/fuse/native.js', import.meta.url)));
  } catch {
    return 'src/serve/fuse/native.ts does not exist';
  }
  try {
    const { createRequire } = await import('node:module');
    createRequire(import.meta.url)('fuse-native');
    return undefined;
  } catch (err) {
    return `fuse-native cannot load: ${(err as Error).message}`;
  }
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  if (args[0] === '--serve') return serve(args[1] as Backend, args[2]!, args[3]!, args[4]!);
  const opt = (name: string, dflt: number): number => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : dflt);
  const warmRuns = opt('--runs', 7);
  const coldRuns = opt('--cold', 3);
  const only = args.includes('--only') ? (args[args.indexOf('--only') + 1] ?? '').split(',') : undefined;
  const coldOnly = args.includes('--cold-only');
  const pinned = args.includes('--pinned');
  const baseline = args.includes('--baseline') ? path.resolve(args[args.indexOf('--baseline') + 1]!) : undefined;
  const write = !args.includes('--no-write') && !only && !coldOnly && !baseline;

  for (const reason of [
    process.getuid?.() === 0 ? undefined : 'needs root (mounting, drop_caches)',
    await fixtureSkipReason(),
    await toolSkipReason('clang'),
  ]) {
    if (reason) {
      console.log(`bench fuse skipped: ${reason}`);
      return;
    }
  }
  const noNative = args.includes('--no-native') ? '--no-native given' : await nativeAvailable();
  const unverified = !args.includes('--no-unverified');
  const all: Backend[] = [
    'kernel',
    ...(baseline ? (['kernel-base'] as const) : []),
    ...(unverified ? (['kernel-unverified'] as const) : []),
    'kernel-classic-open',
    'kernel-thread',
    'kernel-adaptive',
    ...(noNative ? [] : (['native'] as const)),
    ...(noNative || !unverified ? [] : (['native-unverified'] as const)),
  ];
  const backends = all.filter((b) => !only || only.includes(b) || b === 'kernel-base');
  const referenceSkips: string[] = [];
  const references: Reference[] = [];
  for (const ref of args.includes('--no-reference') ? [] : REFERENCES.filter((r) => !only || only.includes(r))) {
    const reason = await referenceSkipReason(ref);
    if (reason) referenceSkips.push(`${REFERENCE_LABEL[ref]} not measured: ${reason}`);
    else references.push(ref);
  }
  for (const skip of referenceSkips) console.log(skip);
  const noTrace = args.includes('--no-trace') ? '--no-trace given' : await traceSkipReason();
  if (noTrace) console.log(`FUSE requests not traced: ${noTrace}`);

  const cacheDir = await tempDir('fbench-cache');
  const work = await tempDir('fbench-work');
  const servers = new Map<Backend | Reference, Server | ReferenceServer>();
  let plain: string | undefined;
  try {
    const entry = await ingestFixture(cacheDir);
    plain = await extractFixture();
    const image = path.join(work, 'tree.squashfs');
    if (references.includes('squashfuse')) await makeSquashfsImage(plain, image);
    const resource = await clangResourceInclude();
    const size = await clangTaskStructSize(plain, resource, work);
    const src = path.join(work, 'prog.c');
    await writeFile(src, BPF_PROGRAM);
    // From here on every process this one spawns (clang, find, cat, the servers until they are
    // moved) inherits the main thread's CPU and policy.
    if (pinned) await pinClient(process.pid);
    const mnt = (b: Backend | Reference): string => path.join(work, `mnt-${b}`);
    const start = async (b: Backend | Reference): Promise<Server | ReferenceServer> => {
      await servers.get(b)?.stop();
      const s = isReference(b) ? await ReferenceServer.start(b, plain!, image, mnt(b)) : await Server.start(b, cacheDir, entry.manifest.id, mnt(b), baseline);
      if (pinned) await pinServer(s.pid);
      servers.set(b, s);
      return s;
    };
    /** Requests the daemon counted (references: none; their requests are traced instead). */
    const countsOf = async (side: Side): Promise<FuseOpCounts> => {
      const s = side === 'plain' ? undefined : servers.get(side);
      return s instanceof Server ? s.counts() : {};
    };
    const root = (side: Side): string => (side === 'plain' ? plain! : isReference(side) ? mnt(side) : path.join(mnt(side), 'current'));
    const compile = (side: Side): Promise<number> => timed(() => bpfCompile(root(side), resource, src, path.join(work, `prog-${side}.o`), size));
    const find = (side: Side): Promise<number> => timed(() => runOk('sh', ['-c', 'find "$1"/ | wc -l', 'sh', root(side)]));
    const readAll = (side: Side): Promise<number> => timed(() => runOk('sh', ['-c', 'find "$1"/ -type f -exec cat {} + > /dev/null', 'sh', root(side)]));
    const mounts: Array<Backend | Reference> = [...backends, ...references];
    const sides: Side[] = ['plain', ...mounts];
    const series = (): Record<string, number[]> => Object.fromEntries(sides.map((s) => [s, [] as number[]]));
    const ms = (x: number): string => `${x.toFixed(0)} ms`;
    const cell = (data: Record<string, number[]>, side: Side): string => {
      const m = median(data[side]!);
      if (side === 'plain') return ms(m);
      // Each FUSE run has a plain neighbour from the same round: the paired ratio resists drift.
      const p = data['plain']!;
      const paired = median(data[side]!.map((x, i) => x / p[Math.min(i, p.length - 1)]!));
      return `${ms(m)} (**${paired.toFixed(2)}×**)`;
    };
    const row = (what: string, data: Record<string, number[]>): string => `| ${what} | ${sides.map((s) => cell(data, s)).join(' | ')} |`;

    // Cold compile: a fresh mount (the kernel has nothing cached for it) and an empty page cache.
    const cold = series();
    const startTimes = series();
    const coldCounts: Record<string, Record<string, number>> = {};
    const coldPrefetched: Record<string, number> = {};
    const coldAhead: Record<string, string> = {};
    for (let i = 0; i < coldRuns; i++) {
      // Every other round the mounts go in reverse order, so none always runs first after plain.
      for (const side of i % 2 === 0 ? sides : ['plain' as const, ...mounts.slice().reverse()]) {
        if (side !== 'plain') startTimes[side]!.push((await start(side)).startMs);
        const before = await countsOf(side);
        await dropCaches();
        cold[side]!.push(await compile(side));
        if (side !== 'plain') {
          const after = await countsOf(side);
          coldCounts[side] = diff(after, before);
          coldPrefetched[side] = (after[PREFETCHED] ?? 0) - (before[PREFETCHED] ?? 0);
          const d = (k: string): number => (after[k] ?? 0) - (before[k] ?? 0);
          coldAhead[side] = `${coldPrefetched[side]} READs from the prefetch, ${d(READY)} of them already in hand; ${d(FOLLOWED)} included headers read ahead; ${d(NEGATIVE)} of the LOOKUPs negative`;
        }
      }
    }
    // One more cold compile per mount, untimed, with bpftrace counting what the kernel sent and
    // how long each request waited for its reply: the same measure for our server and the C ones.
    const traced: Record<string, TracedRequests> = {};
    if (!noTrace) {
      for (const side of mounts) {
        await start(side);
        await dropCaches();
        traced[side] = await traceRequests(mnt(side), () => compile(side));
      }
    }
    const coldTable = `| | plain dir | ${mounts.map(sideLabel).join(' | ')} |
| --- | ---: | ${mounts.map(() => '---:').join(' | ')} |
${row(`compile, cold: fresh mount, drop_caches (median of ${coldRuns})`, cold)}`;
    const tracedLines = mounts.map((m) => (traced[m] ? `| ${sideLabel(m)} | ${fmtCounts(traced[m].counts)} | ${traced[m].waitMs.toFixed(0)} ms | ${(traced[m].waitMs * 1000 / Math.max(1, total(traced[m].counts))).toFixed(0)} µs |` : `| ${sideLabel(m)} | not traced | | |`));
    const tracedTable = `FUSE requests of one more cold compile per mount, from the kernel's side (bpftrace on
fuse:fuse_request_send/end, this mount's connection only), and their time from being sent to
their reply, summed:

| | requests | waiting for replies | per request |
| --- | --- | ---: | ---: |
${tracedLines.join('\n')}`;
    if (coldOnly) {
      const load = (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ');
      console.log(`
${coldTable}

Cold compile runs: ${sides.map((s) => `${s} ${cold[s]!.map((x) => x.toFixed(0)).join('/')}`).join('; ')} ms.
Start to mounted: ${mounts.map((m) => `${m} ${median(startTimes[m]!).toFixed(0)}`).join('; ')} ms.
Daemon-counted requests (cold): ${backends.map((b) => `${b} ${fmtCounts(coldCounts[b] ?? {})}`).join('; ')}.
Prefetch (cold, last round): ${backends.map((b) => `${b}: ${coldAhead[b] ?? 'none'}`).join('; ')}.

${tracedTable}

${pinned ? 'Pinned: clang FIFO on CPU 0, servers RR on CPU 1. ' : ''}Load average at the end: ${load}.`);
      return;
    }
    // One compile each before the warm series.
    for (const side of sides) await compile(side);
    const warm = series();
    const warmCounts: Record<string, Record<string, number>> = {};
    for (let i = 0; i < warmRuns; i++) {
      for (const side of sides) {
        const before = await countsOf(side);
        warm[side]!.push(await compile(side));
        if (side !== 'plain') warmCounts[side] = diff(await countsOf(side), before);
      }
    }
    // find and read-all: cold after drop_caches (same mounts), then warm (median of 3).
    const findCold = series();
    const readCold = series();
    const findWarm = series();
    const readWarm = series();
    const readCounts: Record<string, Record<string, number>> = {};
    for (const side of sides) {
      await dropCaches();
      findCold[side]!.push(await find(side));
      await dropCaches();
      const before = await countsOf(side);
      readCold[side]!.push(await readAll(side));
      if (side !== 'plain') readCounts[side] = diff(await countsOf(side), before);
    }
    for (let i = 0; i < 3; i++) {
      for (const side of sides) {
        findWarm[side]!.push(await find(side));
        readWarm[side]!.push(await readAll(side));
      }
    }
    const rss: Record<string, { rssKiB: number; hwmKiB: number }> = {};
    for (const m of mounts) rss[m] = await servers.get(m)!.rss();
    const load = (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ');

    const md = `
## FUSE: both backends vs a plain directory, and mature C FUSE servers

The kernel-protocol backend (TypeScript on /dev/fuse; the default, and four variants of it) and
fuse-native, each against a \`tar -xJf\` directory of the same archive (the fixture); beside them, as
references for what any FUSE server pays here, two C servers of the same tree: bindfs (libfuse2,
path API, over the plain directory; \`-o ro,entry_timeout=86400,attr_timeout=86400,negative_timeout=86400,kernel_cache\`)
and squashfuse_ll (libfuse3 low-level, node ids like ours, its own endless entry/attribute timeouts,
over an uncompressed squashfs image of the directory). A compile is a
BPF program including \`<linux/sched.h>\`, \`<linux/bpf.h>\`, \`<net/sock.h>\` with BCC's kernel include
flags, \`clang -O2 -emit-llvm -c\` then \`clang -target bpf\`, against \`MOUNT/current\` (a C server: \`MOUNT\`) or the plain
directory. Each mount is served by its own process. Cells: median time (median of per-round ratios to the plain
directory run in the same round).${pinned ? ' Pinned (`--pinned`): clang and the tools FIFO on CPU 0, every server thread SCHED_RR on CPU 1.' : ''}

| | plain dir | ${mounts.map(sideLabel).join(' | ')} |
| --- | ---: | ${mounts.map(() => '---:').join(' | ')} |
${row(`compile, warm (median of ${warmRuns})`, warm)}
${row(`compile, cold: fresh mount, drop_caches (median of ${coldRuns})`, cold)}
${row('find over the tree, warm (median of 3)', findWarm)}
${row('find over the tree, after drop_caches', findCold)}
${row('read every file, warm (median of 3)', readWarm)}
${row('read every file, after drop_caches', readCold)}
| server start to mounted (median of ${coldRuns}) | | ${mounts.map((b) => ms(median(startTimes[b]!))).join(' | ')} |

FUSE requests per compile (reaching the daemon):

| | warm | cold |
| --- | --- | --- |
${backends.map((b) => `| ${LABEL[b]} | ${fmtCounts(warmCounts[b] ?? {})} | ${fmtCounts(coldCounts[b] ?? {})} |`).join('\n')}

${tracedTable}

- Verification (bytes proven against chunk digests before first served; index checksum at load), on / off: ${verificationLine(backends, { warm, cold, start: startTimes })}.
- READs of a cold compile answered from the lookup prefetch (bytes read when the file was looked up): ${backends
      .filter((b) => b.startsWith('kernel'))
      .map((b) => `${LABEL[b]} ${coldPrefetched[b] ?? 0} of ${coldCounts[b]?.['read'] ?? 0}`)
      .join('; ')}.
- Requests to read every file after drop_caches: ${backends.map((b) => `${LABEL[b]} ${fmtCounts(readCounts[b] ?? {})}`).join('; ')}.
- Server RSS at the end (peak): ${mounts.map((b) => `${sideLabel(b)} ${(rss[b]!.rssKiB / 1024).toFixed(0)} MiB (${(rss[b]!.hwmKiB / 1024).toFixed(0)} MiB)`).join(', ')}.
- Targets: the default backend's warm compile within 1.05× of the plain directory; fuse-native's warm compile within 1.15× and cold within 2×.${noNative ? ` fuse-native not measured: ${noNative}.` : ''}${referenceSkips.map((r) => ` ${r}.`).join('')}${noTrace ? ` Requests not traced: ${noTrace}.` : ''}
- All warm compile runs: ${sides.map((s) => `${s} ${warm[s]!.map((x) => x.toFixed(0)).join('/')}`).join('; ')} ms.
- Machine: ${machineLine()}; ${(await run('clang', ['--version'])).stdout.split('\n')[0]}; load average at the end ${load} (shared machine: absolute times drift, ratios within a round are what to read).

Reproduce, from the checkout: \`sudo sh -c 'npx tsc -p . && node dist/bench/fuse.js'\` (\`--runs N\`, \`--cold N\`, \`--no-native\`, \`--no-reference\`, \`--no-trace\`, \`--pinned\`, \`--no-write\`)
`;
    console.log(md);
    if (write) await writeSection('fuse', md);
  } finally {
    for (const s of servers.values()) await s.stop().catch((err: unknown) => console.error('stopping a bench server:', err));
    if (plain) await removeDir(plain);
    await removeDir(work);
    await removeDir(cacheDir);
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
