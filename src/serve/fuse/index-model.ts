/**
 * The FsModel over the cache's entries: what both FUSE backends show.
 *
 *   /current               symlink -> <release> of the current entry
 *   /<release>             symlink -> by-digest/<digest> of the entry the release means
 *   /by-digest/<digest>/   every entry passed to the last setEntries(), by archive digest
 *   <running entry>/btf/   headers of the loaded modules, made on request (module-dir.ts), when
 *                          a ModuleHeaderSource is given and setEntries names the running entry
 *
 * Which entry `current`, a release and a digest mean is decided by the store's Resolver, the
 * same one `cat` and HTTP use. The trees themselves live only under by-digest/: a path inside a
 * tree names one build's file for as long as that build is cached, and only the two kinds of
 * symlink change on a kernel swap. That matters for fuse-native, whose libfuse2 path API gives
 * the kernel one inode per *path*: were `<release>/include/x.h` a directory path, a same-release
 * swap would leave the kernel an inode with the old size and page cache for the new bytes
 * (measured: new bytes cut to the old size, and ESTALE on open). With per-build paths each build
 * has its own inodes on both backends.
 *
 * Inode numbers: 1 root, 2 `current`, 3 `by-digest`; every entry, the first time it is seen,
 * gets the block [base, base + nodes) and node `id` is inode `base + id`; every release name
 * gets one inode for its symlink. Blocks are never reused or forgotten, so an inode keeps its
 * meaning for the life of the process: a transport that holds an inode (an open file, a cached
 * dentry) after a swap still reaches the old entry's bytes.
 *
 * mtimes: seconds as archived, plus the entry's sequence number (mod 1000) as milliseconds.
 * Archive mtimes have one-second resolution, and two builds of one release made with
 * KBUILD_BUILD_TIMESTAMP stamp every file alike: a header whose bytes changed but whose length did
 * not (`#define CONFIG_HZ 250` → `300`) would look unchanged to every mtime+size cache (make,
 * clang's module cache). The sub-second part tells the two trees apart without moving any mtime
 * by a whole second.
 *
 * All lookups are pure in-memory work on the TreeIndex; the only I/O is read(), which goes through
 * the entry's EntryReader (async preads, bytes proven before they are first served; never sync
 * I/O: the FUSE callbacks run on the JS thread, and blocking it stalls every process reading the
 * mount).
 */
import { constants as fsc } from 'node:fs';
import { KheadersError } from '../../errors.js';
import { createLogger, type Logger } from '../../log.js';
import type { CacheEntry } from '../../store/entry.js';
import type { ModuleHeaderSource } from '../../store/module-btf.js';
import { Resolver } from '../../store/resolve.js';
import type { NodeKind } from '../../store/tree-index.js';
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
  /**
   * st_nlink of each dir node (2 + subdirectories), counted the first time the node's attributes
   * are asked for (0: not yet). Not when the slot is made: a walk of every node of every entry,
   * in code V8 has not optimised yet, cost each start 12-45 ms on the serving thread before the
   * mount could answer; a compile asks for a few hundred directories of one entry.
   */
  readonly nlinks: Uint32Array;
}

interface Located {
  slot: Slot;
  node: number;
}

/** What a root or by-digest name meant, to tell which names a swap changed. */
type NameMap = Map<string, { parentIno: number; name: string; ino: number; meaning: string }>;

export class IndexFsModel implements FsModel {
  private readonly log: Logger;
  /** Every entry ever seen, in increasing `base` order (binary-searched by inode). */
  private readonly slots: Slot[] = [];
  /** By entry instance: a rebuilt entry (same id, new files) is a new instance and a new slot. */
  private readonly slotByEntry = new Map<CacheEntry, Slot>();
  private nextBase = FIRST_BLOCK_INO;
  /** One symlink inode per release name, for the life of the process. */
  private readonly releaseIno = new Map<string, number>();
  private readonly releaseByIno = new Map<number, string>();

  /** The view built by the last setEntries(). */
  private visible: Slot[] = [];
  private readonly releases = new Map<string, Slot>();
  private readonly digests = new Map<string, Slot>();
  private current: { target: string; slot: Slot } | null = null;
  /** mtime of the synthetic nodes: the last time the view changed. */
  private stampMs = Date.now();

  private readonly listeners = new Set<(inval: FsInvalidation) => void>();
  private closed = false;
  /** `btf/` under the running kernel's entry, when module headers are served. */
  private readonly modules: ModuleDir | undefined;

