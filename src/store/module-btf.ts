/**
 * C headers for the running kernel's loaded modules, from their split BTF.
 *
 * A module's BTF appears at /sys/kernel/btf/<module> while it is loaded, as split BTF over the
 * kernel's (/sys/kernel/btf/vmlinux); the set changes at runtime as modules load and unload. A
 * header is made only when someone asks for it, on a worker thread (the emitter walks the whole
 * kernel: about a second of CPU), and kept on disk under a key naming its content:
 *
 *   key = sha256(format version, the base BTF's sha256, the module's BTF bytes)
 *   <dir>/<key>.h            at most `maxHeaders` of them, the least recently used evicted first
 *
 * so a module reloaded unchanged, or the same module after a daemon restart, costs nothing, and
 * a rebuilt one gets a new header. Headers are never generated on the daemon's event loop and
 * never twice at once (one worker at a time, concurrent requests for one key share it).
 *
 * The listing is what callers see as the "instance" of a module: its name and the identity of
 * its sysfs file (inode, size, ctime). A module reloaded gets a new sysfs file, so a new
 * identity; the header of an instance never changes, which lets the FUSE mount give each
 * instance its own inode. The listing is re-read when it is older than `staleMs` and someone
 * asks; nothing polls while nobody looks.
 *
 * This module owns the module headers only; FUSE and HTTP reach it through ModuleHeaderSource.
 */
