/**
 * What the HTTP server knows about the cache, kept off the request path's I/O.
 *
 * Reading every manifest per request would cost more than serving the file. The catalog keeps a
 * snapshot (the store's Resolver: which entry `current`, a release or a digest means, decided
 * exactly as `cat` and the FUSE mount decide it), refreshed at most once a second (another
 * process may ingest or gc while the daemon runs) and at once when the daemon says something
 * changed (DaemonState.onChange). Concurrent requests share one refresh.
 *
 * The first snapshot is the start's warm-up (server.ts) and reads the cache synchronously, as the
 * rest of the start does (measured faster: entry-load.ts). Every later one is taken on a request's
 * path while serving, so it reads through the thread pool: a synchronous listing of entries/ and
 * read of every manifest would hold every other request (and the mount) meanwhile. So is an entry
 * a request is the first to serve (its index, up to hundreds of MiB, and its files' checks).
 *
 * It also owns the ByteSource (hot bodies; see bytes.ts) and per-node ETag / Last-Modified
 * strings, computed once. Bytes come from each entry's EntryReader, shared with FUSE.
 */
import { createHash } from 'node:crypto';
import { KheadersError } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { CacheStore } from '../../store/cache.js';
import type { CacheEntry, Manifest } from '../../store/entry.js';
import type { QuarantineRecord } from '../../store/quarantine.js';
import type { Resolver } from '../../store/resolve.js';
import type { ReadMode } from '../../store/small-file.js';
import type { DaemonState } from '../state.js';
import { ByteSource, entryBody, type Body, type ByteSourceOptions } from './bytes.js';
import type { Representation } from './respond.js';

const SNAPSHOT_TTL_MS = 1000;
/** Paths whose lookup a served entry remembers (see ServedEntry.lookup). */
const LOOKUPS_KEPT = 4096;

export interface Snapshot {
  readonly resolver: Resolver;
  /** Newest first. */
  readonly manifests: readonly Manifest[];
  /** The entry `current` names (see resolve.ts). */
  readonly currentId: string | null;
  takenAt: number;
}

let nextInstance = 0;

/** One entry as the server serves it: the entry plus strings derived from it once. */
export class ServedEntry {
  private readonly etags = new Map<number, string>();
  private readonly modified = new Map<number, string>();
  private readonly reps = new Map<string, Map<number, Representation>>();
  private readonly found = new Map<string, number>();
  private newestMtime: number | undefined;
  readonly archiveEtag: string;
  /** sha256 of the archive, base64, for the Digest / Repr-Digest headers. */
  readonly digestBase64: string;
  /** Names this instance's bodies in the byte caches (a rebuilt entry is another instance). */
  readonly cacheKey: string;

  constructor(readonly entry: CacheEntry) {
    this.archiveEtag = `"sha256-${entry.manifest.digest}"`;
    this.digestBase64 = Buffer.from(entry.manifest.digest, 'hex').toString('base64');
    this.cacheKey = `${entry.manifest.id}#${nextInstance++}\0`;
  }

  /**
   * Newest mtime in the tree: the archive's Last-Modified (stable across re-ingests, unlike
   * ingestedAt). Found when first asked, not when the entry is first served: a walk over every
   * node, which the catalog's warm-up at start would otherwise do just as /readyz is first asked.
   */
  get treeMtime(): number {
    if (this.newestMtime === undefined) {
      const index = this.entry.index;
      let newest = 0;
      for (let id = 0; id < index.nodeCount; id++) newest = Math.max(newest, index.mtimeOf(id));
      this.newestMtime = newest;
    }
    return this.newestMtime;
  }

  get manifest(): Manifest {
    return this.entry.manifest;
  }

  /**
   * The node a validated tree path names, symlinks followed, or -1. Most paths name a file
   * through real directories: one binary search per component answers those; only the rest pay
   * for a symlink-following walk.
   */
  lookup(path: string): number {
    // Hot paths repeat (a fleet asks for the same few hundred headers): remember the answers,
    // a few thousand at most, so a request costs one Map lookup instead of a walk.
    const hit = this.found.get(path);
    if (hit !== undefined) return hit;
    const index = this.entry.index;
    const exact = index.idOf(path);
    const id = exact >= 0 && index.kindOf(exact) !== 'symlink' ? exact : index.resolveId(path);
    if (this.found.size >= LOOKUPS_KEPT) this.found.clear();
    this.found.set(path, id);
    return id;
  }

  /** A file's representation, built once per node and Cache-Control (they are immutable). */
  representation(node: number, cacheControl: string, make: () => Representation): Representation {
    let byId = this.reps.get(cacheControl);
    if (!byId) {
      byId = new Map();
      this.reps.set(cacheControl, byId);
    }
    let rep = byId.get(node);
    if (!rep) {
      rep = make();
      byId.set(node, rep);
    }
    return rep;
  }

  /** The bytes of a file node. */
  body(node: number): Body {
    return entryBody(this.entry.reader, node, this.entry.index.sizeOf(node), this.cacheKey);
  }

  /**
   * Strong ETag of a node's bytes: a hash of the archive digest and the node's path. The same
   * archive re-ingested (a re-pack, another host) gives the same tags; another build gives other
   * tags, because its digest differs. A path reached through a symlink uses the target's node,
   * so both URLs share one tag (they are the same bytes).
   */
  etag(node: number): string {
    let tag = this.etags.get(node);
    if (tag === undefined) {
      const h = createHash('sha256').update(this.entry.manifest.digest).update('\0').update(this.entry.index.pathOf(node)).digest('base64url');
      tag = `"${h.slice(0, 27)}"`;
      this.etags.set(node, tag);
    }
    return tag;
  }