  constructor(opts: { log?: Logger; modules?: ModuleHeaderSource } = {}) {
    this.log = opts.log ?? createLogger('silent');
    if (opts.modules) this.modules = new ModuleDir(opts.modules, () => this.allocIno(), (inval) => this.emit(inval));
  }

  // ---- view management ----------------------------------------------------------------------

  /**
   * Show exactly `entries`, with `current` as the store's Resolver decides it from `pointer` (the
   * cache's `current` id): that entry, else the newest of the running kernel's release, else none.
   * Entries seen before keep their inode block; entries no longer listed disappear from the
   * listings but their inodes stay readable for whoever still holds them. `runningId` is the
   * running kernel's own entry: only it shows the loaded modules' headers.
   */
  setEntries(entries: readonly CacheEntry[], pointer: string | null, runningId: string | null = null): void {
    const before = this.names();

    const visible: Slot[] = [];
    const byId = new Map<string, Slot>();
    for (const entry of entries) {
      const slot = this.slotByEntry.get(entry) ?? this.addSlot(entry);
      if (visible.includes(slot)) continue;
      visible.push(slot);
      byId.set(entry.manifest.id, slot);
    }
    const resolver = new Resolver(
      entries.map((e) => e.manifest),
      pointer,
    );
    if (pointer !== null && resolver.byId(pointer) === undefined) this.log.warn({ currentId: pointer }, 'current entry is not among the cache entries');
    const slotOf = (id: string | undefined): Slot | undefined => (id === undefined ? undefined : byId.get(id));
    const currentSlot = slotOf(resolver.current?.id);

    this.digests.clear();
    this.releases.clear();
    for (const slot of visible) {
      const { release, digest } = slot.entry.manifest;
      const forDigest = slotOf(resolver.byDigest(digest)?.id);
      if (forDigest && validName(digest)) this.digests.set(digest, forDigest);
      const forRelease = slotOf(resolver.byRelease(release)?.id);
      if (!forRelease) continue;
      if (validName(release)) this.releases.set(release, forRelease);
      else this.log.warn({ release, id: slot.entry.manifest.id }, 'release is not usable as a file name; shown only under by-digest');
    }
    for (const release of this.releases.keys()) this.linkIno(release);
    this.visible = visible;

    this.current = null;
    if (currentSlot) {
      const { release, digest } = currentSlot.entry.manifest;
      if (this.releases.get(release) === currentSlot) this.current = { target: release, slot: currentSlot };
      else this.current = { target: `${BY_DIGEST_NAME}/${digest}`, slot: currentSlot };
    }

    // Module headers belong to the running kernel: only its entry shows them (and only when its
    // archive has no `btf` of its own, which kheaders archives never have).
    const runningSlot = slotOf(runningId ?? undefined);
    this.modules?.attach(runningSlot && runningSlot.entry.index.childId(0, BTF_DIR_NAME) < 0 ? runningSlot.base : null);

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

  /** Stop reading: the model's entries are released (their files close once nobody else reads them). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.modules?.close();
    for (const slot of this.slots) slot.entry.reader.release();
    await Promise.all(this.slots.map((slot) => slot.entry.reader.close()));
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
      return this.releases.has(name) ? this.releaseAttr(name) : undefined;
    }
    if (parentIno === BY_DIGEST_INO) {
      const slot = this.digests.get(name);
      return slot ? this.attr(slot, 0) : undefined;
    }
    if (parentIno === BTF_DIR_INO) return this.modules?.lookup(name);
    const at = this.locate(parentIno);
    if (!at) return undefined;
    const child = at.slot.entry.index.childId(at.node, name);
    if (child >= 0) return this.attr(at.slot, child);
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
    const release = this.releaseByIno.get(ino);
    if (release !== undefined) return this.releases.has(release) ? this.releaseAttr(release) : undefined;
    if (this.modules?.owns(ino)) return this.modules.getattr(ino);
    const at = this.locate(ino);
    return at ? this.attr(at.slot, at.node) : undefined;
  }

  readdir(ino: number): FsDirent[] | undefined {
    if (ino === ROOT_INO) {
      const out: FsDirent[] = [];
      if (this.current) out.push({ name: CURRENT_NAME, attr: this.currentAttr(this.current.target) });
      out.push({ name: BY_DIGEST_NAME, attr: this.byDigestAttr() });
      for (const name of [...this.releases.keys()].sort()) out.push({ name, attr: this.releaseAttr(name) });
      return out;
    }
    if (ino === BY_DIGEST_INO) {
      return [...this.digests.keys()].sort().map((name) => ({ name, attr: this.attr(this.digests.get(name)!, 0) }));
    }
    if (ino === BTF_DIR_INO) return this.modules && this.modules.parent !== null ? this.modules.readdir() : undefined;
    const at = this.locate(ino);
    if (!at || at.slot.entry.index.kindOf(at.node) !== 'dir') return undefined;
    const index = at.slot.entry.index;
    const { first, count } = index.childRange(at.node);
    const out: FsDirent[] = [];
    for (let id = first; id < first + count; id++) out.push({ name: index.nameOf(id), attr: this.attr(at.slot, id) });
    if (this.modules && ino === this.modules.parent) {
      const pos = out.findIndex((d) => d.name > BTF_DIR_NAME);
      // Lazy: the kernel then looks `btf` up before listing it, and that lookup lists the modules afresh.
      out.splice(pos < 0 ? out.length : pos, 0, { name: BTF_DIR_NAME, attr: this.modules.dirAttr(), lazy: true });
    }
    return out;
  }

  readlink(ino: number): string | undefined {
    if (ino === CURRENT_INO) return this.current?.target;
    const release = this.releaseByIno.get(ino);
    if (release !== undefined) return this.releaseTarget(release);
    const at = this.locate(ino);
    // Served exactly as archived: the index refused targets that leave the tree at ingest.
    return at ? at.slot.entry.index.targetOf(at.node) : undefined;
  }

  async read(ino: number, offset: number, length: number): Promise<Buffer> {
    if (this.closed) throw new KheadersError('E_INTERNAL', 'the filesystem model is closed');
    if (this.modules?.owns(ino)) return this.modules.read(ino, offset, length);
    const at = this.locate(ino);
    if (!at) throw new KheadersError('E_NOT_FOUND', `no inode ${ino}`, { errno: 'ENOENT', ino });
    // The entry's one reader: exact bytes, proven before first served, EIO on damage.
    return at.slot.entry.reader.read(at.node, offset, length);
  }

  resolvePath(p: string): FsAttr | undefined {
    const parts = p.split('/').filter((s) => s !== '');
    if (parts.length === 0) return this.rootAttr();
    if (parts.some((s) => s === '.' || s === '..')) return undefined;
    const [top, second] = parts;
    if (top === CURRENT_NAME) return parts.length === 1 && this.current ? this.currentAttr(this.current.target) : undefined;
    if (top !== BY_DIGEST_NAME) return parts.length === 1 && this.releases.has(top!) ? this.releaseAttr(top!) : undefined;
    if (second === undefined) return this.byDigestAttr();
    const slot = this.digests.get(second);
    if (!slot) return undefined;
    // Inside a tree: one binary search per component (the kernel resolved every symlink itself).
    const id = slot.entry.index.idOf(parts.slice(2).join('/'));
    if (id >= 0) return this.attr(slot, id);
    const m = this.modulePath(p);
    if (m === undefined) return undefined;
    return m.file === undefined ? this.modules?.dirAttr() : this.modules?.lookup(m.file);
  }

  /** For a path into `by-digest/<running entry>/btf`: the file name asked for (undefined for the directory itself). */
  private modulePath(p: string): { file: string | undefined } | undefined {
    if (!this.modules || this.modules.parent === null) return undefined;
    const parts = p.split('/').filter((s) => s !== '');
    const root = parts[0] === BY_DIGEST_NAME ? this.digests.get(parts[1] ?? '') : undefined;
    const rest = parts.slice(2);
    if (!root || root.base !== this.modules.parent || rest[0] !== BTF_DIR_NAME || rest.length > 2) return undefined;
    return { file: rest[1] };
  }

  statfs(): FsStat {
    let bytes = 0;
    let files = 3 + this.releases.size;
    for (const slot of this.visible) {
      bytes += slot.entry.index.totalBytes;
      files += slot.count;
    }
    return { blocks: Math.ceil(bytes / BLOCK_SIZE), files, blockSize: BLOCK_SIZE, nameMax: NAME_MAX };
  }

  // ---- internals -------------------------------------------------------------------------------

  private addSlot(entry: CacheEntry): Slot {
    const index = entry.index;
    const count = index.nodeCount;
    if (this.nextBase + count > MAX_INO) {
      throw new KheadersError('E_FUSE', 'inode numbers exhausted: restart the daemon', { entries: this.slots.length });
    }
    const slot: Slot = { entry, seq: this.slots.length, base: this.nextBase, count, nlinks: new Uint32Array(count) };
    this.nextBase += count;
    this.slots.push(slot);
    this.slotByEntry.set(entry, slot);
    entry.reader.retain();
    this.log.debug({ id: entry.manifest.id, base: slot.base, nodes: count }, 'entry added to the mount');
    return slot;
  }

  /** One inode number outside every entry's block (release links, module headers), never reused. */
  private allocIno(): number {
    if (this.nextBase + 1 > MAX_INO) throw new KheadersError('E_FUSE', 'inode numbers exhausted: restart the daemon', { entries: this.slots.length });
    return this.nextBase++;
  }

  private linkIno(release: string): number {
    let ino = this.releaseIno.get(release);
    if (ino === undefined) {
      ino = this.allocIno();
      this.releaseIno.set(release, ino);
      this.releaseByIno.set(ino, release);
    }
    return ino;
  }

  private releaseTarget(release: string): string | undefined {
    const slot = this.releases.get(release);
    return slot ? `${BY_DIGEST_NAME}/${slot.entry.manifest.digest}` : undefined;
  }

  private locate(ino: number): Located | undefined {
    let lo = 0;
    let hi = this.slots.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const slot = this.slots[mid]!;
      if (ino < slot.base) hi = mid - 1;
      else if (ino >= slot.base + slot.count) lo = mid + 1;
      else return { slot, node: ino - slot.base };
    }
    return undefined;
  }

