/**
 * `<running kernel's entry>/btf/<module>.h` on the mount: one C header per loaded module with
 * BTF, from a ModuleHeaderSource (src/store/module-btf.ts), which lists the modules and makes a
 * header on request on a worker thread.
 *
 * The filesystem model (index-model.ts) delegates everything under the `btf` directory here.
 * Unlike the cached trees, this directory changes as modules load and unload, without anyone
 * telling us, so its nodes are volatile (the kernel caches them for a second only, and never
 * caches a missing name under it) and a header's size is only known once it is made: a LOOKUP
 * waits for it (prepare), and a listing gives the names without attributes (lazy).
 *
 * Inodes: the directory is BTF_DIR_INO; each module *instance* (a module loaded once; loaded
 * again, it is a new instance with a new sysfs file) gets its own inode number, never reused,
 * so a header opened before a module is reloaded keeps reading the bytes it was opened on.
 */
import { constants as fsc } from 'node:fs';
import { KheadersError } from '../../errors.js';
import { MODULE_HEADERS_DIR, type ModuleHeader, type ModuleHeaderSource } from '../../store/module-btf.js';
import type { FsAttr, FsDirent, FsInvalidation } from './fs-model.js';

export const BTF_DIR_INO = 4;
export const BTF_DIR_NAME = MODULE_HEADERS_DIR;
const HEADER_SUFFIX = '.h';
/** Instances remembered for inodes the kernel may still hold, beyond the loaded ones. */
const MAX_REMEMBERED = 1024;
const BLOCK_SIZE = 4096;

interface Instance {
  readonly name: string;
  readonly identity: string;
  readonly ino: number;
  header: ModuleHeader | undefined;
}

export class ModuleDir {
  /** Root inode of the entry that shows `btf/` (the running kernel's), or null: shown nowhere. */
  private parentIno: number | null = null;
  private readonly instances = new Map<string, Instance>();
  private readonly byIno = new Map<number, Instance>();
  /** Module name → the inode last given to the kernel for `<name>.h` (to invalidate it when the module changes). */
  private readonly shown = new Map<string, number>();
  /** mtime of the directory: when the set of modules last changed (tells the kernel to drop a cached listing). */
  private stampMs = Date.now();
  private readonly unsubscribe: () => void;

  constructor(
    private readonly source: ModuleHeaderSource,
    private readonly allocIno: () => number,
    private readonly emit: (inval: FsInvalidation) => void,
  ) {
    this.unsubscribe = source.onChange((changed) => this.modulesChanged(changed));
  }

  close(): void {
    this.unsubscribe();
  }

  /** Show the directory under this entry root (the running kernel's), or nowhere. */
  attach(parentIno: number | null): void {
    this.parentIno = parentIno;
    // List the modules now, so that a listing of the directory never starts from nothing.
    if (parentIno !== null) this.source.knownModules();
  }

  get parent(): number | null {
    return this.parentIno;
  }

  owns(ino: number): boolean {
    return ino === BTF_DIR_INO || this.byIno.has(ino);
  }

  dirAttr(): FsAttr {
    return { ino: BTF_DIR_INO, kind: 'dir', mode: fsc.S_IFDIR | 0o555, size: BLOCK_SIZE, nlink: 2, mtimeMs: this.stampMs, volatile: true };
  }

  getattr(ino: number): FsAttr | undefined {
    if (ino === BTF_DIR_INO) {
      if (this.parentIno === null) return undefined;
      this.source.knownModules(); // a stale listing is re-read in the background
      return this.dirAttr();
    }
    const inst = this.byIno.get(ino);
    return inst?.header ? fileAttr(inst.ino, inst.header) : undefined;
  }

  /** The header of `name` (`<module>.h`) if prepare() made it; undefined otherwise. */
  lookup(name: string): FsAttr | undefined {
    if (this.parentIno === null) return undefined;
    const module = moduleOf(name);
    if (module === undefined) return undefined;
    const inst = this.latest(module);
    if (!inst?.header) return undefined;
    this.shown.set(module, inst.ino);
    return fileAttr(inst.ino, inst.header);
  }

