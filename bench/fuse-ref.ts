/**
 * bench/fuse's references and measuring aids, apart from the bench's own flow:
 *
 * - mature C FUSE servers serving the same tree as the plain directory, so that the cost of the
 *   FUSE round trips themselves (the kernel, the scheduler, the paravirtualised guest) can be
 *   told apart from the cost of our server: bindfs (libfuse2's path API over the `tar -xJf`
 *   directory, single-threaded as it ships) and squashfuse_ll (libfuse3's low-level API, the
 *   one that speaks in node ids like our kernel backend, over an uncompressed squashfs image of
 *   that directory);
 * - counting the FUSE requests one mount gets, and the time they spend between the kernel
 *   sending them and the server's reply, from the kernel's own tracepoints (bpftrace), for any
 *   server, ours included;
 * - pinning: the compiler on one CPU (SCHED_FIFO) and the server on the other (SCHED_RR), so that other
 *   processes on a shared machine cannot run between a request and its reply.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, readFile, stat } from 'node:fs/promises';
import { opName } from '../src/serve/fuse/kernel/protocol.js';
import { run, runOk, toolSkipReason } from '../test/helpers/fuse-env.js';

export type Reference = 'bindfs' | 'squashfuse';
export const REFERENCES: readonly Reference[] = ['bindfs', 'squashfuse'];
export const REFERENCE_LABEL: Record<Reference, string> = {
  bindfs: 'bindfs (C, libfuse2 path API)',
  squashfuse: 'squashfuse_ll (C, libfuse3 low-level)',
};

/** Kernel caching as close to ours as each accepts: read-only, a day of entry, attribute and
 * negative-entry validity, page cache kept across opens. squashfuse_ll sets its own timeouts
 * (DBL_MAX) and takes no such options. */
const DAY = 86_400;
const BINDFS_OPTIONS = `ro,entry_timeout=${DAY},attr_timeout=${DAY},negative_timeout=${DAY},kernel_cache`;

/** Why a reference cannot be measured here, or undefined. */
export async function referenceSkipReason(ref: Reference): Promise<string | undefined> {
  if (ref === 'bindfs') return (await toolSkipReason('bindfs')) && 'bindfs is not installed (Debian package bindfs)';
  for (const tool of ['squashfuse_ll', 'mksquashfs']) {
    if (await toolSkipReason(tool)) return `${tool} is not installed (Debian packages squashfuse, squashfs-tools)`;
  }
  return undefined;
}

/** An uncompressed squashfs image of `dir` (data, inodes, fragments: no decompression to pay). */
export async function makeSquashfsImage(dir: string, image: string): Promise<void> {
  await runOk('mksquashfs', [dir, image, '-noI', '-noD', '-noF', '-noX', '-no-xattrs', '-all-root', '-quiet', '-no-progress']);
}

async function isMounted(mountpoint: string): Promise<boolean> {
  const info = await readFile('/proc/self/mountinfo', 'utf8');
  return info.split('\n').some((line) => line.split(' ')[4] === mountpoint);
}

/** A C FUSE server in the foreground, mounted on `mountpoint`. */
export class ReferenceServer {
  private constructor(
    private readonly child: ChildProcess,
    readonly mountpoint: string,
    /** From spawn to mounted. */
    readonly startMs: number,
  ) {}

  get pid(): number {
    return this.child.pid!;
  }

