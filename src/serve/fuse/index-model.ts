/**
 * The FsModel over the cache's entries: what both FUSE backends show.
 *
 *   /current               symlink -> <release> of the current entry
 *   /<release>/...         per release: the current entry if it has that release, else the most
 *                          recently ingested one
 *   /by-digest/<digest>/   every entry passed to the last setEntries(), by archive digest
 *   <running entry>/btf/   headers of the loaded modules, made on request (module-dir.ts), when
 *                          a ModuleHeaderSource is given and setEntries names the running entry
 *
 * Inode numbers: 1 root, 2 `current`, 3 `by-digest`; every entry, the first time it is seen,
 * gets the block [base, base + nodes) and node `id` is inode `base + id`. Blocks are never reused
 * or forgotten, so an inode keeps its meaning for the life of the process: a transport that holds
 * an inode (an open file, a cached dentry) after a swap still reaches the old entry's bytes.
 *
 * mtimes: seconds as archived, plus the entry's sequence number (mod 1000) as milliseconds.
 * Archive mtimes have one-second resolution, and two builds of one release made with
 * KBUILD_BUILD_TIMESTAMP stamp every file alike: a header whose bytes changed but whose length did
 * not (`#define CONFIG_HZ 250` → `300`) would look unchanged to every mtime+size cache (libfuse's
 * auto_cache, the kernel's attribute checks, make, clang's module cache). The sub-second part
 * tells the two trees apart without moving any mtime by a whole second.
 *
 * All lookups are pure in-memory work on the TreeIndex; the only I/O is read(), which preads the
 * pack through a shared fs.promises FileHandle (never sync I/O: the FUSE callbacks run on the JS
 * thread, and blocking it stalls every process reading the mount).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { constants as fsc } from 'node:fs';
import { KheadersError, errnoOf } from '../../errors.js';
import { createLogger, type Logger } from '../../log.js';
import { dataLocation, type CacheEntry } from '../../store/entry.js';
import type { ModuleHeaderSource } from '../../store/module-btf.js';
import type { TreeNode } from '../../store/tree-index.js';
import { ROOT_INO, type FsAttr, type FsDirent, type FsInvalidation, type FsModel, type FsStat } from './fs-model.js';
import { BTF_DIR_INO, BTF_DIR_NAME, ModuleDir } from './module-dir.js';

export const CURRENT_INO = 2;
export const BY_DIGEST_INO = 3;
/** Inodes below this are reserved for synthetic nodes; entry blocks start here. */
const FIRST_BLOCK_INO = 16;
/**
 * fuse-native passes st_ino as a uint32 and open handles as an int32 (the native backend uses
 * the inode as the handle); 2^31 inodes is ~300,000 entries of 6,700 nodes.
 */
const MAX_INO = 0x7fff_ffff;

export const CURRENT_NAME = 'current';
export const BY_DIGEST_NAME = 'by-digest';

const BLOCK_SIZE = 4096;
const NAME_MAX = 255;

const PERM = { file: 0o444, dir: 0o555, symlink: 0o777 } as const;
const TYPE = { file: fsc.S_IFREG, dir: fsc.S_IFDIR, symlink: fsc.S_IFLNK } as const;

interface Slot {
  readonly entry: CacheEntry;
  /** 0, 1, 2, ... in the order entries were first seen. */
  readonly seq: number;
  readonly base: number;
  readonly count: number;
  /** st_nlink of each dir node (2 + subdirectories), computed once when the slot is made. */
  readonly nlinks: Uint32Array;
}

interface Located {
  slot: Slot;
  node: TreeNode;
}

/** What a root or by-digest name meant, to tell which names a swap changed. */
type NameMap = Map<string, { parentIno: number; name: string; ino: number; meaning: string }>;

export class IndexFsModel implements FsModel {
  private readonly log: Logger;
  /** Every entry ever seen, in increasing `base` order (binary-searched by inode). */
  private readonly slots: Slot[] = [];
  private readonly slotById = new Map<string, Slot>();
  private nextBase = FIRST_BLOCK_INO;

  /** The view built by the last setEntries(). */
  private visible: Slot[] = [];
  private readonly releases = new Map<string, Slot>();
  private readonly digests = new Map<string, Slot>();
  private current: { target: string; slot: Slot } | null = null;
  /** mtime of the synthetic nodes: the last time the view changed. */
  private stampMs = Date.now();

