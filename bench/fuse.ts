/**
 * fuse-native bench: one clang compile of a real BPF program (linux/sched.h, linux/bpf.h,
 * net/sock.h: several hundred headers deep) against the FUSE mount vs against a plain
 * `tar -xJf` directory of the same archive.
 *
 *   cold: first compile after a fresh mount, page cache dropped (echo 3 > drop_caches) before
 *         each side's compile; median of a few rounds.
 *   warm: median of several back-to-back compiles, sides alternating.
 *
 * The mount is served by a child process (this file with --serve), as the daemon would serve it:
 * its RSS is the daemon's, its callback counts are the compile's, and clang never shares a
 * process (or an inherited /dev/fuse descriptor) with the server.
 *
 * Reproduce: sudo sh -c 'cd /work/main && npx tsc -p . && node dist/bench/fuse.js'
 * (root: mounting with allow_other and dropping caches). --runs N sets the warm rounds (11),
 * --no-write prints without touching BENCHMARKS.md. KHEADERSD_FUSE_TUNING='{"timeoutSec":1}'
 * tries other cache settings.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createLogger } from '../src/log.js';
import { IndexFsModel } from '../src/serve/fuse/index-model.js';
import { mountNative, DEFAULT_NATIVE_TUNING, type NativeTuning } from '../src/serve/fuse/native.js';
import type { FuseOpCounts } from '../src/serve/fuse/types.js';
import { CacheStore } from '../src/store/cache.js';
import {
  BPF_PROGRAM,
  bpfCompile,
  clangResourceInclude,
  clangTaskStructSize,
  extractFixture,
  fixtureSkipReason,
  fuseSkipReason,
  ingestFixture,
  removeDir,
  run,
  runOk,
  tempDir,
  toolSkipReason,
} from '../test/helpers/fuse-env.js';
import { machineLine, median, writeSection } from './report.js';

type ServerMsg = { type: 'ready'; mountpoint: string } | { type: 'counts'; counts: FuseOpCounts } | { type: 'rss'; rssKiB: number; hwmKiB: number } | { type: 'error'; message: string };

function tuningFromEnv(): Partial<NativeTuning> {
  const raw = process.env['KHEADERSD_FUSE_TUNING'];
  return raw ? (JSON.parse(raw) as Partial<NativeTuning>) : {};
}

// ---- child: the daemon's half ---------------------------------------------------------------------

async function serve(cacheDir: string, id: string, mountpoint: string): Promise<void> {
  const log = createLogger('warn', process.stderr);
  const store = await CacheStore.open(cacheDir);
  const entry = await store.load(id);
  const model = new IndexFsModel({ log });
  model.setEntries([entry], id);
  const mount = await mountNative({ mountpoint, model, log, tuning: tuningFromEnv() });
  const send = (m: ServerMsg): void => {
    process.send!(m);
  };
  process.on('message', (msg: string) => {
    void (async () => {
      if (msg === 'counts') send({ type: 'counts', counts: mount.opCounts!() });
      else if (msg === 'rss') {
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
  // The parent died or let go without 'stop': never leave the mount behind.
  process.on('disconnect', () => {
    void mount.unmount().finally(() => process.exit(0));
  });
  send({ type: 'ready', mountpoint: mount.mountpoint });
}

// ---- parent: the compiler's half -----------------------------------------------------------------

class Server {
  private constructor(
    private readonly child: ChildProcess,
    readonly mountpoint: string,
  ) {}

  static async start(cacheDir: string, id: string, mountpoint: string): Promise<Server> {
    const child = fork(fileURLToPath(import.meta.url), ['--serve', cacheDir, id, mountpoint], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const ready = await new Promise<ServerMsg>((resolve, reject) => {
      child.once('message', (m: ServerMsg) => resolve(m));
      child.once('exit', (code) => reject(new Error(`bench server exited ${code} before mounting`)));
    });
    if (ready.type !== 'ready') throw new Error(`bench server: ${JSON.stringify(ready)}`);
    return new Server(child, ready.mountpoint);
  }

  private ask<T extends ServerMsg['type']>(msg: string, want: T): Promise<Extract<ServerMsg, { type: T }>> {
    return new Promise((resolve, reject) => {
      this.child.once('message', (m: ServerMsg) => (m.type === want ? resolve(m as Extract<ServerMsg, { type: T }>) : reject(new Error(JSON.stringify(m)))));
      this.child.send(msg);
    });
  }

  counts(): Promise<FuseOpCounts> {
    return this.ask('counts', 'counts').then((m) => m.counts);
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

function diff(after: FuseOpCounts, before: FuseOpCounts): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(after)) {
    const d = v - (before[k] ?? 0);
    if (d > 0) out[k] = d;
  }
  return out;
}

const total = (c: Record<string, number>): number => Object.values(c).reduce((a, b) => a + b, 0);
const fmtCounts = (c: Record<string, number>): string =>
  `${total(c)} (${Object.entries(c)
    .sort((a, b) => b[1] - a[1])
    .map(([k, v]) => `${k} ${v}`)
    .join(', ')})`;

async function dropCaches(): Promise<void> {
  await runOk('sync', []);
  await writeFile('/proc/sys/vm/drop_caches', '3\n');
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  if (args[0] === '--serve') return serve(args[1]!, args[2]!, args[3]!);
  const runsArg = args.indexOf('--runs');
  const warmRuns = runsArg >= 0 ? Number(args[runsArg + 1]) : 11;
  const coldRuns = 3;
  const write = !args.includes('--no-write');

  for (const reason of [await fuseSkipReason(), await fixtureSkipReason(), await toolSkipReason('clang')]) {
    if (reason) {
      console.log(`bench fuse-native skipped: ${reason}`);
      return;
    }
  }

  const cacheDir = await tempDir('bench-cache');
  const work = await tempDir('bench-work');
  const mnt = path.join(work, 'mnt');
  let plain: string | undefined;
  let server: Server | undefined;
  try {
    const entry = await ingestFixture(cacheDir);
    plain = await extractFixture();
    const resource = await clangResourceInclude();
    const size = await clangTaskStructSize(plain, resource, work);
    const src = path.join(work, 'prog.c');
    await writeFile(src, BPF_PROGRAM);

    const compile = async (root: string): Promise<number> => {
      const t0 = performance.now();
      await bpfCompile(root, resource, src, path.join(work, 'prog.o'), size);
      return performance.now() - t0;
    };
    const fuseRoot = (): string => path.join(mnt, 'current');

    // Cold: a fresh mount (no kernel caches for it) and an empty page cache, for both sides.
    const coldPlain: number[] = [];
    const coldFuse: number[] = [];
    let coldCounts: Record<string, number> = {};
    for (let i = 0; i < coldRuns; i++) {
      await dropCaches();
      coldPlain.push(await compile(plain));
      await server?.stop();
      server = await Server.start(cacheDir, entry.manifest.id, mnt);
      await dropCaches();
      const before = await server.counts();
      coldFuse.push(await compile(fuseRoot()));
      coldCounts = diff(await server.counts(), before);
    }

    // Warm: both sides compiled once already; alternate so drift hits both equally.
    await compile(plain);
    await compile(fuseRoot());
    const warmPlain: number[] = [];
    const warmFuse: number[] = [];
    let warmCounts: Record<string, number> = {};
    for (let i = 0; i < warmRuns; i++) {
      warmPlain.push(await compile(plain));
      const before = await server!.counts();
      warmFuse.push(await compile(fuseRoot()));
      warmCounts = diff(await server!.counts(), before);
    }
    const rss = await server!.rss();
    const load = (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ');

    const cold = { plain: median(coldPlain), fuse: median(coldFuse) };
    const warm = { plain: median(warmPlain), fuse: median(warmFuse) };
    const ms = (x: number): string => `${x.toFixed(0)} ms`;
    const ratio = (a: number, b: number): string => (a / b).toFixed(2);
    // Runs alternate, so each FUSE run has a plain neighbour under the same background load.
    const paired = (f: number[], p: number[]): string => median(f.map((x, i) => x / p[i]!)).toFixed(2);
    const tuning = { ...DEFAULT_NATIVE_TUNING, ...tuningFromEnv() };
    const md = `
## FUSE (fuse-native backend)

One compile of a BPF program including \`<linux/sched.h>\`, \`<linux/bpf.h>\` and
\`<net/sock.h>\` with BCC's kernel include flags, against \`MOUNT/current\` vs a plain \`tar -xJf\`
directory of the same archive (kheaders-6.1-x86_64.tar.xz, 6,691 entries). A compile is BCC's
pipeline: \`clang -O2 -emit-llvm -c\` (the host frontend, which reads the headers) then
\`clang -target bpf -O2 -c\` of the IR (x86 headers' inline asm cannot go through a
\`-target bpf\` frontend). The mount is served by a separate node process, as the daemon serves it.

| | plain dir | FUSE mount | ratio | target |
| --- | ---: | ---: | ---: | ---: |
| cold (fresh mount, caches dropped; median of ${coldRuns}) | ${ms(cold.plain)} | ${ms(cold.fuse)} | **${ratio(cold.fuse, cold.plain)}** | ≤ 2 |
| warm (median of ${warmRuns}) | ${ms(warm.plain)} | ${ms(warm.fuse)} | **${ratio(warm.fuse, warm.plain)}** | ≤ 1.15 |

- Median of the per-round ratios (each FUSE run over the plain run next to it): cold ${paired(coldFuse, coldPlain)}, warm ${paired(warmFuse, warmPlain)}.
- FUSE callbacks per compile: cold ${fmtCounts(coldCounts)}; warm ${fmtCounts(warmCounts)}.
  A warm compile's requests are its header opens, one per header (every open reaches the daemon, so
  that a descriptor keeps its tree across a kernel swap), and readlinks of \`current\`; lookups,
  attributes, negative lookups and file data all come from the kernel's caches.
- Daemon RSS while serving: ${(rss.rssKiB / 1024).toFixed(1)} MiB (peak ${(rss.hwmKiB / 1024).toFixed(1)} MiB), the fixture's index loaded.
- Cache settings: auto_cache ${tuning.autoCache}, kernel_cache ${tuning.kernelCache}, attr/entry/negative timeout ${tuning.timeoutSec} s, direct_io ${tuning.directIo}.
- All runs: cold plain ${coldPlain.map(ms).join(', ')}; cold FUSE ${coldFuse.map(ms).join(', ')}; warm plain ${warmPlain.map(ms).join(', ')}; warm FUSE ${warmFuse.map(ms).join(', ')}.
- Machine: ${machineLine()}; ${(await run('clang', ['--version'])).stdout.split('\n')[0]}; load average at the end ${load}
  (the machine is shared: every request is a hop to the daemon's JS thread, and a busy scheduler makes each hop slower).

Reproduce: \`sudo sh -c 'cd /work/main && npx tsc -p . && node dist/bench/fuse.js'\`
`;
    console.log(md);
    if (write) await writeSection('fuse-native', md);
  } finally {
    await server?.stop().catch((err: unknown) => console.error('stopping the bench server:', err));
    if (plain) await removeDir(plain);
    await removeDir(work);
    await removeDir(cacheDir);
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
