/**
 * Mounting a /dev/fuse descriptor with the system's `mount` binary (no libfuse, no native code).
 *
 * mount(2) for FUSE takes the open /dev/fuse descriptor as the `fd=N` option; the `mount`
 * child is given ours as its fd 3 through `stdio` (child_process dups it without close-on-exec
 * into the child only — in this process it stays close-on-exec). util-linux and busybox need
 * `-i` so they do not go looking for a /sbin/mount.fuse helper; toybox (Android) has no helpers
 * and no `-i`. Every child is spawned asynchronously: once mounted, only this process's JS
 * thread answers the mount, so a synchronous child that touches it would never return.
 */
import { execFile, spawn } from 'node:child_process';
import { accessSync, constants as fsConstants, statSync } from 'node:fs';
import { access, readFile, realpath, stat } from 'node:fs/promises';
import path from 'node:path';
import { KheadersError } from '../../../errors.js';
import type { Logger } from '../../../log.js';

export type MountFlavor = 'util-linux' | 'busybox' | 'toybox' | 'unknown';

/** The fs type the mount shows in /proc/mounts (`fuse.<subtype>`; the kernel strips the
 * subtype to find the filesystem). */
export const FUSE_FSTYPE = 'fuse.kheadersd';
export const FUSE_SOURCE = 'kheadersd';
const CHILD_TIMEOUT_MS = 15_000;
/** The descriptor number the `mount` child sees the connection as. */
const CHILD_FD = 3;

export interface FdMountOptions {
  mountpoint: string;
  allowOther: boolean;
  uid: number;
  gid: number;
  /** Default 'mount' from PATH. */
  mountBin?: string;
  flavor?: MountFlavor;
  /** Called once the `mount` child is spawned: the rest happens in that process. */
  onSpawn?: () => void;
  /**
   * Gives the mount up: a `mount` child still running is killed, and mountFd throws the signal's
   * reason once it has exited. It may have mounted first: the caller looks (and unmounts).
   */
  signal?: AbortSignal;
}

/** What `mount --version` says about which implementation this is. */
export function flavorFromVersion(output: string): MountFlavor {
  if (/util-linux/i.test(output)) return 'util-linux';
  if (/toybox/i.test(output)) return 'toybox';
  if (/busybox/i.test(output)) return 'busybox';
  return 'unknown';
}

/**
 * Which `mount` this is, preferably without running it: a child costs every start a fork of the
 * daemon and an exec before the mount can begin (~5 ms here, more on a phone). Multi-call
 * binaries are known by the file a link leads to (Android's /system/bin/mount -> toybox), any
 * other by the one name its bytes hold (util-linux's carries "util-linux <version>", the text
 * --version prints). Only a binary that says none, or more than one, is asked `--version`.
 */
export async function detectMountFlavor(mountBin = 'mount', signal?: AbortSignal): Promise<MountFlavor> {
  return (await flavorFromBinary(mountBin)) ?? askMountVersion(mountBin, signal);
}

/** `signal`: the mount is given up; a `--version` that hangs is killed (and says 'unknown'). */
function askMountVersion(mountBin: string, signal?: AbortSignal): Promise<MountFlavor> {
  return new Promise((resolve) => {
    execFile(mountBin, ['--version'], { timeout: CHILD_TIMEOUT_MS, ...(signal ? { signal, killSignal: 'SIGKILL' as const } : {}) }, (_err, stdout, stderr) => resolve(flavorFromVersion(`${stdout}\n${stderr}`)));
  });
}

/** Beyond this a file is not a `mount` binary worth reading (toybox is ~1 MiB, busybox ~2). */
const MAX_MOUNT_BINARY_BYTES = 8 * 1024 * 1024;
const FLAVOR_MARKS: ReadonlyArray<[MountFlavor, string[]]> = [
  ['util-linux', ['util-linux']],
  ['toybox', ['toybox']],
  ['busybox', ['BusyBox', 'busybox']],
];

