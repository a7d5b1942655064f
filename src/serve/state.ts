/**
 * What the running daemon knows about itself, shared by HTTP (/readyz, /metrics) and the
 * lifecycle code that ingests on start and on SIGHUP. One small object, written only by the
 * daemon, read by the servers.
 */
import type { LiveKernel } from '../store/kernel-match.js';

export interface IngestRecord {
  at: string; // ISO time
  durationMs: number;
  /** The entry that ingest produced or reused. */
  id: string | null;
  reused: boolean;
}

export interface IngestFailure {
  at: string;
  code: string;
  message: string;
}

export class DaemonState {
  /** The running kernel's entry is cached and being served. */
  ready = false;
  currentId: string | null = null;
  /**
   * The entry that is the running kernel's own (see kernel-match.ts), or null when none is
   * cached: `current` may be another kernel's (--archive/--release), and module headers belong
   * to the running kernel only.
   */
  runningId: string | null = null;
  /** The running kernel's release, build id and BTF digest, read at start. */
  live: LiveKernel | null = null;
  lastIngest: IngestRecord | null = null;
  lastIngestError: IngestFailure | null = null;
  /** Where the FUSE tree is mounted, if it is. */
  mountpoint: string | null = null;
  /** Why there is no mount, when there is none. */
  mountError: string | null = null;
  /** Entries this daemon moved to quarantine (damaged on disk, or bytes found wrong when read). */
  quarantined = 0;
  /** Entries it then rebuilt from their own archive. */
  rebuilt = 0;
  /** Damage reports from readers (each failed a read: EIO on FUSE, 500 on HTTP). */
  damageReports = 0;
  readonly startedAt = new Date().toISOString();
  private readonly listeners = new Set<() => void>();

  /** Something changed (a swap, an ingest): listeners refresh what they derive from the store. */
  onChange(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  changed(): void {
    for (const l of this.listeners) l();
  }
}
