/**
 * The fuse-native backend: libfuse2's high-level (path-based) API, driven from JS.
 *
 * Every request arrives as a path; the answer comes from `model.resolvePath`, which never
 * follows symlinks (the kernel resolves them itself and only hands us resolved paths). `open`
 * returns the inode the path meant as the handle, so reads on a descriptor reach that inode's bytes.
 *
 * The path API gives the kernel one inode (one page cache, one size) per path. That is why the
 * model serves every tree under `by-digest/<digest>/` and makes `current` and `<release>`
 * symlinks: a path inside a tree always names one build's file, so a kernel swap never leaves
 * the kernel an inode whose cached size and pages belong to another build. Only the symlinks
 * change meaning, and libfuse2 never lets the kernel cache a symlink's target (no
 * FUSE_CACHE_SYMLINKS), so every walk through `current` asks us for it afresh.
 *
 * Facts about fuse-native 2.2.6 and libfuse2 that shape this file (measured here):
 * - every callback runs on the JS thread; nothing here may block it (no sync I/O);
 * - reads pread the pack through libuv's threadpool, so the serving process must never keep
 *   UV_THREADPOOL_SIZE (4) fs calls on its own mount in flight: each holds a pool thread until
 *   its FUSE request is answered, which needs a pool thread (measured: four concurrent
 *   readFile()s of the mount from the daemon hang it, threads in D state, until the connection
 *   is aborted through /sys/fs/fuse/connections/N/abort). The daemon itself never reads its mount;
 * - fuse-native exposes no `ro`, `use_ino` or `negative_timeout` option and drops falsy ones,
 *   so the libfuse options it cannot express are appended to `fsname` (libfuse splits the one
 *   `-o` string on commas: `fsname=kheaders,ro,...` is parsed as separate options);
 * - libfuse2 opens /dev/fuse without close-on-exec, and fuse-native has no way to push cache
 *   invalidations; we use that descriptor (found through /proc/self/fd) to write the kernel's
 *   FUSE_NOTIFY_INVAL_ENTRY messages ourselves when a swap re-points `current` or `<release>`.
 */
import { createRequire } from 'node:module';
import { access, constants as fsConstants, readFile, readdir, readlink } from 'node:fs/promises';
import { write as fsWrite } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { KheadersError, errnoOf } from '../../errors.js';
import type { Logger } from '../../log.js';
import { ROOT_INO, type FsAttr, type FsInvalidation, type FsModel } from './fs-model.js';
import { errnoFor } from './errno.js';
import { FUSE_ROOT_ID, encodeNotifyInvalEntry } from './kernel/protocol.js';
import { detachMount, isMounted, prepareMountpoint } from './mountpoint.js';
import { within } from './within.js';
import type { FuseMount, FuseOpCounts, MountOptions } from './types.js';

// ---- the slice of fuse-native's (untyped) API we use ---------------------------------------------

interface NativeStat {
  mode: number;
  uid: number;
  gid: number;
  size: number;
  nlink: number;
  ino: number;
  blksize: number;
  blocks: number;
  /** Milliseconds since the epoch (fuse-native accepts numbers or Dates). */
  atime: number;
  mtime: number;
  ctime: number;
}

interface NativeStatfs {
  bsize: number;
  frsize: number;
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  favail: number;
  fsid: number;
  flag: number;
  namemax: number;
}

/** Callbacks take 0 or a negative errno first; read's takes the byte count (or -errno) alone. */
type Done = (code: number) => void;

interface NativeOps {
  init(cb: Done): void;
  getattr(p: string, cb: (code: number, st?: NativeStat) => void): void;
  readdir(p: string, cb: (code: number, names?: string[], stats?: NativeStat[]) => void): void;
  readlink(p: string, cb: (code: number, target?: string) => void): void;
  open(p: string, flags: number, cb: (code: number, fh?: number) => void): void;
  read(p: string, fh: number, buf: Buffer, len: number, pos: number, cb: Done): void;
  statfs(p: string, cb: (code: number, st?: NativeStatfs) => void): void;
  access(p: string, mode: number, cb: Done): void;
  // Write-type operations: all EROFS. Their arguments are irrelevant; the last one is the callback.
  [writeOp: string]: (...args: never[]) => void;
}

