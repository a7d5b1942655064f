/**
 * The index of one cached header tree: every path, what it is, and where its bytes live.
 *
 * It is the sandbox for every reader: FUSE and HTTP look names up here and read bytes at the
 * recorded offset of the pack file; nothing ever joins a user-supplied path onto the filesystem.
 * Pure data, no I/O: built once by ingest, stored as index.json, loaded by readers.
 */
import { KheadersError } from '../errors.js';

export type NodeKind = 'file' | 'dir' | 'symlink';

/** One line of index.json. Offsets and sizes are in bytes of the pack (the decompressed tar). */
export interface IndexRecord {
  path: string; // normalised, relative, no leading './', '' is the root
  kind: NodeKind;
  mode: number; // permission bits as archived (readers present them read-only)
  mtime: number; // seconds since the epoch
  size: number; // file bytes; symlink target length; 0 for dirs
  offset?: number; // files in the pack: byte offset of the data
  blob?: string; // files stored beside the pack instead (e.g. 'vmlinux.h'): name in the entry dir
  sha256?: string; // blobs: the sha256 of their bytes, recorded when they were made
  target?: string; // symlinks: the target exactly as archived
}

export interface TreeNode extends IndexRecord {
  /** Dense id, 0 is the root; stable for the life of the entry (FUSE builds inode numbers on it). */
  readonly id: number;
  readonly name: string;
  readonly parent: number;
  readonly children?: Map<string, TreeNode>;
}

export interface IndexFile {
  version: 1;
  records: IndexRecord[];
}

const MAX_SYMLINK_HOPS = 40; // the kernel's own MAXSYMLINKS

/**
 * Normalise an archive member name to the index's form, or say why it is unsafe.
 * `./include/x.h` → `include/x.h`; `./` → `` (root). Refuses absolute names, `..`, NUL.
 */
export function normaliseEntryPath(name: string): string {
  if (name.includes('\0')) throw unsafe(name, 'contains a NUL byte');
  if (name.startsWith('/')) throw unsafe(name, 'is an absolute path');
  const parts: string[] = [];
  for (const part of name.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') throw unsafe(name, 'has a ".." component');
    parts.push(part);
  }
  return parts.join('/');
}

/**
 * Where a symlink at `linkPath` with `target` points, as an index path; undefined if it
 * leaves the tree (or is absolute). Does not check that the target exists.
 */
export function symlinkTargetPath(linkPath: string, target: string): string | undefined {
  if (target.startsWith('/') || target.includes('\0') || target === '') return undefined;
  const parts = linkPath.split('/');
  parts.pop(); // the link's own name: targets are relative to its directory
  for (const part of target.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') {
      if (parts.length === 0) return undefined;
      parts.pop();
    } else parts.push(part);
  }
  return parts.join('/');
}

const ESCAPES = Symbol('escapes the tree');
const STOPS = Symbol('does not resolve'); // ENOENT, ENOTDIR or ELOOP: nothing is reached

/** The directory chain from the root to node `id` (inclusive). */
function chainTo(nodes: readonly TreeNode[], id: number): TreeNode[] {
  const chain: TreeNode[] = [];
  for (let n = nodes[id]!; ; n = nodes[n.parent]!) {
    chain.unshift(n);
    if (n.id === 0) return chain;
  }
}

/**
 * Path resolution as the kernel does it: components are taken one at a time from the current
 * directory chain; `..` pops the chain (so it climbs from where a symlink led, not from the text
 * of the path); a symlink's target is spliced in front of what remains, relative to the link's
 * own directory; at most MAX_SYMLINK_HOPS links. One walker for ingest's escape check and for
 * every reader's lookups, so `cat`, HTTP, export and FUSE agree on where a path leads.
 */
function walk(chain: readonly TreeNode[], components: readonly string[]): TreeNode | typeof ESCAPES | typeof STOPS {
  const dirs = [...chain];
  const pending = [...components];
  let hops = 0;
  while (pending.length > 0) {
    const name = pending.shift()!;
    if (name === '' || name === '.') continue;
    if (name === '..') {
      if (dirs.length === 1) return ESCAPES;
      dirs.pop();
      continue;
    }
    const cur = dirs[dirs.length - 1]!;
    if (cur.kind !== 'dir') return STOPS;
    const next = cur.children?.get(name);
    if (!next) return STOPS;
    if (next.kind === 'symlink') {
      if (++hops > MAX_SYMLINK_HOPS) return STOPS;
      if (next.target!.startsWith('/')) return ESCAPES;
      pending.unshift(...next.target!.split('/'));
      continue;
    }
    dirs.push(next);
  }
  return dirs[dirs.length - 1]!;
}

function unsafe(entry: string, why: string): KheadersError {
  return new KheadersError('E_UNSAFE_ENTRY', `unsafe archive entry ${JSON.stringify(entry)}: ${why}`, { entry, reason: why });
}

export class TreeIndex {
  readonly nodes: readonly TreeNode[];
  readonly fileCount: number;
  readonly dirCount: number;
  readonly symlinkCount: number;
  /** Sum of file sizes. */
  readonly totalBytes: number;
  private readonly byPath: Map<string, TreeNode>;

