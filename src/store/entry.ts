/**
 * One cached kernel-header entry as readers see it: its manifest, its index, the files its bytes
 * live in, and the one reader every front end reads those bytes through. Entries are immutable
 * once renamed into place, so readers may keep them open for as long as they like (a kernel swap
 * adds a new entry, it never rewrites one; a damaged entry is moved aside and rebuilt as a new one).
 *
 *   <entry>/manifest.json    what it is and where it came from (format ENTRY_FORMAT)
 *           index.bin        every path, offsets, sizes and the digests that prove the bytes
 *           pack.tar         the decompressed tar, read in place
 *           archive.tar.xz   the original archive (its sha256 is the entry's digest)
 *           <blob>           files stored beside the pack (vmlinux.h), named by the index's blob table
 */
import path from 'node:path';
import type { ArchiveOrigin, ModuleFileInfo } from '../source/locate.js';
import { validBlobName } from './index-format.js';
import type { EntryReader } from './reader.js';
import type { TreeIndex, TreeNode } from './tree-index.js';

export const MANIFEST_FILE = 'manifest.json';
export const INDEX_FILE = 'index.bin';
export const PACK_FILE = 'pack.tar';
export const ARCHIVE_FILE = 'archive.tar.xz';
/** The kernel configuration: a blob in the entry directory, `.config` in the tree. */
export const CONFIG_FILE = 'config';
export const CONFIG_PATH = '.config';
/** Format 2: binary index with chunk digests (index.bin). Format 1 (index.json) is rebuilt. */
export const ENTRY_FORMAT = 2;

export type EntryKind = 'headers' | 'btf-only';

export interface Manifest {
  formatVersion: typeof ENTRY_FORMAT;
  /** Directory name inside <cache>/entries: `<release>~<digest>`. */
  id: string;
  release: string;
  /** sha256 (hex) of the original archive; of the BTF blob for a btf-only entry. */
  digest: string;
  kind: EntryKind;
  /** NT_GNU_BUILD_ID of the kernel it came from (hex), when known. */
  buildId: string | null;
  /** Where the archive came from: '/sys/kernel/kheaders.tar.xz', 'module:/x.ko', 'file:/x', 'elf:/x.ko'. */
  source: string;
  /**
   * How it was obtained (absent in entries made before this was recorded): exposed by the kernel,
   * read out of the kheaders module file, by loading the module, or from a file given; 'btf' for
   * an entry holding only vmlinux.h.
   */
  obtained?: ArchiveOrigin | 'btf';
  /** The module file read or loaded, its mtime and the boot time: a module newer than the boot may be for another build. */
  module?: ModuleFileInfo;
  ingestedAt: string; // ISO 8601
  files: number;
  dirs: number;
  symlinks: number;
  /** Uncompressed bytes of all files. */
  bytes: number;
  packBytes: number;
  archiveBytes: number;
  /** vmlinux.h generated from this kernel's BTF, if any (`source`: the BTF file, in newer manifests). */
  btf: { digest: string; bytes: number; source?: string } | null;
  /** The archive was read from the running kernel itself (absent in older manifests: see kernel-match.ts). */
  live?: boolean;
  /** The kernel's configuration, stored as `.config` at the root of the tree, and where it came from. */
  config?: { source: string; bytes: number; sha256: string } | null;
  /**
   * What was checked, refused or could not be checked about files added beside the archive (BTF
   * or a configuration that may belong to another kernel), in words, as logged at ingest.
   */
  notes?: string[];
}

export interface CacheEntry {
  readonly manifest: Manifest;
  /** Absolute path of the entry directory. */
  readonly dir: string;
  readonly index: TreeIndex;
  /** Reads (and proves) the entry's bytes; shared by every front end of this process. */
  readonly reader: EntryReader;
}

const OWN_FILES: ReadonlySet<string> = new Set([MANIFEST_FILE, INDEX_FILE, PACK_FILE, ARCHIVE_FILE]);

/** What a reader opens: a path inside the entry directory, never outside it. */
export function entryFile(dir: string, name: string): string {
  if (!OWN_FILES.has(name) && !validBlobName(name)) throw new Error(`${JSON.stringify(name)} is not a file of an entry`);
  return path.join(dir, name);
}

/** The file holding a node's bytes, and where in it they start (tests read packs raw with it). */
export function dataLocation(entry: Pick<CacheEntry, 'dir' | 'index'>, node: TreeNode): { file: string; offset: number } {
  if (node.blob !== undefined) return { file: entryFile(entry.dir, node.blob), offset: 0 };
  return { file: entryFile(entry.dir, PACK_FILE), offset: node.offset ?? 0 };
}

