/**
 * Boot a real kernel under qemu, run one scenario script inside it, and hand back what it said.
 *
 * The VM is the test's device: a real kernel with its own modules, sysfs, kprobes and FUSE. By
 * default its root is this machine's `/`, read-only over virtio-9p, so the checkout's dist/, this
 * machine's node, clang, bpftrace and BCC run inside unchanged; init.sh (PID 1) puts a tmpfs
 * overlay on top, copies the kernel's modules in, mounts the cache and runs the scenario.
 *
 *   const vm = await startVm({ kernel, scenario: 'kh_start serve serve; kh_wait_log serve mounted', cache: { kind: 'disk', image } });
 *   await vm.waitFor((e) => e.tag === 'serve' && e.json?.msg === 'ingesting', 'progress');
 *   await vm.kill();                                  // SIGKILL: the power cut
 *   const result = await vm.result;                   // events, console, exit status, out dir
 *
 * Channels:
 * - the console (the arch's serial port): kernel messages and the scenario's stdout/stderr, for humans;
 * - "kh.events", a virtio-serial port on a unix socket: lines "TAG TEXT" from the scenario
 *   (lib.sh's kh_emit, kh_start's forwarded daemon log) as they happen, and lines to it (send);
 * - the share (9p tag khshare): scenario.sh, env.sh and files/ in, out/ back (read it after `result`).
 *
 * The cache the daemon uses (/var/cache/kheadersd in the VM) is a fresh tmpfs, a host directory
 * shared read-write (it persists across boots and the host can look at it), or an ext4 disk image
 * on virtio-blk (the power-cut tests). `forwardHttp` forwards 127.0.0.1:<port> on the host to the
 * VM's port 7711, like `adb forward`.
 *
 * Everything that depends on the architecture is in a VmArch (qemu binary, machine, CPU, console,
 * how the kernel finds its root). X86_64 boots the host's / as root; an arch whose binaries this
 * host cannot run (arm64) boots an initramfs instead (`root: { kind: 'initrd' }`), whose /init
 * must speak the same protocol as init.sh: the khshare share, the kh.events port, power off.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI } from '../helpers/archives.js';

const HERE = path.dirname(fileURLToPath(import.meta.url)); // dist/test/vm
/** The checkout (dist/test/vm is three levels down). */
export const REPO_ROOT = path.resolve(HERE, '../../..');
/** init.sh and lib.sh stay in the source tree (tsc does not copy them): the VM reads them over 9p. */
export const VM_SCRIPTS = path.join(REPO_ROOT, 'test/vm');
/** The CLI as it ships (package.json's "bin"), run in the VM through the 9p share of /. */
export const KHEADERSD_CLI = CLI;
/** The port the daemon's HTTP listens on inside the VM (its default). */
export const GUEST_HTTP_PORT = 7711;
/** How long dispose() waits for a SIGKILLed qemu to close before closing its pipes itself. */
const DISPOSE_WAIT_MS = 10_000;

export interface VmArch {
  name: string;
  /** qemu-system-* binary. */
  qemu: string;
  machine: string;
  cpu: string;
  /** The kernel's console device (console=…), on the machine's first serial port. */
  console: string;
  /** Whether this host can run the arch's binaries, i.e. the host's / can be the VM's root. */
  hostRoot: boolean;
}

export const X86_64: VmArch = { name: 'x86_64', qemu: 'qemu-system-x86_64', machine: 'q35', cpu: 'max', console: 'ttyS0', hostRoot: true };

export interface VmKernel {
  arch: VmArch;
  /** bzImage / Image.gz. */
  image: string;
  /** The contents of lib/modules/<release>/ for this kernel, copied in by init (host root only). */
  modulesDir?: string;
}

export type VmRoot =
  /** The host's / read-only over 9p, with test/vm/init.sh as PID 1. */
  | { kind: 'host' }
  /** A self-contained initramfs; `init` is its PID 1 (default /init). */
  | { kind: 'initrd'; initrd: string; init?: string };

export type VmCache =
  | { kind: 'tmpfs' }
  /** A host directory, shared read-write (passthrough: the guest's owners and modes are kept). */
  | { kind: 'host-dir'; dir: string }
  /** A raw ext4 image (makeExt4Image) on virtio-blk; see diskArgs for the cache mode. */
  | { kind: 'disk'; image: string };