  private constructor(nodes: TreeNode[], byPath: Map<string, TreeNode>) {
    this.nodes = nodes;
    this.byPath = byPath;
    let files = 0;
    let dirs = 0;
    let links = 0;
    let bytes = 0;
    for (const n of nodes) {
      if (n.kind === 'file') {
        files++;
        bytes += n.size;
      } else if (n.kind === 'dir') dirs++;
      else links++;
    }
    this.fileCount = files;
    this.dirCount = dirs;
    this.symlinkCount = links;
    this.totalBytes = bytes;
  }

  /**
   * Build from records in any order. Parent directories an archive leaves implicit are created
   * (mode 0755, parent's mtime 0). Duplicates and paths under a non-directory are refused.
   * Symlinks that leave the tree are refused.
   */
  static fromRecords(records: readonly IndexRecord[]): TreeIndex {
    const root: TreeNode = { id: 0, path: '', name: '', parent: 0, kind: 'dir', mode: 0o755, mtime: 0, size: 0, children: new Map() };
    const nodes: TreeNode[] = [root];
    const byPath = new Map<string, TreeNode>([['', root]]);

    const ensureDir = (path: string): TreeNode => {
      const existing = byPath.get(path);
      if (existing) {
        if (existing.kind !== 'dir') throw unsafe(path, 'is used both as a directory and as a ' + existing.kind);
        return existing;
      }
      const slash = path.lastIndexOf('/');
      const parent = ensureDir(slash < 0 ? '' : path.slice(0, slash));
      const node: TreeNode = { id: nodes.length, path, name: path.slice(slash + 1), parent: parent.id, kind: 'dir', mode: 0o755, mtime: 0, size: 0, children: new Map() };
      nodes.push(node);
      byPath.set(path, node);
      parent.children!.set(node.name, node);
      return node;
    };

    for (const rec of records) {
      if (rec.path === '') {
        if (rec.kind !== 'dir') throw unsafe('.', 'the root is not a directory');
        root.mode = rec.mode;
        root.mtime = rec.mtime;
        continue;
      }
      const existing = byPath.get(rec.path);
      if (existing) {
        // A directory may be named implicitly (by a child) before its own header arrives.
        if (existing.kind === 'dir' && rec.kind === 'dir' && existing.mtime === 0 && existing.id !== 0) {
          existing.mode = rec.mode;
          existing.mtime = rec.mtime;
          continue;
        }
        throw unsafe(rec.path, 'appears twice in the archive');
      }
      if (rec.kind === 'symlink' && (rec.target === undefined || symlinkTargetPath(rec.path, rec.target) === undefined)) {
        throw unsafe(rec.path, `is a symlink to ${JSON.stringify(rec.target ?? '')}, which leaves the tree`);
      }
      const slash = rec.path.lastIndexOf('/');
      const parent = ensureDir(slash < 0 ? '' : rec.path.slice(0, slash));
      const node: TreeNode = {
        ...rec,
        id: nodes.length,
        name: rec.path.slice(slash + 1),
        parent: parent.id,
        ...(rec.kind === 'dir' ? { children: new Map<string, TreeNode>() } : {}),
      };
      nodes.push(node);
      byPath.set(rec.path, node);
      parent.children!.set(node.name, node);
    }
    // Text alone cannot tell where a link leads: the kernel (a FUSE mount, an exported tree)
    // expands each symlink where it stands, so `up/../x` with `up -> ../..` climbs from where
    // `up` leads, not from `up`'s directory. Follow every link as the kernel will.
    for (const n of nodes) {
      if (n.kind === 'symlink' && walk(chainTo(nodes, n.parent), n.target!.split('/')) === ESCAPES) {
        throw unsafe(n.path, `is a symlink to ${JSON.stringify(n.target)}, which leaves the tree through another symlink`);
      }
    }
    return new TreeIndex(nodes, byPath);
  }

  static fromJSON(file: IndexFile): TreeIndex {
    if (file.version !== 1 || !Array.isArray(file.records)) {
      throw new KheadersError('E_INTERNAL', `index format ${String(file.version)} is not understood`);
    }
    return TreeIndex.fromRecords(file.records);
  }

  toJSON(): IndexFile {
    const records: IndexRecord[] = [];
    for (const n of this.nodes) {
      const rec: IndexRecord = { path: n.path, kind: n.kind, mode: n.mode, mtime: n.mtime, size: n.size };
      if (n.offset !== undefined) rec.offset = n.offset;
      if (n.blob !== undefined) rec.blob = n.blob;
      if (n.sha256 !== undefined) rec.sha256 = n.sha256;
      if (n.target !== undefined) rec.target = n.target;
      records.push(rec);
    }
    return { version: 1, records };
  }

  get root(): TreeNode {
    return this.nodes[0]!;
  }

  /** The node at exactly this normalised path, symlinks not followed. */
  get(path: string): TreeNode | undefined {
    return this.byPath.get(path);
  }

  node(id: number): TreeNode | undefined {
    return this.nodes[id];
  }

  /** Children sorted by name (readdir order is stable across calls). */
  list(dir: TreeNode): TreeNode[] {
    if (!dir.children) return [];
    return [...dir.children.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /**
   * Resolve a path, following symlinks in every component (and the last one) exactly as the
   * kernel does, never leaving the tree. Undefined when missing, looping, or escaping. Input
   * must already be normalised.
   */
  resolve(path: string): TreeNode | undefined {
    const result = walk([this.root], path === '' ? [] : path.split('/'));
    return typeof result === 'symbol' ? undefined : result;
  }
}
