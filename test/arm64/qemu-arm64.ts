/**
 * Boot the arm64 test kernel with an initramfs under qemu-system-aarch64 and run one scenario.
 *
 * This speaks the VM harness's protocol (the one test/vm/init.sh and test/arm64/android-init.sh
 * implement): a host directory shared as 9p tag "khshare" holds scenario.sh, env.sh and out/;
 * the virtio-serial port "kh.events" carries "TAG TEXT" lines both ways (kh_emit, kh_wait_host);
 * the guest powers itself off. It is the subset the arm64 test needs, written while the shared
 * harness (test/vm/vm.ts, startVm with an initrd root) was not yet in the tree: the options and
 * the session have the same names and meaning, so moving over is a change of import.
 */
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { killAndClose, killWithThisProcess, startQemu } from '../vm/vm.js';

/**
 * A Cortex-A76: a phone core (ARMv8.2, LSE atomics), and what V8 runs correctly under qemu 7.2's
 * TCG here. With `-cpu max` (ARMv8.5+ features for V8's JIT to use) node crashed in 2 of 6 runs of
 * the same ingest, once with an impossible "Cannot access 'undefined' before initialization" on a
 * variable assigned a line before; with cortex-a76, 0 of 6 (measured here, the same image). `max`
 * also emulates QARMA pointer authentication, which made every exec several times slower.
 */
export const ARM64_CPU = 'cortex-a76';
export const GUEST_HTTP_PORT = 7711;

export interface Arm64VmOptions {
  /** Image.gz */
  kernel: string;
  initrd: string;
  scenario: string;
  env?: Readonly<Record<string, string>>;
  /** Forward a free 127.0.0.1 port on the host to the VM's port 7711 (virtio-net, slirp). */
  forwardHttp?: boolean;
  memoryMiB?: number;
  cpus?: number;
  /** qemu's -cpu (default ARM64_CPU). */
  cpu?: string;
  timeoutMs?: number;
  /** The qemu binary (default qemu-system-aarch64; the harness's own test gives a stand-in). */
  qemu?: string;
  onEvent?: (e: VmEvent) => void;
  consoleTo?: NodeJS.WritableStream;
}

export interface VmEvent {
  tag: string;
  text: string;
  atMs: number;
}

export interface VmResult {
  status: number | null;
  timedOut: boolean;
  events: VmEvent[];
  console: string;
  outDir: string;
  bootMs: number | null;
  durationMs: number;
}

export interface VmSession {
  readonly events: readonly VmEvent[];
  readonly httpPort: number | null;
  readonly outDir: string;
  waitFor(pred: (e: VmEvent) => boolean, what: string, timeoutMs?: number): Promise<VmEvent>;
  send(line: string): void;
  readonly result: Promise<VmResult>;
  dispose(): Promise<void>;
}

export async function startArm64Vm(opts: Arm64VmOptions): Promise<VmSession> {
  const work = await mkdtemp(path.join(os.tmpdir(), 'khvm-a64-')); // short: the socket path must fit sun_path
  const share = path.join(work, 'share');
  const outDir = path.join(share, 'out');
  await mkdir(outDir, { recursive: true });
  await writeFile(path.join(share, 'scenario.sh'), opts.scenario);
  await writeFile(path.join(share, 'env.sh'), Object.entries(opts.env ?? {}).map(([k, v]) => `export ${k}='${v.replace(/'/g, `'\\''`)}'\n`).join(''));

  const events: VmEvent[] = [];
  const waiters = new Set<() => void>();
  const started = performance.now();
  let consoleText = '';
  let ended = false;
  let eventSocket: net.Socket | null = null;
  const pending: string[] = [];
  const socketPath = path.join(work, 'ev.sock');
  const server = net.createServer((sock) => {
    eventSocket = sock;
    for (const line of pending.splice(0)) sock.write(line);
    let buffered = '';
    sock.setEncoding('utf8');
    sock.on('data', (s: string) => {
      buffered += s;
      for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        const sp = line.indexOf(' ');
        const event = { tag: sp < 0 ? line : line.slice(0, sp), text: sp < 0 ? '' : line.slice(sp + 1), atMs: Math.round(performance.now() - started) };
        events.push(event);
        opts.onEvent?.(event);
        for (const w of [...waiters]) w();
      }
    });
    sock.on('error', () => {});
  });
  const { child, httpPort } = await startQemu({ server, socketPath, work, forwardHttp: opts.forwardHttp === true }, (port) => {
    const append = ['console=ttyAMA0', 'quiet', 'panic=-1', 'rdinit=/init', ...(port !== null ? ['kh_net=1'] : [])];
    const args = [
      ...['-nodefaults', '-display', 'none', '-no-reboot', '-machine', 'virt', '-cpu', opts.cpu ?? ARM64_CPU, '-accel', 'tcg'],
      ...['-m', String(opts.memoryMiB ?? 1536), '-smp', String(opts.cpus ?? 2), '-serial', 'stdio'],
      ...['-kernel', opts.kernel, '-initrd', opts.initrd],
      ...['-fsdev', `local,id=khshare,path=${share},security_model=none`, '-device', 'virtio-9p-pci,fsdev=khshare,mount_tag=khshare'],
      ...['-device', 'virtio-serial-pci', '-chardev', `socket,id=khev,path=${socketPath}`, '-device', 'virtserialport,chardev=khev,name=kh.events'],
      ...(port !== null ? ['-nic', `user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:${port}-:${GUEST_HTTP_PORT}`] : []),
      ...['-append', append.join(' ')],
    ];
    return spawn(opts.qemu ?? 'qemu-system-aarch64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  });
  killWithThisProcess(child);
  const onConsole = (s: string): void => {
    consoleText += s;
    opts.consoleTo?.write(s);
  };
  child.stdout?.setEncoding('utf8').on('data', onConsole);
  child.stderr?.setEncoding('utf8').on('data', onConsole);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, opts.timeoutMs ?? 600_000);

  const result = new Promise<VmResult>((resolve, reject) => {
    child.on('error', (err) => {
      clearTimeout(timer);
      server.close();
      reject(err);
    });
    child.on('close', () => {
      clearTimeout(timer);
      ended = true;
      server.close();
      for (const w of [...waiters]) w();
      const exit = [...events].reverse().find((e) => e.tag === 'kh-exit');
      resolve({
        status: exit ? Number(exit.text) : null,
        timedOut,
        events,
        console: consoleText,
        outDir,
        bootMs: events.find((e) => e.tag === 'kh-booted')?.atMs ?? null,
        durationMs: Math.round(performance.now() - started),
      });
    });
  });

  return {
    events,
    httpPort,
    outDir,
    result,
    waitFor(pred, what, timeoutMs = 300_000) {
      return new Promise((resolve, reject) => {
        const check = (): void => {
          const hit = events.find(pred);
          if (!hit && !ended) return;
          waiters.delete(check);
          clearTimeout(t);
          if (hit) resolve(hit);
          else reject(new Error(`the VM ended before ${what}\n${consoleText.slice(-3000)}`));
        };
        const t = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}\n${consoleText.slice(-3000)}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    send(line) {
      if (eventSocket) eventSocket.write(`${line}\n`);
      else pending.push(`${line}\n`);
    },
    async dispose() {
      // Bounded as test/vm's: a qemu that will not finish dying must not hold the test process.
      await killAndClose(child, result, !ended, { socket: eventSocket, server });
      clearTimeout(timer);
      // A waitFor still pending rejects now rather than holding its timer for minutes.
      ended = true;
      for (const w of [...waiters]) w();
      await rm(work, { recursive: true, force: true });
    },
  };
}
