/**
 * The kernel-protocol FUSE backend: the daemon speaks FUSE to /dev/fuse itself, in TypeScript.
 * No libfuse and no native addon, so it runs wherever Node and a `mount` binary do — arm64
 * boards and phones, Android (no libfuse at all) — as root.
 *
 *   /dev/fuse ── reader thread ──► FuseSession.dispatch ──► FsModel
 *        ▲                                  │ (replies: writeSync on the JS thread)
 *        └──────── notifier thread ◄── invalidations
 */
import { access, constants as fsConstants } from 'node:fs/promises';
import { KheadersError, errnoOf } from '../../../errors.js';
import { isFuse, isMounted, mountAt, prepareMountpoint } from '../mountpoint.js';
import type { PrefetchStats } from '../prefetch.js';
import type { FuseMount, FuseOpCounts, MountOptions } from '../types.js';
import { within } from '../within.js';
import { DevFuse, loopReaderAvailable, type DeviceEnd, type ReaderKind } from './device.js';
import { FUSE_SOURCE, detectMountFlavor, mountFd, onPath, unmountPath, type MountFlavor } from './mount.js';
import { FUSE_MIN_READ_BUFFER } from './protocol.js';
import { FuseSession, DEFAULT_SESSION_OPTIONS, type NegotiatedInit, type SessionOptions } from './session.js';

export { FuseSession, DEFAULT_SESSION_OPTIONS, type NegotiatedInit, type SessionOptions } from './session.js';
export { loopReaderAvailable, type DeviceEnd, type ReaderKind } from './device.js';

const INIT_TIMEOUT_MS = 20_000;
/** Room for the in header and write_in ahead of max_write bytes of data (80 bytes; a page). */
const HEADER_ROOM = 4096;

export interface KernelMountOptions extends MountOptions {
  session?: SessionOptions;
  /** Default /dev/fuse. */
  devicePath?: string;
  mountBin?: string;
  umountBin?: string;
  /** Skip `mount --version` detection (e.g. 'toybox' on Android). */
  mountFlavor?: MountFlavor;
  /** How requests are read (device.ts): 'auto' takes 'loop' when this Node allows it. */
  reader?: ReaderKind | 'auto';
}

export interface KernelFuseMount extends FuseMount {
  readonly backend: 'kernel';
  /** What INIT settled on with this kernel. */
  readonly init: NegotiatedInit;
  /** Resolves when the connection ends, by our unmount or anyone else's. */
  readonly closed: Promise<DeviceEnd>;
  opCounts(): FuseOpCounts;
  /** Node ids the kernel holds references to (lookups not yet forgotten). */
  knownNodes(): number;
  /** What the lookup prefetch did: reads started, READs answered from it, dropped untaken. */
  prefetchCounts(): PrefetchStats;
  readonly reader: ReaderKind;
}

function fuseError(message: string, details: Record<string, unknown> = {}, cause?: unknown): KheadersError {
  return new KheadersError('E_FUSE', message, { backend: 'kernel', ...details }, cause === undefined ? undefined : { cause });
}

/** Carries the caller's reason for not serving after all (opts.until's rejection, opts.signal's reason) out of the mount's steps, to be handed back as it is. */
class GivenUp extends Error {
  constructor(readonly reason: unknown) {
    super('the mount was given up');
  }
}

/** Whether our mount is at `mountpoint` (prepareMountpoint found none there: any is ours). */
async function mountedHere(mountpoint: string): Promise<boolean> {
  const m = await mountAt(mountpoint).catch(() => undefined);
  return m !== undefined && isFuse(m) && m.source === FUSE_SOURCE;
}

async function checkEnvironment(devicePath: string): Promise<void> {
  if (process.platform !== 'linux' && process.platform !== 'android') {
    throw fuseError(`the kernel FUSE backend needs Linux (this is ${process.platform})`);
  }
  if (process.getuid?.() !== 0) {
    throw fuseError(`the kernel FUSE backend mounts with mount(2) and needs root (uid ${process.getuid?.() ?? '?'}); run as root or use --fuse-backend native`);
  }
  try {
    await access(devicePath, fsConstants.R_OK | fsConstants.W_OK);
  } catch (err) {
    const errno = errnoOf(err);
    if (errno === 'ENOENT') throw fuseError(`no ${devicePath}: load the fuse module (modprobe fuse), or in a container pass --device /dev/fuse`, { device: devicePath }, err);
    throw fuseError(`${devicePath} is not usable: ${errno ?? String(err)}`, { device: devicePath, errno }, err);
  }
}