interface NativeFuse {
  mount(cb: (err: Error | null) => void): void;
  unmount(cb: (err: Error | null) => void): void;
}

interface NativeFuseClass {
  new (mnt: string, ops: NativeOps, opts: Record<string, string | number | boolean | Record<string, number | false>>): NativeFuse;
}

// ---- tuning -------------------------------------------------------------------------------------

/**
 * Kernel caching for this backend.
 *
 * autoCache, not kernelCache: with kernel_cache libfuse tells the kernel on every open to keep
 * the file's page cache, forever. Paths inside a tree never change meaning (the model puts trees
 * under by-digest/), but an entry rebuilt after damage has the same digest and so the same paths;
 * auto_cache keeps the pages only while the file's mtime and size are those libfuse last saw (the
 * model's mtimes differ per entry instance in their millisecond part), so warm compiles still
 * read every header from the page cache (zero read callbacks) and a rebuilt entry is noticed at
 * the next open. FUSE_NOTIFY_INVAL_ENTRY for re-pointed root names (DeviceNotifier) drops the
 * kernel's dentries for `current`, `<release>` and `by-digest` at once instead of at expiry.
 *
 * Long attr/entry/negative timeouts (3600 s): a compiler's include search is mostly lookups of
 * names that exist in one -I directory and not in the others; with these cached a warm compile
 * costs only its opens (which always reach libfuse) and a few readlinks of `current`. Swaps are
 * pushed to the kernel (2, 3) instead of waiting for expiry; when this mount's /dev/fuse
 * descriptor cannot be identified, the mount is made with `fallbackTimeoutSec` instead.
 */
export interface NativeTuning {
  autoCache: boolean;
  kernelCache: boolean;
  /** Seconds the kernel may trust names and attributes when swaps are pushed to it. */
  timeoutSec: number;
  /** Seconds when they cannot be pushed (no /dev/fuse descriptor found). */
  fallbackTimeoutSec: number;
  /** Serve reads uncached (FOPEN_DIRECT_IO on every open). */
  directIo: boolean;
  /** Write invalidations to /dev/fuse on swaps. */
  notify: boolean;
}

export const DEFAULT_NATIVE_TUNING: Readonly<NativeTuning> = {
  autoCache: true,
  kernelCache: false,
  timeoutSec: 3600,
  fallbackTimeoutSec: 1,
  directIo: false,
  notify: true,
};

const MOUNT_TIMEOUT_MS = 20_000;
/** Per-request timeouts for fuse-native: `default` applies to ops not named. */
const NATIVE_OP_TIMEOUTS: Record<string, number | false> = { default: 30_000, getattr: false, readdir: false, readlink: false, open: false, access: false, statfs: false };
/** open(2) access-mode bits; Node does not export O_ACCMODE. */
const O_ACCMODE = 3;

const E = os.constants.errno;
const neg = (errno: number): number => -errno;

const WRITE_OPS = ['write', 'create', 'mknod', 'mkdir', 'unlink', 'rmdir', 'rename', 'link', 'symlink', 'chmod', 'chown', 'truncate', 'ftruncate', 'utimens', 'setxattr', 'removexattr'] as const;

// ---- entry point ----------------------------------------------------------------------------------