import { createHash } from 'node:crypto';
import { chmod, mkdir, open, readdir, readFile, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { KheadersError, errnoOf } from '../errors.js';
import { createLogger, type Logger } from '../log.js';
import { sha256OfFile } from './kernel-match.js';
import { preadAll } from './reader.js';
import { generateHeaderInWorker } from './vmlinux-h.js';

/** Bump when the emitter's output changes, so headers cached by an older version are not served. */
const HEADER_FORMAT = 1;
const KEY_FILE_RE = /^([0-9a-f]{64})\.h$/;
const MODULE_NAME_RE = /^[A-Za-z0-9_-]{1,55}$/;

export const DEFAULT_SYSFS_BTF_DIR = '/sys/kernel/btf';
/** The directory of module headers inside the running kernel's entry, on the mount and over HTTP. */
export const MODULE_HEADERS_DIR = 'btf';
export const MODULE_HEADERS_SUBDIR = 'module-btf';

/** One loaded module as listed: its name and the identity of its BTF file. */
export interface ModuleInstance {
  readonly name: string;
  /** Changes when the module is unloaded and loaded again (a new sysfs file). */
  readonly identity: string;
}

/** A generated header, on disk. */
export interface ModuleHeader {
  readonly module: string;
  /** The identity of the module instance it was made for. */
  readonly identity: string;
  /** Names the content: see the file comment. */
  readonly key: string;
  readonly file: string;
  readonly size: number;
  readonly mtimeMs: number;
}

/** What FUSE and HTTP need: the loaded modules, and a header per module on request. */
export interface ModuleHeaderSource {
  /**
   * The loaded modules with BTF as last listed, without waiting (no I/O); starts a new listing
   * in the background when this one is stale. Empty before the first listing.
   */
  knownModules(): readonly ModuleInstance[];
  /** The loaded modules with BTF, listed afresh when the last listing is stale. */
  modules(): Promise<readonly ModuleInstance[]>;
  /**
   * The header of a loaded module (of that instance, when `identity` is given), generated on a
   * worker if it is not cached. Undefined when no such module (instance) is loaded.
   */
  header(module: string, identity?: string): Promise<ModuleHeader | undefined>;
  /** Bytes of a header returned by header(). */
  read(header: ModuleHeader, offset: number, length: number): Promise<Buffer>;
  /** Called with the names whose instance changed (loaded, unloaded, reloaded) after a listing. */
  onChange(listener: (changed: readonly string[]) => void): () => void;
}

export interface ModuleHeadersOptions {
  /** Where generated headers are kept (created 0755 if missing). */
  dir: string;
  /** Where the kernel publishes BTF (default /sys/kernel/btf): `vmlinux` and one file per module. */
  btfDir?: string;
  /** Headers kept on disk (default 8: each holds the kernel's types too, a few MiB). */
  maxHeaders?: number;
  /** How old a listing may be before a request re-reads it (default 1000 ms). */
  staleMs?: number;
  log?: Logger;
}

interface Listing {
  at: number;
  modules: Map<string, ModuleInstance>;
  /** The base BTF's identity, to notice (impossibly) a new kernel BTF under a running daemon. */
  base: string | null;
}

export class ModuleHeaders implements ModuleHeaderSource {
  private readonly btfDir: string;
  private readonly maxHeaders: number;
  private readonly staleMs: number;
  private readonly log: Logger;
  private listing: Listing = { at: Number.NEGATIVE_INFINITY, modules: new Map(), base: null };
  private listingNow: Promise<Listing> | null = null;
  private baseDigest: { identity: string; digest: Promise<string> } | null = null;
  /** Instance identity → content key, for instances hashed before. */
  private readonly keys = new Map<string, string>();
  /** Cached headers by key, least recently used first (Map order; a use re-inserts). */
  private readonly cached = new Map<string, { file: string; size: number; mtimeMs: number }>();
  private readonly making = new Map<string, Promise<{ file: string; size: number; mtimeMs: number }>>();
  private readonly handles = new Map<string, Promise<FileHandle>>();
  /** One worker at a time: each parses the whole kernel BTF (~100 MiB while it runs). */
  private queue: Promise<unknown> = Promise.resolve();
  private readonly listeners = new Set<(changed: readonly string[]) => void>();

  private constructor(
    readonly dir: string,
    opts: ModuleHeadersOptions,
  ) {
    this.btfDir = opts.btfDir ?? DEFAULT_SYSFS_BTF_DIR;
    this.maxHeaders = Math.max(1, opts.maxHeaders ?? 8);
    this.staleMs = opts.staleMs ?? 1000;
    this.log = opts.log ?? createLogger('silent');
  }

  /**
   * Open (creating) the header directory and take stock of the headers already in it. A directory
   * that cannot be made or read now (a cache volume out of space or inodes) does not stop the
   * daemon: it starts with none kept, says why, and tries again when a header is asked for.
   */
  static async open(opts: ModuleHeadersOptions): Promise<ModuleHeaders> {
    const self = new ModuleHeaders(path.resolve(opts.dir), opts);
    let names: string[];
    try {
      await self.makeDir();
      names = await readdir(self.dir);
    } catch (err) {
      self.log.warn({ dir: self.dir, errno: errnoOf(err) }, `module headers cannot be kept in ${self.dir} now (${(err as Error).message}): none are reused; each is made when first asked for, if the directory can be made then`);
      return self;
    }
    const found: Array<{ key: string; file: string; size: number; mtimeMs: number }> = [];
    for (const name of names) {
      const file = path.join(self.dir, name);
      const m = KEY_FILE_RE.exec(name);
      if (!m) {
        // A temp file of a generation cut short by a crash: never a header anyone was given.
        if (name.endsWith('.tmp')) await unlink(file).catch(() => {});
        continue;
      }
      const st = await stat(file).catch(() => undefined);
      if (st?.isFile()) found.push({ key: m[1]!, file, size: st.size, mtimeMs: st.mtimeMs });
    }
    found.sort((a, b) => a.mtimeMs - b.mtimeMs);
    for (const f of found) self.cached.set(f.key, { file: f.file, size: f.size, mtimeMs: f.mtimeMs });
    await self.evict();
    return self;
  }

  knownModules(): readonly ModuleInstance[] {
    if (this.stale()) void this.relist().catch((err: unknown) => this.log.warn({ err }, 'cannot list module BTF'));
    return [...this.listing.modules.values()];
  }

  async modules(): Promise<readonly ModuleInstance[]> {
    const listing = this.stale() ? await this.relist() : this.listing;
    return [...listing.modules.values()];
  }

  async header(module: string, identity?: string): Promise<ModuleHeader | undefined> {
    if (!MODULE_NAME_RE.test(module)) return undefined;
    let instance = (await this.currentListing()).modules.get(module);
    // Asked for an instance the listing does not have yet: it may have loaded a moment ago.
    if (identity !== undefined && instance?.identity !== identity) instance = (await this.relist()).modules.get(module);
    if (instance === undefined || (identity !== undefined && instance.identity !== identity)) return undefined;
    const key = await this.keyOf(instance);
    if (key === undefined) return undefined; // unloaded while we looked
    const made = await this.ensure(key, instance);
    return { module, identity: instance.identity, key, ...made };
  }

  async read(header: ModuleHeader, offset: number, length: number): Promise<Buffer> {
    if (offset >= header.size || length <= 0) return Buffer.alloc(0);
    const want = Math.min(length, header.size - offset);
    const { buf, got } = await preadAll(await this.handle(header), offset, want);
    if (got < want) throw new KheadersError('E_INTERNAL', `${header.file} ends before the ${header.size} bytes of ${header.module}'s header`, { errno: 'EIO', file: header.file });
    if (this.cached.has(header.key)) this.touch(header.key);
    return buf;
  }

  onChange(listener: (changed: readonly string[]) => void): () => void {
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  }

  /** Close the open header files (after the last read). */
  async close(): Promise<void> {
    const pending = [...this.handles.values()];
    this.handles.clear();
    await Promise.all(pending.map(async (p) => (await p.catch(() => undefined))?.close().catch(() => {})));
    await this.queue.catch(() => {});
  }

  // ---- listing --------------------------------------------------------------------------------

  private stale(): boolean {
    return performance.now() - this.listing.at >= this.staleMs;
  }

  private currentListing(): Promise<Listing> | Listing {
    return this.stale() ? this.relist() : this.listing;
  }

  /** Re-read the BTF directory (one listing at a time; concurrent callers share it). */
  private relist(): Promise<Listing> {
    this.listingNow ??= this.readListing().finally(() => {
      this.listingNow = null;
    });
    return this.listingNow;
  }

  private async readListing(): Promise<Listing> {
    const started = performance.now();
    const base = await identityOf(path.join(this.btfDir, 'vmlinux'));
    const modules = new Map<string, ModuleInstance>();
    if (base !== null) {
      let names: string[] = [];
      try {
        names = await readdir(this.btfDir);
      } catch (err) {
        if (errnoOf(err) !== 'ENOENT') throw err;
      }
      const instances = await Promise.all(
        names.filter((n) => n !== 'vmlinux' && MODULE_NAME_RE.test(n)).map(async (name) => {
          const identity = await identityOf(path.join(this.btfDir, name));
          return identity === null ? undefined : { name, identity };
        }),
      );
      for (const inst of instances) if (inst) modules.set(inst.name, inst);
    }
    const sorted = new Map([...modules.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
    const previous = this.listing;
    const listing: Listing = { at: started, modules: sorted, base };
    this.listing = listing;
    if (previous.base !== base) {
      // Another kernel BTF than the one hashed before (not expected while a kernel runs): start over.
      this.baseDigest = null;
      this.keys.clear();
    }
    const changed: string[] = [];
    for (const [name, inst] of previous.modules) if (sorted.get(name)?.identity !== inst.identity) changed.push(name);
    for (const name of sorted.keys()) if (!previous.modules.has(name)) changed.push(name);
    // Forget keys of instances no longer loaded, so the map stays as small as the listing.
    const live = new Set([...sorted.values()].map((i) => i.identity));
    for (const identity of this.keys.keys()) if (!live.has(identity)) this.keys.delete(identity);
    if (changed.length > 0 && previous.at !== Number.NEGATIVE_INFINITY) {
      this.log.info({ changed }, 'loaded modules with BTF changed');
      for (const l of this.listeners) l(changed);
    }
    return listing;
  }

  // ---- headers --------------------------------------------------------------------------------

  /** The content key of an instance: read its BTF once and hash it with the base's digest. */
  private async keyOf(instance: ModuleInstance): Promise<string | undefined> {
    const known = this.keys.get(instance.identity);
    if (known !== undefined) return known;
    const bytes = await this.moduleBytes(instance);
    if (bytes === undefined) return undefined;
    const key = createHash('sha256').update(`kheadersd module header ${HEADER_FORMAT}\0${await this.base()}\0`).update(bytes).digest('hex');
    this.keys.set(instance.identity, key);
    return key;
  }

  /** The module's BTF, if the file is still the instance listed (not unloaded or reloaded since). */
  private async moduleBytes(instance: ModuleInstance): Promise<Buffer | undefined> {
    const file = path.join(this.btfDir, instance.name);
    try {
      const bytes = await readFile(file);
      return (await identityOf(file)) === instance.identity ? bytes : undefined;
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return undefined;
      throw err;
    }
  }

  private base(): Promise<string> {
    const identity = this.listing.base ?? '';
    if (this.baseDigest?.identity !== identity) {
      const file = path.join(this.btfDir, 'vmlinux');
      const digest = sha256OfFile(file).then((d) => {
        if (d === null) throw new KheadersError('E_NOT_FOUND', `cannot read the kernel's BTF at ${file}`, { errno: 'ENOENT', path: file });
        return d;
      });
      this.baseDigest = { identity, digest };
      this.baseDigest.digest.catch(() => {
        this.baseDigest = null; // try again next time
      });
    }
    return this.baseDigest.digest;
  }

  private async ensure(key: string, instance: ModuleInstance): Promise<{ file: string; size: number; mtimeMs: number }> {
    const hit = this.cached.get(key);
    if (hit) {
      this.touch(key);
      return hit;
    }
    let p = this.making.get(key);
    if (!p) {
      p = this.generate(key, instance).finally(() => this.making.delete(key));
      this.making.set(key, p);
    }
    return p;
  }

  private async generate(key: string, instance: ModuleInstance): Promise<{ file: string; size: number; mtimeMs: number }> {
    const run = this.queue.then(async () => {
      // The bytes given to the worker are the ones hashed into the key (re-read and re-checked).
      const bytes = await this.moduleBytes(instance);
      if (bytes === undefined) throw new KheadersError('E_NOT_FOUND', `module ${instance.name} was unloaded`, { module: instance.name, errno: 'ENOENT' });
      const file = path.join(this.dir, `${key}.h`);
      const tmp = `${file}.${process.pid}.tmp`;
      const started = performance.now();
      await this.makeDir(); // gone since open (a cache wiped by hand), or never made (see open)
      try {
        await generateHeaderInWorker({ btf: bytes, base: path.join(this.btfDir, 'vmlinux'), outFile: tmp }, `the header of module ${instance.name}`);
        await chmod(tmp, 0o644); // the worker's file is as the umask left it
        await rename(tmp, file);
      } catch (err) {
        await unlink(tmp).catch(() => {});
        throw err;
      }
      const st = await stat(file);
      this.log.info({ module: instance.name, key, bytes: st.size, ms: Math.round(performance.now() - started) }, 'module header generated');
      return { file, size: st.size, mtimeMs: st.mtimeMs };
    });
    this.queue = run.catch(() => {});
    const made = await run;
    this.cached.set(key, made);
    await this.evict();
    return made;
  }

  /**
   * The header directory, made if missing, readable by all (the umask must not decide who can
   * read the cache). Made without `recursive` first (the cache directory, its parent, is there):
   * node's recursive mkdir reports a full disk or inode table as ENOENT (it stats the path after
   * the failure), which would read as a missing parent.
   */
  private async makeDir(): Promise<void> {
    try {
      await mkdir(this.dir, { mode: 0o755 });
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') await mkdir(this.dir, { recursive: true, mode: 0o755 });
      else if (errnoOf(err) !== 'EEXIST') throw err;
    }
    await chmod(this.dir, 0o755);
  }

  private touch(key: string): void {
    const v = this.cached.get(key);
    if (v === undefined) return;
    this.cached.delete(key);
    this.cached.set(key, v);
  }

  /** Remove the least recently used headers beyond the bound (open descriptors keep reading). */
  private async evict(): Promise<void> {
    while (this.cached.size > this.maxHeaders) {
      const [key, v] = this.cached.entries().next().value as [string, { file: string }];
      this.cached.delete(key);
      const h = this.handles.get(v.file);
      this.handles.delete(v.file);
      await unlink(v.file).catch(() => {});
      if (h) void h.then((fh) => fh.close()).catch(() => {});
      this.log.debug({ key }, 'module header evicted');
    }
  }

  private handle(header: ModuleHeader): Promise<FileHandle> {
    let p = this.handles.get(header.file);
    if (!p) {
      p = open(header.file, 'r');
      this.handles.set(header.file, p);
      p.catch((err: unknown) => {
        if (this.handles.get(header.file) === p) this.handles.delete(header.file);
        this.log.warn({ file: header.file, errno: errnoOf(err) }, 'cannot open a module header');
      });
    }
    return p.catch((err: unknown) => {
      // Evicted before this reader got to it: the caller asks for the header again.
      if (errnoOf(err) === 'ENOENT') throw new KheadersError('E_NOT_FOUND', `the header of ${header.module} was evicted`, { errno: 'ESTALE', module: header.module });
      throw err;
    });
  }
}

/** A file's identity (inode, size, change time), or null when it is absent. */
async function identityOf(file: string): Promise<string | null> {
  try {
    const st = await stat(file, { bigint: true });
    return `${st.ino}:${st.size}:${st.ctimeNs}`;
  } catch (err) {
    if (errnoOf(err) === 'ENOENT' || errnoOf(err) === 'ENOTDIR') return null;
    throw err;
  }
}
