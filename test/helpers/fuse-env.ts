/**
 * What the FUSE tests and bench share: skip reasons (said out loud, never silently), test
 * entries built by the real ingest, async child processes, temp dirs.
 *
 * Everything that may touch a mount is asynchronous: a FUSE mount served by this process is
 * answered on this process's JS thread, so a synchronous call on it (execSync, fs.*Sync,
 * spawnSync) waits for itself forever. Asynchronous is not enough on its own either: an
 * fs.promises call on the mount holds a libuv threadpool thread until the FUSE request it
 * causes is answered, and the answer (a pread of the pack) needs a threadpool thread too. With
 * UV_THREADPOOL_SIZE (4) such calls in flight, this process deadlocks with itself. Read the
 * mount from this process one call at a time; bulk reads go through child processes.
 */
import { spawn } from 'node:child_process';
import { access, constants as fsc, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { createLogger, type Logger } from '../../src/log.js';
import type { CacheEntry } from '../../src/store/entry.js';
import { ingest } from '../../src/store/ingest.js';
import { FIXTURE_ARCHIVE, FIXTURE_RELEASE, writeTarXz, type SynthEntry } from './archives.js';

export const FIXTURE = process.env['KHEADERSD_FIXTURE'] ?? FIXTURE_ARCHIVE;
export { FIXTURE_RELEASE };
/** What the fixture's README says it holds (the 320 directories include the root, './'). */
export const FIXTURE_COUNTS = { files: 6368, dirs: 320, symlinks: 3 } as const;

export function quietLog(): Logger {
  return createLogger(process.env['KHEADERSD_TEST_LOG'] ? 'debug' : 'silent', process.stderr);
}

// ---- skip reasons --------------------------------------------------------------------------------

/**
 * Why the kernel-protocol backend cannot mount here, or undefined when it can. It speaks to
 * /dev/fuse itself, so it needs Linux, the device and root, and not libfuse.
 */
export async function fuseDeviceSkipReason(): Promise<string | undefined> {
  if (process.platform !== 'linux') return `FUSE tests need Linux (this is ${process.platform})`;
  try {
    await access('/dev/fuse', fsc.R_OK | fsc.W_OK);
  } catch (err) {
    return `/dev/fuse is missing or not usable (${(err as NodeJS.ErrnoException).code ?? String(err)})`;
  }
  if (process.getuid?.() !== 0) return 'FUSE mount tests run as root (they mount with allow_other and drop caches)';
  return undefined;
}

/** Why a fuse-native mount cannot be made here (what the kernel backend needs, and libfuse.so.2), or undefined. */
export async function fuseSkipReason(): Promise<string | undefined> {
  const device = await fuseDeviceSkipReason();
  if (device) return device;
  try {
    createRequire(import.meta.url)('fuse-native');
  } catch (err) {
    return `fuse-native cannot load (libfuse.so.2 missing?): ${(err as Error).message}`;
  }
  return undefined;
}

export async function fixtureSkipReason(): Promise<string | undefined> {
  try {
    await access(FIXTURE, fsc.R_OK);
    return undefined;
  } catch {
    return `the real header archive ${FIXTURE} is absent (set KHEADERSD_FIXTURE)`;
  }
}

/** Why `cmd` cannot be used, or undefined. */
export async function toolSkipReason(cmd: string): Promise<string | undefined> {
  const r = await run('sh', ['-c', `command -v ${cmd}`]);
  return r.code === 0 ? undefined : `${cmd} is not installed`;
}

// ---- processes and dirs --------------------------------------------------------------------------

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/**
 * An async child process, output captured. Never spawnSync: see the file comment.
 *
 * `cwd` is entered by a shell inside the child, never through spawn's own `cwd`: libuv changes
 * directory between fork and exec while the parent waits for the exec, so a cwd on a mount this
 * process serves hangs the parent (measured: clang with cwd = MOUNT/current never started).
 */
export function run(cmd: string, args: readonly string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number; input?: string | Buffer } = {}): Promise<RunResult> {
  const [file, argv] = opts.cwd === undefined ? [cmd, args] : ['sh', ['-c', 'cd -- "$0" && exec "$@"', opts.cwd, cmd, ...args]];
  return new Promise((resolve, reject) => {
    const child = spawn(file, argv, {
      env: opts.env ?? process.env,
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const errOut: Buffer[] = [];
    child.stdout!.on('data', (b: Buffer) => out.push(b));
    child.stderr!.on('data', (b: Buffer) => errOut.push(b));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 300_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(errOut).toString() });
    });
    if (opts.input !== undefined) child.stdin!.end(opts.input);
  });
}