  /** List the modules afresh if the listing is stale, so that a listing of the directory that follows its lookup is current. */
  prepareDir(): Promise<void> | undefined {
    if (this.parentIno === null) return undefined;
    return this.source.modules().then(() => undefined);
  }

  /** Make the header of `name` (listing the modules afresh if needed), so lookup() can answer. */
  prepare(name: string): Promise<void> | undefined {
    if (this.parentIno === null) return undefined;
    const module = moduleOf(name);
    if (module === undefined) return undefined;
    return this.source.header(module).then((header) => {
      if (header) this.instance(header.module, header.identity).header = header;
    });
  }

  readdir(): FsDirent[] {
    return this.source.knownModules().map((m) => {
      const inst = this.instance(m.name, m.identity);
      this.shown.set(m.name, inst.ino);
      const attr = inst.header ? fileAttr(inst.ino, inst.header) : { ino: inst.ino, kind: 'file' as const, mode: fsc.S_IFREG | 0o444, size: 0, nlink: 1, mtimeMs: this.stampMs, volatile: true };
      return { name: `${m.name}${HEADER_SUFFIX}`, attr, lazy: inst.header === undefined };
    });
  }

  async read(ino: number, offset: number, length: number): Promise<Buffer> {
    const inst = this.byIno.get(ino);
    if (!inst?.header) throw new KheadersError('E_NOT_FOUND', `no module header at inode ${ino}`, { errno: 'ENOENT', ino });
    return this.source.read(inst.header, offset, length);
  }

  // ---- internals -----------------------------------------------------------------------------

  private latest(module: string): Instance | undefined {
    const listed = this.source.knownModules().find((m) => m.name === module);
    return listed === undefined ? undefined : this.instances.get(instanceKey(listed));
  }

  private instance(name: string, identity: string): Instance {
    const key = instanceKey({ name, identity });
    let inst = this.instances.get(key);
    if (!inst) {
      inst = { name, identity, ino: this.allocIno(), header: undefined };
      this.instances.set(key, inst);
      this.byIno.set(inst.ino, inst);
      this.forgetOld();
    }
    return inst;
  }

  /** Keep the remembered instances bounded: the oldest that are no longer loaded go first. */
  private forgetOld(): void {
    if (this.instances.size <= MAX_REMEMBERED) return;
    const loaded = new Set(this.source.knownModules().map(instanceKey));
    for (const [key, inst] of this.instances) {
      if (this.instances.size <= MAX_REMEMBERED) break;
      if (loaded.has(key)) continue;
      this.instances.delete(key);
      this.byIno.delete(inst.ino);
    }
  }

  private modulesChanged(changed: readonly string[]): void {
    this.stampMs = Date.now();
    for (const name of changed) {
      // The inode the kernel may hold for the name, if we gave it one: it is out of date now.
      const shown = this.shown.get(name);
      this.shown.delete(name);
      this.emit({ parentIno: BTF_DIR_INO, name: `${name}${HEADER_SUFFIX}`, ...(shown !== undefined ? { oldIno: shown } : {}) });
    }
    // The kernel may hold the directory's listing: drop it with the directory's inode cache.
    if (this.parentIno !== null) this.emit({ parentIno: this.parentIno, name: BTF_DIR_NAME, oldIno: BTF_DIR_INO });
  }
}

function instanceKey(m: { name: string; identity: string }): string {
  return `${m.name}\0${m.identity}`;
}

/** The module a file name in the directory stands for, or undefined for any other name. */
function moduleOf(name: string): string | undefined {
  return name.endsWith(HEADER_SUFFIX) && name.length > HEADER_SUFFIX.length ? name.slice(0, -HEADER_SUFFIX.length) : undefined;
}

function fileAttr(ino: number, header: ModuleHeader): FsAttr {
  return { ino, kind: 'file', mode: fsc.S_IFREG | 0o444, size: header.size, nlink: 1, mtimeMs: header.mtimeMs, volatile: true };
}