  private readonly listeners = new Set<(inval: FsInvalidation) => void>();
  /** One FileHandle per data file (pack.tar, blobs), opened on first read and shared by all readers. */
  private readonly handles = new Map<string, Promise<FileHandle>>();
  private closed = false;
  /** `btf/` under the running kernel's entry, when module headers are served. */
  private readonly modules: ModuleDir | undefined;

  constructor(opts: { log?: Logger; modules?: ModuleHeaderSource } = {}) {
    this.log = opts.log ?? createLogger('silent');
    if (opts.modules) this.modules = new ModuleDir(opts.modules, () => this.allocIno(), (inval) => this.emit(inval));
  }

  // ---- view management ----------------------------------------------------------------------

  /**
   * Show exactly `entries`, with `current` pointing at `currentId` (no `current` when null or not
   * among them). Entries seen before keep their inode block; entries no longer listed disappear
   * from the listings but their inodes stay readable for whoever still holds them.
   */
  setEntries(entries: readonly CacheEntry[], currentId: string | null, runningId: string | null = null): void {
    const before = this.names();

    const visible: Slot[] = [];
    for (const entry of entries) {
      const slot = this.slotById.get(entry.manifest.id) ?? this.addSlot(entry);
      if (!visible.includes(slot)) visible.push(slot);
    }
    const currentSlot = currentId === null ? undefined : visible.find((s) => s.entry.manifest.id === currentId);
    if (currentId !== null && !currentSlot) this.log.warn({ currentId }, 'current entry is not among the cache entries; no /current');

    this.releases.clear();
    this.digests.clear();
    for (const slot of visible) {
      const { release, digest } = slot.entry.manifest;
      if (validName(release)) pick(this.releases, release, slot, currentSlot);
      else this.log.warn({ release, id: slot.entry.manifest.id }, 'release is not usable as a file name; shown only under by-digest');
      if (validName(digest)) pick(this.digests, digest, slot, currentSlot);
      else this.log.warn({ digest, id: slot.entry.manifest.id }, 'digest is not usable as a file name');
    }
    this.visible = visible;

    this.current = null;
    if (currentSlot) {
      const { release, digest } = currentSlot.entry.manifest;
      if (this.releases.get(release) === currentSlot) this.current = { target: release, slot: currentSlot };
      else if (this.digests.get(digest) === currentSlot) this.current = { target: `${BY_DIGEST_NAME}/${digest}`, slot: currentSlot };
    }

    // Module headers belong to the running kernel: only its entry shows them (and only when its
    // archive has no `btf` of its own, which kheaders archives never have).
    const runningSlot = runningId === null ? undefined : visible.find((s) => s.entry.manifest.id === runningId);
    this.modules?.attach(runningSlot && !runningSlot.entry.index.root.children?.has(BTF_DIR_NAME) ? runningSlot.base : null);

    // The whole view above was rebuilt synchronously, so no request saw half of it; only now
    // are transports told which names changed.
    const after = this.names();
    const changed: FsInvalidation[] = [];
    for (const [key, was] of before) {
      if (after.get(key)?.meaning !== was.meaning) changed.push({ parentIno: was.parentIno, name: was.name, oldIno: was.ino });
    }
    for (const [key, now] of after) {
      // A name that did not exist may sit in the kernel's negative dentry cache.
      if (!before.has(key)) changed.push({ parentIno: now.parentIno, name: now.name });
    }
    if (changed.length > 0) this.stampMs = Date.now();
    for (const inval of changed) this.emit(inval);
  }

  /** Close the data files. Reads after close() fail. */
  async close(): Promise<void> {
    this.closed = true;
    this.modules?.close();
    const pending = [...this.handles.values()];
    this.handles.clear();
    await Promise.all(
      pending.map(async (p) => {
        try {
          await (await p).close();
        } catch {
          // An open that failed has nothing to close.
        }
      }),
    );
  }

  onInvalidate(listener: (inval: FsInvalidation) => void): () => void {
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  }

  // ---- FsModel ---------------------------------------------------------------------------------