export async function mountNative(opts: MountOptions & { tuning?: Partial<NativeTuning> }): Promise<FuseMount> {
  const { model, log } = opts;
  const tuning: NativeTuning = { ...DEFAULT_NATIVE_TUNING, ...opts.tuning };
  const allowOther = opts.allowOther ?? true;

  await checkDevice();
  await checkPermission(allowOther);
  const Fuse = loadFuseNative();
  const mountpoint = await prepareMountpoint(opts.mountpoint, log);
  // fuse-native answers as soon as it mounts: held, it mounts only once the model is ready.
  opts.onUnderWay?.();
  await opts.until;

  const counts: Record<string, number> = {};
  const count = (op: string): void => {
    counts[op] = (counts[op] ?? 0) + 1;
  };
  const ops = makeOps(model, log, count);

  // Mount with long timeouts when swaps can be pushed to the kernel. Which /dev/fuse descriptor
  // is ours shows only after mounting (the one that was not there before); if that is ambiguous,
  // mount again with short timeouts rather than let the kernel hide a swap for an hour.
  let attempt = await mountOnce(Fuse, mountpoint, ops, tuning, tuning.notify, allowOther, log);
  if (tuning.notify && attempt.notifyFd === undefined) {
    log.warn({ fallbackTimeoutSec: tuning.fallbackTimeoutSec }, 'cannot tell which /dev/fuse descriptor is this mount; remounting with short cache timeouts');
    await unmountFuse(attempt.fuse, mountpoint, log);
    attempt = await mountOnce(Fuse, mountpoint, ops, tuning, false, allowOther, log);
  }
  const { fuse, timeout } = attempt;
  const notifier = attempt.notifyFd === undefined ? undefined : new DeviceNotifier(attempt.notifyFd, log);

  const unsubscribe = model.onInvalidate((inval) => {
    count('invalidate');
    notifier?.queue(rootNameFor(model, inval));
  });

  log.info({ mountpoint, backend: 'native', allowOther, autoCache: tuning.autoCache, timeoutSec: timeout, notify: notifier !== undefined }, 'FUSE mounted');

  let unmounting: Promise<void> | undefined;
  const unmount = (): Promise<void> => {
    unmounting ??= (async () => {
      unsubscribe();
      notifier?.stop();
      await unmountFuse(fuse, mountpoint, log);
      log.info({ mountpoint }, 'FUSE unmounted');
    })();
    return unmounting;
  };

  return {
    mountpoint,
    backend: 'native',
    unmount,
    opCounts: (): FuseOpCounts => ({ ...counts }),
  };
}

/** One mount(2) with the given caching; `notifyFd` is this mount's /dev/fuse descriptor, if known. */
async function mountOnce(
  Fuse: NativeFuseClass,
  mountpoint: string,
  ops: NativeOps,
  tuning: NativeTuning,
  notify: boolean,
  allowOther: boolean,
  log: Logger,
): Promise<{ fuse: NativeFuse; timeout: number; notifyFd: number | undefined }> {
  const timeout = notify ? tuning.timeoutSec : tuning.fallbackTimeoutSec;
  const extra = [
    'ro', // the VFS itself refuses writes (EROFS) before they reach us
    'use_ino', // st_ino is the model's inode number, as with the kernel backend
    'readdir_ino',
    `negative_timeout=${timeout}`, // failed include-path probes are answered by the kernel
    ...(tuning.directIo ? ['direct_io'] : []),
  ];
  const fuseOpts: Record<string, string | number | boolean | Record<string, number | false>> = {
    fsname: ['kheaders', ...extra].join(','),
    allowOther,
    mkdir: true,
    autoCache: tuning.autoCache,
    kernelCache: tuning.kernelCache,
    attrTimeout: timeout,
    entryTimeout: timeout,
    acAttrTimeout: timeout,
    // fuse-native arms a timer per request (15 s, then ETIMEDOUT). Only a read waits on I/O;
    // every other answer is computed synchronously, so their timers are pure overhead.
    timeout: NATIVE_OP_TIMEOUTS,
  };
  const before = notify ? await fuseDeviceFds() : [];
  const fuse = new Fuse(mountpoint, ops, fuseOpts);
  try {
    await within(
      new Promise<void>((resolve, reject) => fuse.mount((err) => (err ? reject(err) : resolve()))),
      MOUNT_TIMEOUT_MS,
      'the kernel did not start the FUSE session',
    );
  } catch (err) {
    // A mount that got as far as mount(2) but no further must not be left behind.
    if (await isMounted(mountpoint).catch(() => false)) await detachMount(mountpoint, log).catch(() => false);
    throw new KheadersError('E_FUSE', `cannot mount ${mountpoint}: ${describeMountFailure(err, allowOther)}`, { mountpoint, backend: 'native' }, { cause: err });
  }
  let notifyFd: number | undefined;
  if (notify) {
    const fresh = (await fuseDeviceFds()).filter((fd) => !before.includes(fd));
    if (fresh.length === 1) notifyFd = fresh[0];
  }
  return { fuse, timeout, notifyFd };
}