  private attr(slot: Slot, node: number): FsAttr {
    const index = slot.entry.index;
    const kind: NodeKind = index.kindOf(node);
    return {
      ino: slot.base + node,
      kind,
      mode: TYPE[kind] | PERM[kind],
      size: kind === 'dir' ? BLOCK_SIZE : index.sizeOf(node),
      // The running entry's root also holds `btf/`.
      nlink: kind === 'dir' ? dirLinks(slot, node) + (node === 0 && slot.base === this.modules?.parent ? 1 : 0) : 1,
      mtimeMs: index.mtimeOf(node) * 1000 + (slot.seq % 1000),
    };
  }

  private rootAttr(): FsAttr {
    return { ino: ROOT_INO, kind: 'dir', mode: TYPE.dir | PERM.dir, size: BLOCK_SIZE, nlink: 3, mtimeMs: this.stampMs };
  }

  private byDigestAttr(): FsAttr {
    return { ino: BY_DIGEST_INO, kind: 'dir', mode: TYPE.dir | PERM.dir, size: BLOCK_SIZE, nlink: 2 + this.digests.size, mtimeMs: this.stampMs };
  }

  private currentAttr(target: string): FsAttr {
    return { ino: CURRENT_INO, kind: 'symlink', mode: TYPE.symlink | PERM.symlink, size: Buffer.byteLength(target), nlink: 1, mtimeMs: this.stampMs };
  }