export interface VmOptions {
  kernel: VmKernel;
  /** Shell (POSIX sh) run as root inside the VM after lib.sh; its exit status is the result's. */
  scenario: string;
  /** Variables for the scenario (KH_NODE and KH_CLI are always set). */
  env?: Readonly<Record<string, string>>;
  /** Files for the scenario, by name: it finds them in $KH_FILES. */
  files?: Readonly<Record<string, string | Buffer>>;
  root?: VmRoot;
  cache?: VmCache;
  /** Forward a free 127.0.0.1 port on the host to the VM's port 7711. */
  forwardHttp?: boolean;
  memoryMiB?: number;
  cpus?: number;
  /** More kernel command-line arguments. */
  kernelArgs?: readonly string[];
  /** qemu is killed (and the result says timedOut) after this long. Default 5 minutes. */
  timeoutMs?: number;
  /** Called for every event as it arrives (e.g. to log progress). */
  onEvent?: (e: VmEvent) => void;
  /** Copy the console to this stream as it arrives (debugging: KHEADERSD_VM_CONSOLE=1 in tests). */
  consoleTo?: NodeJS.WritableStream;
  /** The console is this process's terminal (stdin included), for a person; not captured. */
  interactive?: boolean;
}

export interface VmEvent {
  tag: string;
  text: string;
  /** TEXT parsed, when it is a JSON object (the daemon's log lines are). */
  json?: Record<string, unknown>;
  /** Milliseconds since qemu started. */
  atMs: number;
}

export interface VmResult {
  /** The scenario's exit status; null if it never finished (killed, timed out, init failed). */
  status: number | null;
  /** qemu ended on its own (the guest powered off), not by kill() or the timeout. */
  poweredOff: boolean;
  killed: boolean;
  timedOut: boolean;
  events: VmEvent[];
  console: string;
  /** The scenario's $KH_OUT, on the host. Removed by dispose(). */
  outDir: string;
  /** qemu start to the scenario starting (kernel boot + init), and to the end. */
  bootMs: number | null;
  durationMs: number;
  /**
   * CPU time qemu used (user + system), sampled every half second: unlike the wall time, it
   * hardly depends on what else loads the machine, so it tells what a quiet one would take.
   */
  cpuMs: number;
}

export interface VmSession {
  readonly events: readonly VmEvent[];
  /** The host port forwarded to the VM's 7711, when forwardHttp. */
  readonly httpPort: number | null;
  readonly outDir: string;
  console(): string;
  /** The first event (past or future) matching `pred`; rejects on timeout or when the VM ends first. */
  waitFor(pred: (e: VmEvent) => boolean, what: string, timeoutMs?: number): Promise<VmEvent>;
  /** A line to the scenario (lib.sh's kh_wait_host). */
  send(line: string): void;
  /** SIGKILL qemu: the guest loses everything it had not written to its disk, as in a power cut. */
  kill(): Promise<VmResult>;
  readonly result: Promise<VmResult>;
  /** Remove the work directory (share, socket); the caller's cache dir or image stays. */
  dispose(): Promise<void>;
}

/** Why VMs of `arch` cannot run here (no qemu), or undefined. */
export async function qemuSkipReason(arch: VmArch = X86_64): Promise<string | undefined> {
  const found = await new Promise<boolean>((resolve) => {
    const child = spawn(arch.qemu, ['--version'], { stdio: 'ignore' });
    child.on('error', () => resolve(false));
    child.on('close', (code) => resolve(code === 0));
  });
  return found ? undefined : `${arch.qemu} is not installed (Debian: qemu-system-${arch.name === 'x86_64' ? 'x86' : 'arm'})`;
}

/**
 * The disk for a VmCache of kind 'disk'. cache=writethrough is the power-cut model: qemu tells the
 * guest the disk has no volatile write cache and completes a write only once it is in the host's
 * file, so SIGKILL of qemu loses exactly what the guest had not yet written to its disk (dirty
 * page cache, the uncommitted journal, requests still queued), as a power cut does to a device
 * without a write cache. (No qemu mode can also drop writes the disk already acknowledged but
 * had not flushed: qemu's own buffers are the host's page cache, which a SIGKILL does not lose;
 * with cache=writeback the guest would believe in a volatile cache that in fact never loses
 * anything, so writethrough is the honest choice.)
 */
function diskArgs(image: string): string[] {
  return ['-drive', `file=${image},format=raw,if=none,id=khdisk,cache=writethrough,aio=threads`, '-device', 'virtio-blk-pci,drive=khdisk'];
}

