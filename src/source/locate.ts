/**
 * Where the header archive comes from: the running kernel (sysfs or the legacy proc path), the
 * kheaders module file on disk (read, not loaded), the module loaded for a moment, or a file the
 * user names (an .tar.xz, or an ELF — kheaders.ko, vmlinux, kheaders.o — that embeds one).
 * Returns the xz bytes in memory: the compressed archive is a few MiB, and holding it lets
 * ingest hash it before deciding whether to decode at all.
 *
 * The order, when no file is named:
 *   1. the archive the kernel exposes (/sys/kernel/kheaders.tar.xz);
 *   2. kheaders.ko (.xz/.zst/.gz) in the module directories (modules.ts: /lib/modules/<release>
 *      and Android's partitions), whose vermagic names the running release: the archive inside
 *      the file is the bytes the loaded module would expose, with no CAP_SYS_MODULE, no signature
 *      question and nothing pinned in kernel memory;
 *   3. only when no module file could be read: `modprobe kheaders`, then `insmod` of each module
 *      file found but not readable here (the kernel checks its vermagic), unloaded afterwards.
 * A module whose vermagic names another release is never used or loaded.
 */
import { access, open, readlink, realpath, stat, statfs, type FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { KheadersError, errnoOf } from '../errors.js';
import type { Logger } from '../log.js';
import type { FoundModule } from './module-files.js';
import { DEFAULT_PLACES, moduleSearchDirs } from './modules.js';
import { readLiveBuildId } from './notes.js';
import { isXz } from './xz.js';

export const LIVE_ARCHIVE_PATHS = ['/sys/kernel/kheaders.tar.xz', '/proc/kheaders.tar.xz'] as const;
export const BTF_PATH = '/sys/kernel/btf/vmlinux';

/**
 * How the archive was obtained: the kernel exposed it; it was read out of the module file; the
 * module was loaded to expose it (and unloaded); or it was a file given by the user.
 */
export type ArchiveOrigin = 'exposed' | 'module-file' | 'module-loaded' | 'file';

/** The module file an archive came from, and when it changed relative to the boot. */
export interface ModuleFileInfo {
  file: string;
  /** The file's mtime (ISO 8601). */
  mtime: string;
  /** When the running kernel booted (ISO 8601): a module changed after it may be for the next kernel. */
  bootTime: string;
}

export interface ArchiveSource {
  /** The exact xz stream. */
  bytes: Buffer;
  /** Human-readable origin for the manifest: a path, 'module:/x.ko', 'file:/x', 'elf:/x.ko'. */
  source: string;
  obtained: ArchiveOrigin;
  /** For module-file and module-loaded (when the file is known). */
  module?: ModuleFileInfo;
  /** True when it is the running kernel's own archive. */
  live: boolean;
  /** The release the source itself names (uname -r for live, vermagic for a .ko). */
  release?: string;
  buildId: string | null;
}

/** The module tools, by name on PATH (toybox provides insmod and rmmod on Android). */
export interface ModuleCommands {
  modprobe: string;
  insmod: string;
  rmmod: string;
}

export interface LocateOptions {
  /** A file to use instead of the running kernel's archive. */
  archive?: string;
  /** Where `archive` was set (`--archive`, `KHEADERSD_ARCHIVE`, a config file's key), for messages. */
  archiveOrigin?: string;
  /** Load the module (modprobe, insmod) when neither the kernel nor a module file gives the archive. */
  modprobe: boolean;
  /** Unload the module afterwards if this process loaded it (it pins ~4 MiB of kernel memory). */
  unloadModule: boolean;
  /** Upper bound on the compressed size read into memory. */
  maxArchiveBytes: number;
  /** Where to look for kheaders.ko: absolute directories ({release} allowed) and "default". */
  moduleDirs?: readonly string[];
  log?: Logger;
  /** For tests: where to look for the live archive, and the module's sysfs directory. */
  livePaths?: readonly string[];
  moduleDir?: string;
  notesPath?: string;
  /** For tests: a directory standing for / under which the module directories are searched. */
  root?: string;
  /** For tests: the running release (default uname -r). */
  release?: string;
  /**
   * Read a matching module file (default true). false loads it instead: how the VM test drives
   * the loading path on a real kernel whose module is perfectly readable.
   */
  readModuleFiles?: boolean;
  /** For tests: the module tools to run, and where the xz and zstd binaries are looked for. */
  commands?: Partial<ModuleCommands>;
  searchPath?: string;
  procStat?: string;
  /**
   * Read the archive, when it is a file of known size (sysfs, a given file), into memory that
   * releaseBytes() gives back at once: for a caller that only hashes it (serve, which builds
   * its entries in another process).
   */
  releasable?: boolean;
}

/**
 * Which archive locateArchive would read, told from facts that cost no reading of it: enough for
 * a cache that recorded the digest of what this very source held to know the digest again, so
 * that a start whose archive has not changed reads and hashes no 4-8 MiB at every boot.
 *
 * - a given file, or a kheaders module file on disk (the first locateArchive would read): its
 *   path, device, inode, size, mtime and ctime (ns). Rewriting a file changes its ctime, which
 *   only the kernel sets. A file changed within SETTLE_NS of now is not `settled`: on a clock as
 *   coarse as the kernel's (a jiffy), a second change could keep its ctime.
 *   A module file's key holds the running kernel's build id too: on a read-only image (an
 *   updated system_dlkm partition) a file's times are the image's, and a new image comes with
 *   a new kernel.
 * - the archive the kernel exposes in sysfs: the running kernel's build id, and the kheaders
 *   module's own build id when it is a module (a module rebuilt for the same kernel is other
 *   bytes with the same kernel build id).
 * Undefined when none of these tells the source apart (the legacy /proc file, whose size reads
 * 0; a kernel without a build id; a module whose build id cannot be read; no source at all).
 */
export interface ArchiveIdentity {
  /** The identifying facts as one canonical string: the key a digest is recorded under. */
  key: string;
  /** Whether the digest of what is read now may be recorded under `key` (see above). */
  settled: boolean;
  /** The ArchiveSource.source of an archive read from this source: what was read must be it. */
  sources: readonly string[];
}

/** How long after a file's last change its identity is trusted to tell a later change apart. */
const SETTLE_NS = 2_000_000_000n;
/** statfs(2)'s f_type of sysfs. */
const SYSFS_MAGIC = 0x62656572;

export async function identifyArchive(opts: LocateOptions): Promise<ArchiveIdentity | undefined> {
  if (opts.archive !== undefined) return fileIdentity('file', opts.archive, [`file:${opts.archive}`, `elf:${opts.archive}`], {});
  const release = opts.release ?? os.release();
  const kernel = await readLiveBuildId(opts.notesPath);
  for (const p of opts.livePaths ?? LIVE_ARCHIVE_PATHS) {
    const st = await stat(p).catch(() => undefined);
    if (!st) continue;
    // Only the kernel's own file is told by build ids (a file standing in for it, by its inode and times).
    if ((await statfs(p).catch(() => undefined))?.type !== SYSFS_MAGIC) return fileIdentity('live-file', p, [p], { release, kernel });
    if (st.size === 0 || kernel === null) return undefined;
    // A module's archive: its own build id must be known (a built-in kheaders has no such directory).
    const sysfsDir = opts.moduleDir ?? '/sys/module/kheaders';
    let module: string | null = null;
    if (await exists(sysfsDir)) {
      module = await readLiveBuildId(`${sysfsDir}/notes/.note.gnu.build-id`);
      if (module === null) return undefined;
    }
    return { key: JSON.stringify({ kind: 'live', path: p, size: st.size, release, kernel, module }), settled: true, sources: [p] };
  }
  const { findModuleFiles } = await import('./module-files.js');
  const first = (await findModuleFiles(moduleSearchDirs(opts.moduleDirs ?? [DEFAULT_PLACES], release), opts.root)).found[0];
  if (!first) return undefined;
  return fileIdentity('module-file', first.location, [`module:${first.file}`], { file: first.file, release, kernel });
}

async function fileIdentity(kind: string, file: string, sources: string[], more: Record<string, unknown>): Promise<ArchiveIdentity | undefined> {
  const st = await stat(file, { bigint: true }).catch(() => undefined);
  if (!st?.isFile()) return undefined;
  const settledBefore = BigInt(Date.now()) * 1_000_000n - SETTLE_NS;
  const facts = { kind, path: path.resolve(file), dev: String(st.dev), ino: String(st.ino), size: String(st.size), mtime: String(st.mtimeNs), ctime: String(st.ctimeNs), ...more };
  return { key: JSON.stringify(facts), settled: st.ctimeNs < settledBefore && st.mtimeNs < settledBefore, sources };
}

interface LoadAttempt {
  label: string;
  load: [string, string[]];
  unload: [string, string[]];
  /** The file it loads, when known. */
  module?: FoundModule;
}

export async function locateArchive(opts: LocateOptions): Promise<ArchiveSource> {
  if (opts.archive !== undefined) return readArchiveFile(opts.archive, opts.maxArchiveBytes, opts.archiveOrigin ?? '--archive', opts.releasable);

  const release = opts.release ?? os.release();
  const livePaths = opts.livePaths ?? LIVE_ARCHIVE_PATHS;
  const tried: string[] = [];
  const buildId = await readLiveBuildId(opts.notesPath);
  const fromLive = async (): Promise<ArchiveSource | undefined> => {
    for (const p of livePaths) {
      if (!(await exists(p))) {
        tried.push(`${p} (absent)`);
        continue;
      }
      const bytes = await readBounded(p, opts.maxArchiveBytes, opts.releasable);
      if (!isXz(bytes)) throw notXz(p, bytes);
      return { bytes, source: p, obtained: 'exposed', live: true, release, buildId };
    }
    return undefined;
  };

  const found = await fromLive();
  if (found) return found;

  // The module file on disk. Its readers (and the ELF parser) load only now: the archive of a
  // start that finds it in sysfs or in a given file never needs them.
  const { findModuleFiles, readBootTime, readModuleFile } = await import('./module-files.js');
  const dirs = moduleSearchDirs(opts.moduleDirs ?? [DEFAULT_PLACES], release);
  const distroDir = `/lib/modules/${release}`;
  const search = await findModuleFiles(dirs, opts.root);
  tried.push(...search.misses);
  const loadable: FoundModule[] = [];
  let distroModuleRejected = false;
  const bootTime = readBootTime(opts.procStat);
  for (const module of search.found) {
    const read = await readModuleFile(module, { release, maxBytes: opts.maxArchiveBytes, ...(opts.searchPath !== undefined ? { searchPath: opts.searchPath } : {}) });
    switch (read.outcome) {
      case 'archive':
        if (opts.readModuleFiles === false) {
          tried.push(`${module.file} (the running kernel's; loading it instead of reading it)`);
          loadable.push(module);
          continue;
        }
        opts.log?.info({ module: module.file, compression: read.compression, method: read.archive.method }, 'read the header archive out of the kheaders module file (not loaded)');
        return {
          bytes: read.archive.data,
          source: `module:${module.file}`,
          obtained: 'module-file',
          module: { file: module.file, mtime: read.mtime.toISOString(), bootTime: (await bootTime).toISOString() },
          live: true,
          release,
          buildId,
        };
      case 'rejected':
        opts.log?.warn({ module: module.file, reason: read.reason }, `kheaders module ${module.file} not used: ${read.reason}`);
        tried.push(`${module.file} (${read.reason}: not used)`);
        if (module.dir === distroDir) distroModuleRejected = true;
        continue;
      case 'unread':
        opts.log?.info({ module: module.file, reason: read.reason }, `kheaders module ${module.file} not read: ${read.reason}; loading it may still work`);
        tried.push(`${module.file} (${read.reason})`);
        loadable.push(module);
        continue;
    }
  }

  // Loading: only what could not be read, and never a module known to be for another release.
  if (!opts.modprobe) {
    tried.push('loading kheaders (not tried: --no-modprobe)');
  } else {
    const cmd: ModuleCommands = { modprobe: 'modprobe', insmod: 'insmod', rmmod: 'rmmod', ...opts.commands };
    const attempts: LoadAttempt[] = [];
    // modprobe looks in /lib/modules/<release>; if what it would load there names another release, skip it.
    if (distroModuleRejected) tried.push(`modprobe kheaders (not tried: the module in ${distroDir} is for another release)`);
    else {
      const distroModule = loadable.find((m) => m.dir === distroDir);
      attempts.push({ label: 'modprobe kheaders', load: [cmd.modprobe, ['kheaders']], unload: [cmd.modprobe, ['-r', 'kheaders']], ...(distroModule ? { module: distroModule } : {}) });
    }
    for (const module of loadable) {
      attempts.push({ label: `insmod ${module.file}`, load: [cmd.insmod, [module.location]], unload: [cmd.rmmod, ['kheaders']], module });
    }
    const loaded = await loadAndRead(attempts, fromLive, opts, tried);
    if (loaded) {
      const info = loaded.module ? await moduleInfo(loaded.module, bootTime) : undefined;
      return { ...loaded.source, obtained: 'module-loaded', ...(info ? { module: info } : {}) };
    }
  }

  const hasBtf = await exists(BTF_PATH);
  const otherRelease = tried.some((t) => t.includes('its vermagic names'));
  throw new KheadersError(
    'E_ARCHIVE_NOT_FOUND',
    [
      'no kernel header archive found for the running kernel ' + release + '.',
      'Tried: ' + tried.join('; ') + '.',
      otherRelease
        ? `A kheaders module was found, but built for another release: install the one built for ${release}.`
        : 'The kernel was built without CONFIG_IKHEADERS (or its kheaders module is not installed).',
      'To fix: build the kernel with CONFIG_IKHEADERS=y (or =m and install kheaders.ko; --module-dirs names',
      'where to look), or pass --archive FILE (a kheaders.tar.xz, kheaders.ko or vmlinux) together with --release R.',
      ...(hasBtf ? [`This kernel has BTF (${BTF_PATH}): \`kheadersd btf\` makes a vmlinux.h for CO-RE programs.`] : []),
    ].join('\n'),
    { tried, btf: hasBtf },
  );
}

/**
 * Run each load attempt until one makes the archive appear; unload what we loaded once the bytes
 * are in memory (unless the module was loaded before or unloading is off).
 */
async function loadAndRead(
  attempts: readonly LoadAttempt[],
  fromLive: () => Promise<ArchiveSource | undefined>,
  opts: LocateOptions,
  tried: string[],
): Promise<{ source: ArchiveSource; module?: FoundModule } | undefined> {
  const sysfsDir = opts.moduleDir ?? '/sys/module/kheaders';
  const loadedBefore = await exists(sysfsDir);
  for (const attempt of attempts) {
    const result = await run(...attempt.load);
    opts.log?.info({ command: attempt.label, result }, `ran ${attempt.label}`);
    tried.push(`${attempt.label} (${result.ok ? 'loaded' : result.message})`);
    if (!result.ok) continue;
    try {
      const afterLoad = await fromLive();
      if (afterLoad) return { source: { ...afterLoad, source: `${afterLoad.source} (after ${attempt.label})` }, ...(attempt.module ? { module: attempt.module } : {}) };
    } finally {
      if (!loadedBefore && opts.unloadModule) {
        const unload = await run(...attempt.unload);
        opts.log?.info({ unload }, 'unloaded the kheaders module we loaded');
      }
    }
  }
  return undefined;
}

async function moduleInfo(module: FoundModule, bootTime: Promise<Date>): Promise<ModuleFileInfo | undefined> {
  const st = await stat(module.location).catch(() => undefined);
  return st ? { file: module.file, mtime: st.mtime.toISOString(), bootTime: (await bootTime).toISOString() } : undefined;
}

async function readArchiveFile(file: string, maxBytes: number, origin: string, releasable = false): Promise<ArchiveSource> {
  let bytes: Buffer;
  try {
    bytes = await readBounded(file, maxBytes, releasable);
  } catch (err) {
    const code = errnoOf(err);
    if (code === 'ENOENT' || code === 'EACCES' || code === 'EISDIR') {
      throw new KheadersError('E_ARCHIVE_NOT_FOUND', `cannot read ${origin} ${file}: ${code}`, { file, origin });
    }
    // A socket has a name but no open(2): `--archive /dev/stdin` when stdin is one (a supervisor's
    // socketpair, node's stdio 'pipe') ends here too, and said "internal error".
    if (code === 'ENXIO') {
      throw new KheadersError('E_ARCHIVE_NOT_FOUND', `cannot read ${origin} ${file}: it is a socket, which cannot be opened as a file (ENXIO); give a file, a pipe or a FIFO`, { file, origin });
    }
    throw err;
  }
  if (isXz(bytes)) return { bytes, source: `file:${file}`, obtained: 'file', live: false, buildId: null };
  const elf = await import('./elf.js');
  if (elf.isElf(bytes)) {
    const embedded = elf.findEmbeddedArchive(bytes);
    return {
      bytes: embedded.data,
      source: `elf:${file}`,
      obtained: 'file',
      live: false,
      ...(embedded.release !== undefined ? { release: embedded.release } : {}),
      buildId: null,
    };
  }
  throw notXz(file, bytes);
}

function notXz(file: string, bytes: Buffer): KheadersError {
  const head = bytes.subarray(0, 8).toString('hex');
  return new KheadersError(
    'E_ARCHIVE_CORRUPT',
    `corrupt archive: ${file} is neither an xz archive nor an ELF file (it starts with ${head || 'nothing: it is empty'})`,
    { file, head },
  );
}

/**
 * Read a whole file, refusing one over the limit. sysfs reports a binary attribute's size, but
 * procfs files report 0, so read until EOF rather than trusting stat. `releasable`: a file of
 * known size is read into memory that releaseBytes() can give back (see there).
 */
export async function readBounded(file: string, maxBytes: number, releasable = false): Promise<Buffer> {
  const fh = await open(file, 'r');
  try {
    const chunks: Buffer[] = [];
    let total = 0;
    // A size stat can tell (a regular file, sysfs) is read straight into one buffer: a copy of
    // the whole archive less, and its page faults, at every start.
    const { size } = await fh.stat();
    if (size > 0 && size <= maxBytes) {
      const whole = releasable ? releasableBuffer(size) : Buffer.allocUnsafe(size);
      total = await readRegions(fh, whole);
      chunks.push(whole.subarray(0, total));
      if (total < size) return chunks[0]!; // shrank while read: what was there
    }
    for (;;) {
      const buf = Buffer.allocUnsafe(1024 * 1024);
      // After the regions, at where they ended (positional reads move no file position); else in
      // turn from the file position (a pipe has no other).
      const { bytesRead } = await fh.read(buf, 0, buf.length, size > 0 ? total : null);
      if (bytesRead === 0) break;
      total += bytesRead;
      if (total > maxBytes) {
        throw new KheadersError('E_LIMIT', `${file} is larger than ${maxBytes} bytes; refusing to read it`, { file, limit: 'maxArchiveBytes' });
      }
      chunks.push(bytesRead === buf.length ? buf : buf.subarray(0, bytesRead));
    }
    return chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, total);
  } finally {
    await fh.close();
  }
}

