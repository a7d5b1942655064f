/**
 * Is this entry the running kernel's? Serving another kernel's headers is the one way this tool
 * makes a tracer print garbage without an error (a 6.12 tree read by BCC on a 6.18 kernel shows
 * PID 0 and negative ages), so every front end says so plainly when `current` is not the running
 * kernel: an --archive/--release override, or an entry left from another boot.
 *
 *   yes      the build id recorded at ingest is the running kernel's, or the archive (or, for a
 *            vmlinux.h-only entry, the BTF) was read from the running kernel itself with nothing
 *            contradicting it
 *   no       another release, or another build id
 *   unknown  the release matches, but nothing recorded tells the build (a file given by hand:
 *            a kheaders.ko rebuilt with the same release string is another kernel)
 *
 * Pure, apart from readLiveKernel.
 */
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import os from 'node:os';
import { readLiveBuildId } from '../source/notes.js';
import type { Manifest } from './entry.js';
import type { ReadMode } from './small-file.js';

export interface LiveKernel {
  release: string;
  /** NT_GNU_BUILD_ID from /sys/kernel/notes, when readable. */
  buildId: string | null;
  /** sha256 of /sys/kernel/btf/vmlinux, when the kernel has BTF. */
  btfDigest: string | null;
}

export type RunningMatch = 'yes' | 'no' | 'unknown';

export interface KernelMatch {
  match: RunningMatch;
  /** Why not (or why unknown), in words; empty for 'yes'. */
  why: string;
}

/** Where the archive of a live source was read: the running kernel's own files. */
const LIVE_SOURCE_RE = /^\/(?:sys|proc)\/kernel\/kheaders\.tar\.xz|^\/proc\/kheaders\.tar\.xz/;

/** Whether the manifest's archive came from the running kernel itself (older manifests say it only in `source`). */
export function fromLiveSource(m: Manifest): boolean {
  return m.live ?? LIVE_SOURCE_RE.test(m.source);
}

export function matchRunning(m: Manifest, live: LiveKernel): KernelMatch {
  const describe = `${m.release}${m.buildId ? ` (build id ${m.buildId.slice(0, 12)})` : ''}`;
  if (m.release !== live.release) return { match: 'no', why: `it is ${describe}; the running kernel is ${live.release}` };
  if (m.buildId !== null && live.buildId !== null) {
    return m.buildId === live.buildId
      ? { match: 'yes', why: '' }
      : { match: 'no', why: `it is build ${m.buildId.slice(0, 12)} of ${m.release}; the running kernel is build ${live.buildId.slice(0, 12)}` };
  }
  if (fromLiveSource(m)) return { match: 'yes', why: '' };
  if (m.kind === 'btf-only' && live.btfDigest !== null) {
    return m.digest === live.btfDigest ? { match: 'yes', why: '' } : { match: 'no', why: `its BTF is not the running kernel's (${m.release})` };
  }
  return { match: 'unknown', why: `it has the running kernel's release (${m.release}) but came from ${m.source}: nothing recorded tells whether it is the same build` };
}

export interface LivePaths {
  notesPath?: string;
  btfPath?: string;
}

/**
 * The running kernel's release, build id and BTF digest. Given the manifests it will be matched
 * against, the BTF (~5 MiB, read 4 KiB per system call from sysfs) is hashed only when one of
 * them needs it (see needsBtfDigest); btfDigest is null otherwise, which matchRunning then never
 * reads for those manifests. `mode`: how the notes are read ('async' while serving).
 */
export async function readLiveKernel(paths: LivePaths = {}, against?: readonly Manifest[], mode: ReadMode = 'sync'): Promise<LiveKernel> {
  const release = os.release();
  const buildId = await readLiveBuildId(paths.notesPath, mode);
  const needed = against === undefined || against.some((m) => needsBtfDigest(m, { release, buildId }));
  const btfDigest = needed ? await sha256OfFile(paths.btfPath ?? RUNNING_KERNEL_BTF) : null;
  return { release, buildId, btfDigest };
}

/** Whether matchRunning must know the running kernel's BTF digest to judge `m`: a vmlinux.h-only entry of the running release, its build not known. */
export function needsBtfDigest(m: Manifest, live: Pick<LiveKernel, 'release' | 'buildId'>): boolean {
  return m.kind === 'btf-only' && m.release === live.release && (m.buildId === null || live.buildId === null) && !fromLiveSource(m);
}

const RUNNING_KERNEL_BTF = '/sys/kernel/btf/vmlinux';
/**
 * The running kernel's own BTF is part of its image: it cannot change while this process lives,
 * so its digest is computed once (serve's start asked for it twice: ~5 MiB read 4 KiB at a time).
 */
let runningKernelBtfDigest: Promise<string | null> | undefined;

/**
 * sha256 (hex) of a file's bytes, read through one reused buffer; null when it cannot be read.
 * Not a read stream: sysfs hands out BTF 4 KiB per read(2), and a stream allocates a fresh
 * 64 KiB buffer for each, so hashing the kernel's 5 MiB BTF that way churned ~85 MiB through
 * malloc at every start and left the daemon's heap fragmented (and took 5x the CPU).
 */
export function sha256OfFile(file: string): Promise<string | null> {
  if (file !== RUNNING_KERNEL_BTF) return hashFile(file);
  runningKernelBtfDigest ??= hashFile(file);
  return runningKernelBtfDigest;
}

async function hashFile(file: string): Promise<string | null> {
  let fh;
  try {
    fh = await open(file, 'r');
    const hash = createHash('sha256');
    const buf = Buffer.allocUnsafe(64 * 1024);
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      hash.update(buf.subarray(0, bytesRead));
    }
    return hash.digest('hex');
  } catch {
    return null;
  } finally {
    await fh?.close().catch(() => {});
  }
}
