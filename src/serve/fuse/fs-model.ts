/**
 * The filesystem the mount shows, independent of how it reaches the kernel.
 *
 * Both FUSE transports (fuse-native over libfuse2, and the pure-TypeScript /dev/fuse protocol)
 * answer every request from one FsModel, so the tree, its inode numbers, its permissions and its
 * kernel-swap behaviour are identical whichever backend runs. Layout:
 *
 *   /current              symlink -> <release> of the running kernel (or --release)
 *   /<release>            symlink -> by-digest/<sha256> of the chosen entry of that release
 *   /by-digest/<sha256>/  every cached entry, by the archive's content digest: the tree exactly
 *                         as archived (the only place trees are, so a path names one build)
 *
 * Inode numbers: 1 is the root. Every cache entry gets its own block of inode numbers when it is
 * added, so a node id never changes meaning: a kernel swap adds new ids and re-points `current`
 * (and the `<release>` link), and files opened on the old tree keep reading the old bytes.
 */
import type { NodeKind } from '../../store/tree-index.js';

export const ROOT_INO = 1;

export interface FsAttr {
  ino: number;
  kind: NodeKind;
  /** Full st_mode: type bits | permissions (files 0444, dirs 0555, symlinks 0777). */
  mode: number;
  size: number;
  nlink: number;
  mtimeMs: number;
  /**
   * The node (or, for a directory, the set of its children) can change at any moment without an
   * invalidation (module headers come and go as modules load): transports must not let the kernel
   * cache it, its listing, or the absence of a child, for long.
   */
  volatile?: boolean;
}

export interface FsDirent {
  name: string;
  attr: FsAttr;
  /**
   * Only the name, type and inode number are known yet (the size is made on LOOKUP): READDIRPLUS
   * must send the name without attributes, so that the kernel looks it up before using it.
   */
  lazy?: boolean;
}

/** A name whose meaning changed: the transport must drop the kernel's cached dentry for it. */
export interface FsInvalidation {
  parentIno: number;
  name: string;
  /** The inode the name used to point to, if the kernel may hold it (its attrs changed too). */
  oldIno?: number;
}

export interface FsStat {
  blocks: number;
  files: number;
  blockSize: number;
  nameMax: number;
}

export interface FsModel {
  /** Children of a directory by name; undefined if no such child (ENOENT). */
  lookup(parentIno: number, name: string): FsAttr | undefined;
  getattr(ino: number): FsAttr | undefined;
  /** Directory entries without '.' and '..' (transports add those); undefined if not a dir. */
  readdir(ino: number): FsDirent[] | undefined;
  readlink(ino: number): string | undefined;
  /** Bytes of a regular file, read asynchronously from the pack (never blocks the event loop). */
  read(ino: number, offset: number, length: number): Promise<Buffer>;
  /** Path form for path-based transports (libfuse high-level API): '/a/b', no symlinks followed. */
  resolvePath(path: string): FsAttr | undefined;
  statfs(): FsStat;
  /** Called when `current` or a `<release>` name is re-pointed by a kernel swap. */
  onInvalidate(listener: (inval: FsInvalidation) => void): () => void;
  /**
   * Optional, for names whose node is made on request (a module's header): a promise that
   * settles once lookup(parentIno, name) can answer, or undefined when it can answer now (every
   * other name: the transport then answers synchronously, as before).
   */
  prepareLookup?(parentIno: number, name: string): Promise<void> | undefined;
  /** The same for resolvePath (path-based transports). */
  preparePath?(path: string): Promise<void> | undefined;
}
