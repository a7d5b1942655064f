/**
 * Which entry a name means: the one place that decides it, for the cache commands (`cat`,
 * `export`), the HTTP catalog and the FUSE model alike, so they can never disagree.
 *
 *   current        the entry the `current` pointer names (written in this boot); with no usable
 *                  pointer, the newest entry of the running kernel's release (`uname -r`) that is
 *                  not of another build (its build id is the running one's, or unknown); else none
 *   <id>           `<release>~<digest>` exactly
 *   <release>      the current entry if it has that release, else the newest of that release
 *   <digest>       64 hex digits; or a prefix of at least 8 that only one digest starts with.
 *                  Several entries can share a digest (one archive under two release names):
 *                  the current one if it is among them, else the newest.
 *
 * Pure: it works on a snapshot of manifests (newest first) and the pointer; no I/O.
 */
import os from 'node:os';
import { KheadersError } from '../errors.js';
import type { Manifest } from './entry.js';

const PREFIX_RE = /^[0-9a-f]{8,64}$/;

/** Newest first, the order every listing uses. */
export function newestFirst(manifests: readonly Manifest[]): Manifest[] {
  return [...manifests].sort((a, b) => (a.ingestedAt < b.ingestedAt ? 1 : a.ingestedAt > b.ingestedAt ? -1 : 0));
}

/**
 * The entries that may be the running kernel's, best first: its release, and never the build id
 * of another build (a rebuild that kept the release string). Entries with its very build id
 * come first, then those whose build id is unknown (made from a file); each in the given order.
 */
export function ofRunningKernel(manifests: readonly Manifest[], release: string, buildId: string | null): Manifest[] {
  const same = manifests.filter((m) => m.release === release && (buildId === null || m.buildId === null || m.buildId === buildId));
  return [...same.filter((m) => m.buildId !== null), ...same.filter((m) => m.buildId === null)];
}

export class Resolver {
  /** The entries, newest first. */
  readonly manifests: readonly Manifest[];
  /** What `current` means (see the file comment), or null. */
  readonly currentId: string | null;
  private readonly byIdMap: Map<string, Manifest>;

  constructor(
    manifests: readonly Manifest[],
    pointer: string | null,
    private readonly runningRelease: string = os.release(),
    runningBuildId: string | null = null,
  ) {
    this.manifests = newestFirst(manifests);
    this.byIdMap = new Map(this.manifests.map((m) => [m.id, m]));
    const pointed = pointer === null ? undefined : this.byIdMap.get(pointer);
    this.currentId = pointed?.id ?? ofRunningKernel(this.manifests, runningRelease, runningBuildId)[0]?.id ?? null;
  }

  get current(): Manifest | undefined {
    return this.currentId === null ? undefined : this.byIdMap.get(this.currentId);
  }

  byId(id: string): Manifest | undefined {
    return this.byIdMap.get(id);
  }

  /** The current entry if it has this release, else the newest one that does. */
  byRelease(release: string): Manifest | undefined {
    return this.preferCurrent((m) => m.release === release);
  }

  /** The current entry if it has this digest, else the newest one that does. */
  byDigest(digest: string): Manifest | undefined {
    return this.preferCurrent((m) => m.digest === digest);
  }

  private preferCurrent(match: (m: Manifest) => boolean): Manifest | undefined {
    let newest: Manifest | undefined;
    for (const m of this.manifests) {
      if (!match(m)) continue;
      if (m.id === this.currentId) return m;
      newest ??= m;
    }
    return newest;
  }

  /** `current`, an id, a release or a digest (or a unique prefix); undefined when nothing matches. */
  find(ref: string): Manifest | undefined {
    if (ref === 'current') return this.current;
    const hit = this.byIdMap.get(ref) ?? this.byRelease(ref);
    if (hit || !PREFIX_RE.test(ref)) return hit;
    const digests = new Set(this.manifests.filter((m) => m.digest.startsWith(ref)).map((m) => m.digest));
    if (digests.size > 1) throw new KheadersError('E_USAGE', `digest prefix ${ref} is ambiguous (${digests.size} entries); give more digits`, { ref });
    const [digest] = digests;
    return digest === undefined ? undefined : this.byDigest(digest);
  }

  /** find(), or E_NOT_FOUND saying what to do. */
  resolve(ref: string): Manifest {
    const m = this.find(ref);
    if (m) return m;
    if (ref === 'current') {
      // `current` means the running kernel: say which that is, and what the cache does hold.
      const cached = [...new Set(this.manifests.map((m) => m.release))];
      throw new KheadersError(
        'E_NOT_FOUND',
        `"current" is the running kernel, ${this.runningRelease}, and no entry for it is cached` +
          (cached.length > 0 ? ` (cached: ${cached.join(', ')}: name one of them instead of "current")` : ' (the cache is empty)') +
          "; `kheadersd ingest` caches the running kernel's headers",
        { ref, running: this.runningRelease, cached },
      );
    }
    throw new KheadersError('E_NOT_FOUND', `no cached entry matches ${JSON.stringify(ref)} (a release, a digest, or "current"); see \`kheadersd ls\``, { ref });
  }
}