/**
 * Whether another process that opens `file` reads the bytes this one read there: a regular file
 * named by a path that means the same to every process. Not a FIFO, a pipe, a socket or a
 * terminal (what one reader took, no later reader gets; a second open of a FIFO written once
 * waits for a writer for good), nor a name for one of this process's own descriptors or
 * directories (/dev/stdin, /dev/fd/N, /proc/self/...: in another process, that process's own;
 * `--archive /dev/stdin < file` is a regular file here and /dev/null in a child).
 */
export async function readableElsewhere(file: string): Promise<boolean> {
  if (!(await stat(file).catch(() => undefined))?.isFile()) return false;
  let p = path.resolve(file);
  // Each link followed by hand, the directory it lands in resolved: /proc/self and /proc/thread-self
  // resolve to /proc/<pid>. 40: the kernel's own limit on links in one lookup.
  for (let links = 0; links < 40; links++) {
    const dir = await realpath(path.dirname(p)).catch(() => undefined);
    if (dir === undefined) return false;
    if (/^\/proc\/\d+(\/|$)/.test(dir)) return false;
    const target = await readlink(path.join(dir, path.basename(p))).catch(() => undefined);
    if (target === undefined) return true; // not a link: the file itself
    p = path.resolve(dir, target);
  }
  return false;
}

