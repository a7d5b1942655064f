/**
 * The mount point's life, shared by both FUSE backends: make it, notice a mount left behind by a
 * crash and clear it, tell whether something is mounted there, and detach.
 *
 * Everything here that could reach a mount is asynchronous, including the child processes (only
 * /proc/self/mountinfo, the kernel's own table, is read at once): once a backend has mounted,
 * its callbacks run on this process's JS thread, so any synchronous call that ends up touching
 * the mount (spawnSync('umount'), fs.statSync on it) waits for an answer only this thread can
 * give, and never returns.
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdir, readFile, readdir, realpath, stat } from 'node:fs/promises';
import path from 'node:path';
import { KheadersError, errnoOf } from '../../errors.js';
import type { Logger } from '../../log.js';

export interface MountInfo {
  /** Canonical absolute path, octal escapes decoded. */
  mountPoint: string;
  /** e.g. 'fuse', 'fuse.kheaders', 'fuseblk', 'ext4'. */
  fsType: string;
  /** The mount source; fsname= for a FUSE mount. */
  source: string;
  /** Per-mount options (ro, nosuid, ...). */
  options: string[];
}

/** Errnos a FUSE mount whose server is gone answers with. */
const STALE_ERRNOS = new Set(['ENOTCONN', 'ECONNABORTED']);
/** How long a stat on an existing mount may take before we call the server hung. */
const PROBE_TIMEOUT_MS = 3000;
const CHILD_TIMEOUT_MS = 15_000;

const MOUNTINFO = '/proc/self/mountinfo';

/** A mountinfo file (this process's by default), parsed; read asynchronously (see the file comment). */
export async function readMountInfo(file: string = MOUNTINFO): Promise<MountInfo[]> {
  return parseMountInfo(await readFile(file, 'utf8'));
}

/** The lines of a mountinfo file; a line that is not one is skipped. */
export function parseMountInfo(text: string): MountInfo[] {
  const out: MountInfo[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    // id parent maj:min root mountpoint options [optional fields...] - fstype source superoptions
    const fields = line.split(' ');
    const sep = fields.indexOf('-', 6);
    if (sep < 0 || fields.length < sep + 3) continue;
    out.push({
      mountPoint: unescapeMountField(fields[4]!),
      options: fields[5]!.split(','),
      fsType: fields[sep + 1]!,
      source: unescapeMountField(fields[sep + 2]!),
    });
  }
  return out;
}

function unescapeMountField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/**
 * The path the kernel lists the mount point under: the parent resolved through symlinks, plus
 * the last component (which may itself be a dead mount, so it is not stat'ed).
 */
export async function canonicalMountpoint(dir: string): Promise<string> {
  const abs = path.resolve(dir);
  const parent = path.dirname(abs);
  try {
    return path.join(await realpath(parent), path.basename(abs));
  } catch {
    return abs;
  }
}

/** The mount whose mount point is exactly `dir` (the topmost, if stacked), or undefined. */
export async function mountAt(dir: string, mountinfo: string = MOUNTINFO): Promise<MountInfo | undefined> {
  const want = await canonicalMountpoint(dir);
  return topmostAt(await readMountInfo(mountinfo), want);
}

function topmostAt(all: readonly MountInfo[], canonical: string): MountInfo | undefined {
  for (let i = all.length - 1; i >= 0; i--) if (all[i]!.mountPoint === canonical) return all[i];
  return undefined;
}

export async function isMounted(dir: string): Promise<boolean> {
  return (await mountAt(dir)) !== undefined;
}

export function isFuse(m: MountInfo): boolean {
  return m.fsType === 'fuse' || m.fsType.startsWith('fuse.') || m.fsType === 'fuseblk';
}

/** stat() that gives up after `ms` (a mount whose server is alive but stuck never answers). */
async function statWithin(p: string, ms: number): Promise<{ ok: true; isDir: boolean } | { ok: false; errno: string }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<{ ok: false; errno: string }>((resolve) => {
    timer = setTimeout(() => resolve({ ok: false, errno: 'ETIMEDOUT' }), ms);
  });
  const probe = stat(p).then(
    (st) => ({ ok: true as const, isDir: st.isDirectory() }),
    (err: unknown) => ({ ok: false as const, errno: errnoOf(err) ?? 'EIO' }),
  );
  try {
    return await Promise.race([probe, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function run(cmd: string, args: string[]): Promise<{ ok: boolean; output: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: CHILD_TIMEOUT_MS }, (err, stdout, stderr) => {
      resolve({ ok: !err, output: `${stdout}${stderr}`.trim() || (err ? err.message : '') });
    });
  });
}

