/**
 * One cached kernel-header entry as readers see it: its manifest, its index, and the files its
 * bytes live in. Entries are immutable once renamed into place, so readers may keep them open
 * for as long as they like (a kernel swap adds a new entry, it never rewrites one).
 */
import path from 'node:path';
import type { TreeIndex, TreeNode } from './tree-index.js';

export const MANIFEST_FILE = 'manifest.json';
export const INDEX_FILE = 'index.json';
export const PACK_FILE = 'pack.tar';
export const ARCHIVE_FILE = 'archive.tar.xz';
/** The kernel configuration: a blob in the entry directory, `.config` in the tree. */
export const CONFIG_FILE = 'config';
export const CONFIG_PATH = '.config';

export type EntryKind = 'headers' | 'btf-only';

export interface Manifest {
  formatVersion: 1;
  /** Directory name inside <cache>/entries: `<release>~<digest>`. */
  id: string;
  release: string;
  /** sha256 (hex) of the original archive; of the BTF blob for a btf-only entry. */
  digest: string;
  kind: EntryKind;
  /** NT_GNU_BUILD_ID of the kernel it came from (hex), when known. */
  buildId: string | null;
  /** Where the archive came from: '/sys/kernel/kheaders.tar.xz', 'modprobe kheaders', 'file:/x', 'elf:/x.ko'. */
  source: string;
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
}

/** The file holding a node's bytes, and where in it they start. */
export function dataLocation(entry: CacheEntry, node: TreeNode): { file: string; offset: number } {
  if (node.blob !== undefined) return { file: path.join(entry.dir, node.blob), offset: 0 };
  return { file: path.join(entry.dir, PACK_FILE), offset: node.offset ?? 0 };
}

export function archivePath(entry: CacheEntry): string | null {
  return entry.manifest.kind === 'headers' ? path.join(entry.dir, ARCHIVE_FILE) : null;
}