  lookup(parentIno: number, name: string): FsAttr | undefined {
    if (parentIno === ROOT_INO) {
      if (name === CURRENT_NAME) return this.current ? this.currentAttr(this.current.target) : undefined;
      if (name === BY_DIGEST_NAME) return this.byDigestAttr();
      const slot = this.releases.get(name);
      return slot ? this.attr(slot, slot.entry.index.root) : undefined;
    }
    if (parentIno === BY_DIGEST_INO) {
      const slot = this.digests.get(name);
      return slot ? this.attr(slot, slot.entry.index.root) : undefined;
    }
    if (parentIno === BTF_DIR_INO) return this.modules?.lookup(name);
    const at = this.locate(parentIno);
    const child = at?.node.children?.get(name);
    if (at && child) return this.attr(at.slot, child);
    if (name === BTF_DIR_NAME && this.modules && parentIno === this.modules.parent) return this.modules.dirAttr();
    return undefined;
  }

  prepareLookup(parentIno: number, name: string): Promise<void> | undefined {
    if (parentIno === BTF_DIR_INO) return this.modules?.prepare(name);
    if (name === BTF_DIR_NAME && this.modules && parentIno === this.modules.parent) return this.modules.prepareDir();
    return undefined;
  }

  preparePath(p: string): Promise<void> | undefined {
    const m = this.modulePath(p);
    if (m === undefined) return undefined;
    return m.file === undefined ? this.modules?.prepareDir() : this.modules?.prepare(m.file);
  }

  getattr(ino: number): FsAttr | undefined {
    if (ino === ROOT_INO) return this.rootAttr();
    if (ino === CURRENT_INO) return this.current ? this.currentAttr(this.current.target) : undefined;
    if (ino === BY_DIGEST_INO) return this.byDigestAttr();
    if (this.modules?.owns(ino)) return this.modules.getattr(ino);
    const at = this.locate(ino);
    return at ? this.attr(at.slot, at.node) : undefined;
  }

  readdir(ino: number): FsDirent[] | undefined {
    if (ino === ROOT_INO) {
      const out: FsDirent[] = [];
      if (this.current) out.push({ name: CURRENT_NAME, attr: this.currentAttr(this.current.target) });
      out.push({ name: BY_DIGEST_NAME, attr: this.byDigestAttr() });
      for (const name of [...this.releases.keys()].sort()) {
        const slot = this.releases.get(name)!;
        out.push({ name, attr: this.attr(slot, slot.entry.index.root) });
      }
      return out;
    }
    if (ino === BY_DIGEST_INO) {
      return [...this.digests.keys()].sort().map((name) => {
        const slot = this.digests.get(name)!;
        return { name, attr: this.attr(slot, slot.entry.index.root) };
      });
    }
    if (ino === BTF_DIR_INO) return this.modules && this.modules.parent !== null ? this.modules.readdir() : undefined;
    const at = this.locate(ino);
    if (!at || at.node.kind !== 'dir') return undefined;
    const out: FsDirent[] = at.slot.entry.index.list(at.node).map((child) => ({ name: child.name, attr: this.attr(at.slot, child) }));
    if (this.modules && ino === this.modules.parent) {
      const pos = out.findIndex((d) => d.name > BTF_DIR_NAME);
      // Lazy: the kernel then looks `btf` up before listing it, and that lookup lists the modules afresh.
      out.splice(pos < 0 ? out.length : pos, 0, { name: BTF_DIR_NAME, attr: this.modules.dirAttr(), lazy: true });
    }
    return out;
  }

  readlink(ino: number): string | undefined {
    if (ino === CURRENT_INO) return this.current?.target;
    const at = this.locate(ino);
    // Served exactly as archived: the index refused targets that leave the tree at ingest.
    return at?.node.kind === 'symlink' ? at.node.target : undefined;
  }

  async read(ino: number, offset: number, length: number): Promise<Buffer> {
    if (this.closed) throw new KheadersError('E_INTERNAL', 'the filesystem model is closed');
    if (this.modules?.owns(ino)) return this.modules.read(ino, offset, length);
    const at = this.locate(ino);
    if (!at) throw new KheadersError('E_NOT_FOUND', `no inode ${ino}`, { errno: 'ENOENT', ino });
    const { slot, node } = at;
    if (node.kind !== 'file') throw new KheadersError('E_NOT_FOUND', `${node.path} is not a regular file`, { errno: node.kind === 'dir' ? 'EISDIR' : 'EINVAL', ino });
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new KheadersError('E_INTERNAL', `bad read range ${offset}+${length}`, { errno: 'EINVAL' });
    }
    if (offset >= node.size || length === 0) return Buffer.alloc(0);
    const want = Math.min(length, node.size - offset);
    const loc = dataLocation(slot.entry, node);
    const fh = await this.handle(loc.file);
    const buf = Buffer.allocUnsafe(want);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await fh.read(buf, got, want - got, loc.offset + offset + got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    if (got < want) {
      // Never hand a compiler a silently truncated header: the pack no longer matches its index.
      throw new KheadersError('E_INTERNAL', `${loc.file} ends before ${node.path} does (entry ${slot.entry.manifest.id})`, { errno: 'EIO', file: loc.file });
    }
    return buf;
  }