/** run() that rejects unless the exit status is 0, with the output in the message. */
export async function runOk(cmd: string, args: readonly string[], opts: Parameters<typeof run>[2] = {}): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code ?? r.signal}:\n${r.stderr.slice(-4000)}${r.stdout.slice(-2000)}`);
  return r;
}

export function tempDir(prefix: string): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), `kheadersd-${prefix}-`));
}

export async function removeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true, maxRetries: 3 });
}

// ---- test entries --------------------------------------------------------------------------------

/** An entry of a synthetic archive (the core tests' type). */
export type TarSpec = SynthEntry;

/** A tar built with tar-stream, then xz-compressed with the xz tool, like the kernel's archive. */
export function makeTarXz(files: readonly TarSpec[], out: string): Promise<string> {
  return writeTarXz(files, out, new Date('2024-01-01T00:00:00Z'));
}

/**
 * A small kernel-like tree: a header per release/variant (content differs with `variant`, and
 * with it the sizes), a symlink, a multi-chunk file, and utsrelease.h naming the release.
 */
export function smallTree(release: string, variant: string, mtime = new Date('2024-01-01T00:00:00Z')): TarSpec[] {
  // 300 KiB (several FUSE reads), same length for every variant, bytes that depend on all of it.
  const big = Buffer.alloc(300 * 1024);
  let seed = 0;
  for (const ch of `${release}/${variant}`) seed = (seed * 131 + ch.charCodeAt(0)) >>> 0;
  for (let i = 0; i < big.length; i++) big[i] = ((i * 31) ^ (seed >>> (i % 24))) & 0xff;
  return [
    { name: './', type: 'directory', mtime },
    { name: './include/', type: 'directory', mtime },
    { name: './include/linux/', type: 'directory', mtime },
    { name: './include/linux/a.h', content: `/* a.h of ${release} ${variant} */\n#define A_VARIANT "${variant}"\n`, mtime },
    { name: './include/linux/big.bin', content: big, mtime },
    { name: './include/dt/', type: 'directory', mtime },
    { name: './include/dt/link.h', type: 'symlink', linkname: '../linux/a.h', mtime },
    { name: './include/generated/', type: 'directory', mtime },
    { name: './include/generated/utsrelease.h', content: `#define UTS_RELEASE "${release}"\n`, mtime },
  ];
}

/** Ingest a small tree through the real ingest; `keep` is high so tests control eviction. */
export async function ingestTree(cacheDir: string, work: string, files: readonly TarSpec[], release: string, setCurrent = false): Promise<CacheEntry> {
  const archive = await makeTarXz(files, path.join(work, `t-${release}-${Math.random().toString(36).slice(2)}.tar.xz`));
  const { entry } = await ingest({ cacheDir, archive, release, setCurrent, keep: 100, log: quietLog() });
  return entry;
}

export async function ingestFixture(cacheDir: string, setCurrent = true): Promise<CacheEntry> {
  const { entry } = await ingest({ cacheDir, archive: FIXTURE, setCurrent, keep: 100, log: quietLog() });
  return entry;
}

/** `tar -xJf` of the fixture into a fresh temp dir (the reference every mount test compares to). */
export async function extractFixture(): Promise<string> {
  const dir = await tempDir('extract');
  await runOk('tar', ['-xJf', FIXTURE, '-C', dir]);
  return dir;
}

/** `find DIR -type T | wc -l`, in a child (it may be the mount). */
export async function findCount(dir: string, type: 'f' | 'd' | 'l'): Promise<number> {
  const r = await runOk('sh', ['-c', 'find "$1"/ -mindepth 1 -type "$2" | wc -l', 'sh', dir, type]);
  return Number(r.stdout.trim());
}

export async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
}

// ---- BPF compile flags ---------------------------------------------------------------------------