  private releaseAttr(release: string): FsAttr {
    const target = this.releaseTarget(release) ?? '';
    return { ino: this.linkIno(release), kind: 'symlink', mode: TYPE.symlink | PERM.symlink, size: Buffer.byteLength(target), nlink: 1, mtimeMs: this.stampMs };
  }

  /** Every name whose meaning a swap can change, with what it means now. */
  private names(): NameMap {
    const out: NameMap = new Map();
    if (this.current) out.set(`/${CURRENT_NAME}`, { parentIno: ROOT_INO, name: CURRENT_NAME, ino: CURRENT_INO, meaning: `-> ${this.current.target}` });
    for (const name of this.releases.keys()) out.set(`/${name}`, { parentIno: ROOT_INO, name, ino: this.linkIno(name), meaning: `-> ${this.releaseTarget(name)}` });
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

/** A directory's st_nlink: 2 + its subdirectories (counted once, then kept in the slot). */
function dirLinks(slot: Slot, node: number): number {
  const known = slot.nlinks[node]!;
  if (known !== 0) return known;
  const index = slot.entry.index;
  const { first, count } = index.childRange(node);
  let links = 2;
  for (let child = first; child < first + count; child++) if (index.kindOf(child) === 'dir') links++;
  slot.nlinks[node] = links;
  return links;
}
