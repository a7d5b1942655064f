/**
 * What the HTTP server knows about the cache, kept off the request path's I/O.
 *
 * `CacheStore.list()` reads every manifest from disk; doing that per request would cost more
 * than serving the file. The catalog keeps a snapshot of the manifests and the current id,
 * refreshed at most once a second (another process may ingest or gc while the daemon runs) and
 * at once when the daemon says something changed (DaemonState.onChange). Concurrent requests
 * share one refresh.
 *
 * It also owns the ByteSource (open files, hot bodies; see bytes.ts) and per-node ETag /
 * Last-Modified strings, computed once.
 */
import { createHash } from 'node:crypto';
import os from 'node:os';
import { KheadersError } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { CacheStore } from '../../store/cache.js';
import { validRelease } from '../../store/cache.js';
import type { CacheEntry, Manifest } from '../../store/entry.js';
import type { TreeNode } from '../../store/tree-index.js';
import type { DaemonState } from '../state.js';
import { ByteSource, type ByteSourceOptions } from './bytes.js';
import type { Representation } from './respond.js';

const SNAPSHOT_TTL_MS = 1000;

export interface Snapshot {
  /** Newest first, as CacheStore.list() returns them. */
  manifests: readonly Manifest[];
  /** The entry `current` names for this daemon (see effectiveCurrent). */
  currentId: string | null;
  takenAt: number;
}

/** One entry as the server serves it: the entry plus strings derived from it once. */
export class ServedEntry {
  private readonly etags: (string | undefined)[];
  private readonly modified: (string | undefined)[];
  /** Newest mtime in the tree: the archive's Last-Modified (stable across re-ingests, unlike ingestedAt). */
  readonly treeMtime: number;
  readonly archiveEtag: string;
  /** sha256 of the archive, base64, for the Digest / Repr-Digest headers. */
  readonly digestBase64: string;

  constructor(readonly entry: CacheEntry) {
    const n = entry.index.nodes.length;
    this.etags = new Array<string | undefined>(n);
    this.modified = new Array<string | undefined>(n);
    let newest = 0;
    for (const node of entry.index.nodes) if (node.mtime > newest) newest = node.mtime;
    this.treeMtime = newest;
    this.archiveEtag = `"sha256-${entry.manifest.digest}"`;
    this.digestBase64 = Buffer.from(entry.manifest.digest, 'hex').toString('base64');
  }

  get manifest(): Manifest {
    return this.entry.manifest;
  }

  /**
   * The node a validated tree path names, symlinks followed. Most paths name a file through real
   * directories: one Map lookup answers those; only the rest pay for a symlink-following walk.
   */
  lookup(path: string): TreeNode | undefined {
    const exact = this.entry.index.get(path);
    return exact && exact.kind !== 'symlink' ? exact : this.entry.index.resolve(path);
  }

  private readonly reps = new Map<string, (Representation | undefined)[]>();

  /** A file's representation, built once per node and Cache-Control (they are immutable). */
  representation(node: TreeNode, cacheControl: string, make: () => Representation): Representation {
    let byId = this.reps.get(cacheControl);
    if (!byId) {
      byId = new Array<Representation | undefined>(this.entry.index.nodes.length);
      this.reps.set(cacheControl, byId);
    }
    return (byId[node.id] ??= make());
  }

  /**
   * Strong ETag of a node's bytes: a hash of the archive digest and the node's path. The same
   * archive re-ingested (a re-pack, another host) gives the same tags; another build gives other
   * tags, because its digest differs. A path reached through a symlink uses the target's node,
   * so both URLs share one tag (they are the same bytes).
   */
  etag(node: TreeNode): string {
    let tag = this.etags[node.id];
    if (tag === undefined) {
      const h = createHash('sha256').update(this.entry.manifest.digest).update('\0').update(node.path).digest('base64url');
      tag = `"${h.slice(0, 27)}"`;
      this.etags[node.id] = tag;
    }
    return tag;
  }

  lastModified(node: TreeNode): string {
    let s = this.modified[node.id];
    if (s === undefined) {
      s = httpDate(node.mtime);
      this.modified[node.id] = s;
    }
    return s;
  }
}

export function httpDate(epochSeconds: number): string {
  return new Date(epochSeconds * 1000).toUTCString();
}

export class Catalog {
  readonly bytes: ByteSource;
  private snap: Snapshot | null = null;
  private refreshing: Promise<Snapshot> | null = null;
  private readonly served = new Map<string, ServedEntry>();
  private readonly unsubscribe: () => void;