/** ArrayBuffer's constructor as ES2024 has it (this project's TypeScript library is ES2022's). */
type ResizableArrayBufferConstructor = new (byteLength: number, options: { maxByteLength: number }) => ArrayBuffer;
type MaybeResizable = ArrayBufferLike & { readonly resizable?: boolean; resize?: (byteLength: number) => void };

/**
 * A buffer whose memory releaseBytes() can give back to the system at once. Its ArrayBuffer is
 * resizable: V8 maps such a buffer's pages apart from the C allocator's and, resized to 0, makes
 * them inaccessible and discards them (measured: a 4 MiB archive's pages left Private_Dirty at
 * the resize). A plain Buffer's memory is freed only when V8 collects its object, in a full
 * collection for one that lived through a few scavenges: an idle daemon may run none for many
 * seconds after its start, and held the archive it had only hashed (4 MiB) until then.
 */
function releasableBuffer(size: number): Buffer {
  return Buffer.from(new (ArrayBuffer as unknown as ResizableArrayBufferConstructor)(size, { maxByteLength: size }), 0, size);
}

/**
 * Give back the memory under `bytes` now if it was read releasable (readBounded); otherwise it
 * is left to V8's collector, as any buffer. Every view of that memory reads as empty afterwards:
 * only for bytes nothing else will read, and that no I/O under way still reads or writes.
 * Whether it was given back: bytes that were not (a pipe's, a FIFO's, procfs's: files of no
 * known size, which may not be there to read a second time) are still whole.
 */