/** A fresh ext4 image of `sizeMiB` at `file` (e2fsprogs' mkfs.ext4). */
export async function makeExt4Image(file: string, sizeMiB = 256): Promise<void> {
  await runTool('mkfs.ext4', ['-q', '-F', '-m', '0', file, `${sizeMiB}M`]);
}

/** e2fsck -fn of an image that was unmounted cleanly. */
export async function fsck(image: string): Promise<{ status: number; output: string }> {
  return runTool('e2fsck', ['-f', '-n', image], { allowStatus: [0, 1, 2, 4, 8] });
}

export async function startVm(opts: VmOptions): Promise<VmSession> {
  const arch = opts.kernel.arch;
  const root: VmRoot = opts.root ?? { kind: 'host' };
  if (root.kind === 'host' && !arch.hostRoot) throw new Error(`${arch.name} cannot boot this host's / as its root: give an initrd`);
  // Short path: the events socket's name must fit in sun_path (108 bytes).
  const work = await mkdtemp(path.join(os.tmpdir(), 'khvm-'));
  const share = path.join(work, 'share');
  const outDir = path.join(share, 'out');
  await mkdir(outDir, { recursive: true });
  await mkdir(path.join(share, 'files'));
  await writeFile(path.join(share, 'scenario.sh'), opts.scenario);
  for (const [name, content] of Object.entries(opts.files ?? {})) await writeFile(path.join(share, 'files', path.basename(name)), content);
  const env = { KH_NODE: process.execPath, KH_CLI: KHEADERSD_CLI, ...opts.env };
  await writeFile(path.join(share, 'env.sh'), Object.entries(env).map(([k, v]) => `export ${k}=${shellQuote(v)}\n`).join(''));

  const events: VmEvent[] = [];
  const waiters = new Set<() => void>();
  let consoleText = '';
  let ended = false;
  const started = performance.now();
  const sinceStart = (): number => Math.round(performance.now() - started);

  const socketPath = path.join(work, 'ev.sock');
  let eventSocket: net.Socket | null = null;
  const pendingSends: string[] = [];
  const server = net.createServer((sock) => {
    eventSocket = sock;
    for (const line of pendingSends.splice(0)) sock.write(line);
    let buffered = '';
    sock.setEncoding('utf8');
    sock.on('data', (s: string) => {
      buffered += s;
      let nl;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const event = parseEvent(buffered.slice(0, nl), sinceStart());
        buffered = buffered.slice(nl + 1);
        events.push(event);
        opts.onEvent?.(event);
        for (const w of [...waiters]) w();
      }
    });
    sock.on('error', () => {}); // qemu going away mid-line is the power cut, not an error
  });
  const { child, httpPort } = await startQemu({ server, socketPath, work, forwardHttp: opts.forwardHttp === true }, (port) =>
    spawn(arch.qemu, qemuArgs(opts, { share, socket: socketPath, httpPort: port }), { stdio: opts.interactive ? 'inherit' : ['ignore', 'pipe', 'pipe'] }),
  );
  killWithThisProcess(child);
  const onConsole = (s: string): void => {
    consoleText += s;
    opts.consoleTo?.write(s);
  };
  for (const stream of [child.stdout, child.stderr]) stream?.setEncoding('utf8').on('data', onConsole);

  let cpuMs = 0;
  const cpuSampler = setInterval(() => {
    void readFile(`/proc/${child.pid}/stat`, 'utf8').then(
      (stat) => {
        // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
        const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        cpuMs = (Number(f[11]) + Number(f[12])) * 10; // USER_HZ is 100 on Linux
      },
      () => undefined,
    );
  }, 500);

  let killed = false;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, opts.timeoutMs ?? 300_000);

  const result = new Promise<VmResult>((resolve, reject) => {
    child.on('error', (err) => {
      clearTimeout(timer);
      clearInterval(cpuSampler);
      server.close();
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      clearInterval(cpuSampler);
      ended = true;
      server.close();
      for (const w of [...waiters]) w();
      const exit = [...events].reverse().find((e) => e.tag === 'kh-exit');
      const booted = events.find((e) => e.tag === 'kh-booted');
      resolve({
        status: exit ? Number(exit.text) : null,
        poweredOff: !killed && !timedOut && signal === null && code === 0,
        killed,
        timedOut,
        events,
        console: consoleText,
        outDir,
        bootMs: booted?.atMs ?? null,
        durationMs: sinceStart(),
        cpuMs,
      });
    });
  });

  return {
    events,
    httpPort,
    outDir,
    console: () => consoleText,
    result,
    waitFor(pred, what, timeoutMs = 120_000) {
      return new Promise((resolve, reject) => {
        const check = (): void => {
          const hit = events.find(pred);
          if (hit || ended) {
            waiters.delete(check);
            clearTimeout(t);
            if (hit) resolve(hit);
            else reject(new Error(`the VM ended before ${what}\n${tail(consoleText)}`));
          }
        };
        const t = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}\n${tail(consoleText)}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    send(line) {
      const data = `${line}\n`;
      if (eventSocket) eventSocket.write(data);
      else pendingSends.push(data);
    },
    async kill() {
      if (!ended) {
        killed = true;
        child.kill('SIGKILL');
      }
      return result;
    },
    async dispose() {
      if (!ended) killed = true;
      await killAndClose(child, result, !ended, { socket: eventSocket, server });
      clearTimeout(timer);
      clearInterval(cpuSampler);
      // A waitFor still pending rejects now rather than holding its timer for minutes.
      ended = true;
      for (const w of [...waiters]) w();
      await rm(work, { recursive: true, force: true });
    },
  };
}

/**
 * The events server listening on `socketPath`, a free port to forward (when asked), and qemu
 * spawned (here and in test/arm64). If any of it fails there is no session to dispose() of yet:
 * the server is closed and `work` removed here, since a listening server would hold the test
 * process open.
 */
export async function startQemu(
  where: { server: net.Server; socketPath: string; work: string; forwardHttp: boolean },
  spawnQemu: (httpPort: number | null) => ChildProcess,
): Promise<{ child: ChildProcess; httpPort: number | null }> {
  try {
    await new Promise<void>((resolve, reject) => {
      where.server.once('error', reject);
      where.server.listen(where.socketPath, resolve);
    });
    const httpPort = where.forwardHttp ? await freePort() : null;
    return { child: spawnQemu(httpPort), httpPort };
  } catch (err) {
    where.server.close();
    await rm(where.work, { recursive: true, force: true });
    throw err;
  }
}

/**
 * A VM's end, for dispose() (here and in test/arm64): SIGKILL qemu when it still `runs`, and wait
 * for its 'close' (`result`) at most DISPOSE_WAIT_MS. SIGKILL ends qemu at once, but its 'close'
 * waits for its pipes; a qemu stuck in the kernel (D state) must not hold the test process, so
 * whatever of it is still open is then closed regardless: its pipes, the events socket and server.
 */
export async function killAndClose(child: ChildProcess, result: Promise<unknown>, runs: boolean, events: { socket: net.Socket | null; server: net.Server }): Promise<void> {
  if (runs) {
    child.kill('SIGKILL');
    await new Promise<void>((resolve) => {
      const bound = setTimeout(resolve, DISPOSE_WAIT_MS);
      void result.catch(() => undefined).finally(() => {
        clearTimeout(bound);
        resolve();
      });
    });
  }
  child.stdout?.destroy();
  child.stderr?.destroy();
  events.socket?.destroy();
  events.server.close();
}

/** Boot, run the scenario to its end, and return the result (dispose() it when done with outDir). */
export async function runVm(opts: VmOptions): Promise<VmResult & { dispose(): Promise<void> }> {
  const vm = await startVm(opts);
  const result = await vm.result;
  return { ...result, dispose: () => vm.dispose() };
}

/** qemu's command line for `opts`, given where the share and the events socket are on the host. */
const liveQemus = new Set<ChildProcess>();
let killHooked = false;

/**
 * qemu outlives a test process that is killed (the runner's timeout, ^C): a VM left running
 * holds a core and its files for as long as its scenario waits. Kill every live qemu when this
 * process exits or is told to stop.
 */
export function killWithThisProcess(child: ChildProcess): void {
  if (!killHooked) {
    killHooked = true;
    process.once('exit', killAllQemus);
    for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
      process.once(signal, () => {
        killAllQemus();
        process.kill(process.pid, signal);
      });
    }
  }
  liveQemus.add(child);
  child.once('exit', () => liveQemus.delete(child));
}