export async function mountKernel(opts: KernelMountOptions): Promise<KernelFuseMount> {
  const { model, log } = opts;
  const devicePath = opts.devicePath ?? '/dev/fuse';
  const allowOther = opts.allowOther ?? true;
  await checkEnvironment(devicePath);
  // Given up (opts.until rejected, opts.signal aborted), a `mount` child still running is killed:
  // one that hangs must not hold the start, or a stop, until its timeout, and leave its mount.
  const giveUp = new AbortController();
  const onAbort = (): void => giveUp.abort(new GivenUp(opts.signal?.reason));
  if (opts.signal?.aborted) onAbort();
  else opts.signal?.addEventListener('abort', onAbort, { once: true });
  // Which `mount` this is is looked up while the mountpoint and the device are made ready.
  // (It never rejects: a binary it cannot read is asked --version; one that cannot run is 'unknown', mounted as util-linux is.)
  // The child is started by the path found here, the file whose flavor is read: a bare name had
  // it walk PATH's directories itself while this thread waited for its exec (libuv's spawn does).
  const bin = onPath(opts.mountBin ?? 'mount').then((found) => found ?? opts.mountBin ?? 'mount', () => opts.mountBin ?? 'mount');
  const flavor = opts.mountFlavor !== undefined ? Promise.resolve(opts.mountFlavor) : bin.then((file) => detectMountFlavor(file, giveUp.signal));
  const mountpoint = await prepareMountpoint(opts.mountpoint, log);

  const sessionOptions = { ...DEFAULT_SESSION_OPTIONS, ...opts.session };
  const bufferSize = Math.max(FUSE_MIN_READ_BUFFER, sessionOptions.maxWrite + HEADER_ROOM);
  let dev: DevFuse;
  try {
    dev = await DevFuse.open(devicePath, bufferSize, log);
  } catch (err) {
    throw fuseError(`cannot open ${devicePath}: ${errnoOf(err) ?? String(err)}`, { device: devicePath }, err);
  }
  const session = new FuseSession(model, dev, log, opts.session);

  const wanted = opts.reader ?? 'auto';
  let reader: ReaderKind = wanted === 'auto' ? (loopReaderAvailable() ? 'loop' : 'thread') : wanted;
  let unmounting = false;
  let resolveClosed!: (end: DeviceEnd) => void;
  const closed = new Promise<DeviceEnd>((resolve) => (resolveClosed = resolve));
  const startReader = (): void =>
    dev.startReader(
      reader,
      (buf) => session.dispatch(buf),
      (end) => {
        session.end(end.code);
        if (!unmounting) log.warn({ mountpoint, ...end }, 'FUSE connection ended (unmounted from outside?)');
        resolveClosed(end);
      },
    );

  let init: NegotiatedInit;
  let mounted = false;
  const held = opts.until?.catch((reason: unknown) => {
    const given = new GivenUp(reason);
    giveUp.abort(given);
    throw given;
  });
  held?.catch(() => {}); // a rejection while `mount` still runs is not left unhandled
  try {
    // A reader thread waits for the mount by itself; the event-loop reader must not read an
    // unattached descriptor (EPERM would end it), so it starts once mount(2) is done. The
    // kernel queues INIT at mount time and `mount` does not wait for it, so nothing is lost.
    // Held (opts.until), neither starts before it resolves: the kernel keeps INIT, and every
    // request after it waits for INIT's answer, so the mount exists but answers nothing yet.
    if (reader === 'thread' && !held) startReader();
    await mountFd(dev.fd, { mountpoint, allowOther, uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, mountBin: await bin, ...(opts.onUnderWay ? { onSpawn: opts.onUnderWay } : {}), flavor: await flavor, signal: giveUp.signal }, log).finally(() => opts.signal?.removeEventListener('abort', onAbort));
    mounted = true;
    dev.mounted();
    if (held) {
      await held;
      if (reader === 'thread') startReader();
    }
    if (reader === 'loop') {
      try {
        startReader();
      } catch (err) {
        // The Pipe binding is Node-internal: if this Node refuses the descriptor, a reader
        // thread serves just as correctly (only each request's hop is slower).
        if (wanted === 'loop') throw err;
        log.warn({ err: err instanceof Error ? err.message : String(err) }, 'event-loop FUSE reader unavailable; using a reader thread');
        reader = 'thread';
        startReader();
      }
    }
    init = await within(session.initialized(), INIT_TIMEOUT_MS, 'the kernel did not start the FUSE session');
  } catch (err) {
    unmounting = true;
    session.end('mount failed');
    // The device first: closing it aborts the connection. An unmount of a mount whose INIT was
    // never answered (held back, or the kernel's INIT lost) waits for that answer in the kernel.
    await dev.close();
    // A `mount` child that failed, timed out or was killed may have mounted all the same.
    if (mounted || (await mountedHere(mountpoint))) await unmountPath(mountpoint, log, opts.umountBin);
    if (err instanceof GivenUp) throw err.reason;
    if (err instanceof KheadersError) throw err;
    throw fuseError(`cannot mount ${mountpoint}: ${err instanceof Error ? err.message : String(err)}`, { mountpoint }, err);
  }
  log.info({ mountpoint, backend: 'kernel', reader, protocol: `7.${init.minor}`, kernelProtocol: `${init.kernelMajor}.${init.kernelMinor}`, flags: `0x${init.flags.toString(16)}` }, 'FUSE mounted');

  let unmounted: Promise<void> | undefined;
  const unmount = (): Promise<void> => {
    unmounted ??= (async () => {
      unmounting = true;
      const how = dev.end ? 'gone' : await unmountPath(mountpoint, log, opts.umountBin);
      // A clean umount ends the connection (the reader sees ENODEV); after a lazy one the
      // superblock lives on while files are open, and closing our descriptor aborts it.
      if (how === 'clean') await dev.waitEnd(2000);
      await dev.close();
      session.end('unmounted');
      if (how === 'failed' && (await isMounted(mountpoint))) {
        throw fuseError(`cannot unmount ${mountpoint}; run: umount -l ${mountpoint}`, { mountpoint });
      }
      log.info({ mountpoint, how }, 'FUSE unmounted');
    })();
    return unmounted;
  };

  return {
    mountpoint,
    backend: 'kernel',
    init,
    reader,
    closed,
    unmount,
    opCounts: () => session.opCounts(),
    knownNodes: () => session.knownNodes(),
    prefetchCounts: () => session.prefetchCounts(),
  };
}