export function releaseBytes(bytes: Buffer): boolean {
  const buffer = bytes.buffer as MaybeResizable;
  if (buffer.resizable !== true || buffer.resize === undefined) return false;
  buffer.resize(0);
  return true;
}

/**
 * How many parts of a file of known size are read at once. One reader after another, a 4 MiB
 * archive took ~14 ms here (copying the pages, faulting the fresh buffer's in); four threads of
 * the pool, ~8 ms. sysfs hands out a binary attribute 4 KiB per read(2), one thread-pool round
 * trip each: four readers walk it four times faster.
 */
const READ_REGIONS = 4;

/** Fill `into` from the file's start, its regions at once; the bytes read from the start on (fewer if the file shrank). */
async function readRegions(fh: FileHandle, into: Buffer): Promise<number> {
  const step = Math.ceil(into.length / READ_REGIONS / 65536) * 65536;
  const regions: Array<{ start: number; end: number }> = [];
  for (let start = 0; start < into.length; start += step) regions.push({ start, end: Math.min(into.length, start + step) });
  const got = await Promise.all(
    regions.map(async ({ start, end }) => {
      let at = start;
      while (at < end) {
        const { bytesRead } = await fh.read(into, at, end - at, at);
        if (bytesRead === 0) break;
        at += bytesRead;
      }
      return at;
    }),
  );
  // Up to the first region cut short: past it the bytes are not the file's.
  for (let i = 0; i < regions.length; i++) if (got[i]! < regions[i]!.end) return got[i]!;
  return into.length;
}

async function exists(p: string): Promise<boolean> {
  try {
    await access(p);
    return true;
  } catch {
    return false;
  }
}

interface RunResult {
  ok: boolean;
  message: string;
}

async function run(file: string, args: string[]): Promise<RunResult> {
  // child_process is loaded only to run something: a start that finds its archive never does.
  const { execFile } = await import('node:child_process');
  return new Promise((resolve) => {
    execFile(file, args, { timeout: 30_000 }, (err, _stdout, stderr) => {
      if (!err) resolve({ ok: true, message: 'ok' });
      else if (errnoOf(err) === 'ENOENT') resolve({ ok: false, message: `${file} is not installed` });
      else resolve({ ok: false, message: (stderr || err.message).trim().split('\n')[0] ?? err.message });
    });
  });
}
