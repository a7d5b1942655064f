/**
 * What the running daemon knows about itself, shared by HTTP (/readyz, /metrics) and the
 * lifecycle code that ingests on start and on SIGHUP. One small object, written only by the
 * daemon, read by the servers.
 */
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
  lastIngest: IngestRecord | null = null;
  lastIngestError: IngestFailure | null = null;
  /** Where the FUSE tree is mounted, if it is. */
  mountpoint: string | null = null;
  /** Why there is no mount, when there is none. */
  mountError: string | null = null;
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