/** BCC's kernel include flags (src/cc/frontends/clang/kbuild_helper.cc), relative to a header tree. */
export const BCC_KERNEL_FLAGS = [
  '-nostdinc',
  '-Iarch/x86/include',
  '-Iarch/x86/include/generated',
  '-Iinclude',
  '-Iarch/x86/include/uapi',
  '-Iarch/x86/include/generated/uapi',
  '-Iinclude/uapi',
  '-Iinclude/generated/uapi',
  '-include',
  'include/linux/kconfig.h',
  '-D__KERNEL__',
] as const;

/** clang's own headers (stdarg.h, stddef.h) that -nostdinc hides. */
export async function clangResourceInclude(): Promise<string> {
  const r = await runOk('clang', ['-print-resource-dir']);
  return path.join(r.stdout.trim(), 'include');
}

/** A tracing BPF program several headers deep: what a BCC tool compiles. */
export const BPF_PROGRAM = `
#include <linux/sched.h>
#include <linux/bpf.h>
#include <net/sock.h>

_Static_assert(sizeof(struct task_struct) == TASK_STRUCT_SIZE, "task_struct size");

struct event { int pid; char comm[TASK_COMM_LEN]; unsigned short family; };

__attribute__((section("kprobe/tcp_v4_connect"), used))
int trace_connect(struct pt_regs *ctx)
{
	struct sock *sk = (struct sock *)ctx->di;
	struct event ev = {};
	ev.family = sk ? sk->__sk_common.skc_family : 0;
	return ev.family + (int)sizeof(struct task_struct);
}

char _license[] __attribute__((section("license"), used)) = "GPL";
`;

/**
 * The flags of BCC's frontend pass for `src` against the tree at `root` (-I paths are relative:
 * run with cwd = root). TASK_STRUCT_SIZE feeds the program's _Static_assert.
 */
export function bpfFrontendArgs(resourceInclude: string, taskStructSize: number): string[] {
  return [
    ...BCC_KERNEL_FLAGS,
    '-isystem',
    resourceInclude,
    '-D__BPF_TRACING__',
    '-D__TARGET_ARCH_x86',
    '-Wno-unused-value',
    '-Wno-pointer-sign',
    '-Wno-compare-distinct-pointer-types',
    '-Wno-gnu-variable-sized-type-not-at-end',
    '-Wno-address-of-packed-member',
    '-Wno-tautological-compare',
    '-Wno-unknown-warning-option',
    `-DTASK_STRUCT_SIZE=${taskStructSize}`,
  ];
}

/**
 * Compile a BPF program against the header tree at `root`, the way BCC and the kernel's own
 * samples/bpf do: the C frontend runs for the host (x86 kernel headers carry x86 inline asm,
 * whose constraints `-target bpf` rejects even in unused inline functions), then
 * `clang -target bpf -c` turns the IR into a BPF object. Only the first step reads headers.
 */
export async function bpfCompile(root: string, resourceInclude: string, src: string, outObj: string, taskStructSize: number): Promise<void> {
  const bc = `${outObj}.bc`;
  await runOk('clang', ['-O2', '-emit-llvm', '-c', ...bpfFrontendArgs(resourceInclude, taskStructSize), src, '-o', bc], { cwd: root });
  await runOk('clang', ['-target', 'bpf', '-O2', '-Wno-override-module', '-c', bc, '-o', outObj], { cwd: root });
}

/** sizeof(struct task_struct) as clang computes it from the tree at `root` (via -emit-llvm). */
export async function clangTaskStructSize(root: string, resourceInclude: string, work: string): Promise<number> {
  const src = path.join(work, `size-${process.pid}.c`);
  await writeFile(src, '#include <linux/sched.h>\nunsigned long task_struct_size = sizeof(struct task_struct);\n');
  const args = bpfFrontendArgs(resourceInclude, 0);
  const r = await runOk('clang', ['-O2', '-S', '-emit-llvm', ...args, src, '-o', '-'], { cwd: root });
  const m = /@task_struct_size = [^\n]*global i64 (\d+)/.exec(r.stdout);
  if (!m) throw new Error(`no task_struct_size in clang's IR:\n${r.stdout.slice(0, 2000)}`);
  return Number(m[1]);
}