/** fuse-native's unmount (`fusermount -uz`, async), then make sure nothing is left mounted. */
async function unmountFuse(fuse: NativeFuse, mountpoint: string, log: Logger): Promise<void> {
  await new Promise<void>((resolve) => {
    fuse.unmount((err) => {
      if (err) log.warn({ err: err.message }, 'fuse-native unmount failed; detaching directly');
      resolve();
    });
  });
  if ((await isMounted(mountpoint)) && !(await detachMount(mountpoint, log))) {
    throw new KheadersError('E_FUSE', `cannot unmount ${mountpoint}; run: umount -l ${mountpoint}`, { mountpoint });
  }
}

// ---- operations -----------------------------------------------------------------------------------

function makeOps(model: FsModel, log: Logger, count: (op: string) => void): NativeOps {
  const ops: NativeOps = {
    init(cb) {
      cb(0);
    },
    getattr(p, cb) {
      count('getattr');
      const answer = (): void => {
        const a = model.resolvePath(p);
        if (!a) return cb(neg(E.ENOENT));
        cb(0, toStat(a));
      };
      // A node made on request (a module's header) is answered once it exists.
      const wait = model.preparePath?.(p);
      if (wait === undefined) return answer();
      wait.then(answer, (err: unknown) => cb(neg(errnoFor(err))));
    },
    readdir(p, cb) {
      count('readdir');
      const a = model.resolvePath(p);
      if (!a) return cb(neg(E.ENOENT));
      const list = a.kind === 'dir' ? model.readdir(a.ino) : undefined;
      if (!list) return cb(neg(E.ENOTDIR));
      const parent = p === '/' ? a : (model.resolvePath(path.posix.dirname(p)) ?? a);
      const names = ['.', '..'];
      const stats = [toStat(a), toStat(parent)];
      for (const d of list) {
        names.push(d.name);
        stats.push(toStat(d.attr));
      }
      cb(0, names, stats);
    },
    readlink(p, cb) {
      count('readlink');
      const a = model.resolvePath(p);
      if (!a) return cb(neg(E.ENOENT));
      const target = a.kind === 'symlink' ? model.readlink(a.ino) : undefined;
      if (target === undefined) return cb(neg(E.EINVAL));
      cb(0, target);
    },
    open(p, flags, cb) {
      count('open');
      if ((flags & O_ACCMODE) !== fsConstants.O_RDONLY || flags & fsConstants.O_TRUNC) return cb(neg(E.EROFS));
      const a = model.resolvePath(p);
      if (!a) return cb(neg(E.ENOENT));
      if (a.kind === 'dir') return cb(neg(E.EISDIR));
      // The handle is the inode itself: reads on this descriptor reach this inode's bytes even
      // if the entry is rebuilt meanwhile, and there is no table to clean up, so `release` needs
      // no callback (half the warm compile's requests were releases).
      cb(0, a.ino);
    },
    read(p, fh, buf, len, pos, cb) {
      count('read');
      const ino = fh !== 0 ? fh : model.resolvePath(p)?.ino;
      if (ino === undefined) return cb(neg(E.EBADF));
      model.read(ino, pos, len).then(
        (data) => {
          data.copy(buf, 0, 0, Math.min(data.length, len));
          cb(Math.min(data.length, len));
        },
        (err: unknown) => {
          const code = errnoFor(err);
          if (code !== E.ENOENT) log.error({ err, path: p, ino, pos, len }, 'FUSE read failed');
          cb(neg(code));
        },
      );
    },
    statfs(_p, cb) {
      count('statfs');
      const s = model.statfs();
      cb(0, { bsize: s.blockSize, frsize: s.blockSize, blocks: s.blocks, bfree: 0, bavail: 0, files: s.files, ffree: 0, favail: 0, fsid: 0, flag: 1 /* ST_RDONLY */, namemax: s.nameMax });
    },
    access(p, mode, cb) {
      count('access');
      if (!model.resolvePath(p)) return cb(neg(E.ENOENT));
      cb(mode & fsConstants.W_OK ? neg(E.EROFS) : 0);
    },
  };
  for (const op of WRITE_OPS) {
    ops[op] = (...args: never[]) => {
      count(op);
      const cb = args[args.length - 1] as unknown as Done;
      cb(neg(E.EROFS));
    };
  }
  return ops;
}