/**
 * Detach whatever FUSE mount is at `dir`, lazily (it goes away when its last user does).
 * `umount -l` works for root; `fusermount -u -z` is how an unprivileged owner does it.
 * Resolves true when nothing is mounted there any more.
 */
export async function detachMount(dir: string, log: Logger): Promise<boolean> {
  const target = await canonicalMountpoint(dir);
  const attempts: Array<[string, string[]]> = [
    ['umount', ['-l', target]],
    ['fusermount', ['-u', '-z', target]],
  ];
  for (const [cmd, args] of attempts) {
    if (!(await isMounted(target))) return true;
    const r = await run(cmd, args);
    if (!r.ok) log.debug({ cmd, args, output: r.output }, 'unmount attempt failed');
  }
  return !(await isMounted(target));
}

/**
 * Make `dir` ready to mount on and return its canonical path: create it when missing, clear a
 * stale FUSE mount a crashed daemon left (stat fails with ENOTCONN), refuse a live mount or a
 * non-empty directory (libfuse2 refuses those too, with a less helpful message).
 */
export async function prepareMountpoint(dir: string, log: Logger): Promise<string> {
  const abs = path.resolve(dir);
  await mkdir(path.dirname(abs), { recursive: true }).catch((err: unknown) => {
    throw new KheadersError('E_FUSE', `cannot create the parent of mount point ${abs}: ${errnoOf(err) ?? String(err)}`, { mountpoint: abs }, { cause: err });
  });
  const target = await canonicalMountpoint(abs);

  // Read at once, on this thread: procfs answers from the kernel's own tables, never through a
  // mount; through the thread pool it was four round trips in a row ahead of the `mount` child.
  const existing = topmostAt(parseMountInfo(readFileSync(MOUNTINFO, 'utf8')), target);
  let probe = await statWithin(target, PROBE_TIMEOUT_MS);
  if (existing && isFuse(existing)) {
    if (!probe.ok && (STALE_ERRNOS.has(probe.errno) || probe.errno === 'ETIMEDOUT')) {
      // ENOTCONN: the server died without unmounting (kill -9). A hung server is detached too:
      // nobody can use that mount any more, and we are about to serve the same tree.
      log.warn({ mountpoint: target, errno: probe.errno, fsType: existing.fsType, source: existing.source }, 'clearing a stale FUSE mount');
      if (!(await detachMount(target, log))) {
        throw new KheadersError('E_FUSE', `a stale FUSE mount at ${target} (${probe.errno}) could not be cleared; run: umount -l ${target}`, { mountpoint: target });
      }
      probe = await statWithin(target, PROBE_TIMEOUT_MS);
    } else {
      throw new KheadersError('E_FUSE', `${target} is already a live FUSE mount (${existing.source}); is another kheadersd serving it?`, { mountpoint: target, source: existing.source });
    }
  } else if (existing) {
    throw new KheadersError('E_FUSE', `${target} is already a mount point (${existing.fsType} ${existing.source})`, { mountpoint: target, fsType: existing.fsType });
  }

  if (!probe.ok && probe.errno === 'ENOENT') {
    try {
      await mkdir(target, { recursive: true });
    } catch (err) {
      throw new KheadersError('E_FUSE', `cannot create mount point ${target}: ${errnoOf(err) ?? String(err)}`, { mountpoint: target }, { cause: err });
    }
    return target;
  }
  if (!probe.ok) throw new KheadersError('E_FUSE', `mount point ${target} is unusable: ${probe.errno}`, { mountpoint: target, errno: probe.errno });
  if (!probe.isDir) throw new KheadersError('E_FUSE', `mount point ${target} is not a directory`, { mountpoint: target });
  const names = await readdir(target);
  if (names.length > 0) {
    throw new KheadersError('E_FUSE', `mount point ${target} is not empty (${names.length} entries); FUSE would hide them`, { mountpoint: target });
  }
  return target;
}