/** The flavor the file itself shows, or undefined when it does not show exactly one. */
export async function flavorFromBinary(mountBin: string): Promise<MountFlavor | undefined> {
  const file = await onPath(mountBin);
  if (file === undefined) return undefined;
  try {
    const real = await realpath(file);
    const name = path.basename(real);
    if (name === 'toybox' || name === 'busybox') return name;
    const st = await stat(real);
    if (!st.isFile() || st.size > MAX_MOUNT_BINARY_BYTES) return undefined;
    const bytes = await readFile(real);
    const shown = FLAVOR_MARKS.filter(([, marks]) => marks.some((m) => bytes.includes(m)));
    return shown.length === 1 ? shown[0]![0] : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The system's own binary directories, on the root or system partition: looked in synchronously
 * (a stat that finds nothing builds no Error), which is never a FUSE mount's answer to wait for.
 * Any other PATH directory (a home, a network file system) is probed through the thread pool.
 */
const SYSTEM_BIN_DIRS: ReadonlySet<string> = new Set(['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin', '/system/bin', '/system/xbin', '/vendor/bin']);

function executableNow(file: string): boolean {
  try {
    if (statSync(file, { throwIfNoEntry: false })?.isFile() !== true) return false;
    accessSync(file, fsConstants.X_OK);
    return true;
  } catch {
    return false; // not executable, or PATH names something that is no directory
  }
}

/**
 * Where `cmd` is as a child would find it: itself when it names a path, else the first
 * executable on PATH. The system directories are looked in at once, on this thread; only the
 * other directories PATH names ahead of the first system one that has it are probed through the
 * thread pool (at once; the first in PATH's order wins). At a start each probe that failed was a
 * pool round trip, ahead of the mount's own, and an Error with its stack on this thread.
 */
export async function onPath(cmd: string): Promise<string | undefined> {
  if (cmd.includes('/')) return cmd;
  const candidates = (process.env['PATH'] ?? '').split(':').filter((dir) => dir !== '').map((dir) => ({ dir, file: path.join(dir, cmd) }));
  const hit = candidates.findIndex(({ dir, file }) => SYSTEM_BIN_DIRS.has(path.normalize(dir)) && executableNow(file));
  const ahead = (hit < 0 ? candidates : candidates.slice(0, hit)).filter(({ dir }) => !SYSTEM_BIN_DIRS.has(path.normalize(dir)));
  const found = await Promise.all(ahead.map(({ file }) => access(file, fsConstants.X_OK).then(() => true, () => false)));
  return ahead[found.indexOf(true)]?.file ?? candidates[hit]?.file;
}

/**
 * The -o string. `ro` makes the VFS refuse every write with EROFS before it reaches us;
 * `default_permissions` makes the kernel check the (read-only) modes itself instead of asking
 * us with ACCESS; rootmode/user_id/group_id are required by the kernel for fd= mounts.
 */
export function mountOptionString(o: { fd: number; allowOther: boolean; uid: number; gid: number }): string {
  const opts = [`fd=${o.fd}`, 'rootmode=40000', `user_id=${o.uid}`, `group_id=${o.gid}`, 'ro', 'nosuid', 'nodev', 'noatime', 'default_permissions'];
  if (o.allowOther) opts.push('allow_other');
  return opts.join(',');
}

export function mountArgs(flavor: MountFlavor, o: { mountpoint: string; allowOther: boolean; uid: number; gid: number; fstype?: string }): string[] {
  const args = flavor === 'toybox' ? [] : ['-i'];
  args.push('-t', o.fstype ?? FUSE_FSTYPE, '-o', mountOptionString({ fd: CHILD_FD, ...o }), FUSE_SOURCE, o.mountpoint);
  return args;
}

/** `ended`: how a child that ran ended without an exit status (killed at its bound, or by a signal). */
function runChild(cmd: string, args: string[], extraFd?: number, onSpawn?: () => void, signal?: AbortSignal): Promise<{ code: number | null; output: string; ended?: string }> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve({ code: null, output: 'given up' });
    const stdio: Array<'ignore' | 'pipe' | number> = ['ignore', 'pipe', 'pipe'];
    if (extraFd !== undefined) stdio.push(extraFd);
    let output = '';
    let child: ReturnType<typeof spawn>;
    try {
      child = spawn(cmd, args, { stdio, timeout: CHILD_TIMEOUT_MS });
    } catch (err) {
      resolve({ code: null, output: err instanceof Error ? err.message : String(err) });
      return;
    }
    // Killed when given up, and done once it has exited (not once its pipes close: a process
    // it left behind may hold them): whatever it did to the mount is done by then.
    const givenUp = (): void => resolve({ code: null, output: 'given up' });
    const giveUp = (): void => {
      if (child.exitCode !== null || child.signalCode !== null) return givenUp();
      child.once('exit', givenUp);
      child.kill('SIGKILL');
    };
    signal?.addEventListener('abort', giveUp, { once: true });
    onSpawn?.();
    child.stdout?.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr?.on('data', (d: Buffer) => (output += d.toString()));
    child.on('error', (err) => resolve({ code: null, output: `${output}${err.message}` }));
    child.on('close', (code, by) => {
      signal?.removeEventListener('abort', giveUp);
      // Only the timeout kills it here (child.killed): said as that, not as a child that could not run.
      const ended = by === null ? undefined : child.killed ? `did not finish in ${CHILD_TIMEOUT_MS / 1000} s` : `was killed by ${by}`;
      resolve({ code, output: output.trim(), ...(ended ? { ended } : {}) });
    });
  });
}