function toStat(a: FsAttr): NativeStat {
  return {
    mode: a.mode,
    uid: 0,
    gid: 0,
    size: a.size,
    nlink: a.nlink,
    ino: a.ino,
    blksize: 4096,
    blocks: Math.ceil(a.size / 512),
    atime: a.mtimeMs,
    mtime: a.mtimeMs,
    ctime: a.mtimeMs,
  };
}

/**
 * The name directly under the mount root an invalidation falls under. libfuse's node ids are its
 * own (only the root's, 1, is known), so a name deeper down is invalidated through its top-level
 * ancestor: dropping that dentry drops the unused dentries under it.
 */
function rootNameFor(model: FsModel, inval: FsInvalidation): string | undefined {
  if (inval.parentIno === ROOT_INO) return inval.name;
  return model.readdir(ROOT_INO)?.find((d) => d.attr.ino === inval.parentIno)?.name;
}

// ---- pushing invalidations to the kernel -----------------------------------------------------------

/**
 * Writes FUSE_NOTIFY_INVAL_ENTRY for names under the mount root to this mount's /dev/fuse
 * descriptor (the same message libfuse's fuse_lowlevel_notify_inval_entry writes; fuse-native
 * just does not expose it). The write goes through libuv's threadpool: the kernel takes the
 * root directory's lock to drop the dentry and may wait for a lookup only this JS thread can
 * answer, so it must never be a synchronous write.
 */
class DeviceNotifier {
  private readonly pending = new Set<string>();
  private scheduled = false;
  private stopped = false;

  constructor(
    private readonly fd: number,
    private readonly log: Logger,
  ) {}

  queue(name: string | undefined): void {
    if (name === undefined || this.stopped) return;
    this.pending.add(name);
    if (this.scheduled) return;
    this.scheduled = true;
    // Batch the burst of names one setEntries() emits.
    setImmediate(() => void this.flush());
  }

  private async flush(): Promise<void> {
    this.scheduled = false;
    const names = [...this.pending];
    this.pending.clear();
    // The descriptor is libfuse's, not ours: if its session ended (an outside `fusermount -u`)
    // the number may now be a socket or a file, and these bytes must not land there.
    const target = await readlink(`/proc/self/fd/${this.fd}`).catch(() => undefined);
    if (target !== '/dev/fuse') {
      this.log.warn({ fd: this.fd, target }, 'the FUSE descriptor is gone; no more invalidations');
      this.stop();
      return;
    }
    await Promise.all(names.map((n) => this.invalEntry(n)));
  }

  stop(): void {
    this.stopped = true;
    this.pending.clear();
  }

