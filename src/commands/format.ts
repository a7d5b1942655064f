/** Plain-text output helpers shared by the commands. */
import type { Manifest } from '../store/entry.js';
import { matchRunning, type LiveKernel, type RunningMatch } from '../store/kernel-match.js';

export function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

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

export function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n') + '\n';
}

/** A one-line progress bar for a TTY, redrawn in place. */
export function progressBar(fraction: number | undefined, label: string, width = 30): string {
  if (fraction === undefined) return `\r${label}`;
  const filled = Math.round(Math.max(0, Math.min(1, fraction)) * width);
  return `\r[${'#'.repeat(filled)}${' '.repeat(width - filled)}] ${(fraction * 100).toFixed(0).padStart(3)}% ${label}`;
}