/**
 * mount(2) `fd` on `mountpoint` through the `mount` binary. The kernel sends INIT as soon as the
 * mount exists; the caller's session must already be reading, or whatever `mount` does after
 * mount(2) (util-linux may stat the target) waits for it.
 */
export async function mountFd(fd: number, o: FdMountOptions, log: Logger): Promise<void> {
  const bin = o.mountBin ?? 'mount';
  const flavor = o.flavor ?? (await detectMountFlavor(bin));
  const args = mountArgs(flavor, o);
  log.debug({ bin, args, flavor }, 'mounting /dev/fuse descriptor');
  let r = await runChild(bin, args, fd, o.onSpawn, o.signal);
  if (r.code !== 0 && /unknown filesystem type/i.test(r.output) && !o.signal?.aborted) {
    // A kernel or mount without subtype support: plain `fuse` is the same filesystem.
    r = await runChild(bin, mountArgs(flavor, { ...o, fstype: 'fuse' }), fd, undefined, o.signal);
  }
  if (o.signal?.aborted) throw o.signal.reason;
  if (r.code !== 0) {
    const why = r.ended ? `${bin} ${r.ended}` : r.code === null ? `could not run ${bin}` : `${bin} exited with ${r.code}`;
    throw new KheadersError('E_FUSE', `cannot mount ${o.mountpoint}: ${why}${r.output ? `: ${r.output}` : ''}`, { mountpoint: o.mountpoint, args, backend: 'kernel' });
  }
}

/**
 * How long one unmount child may take (one takes milliseconds): a `umount` that hangs must not
 * hold a stop past its deadline (6 s), nor a second signal's detach past its bound (3 s, both
 * serve.ts), after which the process exits and leaves the mount behind, answering ENOTCONN.
 */
const UNMOUNT_CHILD_BOUND_MS = 900;

/**
 * `umount DIR`; on failure (busy), or no answer in time, `umount -l DIR`; then `fusermount -u -z
 * DIR`, which detaches it where that `umount` cannot. Says which one worked.
 */
export async function unmountPath(mountpoint: string, log: Logger, umountBin = 'umount'): Promise<'clean' | 'lazy' | 'failed'> {
  const bounded = (cmd: string, args: string[]): ReturnType<typeof runChild> => runChild(cmd, args, undefined, undefined, AbortSignal.timeout(UNMOUNT_CHILD_BOUND_MS));
  const r = await bounded(umountBin, [mountpoint]);
  if (r.code === 0) return 'clean';
  log.debug({ mountpoint, output: r.output }, 'umount failed; detaching lazily');
  const l = await bounded(umountBin, ['-l', mountpoint]);
  if (l.code === 0) return 'lazy';
  const f = await bounded('fusermount', ['-u', '-z', mountpoint]);
  if (f.code === 0) return 'lazy';
  log.warn({ mountpoint, output: l.output, fusermount: f.output }, 'umount -l failed');
  return 'failed';
}