  private invalEntry(name: string): Promise<void> {
    // The kernel backend's own encoder: the message is the same whoever owns the descriptor.
    const msg = encodeNotifyInvalEntry(FUSE_ROOT_ID, Buffer.from(name));
    return new Promise((resolve) => {
      if (this.stopped) return resolve();
      fsWrite(this.fd, msg, 0, msg.length, null, (err) => {
        // ENOENT: the kernel had no dentry for it, which is just as good.
        if (err && errnoOf(err) !== 'ENOENT') this.log.warn({ name, errno: errnoOf(err) }, 'FUSE invalidation failed');
        else this.log.debug({ name }, 'FUSE entry invalidated');
        resolve();
      });
    });
  }
}

/** This process's descriptors open on /dev/fuse. */
async function fuseDeviceFds(): Promise<number[]> {
  const dir = '/proc/self/fd';
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return [];
  }
  const out: number[] = [];
  await Promise.all(
    names.map(async (n) => {
      try {
        if ((await readlink(path.join(dir, n))) === '/dev/fuse') out.push(Number(n));
      } catch {
        // closed meanwhile
      }
    }),
  );
  return out.sort((a, b) => a - b);
}

// ---- preconditions and failures --------------------------------------------------------------------

async function checkDevice(): Promise<void> {
  try {
    await access('/dev/fuse', fsConstants.R_OK | fsConstants.W_OK);
  } catch (err) {
    const errno = errnoOf(err);
    if (errno === 'ENOENT') {
      throw new KheadersError('E_FUSE', 'no /dev/fuse: load the fuse module (modprobe fuse), or in a container pass --device /dev/fuse', { device: '/dev/fuse' }, { cause: err });
    }
    throw new KheadersError('E_FUSE', `/dev/fuse is not usable (${errno ?? String(err)}): not permitted for uid ${process.getuid?.() ?? '?'}`, { device: '/dev/fuse', errno }, { cause: err });
  }
}

async function checkPermission(allowOther: boolean): Promise<void> {
  if (process.getuid?.() === 0 || !allowOther) return;
  // As a user, fusermount (setuid) does the mount and refuses allow_other unless the admin allowed it.
  let conf = '';
  try {
    conf = await readFile('/etc/fuse.conf', 'utf8');
  } catch {
    // no file: the option is off
  }
  if (!/^\s*user_allow_other\b/m.test(conf)) {
    throw new KheadersError('E_FUSE', "allow_other is not permitted: non-root mounts need 'user_allow_other' in /etc/fuse.conf (or run as root)", { option: 'allow_other' });
  }
}

/** Throws E_FUSE with details.unavailable = true when this backend cannot run here at all. */
function loadFuseNative(): NativeFuseClass {
  // Loaded here, not at the top: commands that never mount should not load libfuse at all.
  const require = createRequire(import.meta.url);
  try {
    return require('fuse-native') as NativeFuseClass;
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    if (/libfuse\.so/.test(msg)) {
      throw new KheadersError('E_FUSE', `libfuse.so.2 is not installed (Debian/Ubuntu: apt install libfuse2 fuse): ${msg}`, { library: 'libfuse.so.2', unavailable: true }, { cause: err });
    }
    // e.g. no prebuild for this architecture (fuse-native ships linux-x64 and darwin-x64 only).
    throw new KheadersError('E_FUSE', `cannot load fuse-native on ${process.platform}-${process.arch}: ${msg}`, { unavailable: true }, { cause: err });
  }
}

function describeMountFailure(err: unknown, allowOther: boolean): string {
  const msg = err instanceof Error ? err.message : String(err);
  if (msg === 'fuse failed') {
    // libfuse printed the real reason to stderr; name the usual ones.
    const who = process.getuid?.() === 0 ? 'root without CAP_SYS_ADMIN (a container needs --cap-add SYS_ADMIN --device /dev/fuse)' : 'this user (fusermount must be installed setuid root)';
    return `libfuse could not mount (not permitted for ${who}${allowOther ? ', or allow_other refused' : ''}; libfuse's own message is on stderr)`;
  }
  return msg;
}
