/**
 * What the VM tests share besides booting: why they cannot run here (said in one skip line), the
 * reference tree of a kernel's archive (taken from its kheaders.ko by the project's ELF reader,
 * then `tar -xJf`, the way BCC and bpftrace unpacked it), tree comparison, and reading what a
 * scenario left in its out directory.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { access, lstat, mkdir, readdir, readFile, readlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { archiveFromModule, kernelsSkipReason, type TestKernel } from './kernels.js';
import { KHEADERSD_CLI, qemuSkipReason, X86_64, type VmResult } from './vm.js';

export const sha256 = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');

/**
 * A VM test's own deadline, over the suite's 15 minutes: under TCG on a machine other work loads,
 * one boot can take minutes. A hang still fails sooner: every VM has its own timeout.
 */
export const VM_TEST_TIMEOUT_MS = 90 * 60_000;

/** One reason for all the VM tests of a file, or undefined when they can run. */
export async function vmSkipReason(kernels: readonly string[], opts: { root?: boolean } = {}): Promise<string | undefined> {
  if (process.platform !== 'linux') return `VM tests need Linux (this is ${process.platform})`;
  if (process.env['KHEADERSD_VM'] === 'off') return 'KHEADERSD_VM=off (CI runs the VM tests once, under the first Node: they take minutes)';
  // The VM's root is this machine's /, but its /tmp is its own (as on a device): what it runs must live elsewhere.
  for (const [what, file] of [['node', process.execPath], ['the checkout', KHEADERSD_CLI]] as const) {
    if (file.startsWith('/tmp/')) return `${what} is under /tmp (${file}), which the VM hides behind its own /tmp`;
  }
  if (opts.root && process.getuid?.() !== 0) return 'this VM test shares a host directory with the guest\'s root ownership kept (9p passthrough): run it as root';
  try {
    await access(KHEADERSD_CLI);
  } catch {
    return `${KHEADERSD_CLI} is missing: build first (npm run build)`;
  }
  return (await qemuSkipReason(X86_64)) ?? (await kernelsSkipReason(kernels));
}

/** The console's end and the events, for an assertion message. */
export function context(r: Pick<VmResult, 'console' | 'events'>, consoleChars = 4000): string {
  const events = r.events
    .filter((e) => !(e.json?.['msg'] === 'ingesting'))
    .slice(-40)
    .map((e) => `  [${e.atMs} ms] ${e.tag} ${e.text.slice(0, 300)}`)
    .join('\n');
  return `\n--- last events ---\n${events}\n--- console (end) ---\n${r.console.slice(-consoleChars)}`;
}

export async function readOut(r: Pick<VmResult, 'outDir'>, name: string): Promise<string> {
  return readFile(path.join(r.outDir, name), 'utf8');
}

/** A daemon's log as kh_start wrote it: one object per JSON line (other lines as {line}). */
export async function readLog(r: Pick<VmResult, 'outDir'>, name: string): Promise<Array<Record<string, unknown>>> {
  return (await readOut(r, `${name}.log`))
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      try {
        return JSON.parse(l) as Record<string, unknown>;
      } catch {
        return { line: l };
      }
    });
}

export interface ReferenceTree {
  /** The archive as kheaders.ko carries it. */
  archive: string;
  /** `tar -xJf` of it. */
  dir: string;
}

/** The kernel's own archive, checked against kheaders.sha256, and its `tar -xJf` extraction. */
export async function referenceTree(kernel: TestKernel, work: string): Promise<ReferenceTree> {
  const bytes = await archiveFromModule(kernel);
  const digest = sha256(bytes);
  if (digest !== kernel.archiveSha256) throw new Error(`the archive in ${kernel.kheadersKo} has sha256 ${digest}, not ${kernel.archiveSha256} as kheaders.sha256 says`);
  const archive = path.join(work, `${kernel.name}.tar.xz`);
  const dir = path.join(work, `${kernel.name}.tree`);
  await writeFile(archive, bytes);
  await mkdir(dir, { recursive: true });
  await tool('tar', ['-xJf', archive, '-C', dir]);
  return { archive, dir };
}

/**
 * Every difference between two trees (kind, bytes, symlink target), at most `max`; [] when equal.
 * Modes and times are not compared: the archive's are not the point, the bytes are.
 */
export async function treeDifferences(a: string, b: string, max = 20): Promise<string[]> {
  const diffs: string[] = [];
  const walk = async (rel: string): Promise<void> => {
    const [na, nb] = await Promise.all([readdir(path.join(a, rel)), readdir(path.join(b, rel))]);
    const names = new Set([...na, ...nb]);
    for (const name of [...names].sort()) {
      if (diffs.length >= max) return;
      const r = path.join(rel, name);
      const [sa, sb] = await Promise.all([lstat(path.join(a, r)).catch(() => null), lstat(path.join(b, r)).catch(() => null)]);
      if (!sa || !sb) {
        diffs.push(`${r}: only in ${sa ? a : b}`);
        continue;
      }
      const kind = (s: typeof sa): string => (s.isDirectory() ? 'dir' : s.isSymbolicLink() ? 'symlink' : s.isFile() ? 'file' : 'other');
      if (kind(sa) !== kind(sb)) diffs.push(`${r}: ${kind(sa)} vs ${kind(sb)}`);
      else if (sa.isDirectory()) await walk(r);
      else if (sa.isSymbolicLink()) {
        const [la, lb] = await Promise.all([readlink(path.join(a, r)), readlink(path.join(b, r))]);
        if (la !== lb) diffs.push(`${r}: -> ${la} vs -> ${lb}`);
      } else if (sa.size !== sb.size || !(await readFile(path.join(a, r))).equals(await readFile(path.join(b, r)))) {
        diffs.push(`${r}: contents differ (${sa.size} vs ${sb.size} bytes)`);
      }
    }
  };
  await walk('.');
  return diffs;
}

/** Run a host tool; resolves with its stdout, rejects with its output when its status is not in okStatus ([0]). */
export function tool(cmd: string, args: readonly string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number; okStatus?: readonly number[] } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (err += s));
    const timeoutMs = opts.timeoutMs ?? 120_000;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if ((opts.okStatus ?? [0]).includes(code ?? -1)) return resolve(out);
      // Say whether this harness's time limit killed it (`exited null` told nothing apart), and
      // keep the output's end: where it was when it failed or was stopped.
      const how = timedOut ? `was killed after ${timeoutMs / 1000} s, the time this test gives it` : signal !== null ? `was killed by ${signal}` : `exited ${code}`;
      const output = `${err}${out}`;
      reject(new Error(`${cmd} ${args.join(' ')} ${how}:\n${output.length > 6000 ? `…${output.slice(-6000)}` : output}`));
    });
  });
}

/** `node <the shipped CLI> ARGS` on the host. */
export function hostCli(args: readonly string[], env: NodeJS.ProcessEnv = process.env): Promise<string> {
  return tool(process.execPath, [KHEADERSD_CLI, ...args], { env });
}

/** Milliseconds since `start`, for the per-test timing lines. */
export function elapsed(start: number): string {
  return `${((performance.now() - start) / 1000).toFixed(1)} s`;
}