  resolvePath(p: string): FsAttr | undefined {
    const parts = p.split('/').filter((s) => s !== '');
    if (parts.length === 0) return this.rootAttr();
    if (parts.some((s) => s === '.' || s === '..')) return undefined;
    // Fast path: everything below an entry root is one map lookup in its index (which never
    // follows symlinks: a path through a symlink is simply not a key).
    let slot: Slot | undefined;
    let rest: string[];
    if (parts[0] === BY_DIGEST_NAME) {
      if (parts.length === 1) return this.byDigestAttr();
      slot = this.digests.get(parts[1]!);
      rest = parts.slice(2);
    } else if (parts[0] === CURRENT_NAME) {
      return parts.length === 1 && this.current ? this.currentAttr(this.current.target) : undefined;
    } else {
      slot = this.releases.get(parts[0]!);
      rest = parts.slice(1);
    }
    if (!slot) return undefined;
    const node = slot.entry.index.get(rest.join('/'));
    if (node) return this.attr(slot, node);
    const m = this.modulePath(p);
    if (m === undefined) return undefined;
    return m.file === undefined ? this.modules?.dirAttr() : this.modules?.lookup(m.file);
  }

  /** For a path into `<running entry>/btf`: the file name asked for (undefined for the directory itself). */
  private modulePath(p: string): { file: string | undefined } | undefined {
    if (!this.modules || this.modules.parent === null) return undefined;
    const parts = p.split('/').filter((s) => s !== '');
    const root = parts[0] === BY_DIGEST_NAME ? this.digests.get(parts[1] ?? '') : this.releases.get(parts[0] ?? '');
    const rest = parts.slice(parts[0] === BY_DIGEST_NAME ? 2 : 1);
    if (!root || root.base !== this.modules.parent || rest[0] !== BTF_DIR_NAME || rest.length > 2) return undefined;
    return { file: rest[1] };
  }

  statfs(): FsStat {
    let bytes = 0;
    let files = 3;
    for (const slot of this.visible) {
      bytes += slot.entry.index.totalBytes;
      files += slot.count;
    }
    return { blocks: Math.ceil(bytes / BLOCK_SIZE), files, blockSize: BLOCK_SIZE, nameMax: NAME_MAX };
  }

  // ---- internals -------------------------------------------------------------------------------

  private addSlot(entry: CacheEntry): Slot {
    const count = entry.index.nodes.length;
    if (this.nextBase + count > MAX_INO) {
      throw new KheadersError('E_FUSE', 'inode numbers exhausted: restart the daemon', { entries: this.slots.length });
    }
    const nlinks = new Uint32Array(count);
    for (const node of entry.index.nodes) {
      if (node.kind !== 'dir') continue;
      nlinks[node.id]! += 2;
      if (node.id !== 0) nlinks[node.parent]! += 1;
    }
    const slot: Slot = { entry, seq: this.slots.length, base: this.nextBase, count, nlinks };
    this.nextBase += count;
    this.slots.push(slot);
    this.slotById.set(entry.manifest.id, slot);
    this.log.debug({ id: entry.manifest.id, base: slot.base, nodes: count }, 'entry added to the mount');
    return slot;
  }

  /** One inode number outside every entry's block (module headers), never reused. */
  private allocIno(): number {
    if (this.nextBase + 1 > MAX_INO) throw new KheadersError('E_FUSE', 'inode numbers exhausted: restart the daemon', { entries: this.slots.length });
    return this.nextBase++;
  }