function killAllQemus(): void {
  for (const child of liveQemus) child.kill('SIGKILL');
}

export function qemuArgs(opts: VmOptions, p: { share: string; socket: string; httpPort: number | null }): string[] {
  const arch = opts.kernel.arch;
  const root: VmRoot = opts.root ?? { kind: 'host' };
  const cache: VmCache = opts.cache ?? { kind: 'tmpfs' };
  const ninep = (id: string, dir: string, tag: string, extra: string): string[] => [
    '-fsdev',
    `local,id=${id},path=${dir},${extra}`,
    '-device',
    `virtio-9p-pci,fsdev=${id},mount_tag=${tag}`,
  ];
  const append = [`console=${arch.console}`, 'quiet', 'panic=-1'];
  const args = [
    '-nodefaults',
    '-display',
    'none',
    '-no-reboot',
    '-machine',
    arch.machine,
    '-cpu',
    arch.cpu,
    '-accel',
    process.env['KHEADERSD_VM_ACCEL'] ?? 'tcg',
    '-m',
    String(opts.memoryMiB ?? 1536),
    '-smp',
    String(opts.cpus ?? 2),
    '-serial',
    'stdio',
    '-kernel',
    opts.kernel.image,
  ];
  switch (root.kind) {
    case 'host':
      args.push(...ninep('hostroot', '/', 'hostroot', 'readonly=on,security_model=none,multidevs=remap'));
      // cache=loose: the guest keeps what it read of the host's files (they do not change while it
      // runs) and reads ahead in msize requests. Without it every page of node's binary that a
      // start touches is its own 4 KiB 9p read, and each lookup goes to the host: about a third
      // of the qemu CPU time of a boot that starts node a few times (measured).
      append.push('root=hostroot', 'rootfstype=9p', 'rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose', 'ro', `init=${path.join(VM_SCRIPTS, 'init.sh')}`);
      if (opts.kernel.modulesDir !== undefined) append.push(`kh_modules=${opts.kernel.modulesDir}`);
      break;
    case 'initrd':
      args.push('-initrd', root.initrd);
      append.push(`rdinit=${root.init ?? '/init'}`);
      break;
  }
  args.push(...ninep('khshare', p.share, 'khshare', 'security_model=none'));
  args.push('-device', 'virtio-serial-pci', '-chardev', `socket,id=khev,path=${p.socket}`, '-device', 'virtserialport,chardev=khev,name=kh.events');
  switch (cache.kind) {
    case 'tmpfs':
      append.push('kh_cache=none');
      break;
    case 'host-dir':
      args.push(...ninep('khcache', cache.dir, 'khcache', 'security_model=passthrough'));
      append.push('kh_cache=9p');
      break;
    case 'disk':
      args.push(...diskArgs(cache.image));
      append.push('kh_cache=disk');
      break;
  }
  if (p.httpPort !== null) {
    args.push('-nic', `user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:${p.httpPort}-:${GUEST_HTTP_PORT}`);
    append.push('kh_net=1');
  }
  args.push('-append', [...append, ...(opts.kernelArgs ?? [])].join(' '));
  return args;
}