export function archivePath(entry: Pick<CacheEntry, 'dir' | 'manifest'>): string | null {
  return entry.manifest.kind === 'headers' ? path.join(entry.dir, ARCHIVE_FILE) : null;
}

const RELEASE_RE = /^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$/;
const DIGEST_RE = /^[0-9a-f]{64}$/;

export function validRelease(release: string): boolean {
  return RELEASE_RE.test(release) && !release.includes('~');
}

export function isDigest(s: string): boolean {
  return DIGEST_RE.test(s);
}

export function entryId(release: string, digest: string): string {
  return `${release}~${digest}`;
}

/** `<release>~<digest>` split, or undefined if the name is not an entry id. */
export function parseEntryId(id: string): { release: string; digest: string } | undefined {
  const tilde = id.lastIndexOf('~');
  if (tilde < 0) return undefined;
  const release = id.slice(0, tilde);
  const digest = id.slice(tilde + 1);
  return validRelease(release) && isDigest(digest) ? { release, digest } : undefined;
}

/** Why a manifest is not usable: `outdated` for a well-formed older format (rebuilt, not damaged). */
export class ManifestProblem extends Error {
  constructor(
    message: string,
    readonly outdated = false,
  ) {
    super(message);
    this.name = 'ManifestProblem';
  }
}

const isCount = (x: unknown): x is number => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;

/** Parse and check a manifest's text for the entry directory `id`. Throws ManifestProblem. */
export function parseManifest(text: string, id: string): Manifest {
  let m: unknown;
  try {
    m = JSON.parse(text);
  } catch (err) {
    throw new ManifestProblem(`manifest.json is not valid JSON (${(err as Error).message})`);
  }
  if (typeof m !== 'object' || m === null || Array.isArray(m)) throw new ManifestProblem('manifest.json is not an object');
  const o = m as Record<string, unknown>;
  if (o['formatVersion'] === 1) throw new ManifestProblem('it is in entry format 1 (index.json), which this version no longer reads', true);
  if (o['formatVersion'] !== ENTRY_FORMAT) throw new ManifestProblem(`manifest.json has format ${JSON.stringify(o['formatVersion'])}, not ${ENTRY_FORMAT}`);
  const fail = (field: string): never => {
    throw new ManifestProblem(`manifest.json has a bad ${field}`);
  };
  if (o['id'] !== id) fail('id');
  if (typeof o['release'] !== 'string' || !validRelease(o['release'])) fail('release');
  if (typeof o['digest'] !== 'string' || !isDigest(o['digest'])) fail('digest');
  if (entryId(o['release'] as string, o['digest'] as string) !== id) fail('release or digest (they do not make its id)');
  if (o['kind'] !== 'headers' && o['kind'] !== 'btf-only') fail('kind');
  if (o['buildId'] !== null && (typeof o['buildId'] !== 'string' || !/^[0-9a-f]*$/.test(o['buildId']))) fail('buildId');
  if (typeof o['source'] !== 'string') fail('source');
  if (typeof o['ingestedAt'] !== 'string' || Number.isNaN(Date.parse(o['ingestedAt']))) fail('ingestedAt');
  for (const k of ['files', 'dirs', 'symlinks', 'bytes', 'packBytes', 'archiveBytes']) if (!isCount(o[k])) fail(k);
  const btf = o['btf'];
  if (btf !== null) {
    if (typeof btf !== 'object' || btf === null) fail('btf');
    const b = btf as Record<string, unknown>;
    if (typeof b['digest'] !== 'string' || !isDigest(b['digest']) || !isCount(b['bytes']) || (b['source'] !== undefined && typeof b['source'] !== 'string')) fail('btf');
  }
  if (o['live'] !== undefined && typeof o['live'] !== 'boolean') fail('live');
  const config = o['config'];
  if (config !== undefined && config !== null) {
    const c = config as Record<string, unknown>;
    if (typeof config !== 'object' || typeof c['source'] !== 'string' || !isCount(c['bytes']) || typeof c['sha256'] !== 'string' || !isDigest(c['sha256'])) fail('config');
  }
  const notes = o['notes'];
  if (notes !== undefined && (!Array.isArray(notes) || !notes.every((n) => typeof n === 'string'))) fail('notes');
  return m as Manifest;
}