  private locate(ino: number): Located | undefined {
    let lo = 0;
    let hi = this.slots.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const slot = this.slots[mid]!;
      if (ino < slot.base) hi = mid - 1;
      else if (ino >= slot.base + slot.count) lo = mid + 1;
      else {
        const node = slot.entry.index.node(ino - slot.base);
        return node ? { slot, node } : undefined;
      }
    }
    return undefined;
  }

  private attr(slot: Slot, node: TreeNode): FsAttr {
    return {
      ino: slot.base + node.id,
      kind: node.kind,
      mode: TYPE[node.kind] | PERM[node.kind],
      size: node.kind === 'dir' ? BLOCK_SIZE : node.size,
      // The running entry's root also holds `btf/`.
      nlink: node.kind === 'dir' ? slot.nlinks[node.id]! + (node.id === 0 && slot.base === this.modules?.parent ? 1 : 0) : 1,
      mtimeMs: node.mtime * 1000 + (slot.seq % 1000),
    };
  }

  private rootAttr(): FsAttr {
    return { ino: ROOT_INO, kind: 'dir', mode: TYPE.dir | PERM.dir, size: BLOCK_SIZE, nlink: 3 + this.releases.size, mtimeMs: this.stampMs };
  }

  private byDigestAttr(): FsAttr {
    return { ino: BY_DIGEST_INO, kind: 'dir', mode: TYPE.dir | PERM.dir, size: BLOCK_SIZE, nlink: 2 + this.digests.size, mtimeMs: this.stampMs };
  }

  private currentAttr(target: string): FsAttr {
    return { ino: CURRENT_INO, kind: 'symlink', mode: TYPE.symlink | PERM.symlink, size: Buffer.byteLength(target), nlink: 1, mtimeMs: this.stampMs };
  }

  /** Every name whose meaning a swap can change, with what it means now. */
  private names(): NameMap {
    const out: NameMap = new Map();
    if (this.current) out.set(`/${CURRENT_NAME}`, { parentIno: ROOT_INO, name: CURRENT_NAME, ino: CURRENT_INO, meaning: `-> ${this.current.target}` });
    for (const [name, slot] of this.releases) out.set(`/${name}`, { parentIno: ROOT_INO, name, ino: slot.base, meaning: `ino ${slot.base}` });
    for (const [name, slot] of this.digests) out.set(`${BY_DIGEST_NAME}/${name}`, { parentIno: BY_DIGEST_INO, name, ino: slot.base, meaning: `ino ${slot.base}` });
    const btfParent = this.modules?.parent ?? null;
    if (btfParent !== null) out.set(`${btfParent}/${BTF_DIR_NAME}`, { parentIno: btfParent, name: BTF_DIR_NAME, ino: BTF_DIR_INO, meaning: 'modules' });
    return out;
  }

  private emit(inval: FsInvalidation): void {
    for (const listener of this.listeners) {
      try {
        listener(inval);
      } catch (err) {
        this.log.error({ err, inval }, 'invalidation listener failed');
      }
    }
  }

  private handle(file: string): Promise<FileHandle> {
    let p = this.handles.get(file);
    if (!p) {
      p = open(file, 'r');
      this.handles.set(file, p);
      // A failed open is not cached: the next read tries again (and reports its own error).
      p.catch((err: unknown) => {
        if (this.handles.get(file) === p) this.handles.delete(file);
        this.log.error({ file, errno: errnoOf(err) }, 'cannot open a cache data file');
      });
    }
    return p;
  }
}

/** Usable as one path component of the mount, and not one of the reserved root names. */
function validName(name: string): boolean {
  return (
    name !== '' &&
    name !== '.' &&
    name !== '..' &&
    name !== CURRENT_NAME &&
    name !== BY_DIGEST_NAME &&
    !name.includes('/') &&
    !name.includes('\0') &&
    Buffer.byteLength(name) <= NAME_MAX
  );
}

/** Keep the preferred slot under `name`: the current entry, else the most recently ingested. */
function pick(map: Map<string, Slot>, name: string, slot: Slot, currentSlot: Slot | undefined): void {
  const have = map.get(name);
  if (!have || slot === currentSlot) {
    map.set(name, slot);
    return;
  }
  if (have === currentSlot) return;
  if (ingestedMs(slot) >= ingestedMs(have)) map.set(name, slot);
}

function ingestedMs(slot: Slot): number {
  const ms = Date.parse(slot.entry.manifest.ingestedAt);
  return Number.isNaN(ms) ? 0 : ms;
}