  static async start(ref: Reference, plainDir: string, squashfsImage: string, mountpoint: string): Promise<ReferenceServer> {
    await mkdir(mountpoint, { recursive: true });
    const t0 = performance.now();
    const [cmd, args] = ref === 'bindfs' ? ['bindfs', ['-f', '--no-allow-other', '-o', BINDFS_OPTIONS, plainDir, mountpoint]] : ['squashfuse_ll', ['-f', '-o', 'ro', squashfsImage, mountpoint]];
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${cmd} exited before mounting: ${stderr.trim()}`);
      if (await isMounted(mountpoint)) break;
      if (performance.now() - t0 > 10_000) {
        child.kill();
        throw new Error(`${cmd} did not mount ${mountpoint} in 10 s: ${stderr.trim()}`);
      }
      await new Promise((r) => setTimeout(r, 2));
    }
    return new ReferenceServer(child, mountpoint, performance.now() - t0);
  }

  async rss(): Promise<{ rssKiB: number; hwmKiB: number }> {
    const status = await readFile(`/proc/${this.pid}/status`, 'utf8');
    const kib = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0);
    return { rssKiB: kib('VmRSS'), hwmKiB: kib('VmHWM') };
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
    // Unmounting ends a foreground libfuse server's loop.
    const r = await run('umount', [this.mountpoint]);
    if (r.code !== 0) this.child.kill();
    await exited;
  }
}

// ---- counting requests from the kernel's side ---------------------------------------------------

export interface TracedRequests {
  counts: Record<string, number>;
  /** Summed over the requests: the kernel sending one → its reply ending it. */
  waitMs: number;
}

export async function traceSkipReason(): Promise<string | undefined> {
  if (await toolSkipReason('bpftrace')) return 'bpftrace is not installed';
  const r = await run('bpftrace', ['-l', 'tracepoint:fuse:fuse_request_send']);
  return r.stdout.includes('fuse_request_send') ? undefined : 'this kernel has no fuse:fuse_request_send tracepoint';
}

/** The kernel's dev_t of the FUSE connection behind `mountpoint` (major 0: an anonymous device). */
async function connectionDev(mountpoint: string): Promise<number> {
  const dev = (await stat(mountpoint)).dev;
  // glibc's st_dev packs the minor as low 8 bits + bits 20 and up; the kernel's is MKDEV(0, minor).
  return (dev & 0xff) | ((dev >>> 12) & ~0xff);
}

/** Run `fn` while bpftrace counts the requests the FUSE connection of `mountpoint` sends. */
export async function traceRequests(mountpoint: string, fn: () => Promise<unknown>): Promise<TracedRequests> {
  const dev = await connectionDev(mountpoint);
  const script = `
tracepoint:fuse:fuse_request_send /args->connection == ${dev}/ { @n[(uint32)args->opcode] = count(); @t[args->unique] = nsecs; }
tracepoint:fuse:fuse_request_end /args->connection == ${dev} && @t[args->unique]/ { @wait = sum(nsecs - @t[args->unique]); delete(@t[args->unique]); }
END { clear(@t); }`;
  const bt = spawn('bpftrace', ['-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  bt.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((resolve) => bt.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    bt.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('Attaching')) resolve();
    });
    void exited.then(() => reject(new Error(`bpftrace exited before attaching: ${err.trim()}`)));
  });
  try {
    await fn();
  } finally {
    bt.kill('SIGINT');
    await exited;
  }
  const counts: Record<string, number> = {};
  for (const m of out.matchAll(/^@n\[(\d+)\]: (\d+)$/gm)) counts[opName(Number(m[1]))] = Number(m[2]);
  const wait = /^@wait: (\d+)$/m.exec(out);
  return { counts, waitMs: wait ? Number(wait[1]) / 1e6 : 0 };
}

// ---- pinning ------------------------------------------------------------------------------------

/** The CPU the compiler runs on; servers run on the other one. */
export const CLIENT_CPU = 0;
export const SERVER_CPU = 1;
const RT_PRIORITY = '10';

/** This process's main thread, and so every child it spawns from now on: FIFO on CLIENT_CPU. */
export async function pinClient(pid: number): Promise<void> {
  await runOk('taskset', ['-p', '-c', String(CLIENT_CPU), String(pid)]);
  await runOk('chrt', ['-f', '-p', RT_PRIORITY, String(pid)]);
}

/**
 * Every thread of a server on SERVER_CPU, SCHED_RR at the compiler's priority. Not FIFO: with all
 * of a process's threads at one FIFO priority on one CPU, a thread that polls for another's work
 * never lets it run, and node does that (its main thread re-posts V8's incremental sweep task
 * until the concurrent sweeper is done; at exit a V8 worker waits for the main thread the same
 * way): the server hung at 100% CPU in both orders of priority. RR hands the CPU on after each
 * time slice (100 ms here), so such a wait costs a slice at worst, never the run.
 */
export async function pinServer(pid: number): Promise<void> {
  await runOk('taskset', ['-a', '-p', '-c', String(SERVER_CPU), String(pid)]);
  await runOk('chrt', ['-a', '-r', '-p', RT_PRIORITY, String(pid)]);
}
