/**
 * The public shape of a cache entry, the same wherever it is shown: `ls --json`, `ingest
 * --json` and HTTP `/v1/kernels`. Built from the manifest and what is known of the running kernel.
 */
import type { Manifest } from './entry.js';
import { matchRunning, type LiveKernel, type RunningMatch } from './kernel-match.js';

export interface EntrySummary {
  release: string;
  digest: string;
  kind: Manifest['kind'];
  files: number;
  bytes: number;
  buildId: string | null;
  source: string;
  /** How the archive was obtained (null for entries made before this was recorded). */
  obtained: NonNullable<Manifest['obtained']> | null;
  /** The module file it was read from or loaded from, with its mtime and the boot time. */
  module: NonNullable<Manifest['module']> | null;
  ingestedAt: string;
  current: boolean;
  vmlinuxH: boolean;
  /** The tree holds the kernel's `.config`. */
  config: boolean;
  /** Whether this is the running kernel's entry (see kernel-match.ts), when the running kernel is known. */
  runningKernel?: RunningMatch;
  /** Why it is not (or may not be) the running kernel's, in words. */
  runningKernelNote?: string;
  /** What ingest checked or left out (vmlinux.h, .config), in words. */
  notes?: string[];
}

/** The public shape of an entry (`ls --json`, HTTP `/v1/kernels`). */
export function summarise(m: Manifest, currentId: string | null, live?: LiveKernel | null): EntrySummary {
  const match = live ? matchRunning(m, live) : undefined;
  return {
    release: m.release,
    digest: m.digest,
    kind: m.kind,
    files: m.files,
    bytes: m.bytes,
    buildId: m.buildId,
    source: m.source,
    obtained: m.obtained ?? null,
    module: m.module ?? null,
    ingestedAt: m.ingestedAt,
    current: m.id === currentId,
    vmlinuxH: m.btf !== null,
    config: (m.config ?? null) !== null,
    ...(match ? { runningKernel: match.match } : {}),
    ...(match && match.why !== '' ? { runningKernelNote: match.why } : {}),
    ...(m.notes !== undefined && m.notes.length > 0 ? { notes: m.notes } : {}),
  };
}