  constructor(
    private readonly store: CacheStore,
    private readonly state: DaemonState,
    private readonly log: Logger,
    bytes: ByteSourceOptions,
  ) {
    this.bytes = new ByteSource(bytes);
    this.unsubscribe = state.onChange(() => {
      // stale: the next request refreshes (-Infinity, not 0: performance.now() starts at 0 too)
      if (this.snap) this.snap.takenAt = Number.NEGATIVE_INFINITY;
    });
  }

  /** The current snapshot, refreshed if older than a second. */
  snapshot(): Promise<Snapshot> | Snapshot {
    const s = this.snap;
    if (s && performance.now() - s.takenAt < SNAPSHOT_TTL_MS) return s;
    return this.refresh();
  }

  refresh(): Promise<Snapshot> {
    if (!this.refreshing) {
      this.refreshing = this.load().finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  private async load(): Promise<Snapshot> {
    const manifests = await this.store.list();
    const stored = await this.store.currentId();
    const currentId = effectiveCurrent(manifests, this.state.currentId, stored);
    const live = new Set(manifests.map((m) => m.id));
    for (const [id, served] of this.served) {
      if (live.has(id)) continue;
      this.served.delete(id);
      this.bytes.retire(served.entry.dir + '/');
      this.log.debug({ id }, 'entry left the cache: no longer served');
    }
    const snap: Snapshot = { manifests, currentId, takenAt: performance.now() };
    this.snap = snap;
    return snap;
  }

  private async serve(id: string): Promise<ServedEntry | undefined> {
    const hit = this.served.get(id);
    if (hit) return hit;
    let entry: CacheEntry;
    try {
      entry = await this.store.load(id);
    } catch (err) {
      if (err instanceof KheadersError && err.code === 'E_NOT_FOUND') return undefined;
      throw err;
    }
    const served = this.served.get(id) ?? new ServedEntry(entry);
    this.served.set(id, served);
    return served;
  }

  /** `current`, or a release (the current build of it if it is one, else the newest). */
  async byRef(ref: string): Promise<ServedEntry | undefined> {
    const id = idForRef(await this.snapshot(), ref);
    return id === undefined ? undefined : this.serve(id);
  }

  /** An entry by its id (`<release>~<digest>`), if it is cached. */
  async byId(id: string): Promise<ServedEntry | undefined> {
    return (await this.snapshot()).manifests.some((m) => m.id === id) ? this.serve(id) : undefined;
  }

  /** The entry whose archive has this sha256 (the current one if several releases share it). */
  async byDigest(digest: string): Promise<ServedEntry | undefined> {
    const id = idForDigest(await this.snapshot(), digest);
    return id === undefined ? undefined : this.serve(id);
  }

  /**
   * byRef / byDigest without waiting: the entry if the snapshot is fresh and the entry already
   * loaded, else undefined (the caller then takes the ordinary, asynchronous route).
   */
  peek(kind: 'ref' | 'digest', name: string): ServedEntry | undefined {
    const s = this.snap;
    if (!s || performance.now() - s.takenAt >= SNAPSHOT_TTL_MS) return undefined;
    const id = kind === 'ref' ? idForRef(s, name) : idForDigest(s, name);
    return id === undefined ? undefined : this.served.get(id);
  }

  async close(): Promise<void> {
    this.unsubscribe();
    await this.bytes.close();
  }
}

function idForRef(snap: Snapshot, ref: string): string | undefined {
  if (ref === 'current') return snap.currentId ?? undefined;
  if (!validRelease(ref)) return undefined;
  let newest: string | undefined;
  for (const m of snap.manifests) {
    if (m.release !== ref) continue;
    if (m.id === snap.currentId) return m.id;
    newest ??= m.id; // manifests are newest first
  }
  return newest;
}

function idForDigest(snap: Snapshot, digest: string): string | undefined {
  let first: string | undefined;
  for (const m of snap.manifests) {
    if (m.digest !== digest) continue;
    if (m.id === snap.currentId) return m.id;
    first ??= m.id;
  }
  return first;
}

/**
 * Which entry `current` means for the HTTP API: the one this daemon says it serves, else the
 * cache's `current` pointer, else an entry for `uname -r` (CacheStore.resolve's rules).
 */
export function effectiveCurrent(manifests: readonly Manifest[], fromState: string | null, stored: string | null): string | null {
  if (fromState && manifests.some((m) => m.id === fromState)) return fromState;
  if (stored && manifests.some((m) => m.id === stored)) return stored;
  return manifests.find((m) => m.release === os.release())?.id ?? null;
}