/** One line of the events port: "TAG TEXT", TEXT parsed when it is a JSON object. */
export function parseEvent(line: string, atMs: number): VmEvent {
  const sp = line.indexOf(' ');
  const tag = sp < 0 ? line : line.slice(0, sp);
  const text = sp < 0 ? '' : line.slice(sp + 1);
  let json: Record<string, unknown> | undefined;
  if (text.startsWith('{')) {
    try {
      const v: unknown = JSON.parse(text);
      if (v !== null && typeof v === 'object' && !Array.isArray(v)) json = v as Record<string, unknown>;
    } catch {
      // not JSON: the text alone
    }
  }
  return json ? { tag, text, json, atMs } : { tag, text, atMs };
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function tail(s: string, n = 3000): string {
  return s.length > n ? `…${s.slice(-n)}` : s;
}

/** A TCP port free on the loopback now (for qemu's hostfwd). */
export async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', resolve);
  });
  const addr = srv.address();
  await new Promise((resolve) => srv.close(resolve));
  if (addr === null || typeof addr === 'string') throw new Error('no TCP port');
  return addr.port;
}

function runTool(cmd: string, args: readonly string[], opts: { allowStatus?: readonly number[] } = {}): Promise<{ status: number; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (output += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (output += s));
    child.on('error', reject);
    child.on('close', (code) => {
      const status = code ?? -1;
      if ((opts.allowStatus ?? [0]).includes(status)) resolve({ status, output });
      else reject(new Error(`${cmd} ${args.join(' ')} exited ${status}:\n${output}`));
    });
  });
}