  lastModified(node: number): string {
    let s = this.modified.get(node);
    if (s === undefined) {
      s = httpDate(this.entry.index.mtimeOf(node));
      this.modified.set(node, s);
    }
    return s;
  }
}

export function httpDate(epochSeconds: number): string {
  return new Date(epochSeconds * 1000).toUTCString();
}

function sameListing(before: Snapshot | null, after: Snapshot): boolean {
  if (before === null || before.currentId !== after.currentId || before.manifests.length !== after.manifests.length) return false;
  return before.manifests.every((m, i) => m.id === after.manifests[i]!.id);
}

export class Catalog {
  readonly bytes: ByteSource;
  private snap: Snapshot | null = null;
  private refreshing: Promise<Snapshot> | null = null;
  private readonly served = new Map<string, ServedEntry>();
  private readonly unsubscribe: () => void;
  private changes = 0;
  /** 'sync' for the warm-up's snapshot only (see above); entries are read as snapshots are. */
  private readMode: ReadMode = 'sync';

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

  /**
   * Bumped whenever what a name resolves to may have changed (a new snapshot, an entry served
   * or dropped): what the fast path remembers per URL is valid only for the epoch it was made in.
   */
  get epoch(): number {
    return this.changes;
  }

  /** Whether the snapshot is recent enough to answer from without reading the store (`now`: performance.now()). */
  fresh(now: number): boolean {
    const s = this.snap;
    return s !== null && now - s.takenAt < SNAPSHOT_TTL_MS;
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

  /** Quarantined entries (for /metrics). */
  quarantined(): Promise<QuarantineRecord[]> {
    return this.store.quarantined();
  }

  private async load(): Promise<Snapshot> {
    // The daemon's own idea of `current` wins over the file: FUSE shows the same.
    const mode = this.readMode;
    this.readMode = 'async';
    const resolver = await this.store.snapshot(this.state.currentId ?? undefined, mode);
    for (const [id, served] of this.served) {
      // Gone from the cache, or replaced by a rebuilt instance: stop serving this one.
      const now = resolver.byId(id) ? await this.store.load(id, this.readMode).catch(() => undefined) : undefined;
      // A request may have served the rebuilt copy while we waited: that one is not ours to drop.
      if (now === served.entry || this.served.get(id) !== served) continue;
      this.drop(id, served);
      this.log.debug({ id }, now ? 'entry rebuilt: serving the new copy' : 'entry left the cache: no longer served');
    }
    const snap: Snapshot = { resolver, manifests: resolver.manifests, currentId: resolver.currentId, takenAt: performance.now() };
    // A refresh runs every second under traffic; most find the cache as it was. Names resolve the
    // same while the same entries are listed and `current` is the same (an entry's id fixes its
    // release and digest), so only a change moves the epoch and drops what the fast path remembers.
    if (!sameListing(this.snap, snap)) this.changes++;
    this.snap = snap;
    return snap;
  }

  private drop(id: string, served: ServedEntry): void {
    this.changes++;
    this.served.delete(id);
    this.bytes.retire(served.cacheKey);
    served.entry.reader.release();
  }

  private async serve(id: string): Promise<ServedEntry | undefined> {
    let entry: CacheEntry;
    try {
      // An entry first served by a request (or rebuilt since) is read on that request's path.
      entry = await this.store.load(id, this.readMode);
    } catch (err) {
      // Gone, or damaged (the daemon hears of it through the store and repairs it): not served.
      if (err instanceof KheadersError && (err.code === 'E_NOT_FOUND' || err.code === 'E_ENTRY_DAMAGED')) {
        if (err.code === 'E_ENTRY_DAMAGED') this.log.warn({ id }, err.message);
        return undefined;
      }
      throw err;
    }
    const hit = this.served.get(id);
    if (hit?.entry === entry) return hit;
    if (hit) this.drop(id, hit);
    const served = new ServedEntry(entry);
    entry.reader.retain();
    this.served.set(id, served);
    this.changes++;
    return served;
  }

  /** `current`, a release, an id or a digest (prefix), as the resolver decides; undefined if none. */
  async byRef(ref: string): Promise<ServedEntry | undefined> {
    const id = findId((await this.snapshot()).resolver, ref);
    return id === undefined ? undefined : this.serve(id);
  }

  /** An entry by its id (`<release>~<digest>`), if it is cached. */
  async byId(id: string): Promise<ServedEntry | undefined> {
    return (await this.snapshot()).manifests.some((m) => m.id === id) ? this.serve(id) : undefined;
  }

  /** The entry whose archive has this sha256 (the current one if several releases share it). */
  async byDigest(digest: string): Promise<ServedEntry | undefined> {
    const id = (await this.snapshot()).resolver.byDigest(digest)?.id;
    return id === undefined ? undefined : this.serve(id);
  }

  /**
   * byRef / byDigest without waiting: the entry if the snapshot is fresh and the entry already
   * served, else undefined (the caller then takes the ordinary, asynchronous route).
   */
  peek(kind: 'ref' | 'digest', name: string): ServedEntry | undefined {
    const s = this.snap;
    if (!s || !this.fresh(performance.now())) return undefined;
    const id = kind === 'ref' ? findId(s.resolver, name) : s.resolver.byDigest(name)?.id;
    return id === undefined ? undefined : this.served.get(id);
  }

  async close(): Promise<void> {
    this.unsubscribe();
    for (const [id, served] of [...this.served]) this.drop(id, served);
  }
}

/** The resolver's answer, with an ambiguous digest prefix meaning "no such entry" here. */
function findId(resolver: Resolver, ref: string): string | undefined {
  try {
    return resolver.find(ref)?.id;
  } catch (err) {
    if (err instanceof KheadersError && err.code === 'E_USAGE') return undefined;
    throw err;
  }
}
