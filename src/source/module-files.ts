/**
 * kheaders.ko on disk: find it in the module directories, read it (decompressing .xz, .gz and
 * .zst as kmod would), and say whether it is the running kernel's. The rules about names, places
 * and vermagic are in modules.ts; this file does the reading.
 *
 * Everything here is asynchronous (the daemon re-runs it on SIGHUP while its FUSE mount is up,
 * and a synchronous call on the event loop could stall the mount), and nothing here loads a
 * module: module-loader.ts does that, only for what this file could not read.
 */
import { constants } from 'node:fs';
import { access, open, readFile, realpath, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Transform } from 'node:stream';
import { promisify } from 'node:util';
import { errnoOf } from '../errors.js';
import { judgeModule, type EmbeddedArchive } from './elf.js';
import { kheadersInModulesDep, moduleCompression, namesInModuleDir, type ModuleCompression } from './modules.js';

export interface FoundModule {
  /** The file as the system names it (search directory + name). */
  file: string;
  /** The search directory it was found in. */
  dir: string;
  /** Where it is opened: `file` under the search root (the same path outside tests). */
  location: string;
}

export interface ModuleSearch {
  found: FoundModule[];
  /** One line per directory that held no kheaders module: why (absent, empty of it). */
  misses: string[];
}

export type ModuleRead =
  /** The running kernel's module: `archive` is its embedded header archive. */
  | { outcome: 'archive'; module: FoundModule; archive: EmbeddedArchive; mtime: Date; compression: ModuleCompression }
  /** Not the running kernel's (or not a usable module): never used, never loaded. */
  | { outcome: 'rejected'; module: FoundModule; reason: string }
  /** We could not look inside (no permission, no decoder): loading it lets the kernel judge it. */
  | { outcome: 'unread'; module: FoundModule; reason: string; mtime?: Date };

export interface ReadModuleOptions {
  /** The running kernel's release, which the vermagic must name. */
  release: string;
  /** Refuse a file (or its decompressed form) larger than this. */
  maxBytes: number;
  /** Where the xz and zstd binaries are looked for (default $PATH). */
  searchPath?: string;
}

/**
 * Every kheaders module file in `dirs` (in order, each file once): those modules.dep lists, then
 * the usual names in the directory and in kernel/kernel/. `root` prefixes every path (tests).
 */
export async function findModuleFiles(dirs: readonly string[], root = '/'): Promise<ModuleSearch> {
  const found: FoundModule[] = [];
  const misses: string[] = [];
  const seen = new Set<string>();
  for (const dir of dirs) {
    const here = path.join(root, dir);
    const st = await stat(here).catch((err: unknown) => errnoOf(err) ?? 'error');
    if (typeof st === 'string') {
      misses.push(`${dir} (${st === 'ENOENT' ? 'absent' : st})`);
      continue;
    }
    if (!st.isDirectory()) {
      misses.push(`${dir} (not a directory)`);
      continue;
    }
    let foundHere = 0;
    for (const file of await candidatesIn(dir, root)) {
      const location = path.join(root, file);
      const real = await realpath(location).catch(() => undefined);
      if (real === undefined || seen.has(real)) continue;
      if (!(await stat(real).then((s) => s.isFile(), () => false))) continue;
      seen.add(real);
      found.push({ file, dir, location });
      foundHere++;
    }
    if (foundHere === 0) misses.push(`${dir} (no kheaders.ko)`);
  }
  return { found, misses };
}

/** The paths to try in one directory: modules.dep's kheaders entries first, then the usual names. */
async function candidatesIn(dir: string, root: string): Promise<string[]> {
  const out: string[] = [];
  const dep = await readFile(path.join(root, dir, 'modules.dep'), 'utf8').catch(() => '');
  for (const entry of kheadersInModulesDep(dep)) {
    if (!entry.startsWith('/')) {
      out.push(path.join(dir, entry));
      continue;
    }
    // An absolute entry names the file where the device mounts it; a copy of the tree elsewhere
    // (a vendor image unpacked, a ramdisk's first-stage path) has it next to modules.dep instead.
    out.push(entry, path.join(dir, path.basename(entry)));
  }
  out.push(...namesInModuleDir().map((name) => path.join(dir, name)));
  return out;
}

/** Read one module file and judge it against the running release. Never throws for a bad file. */
export async function readModuleFile(module: FoundModule, opts: ReadModuleOptions): Promise<ModuleRead> {
  let raw: Buffer;
  let mtime: Date;
  try {
    const fh = await open(module.location, 'r');
    try {
      const st = await fh.stat();
      mtime = st.mtime;
      if (st.size > opts.maxBytes) return { outcome: 'rejected', module, reason: `it is ${st.size} bytes, over the limit of ${opts.maxBytes} (--max-total-bytes)` };
      raw = await fh.readFile();
    } finally {
      await fh.close();
    }
  } catch (err) {
    return { outcome: 'unread', module, reason: `cannot read it (${errnoOf(err) ?? String(err)})` };
  }

  const compression = moduleCompression(raw.subarray(0, 8));
  if (compression === undefined) {
    return { outcome: 'rejected', module, reason: `it is neither an ELF module nor xz, gzip or zstd compressed (it starts with ${raw.subarray(0, 8).toString('hex') || 'nothing: it is empty'})` };
  }
  let elf: Buffer;
  try {
    const decoded = await decompress(raw, compression, opts);
    if (decoded.outcome !== 'ok') return { outcome: decoded.outcome, module, reason: decoded.reason, mtime };
    elf = decoded.bytes;
  } catch (err) {
    return { outcome: 'rejected', module, reason: `its ${compression} data does not decode (${(err as Error).message.split('\n')[0] ?? ''})` };
  }
  const verdict = judgeModule(elf, opts.release);
  if (!verdict.use) return { outcome: 'rejected', module, reason: verdict.reason };
  return { outcome: 'archive', module, archive: verdict.archive, mtime, compression };
}

type Decoded = { outcome: 'ok'; bytes: Buffer } | { outcome: 'unread' | 'rejected'; reason: string };

/**
 * The module's ELF bytes. xz: the xz binary (toybox's xzcat on Android) or lzma-native; gzip:
 * zlib; zstd: zlib where Node has it built in (22.15 and later), else the zstd binary. A missing
 * decoder leaves the file unread, not rejected: the kernel or kmod may still load it.
 */
async function decompress(raw: Buffer, compression: ModuleCompression, opts: ReadModuleOptions): Promise<Decoded> {
  const limit = opts.maxBytes;
  // zlib (~4 ms to load) only when a module is read: serve's start loads this module, not zlib.
  const zlib = process.getBuiltinModule('node:zlib');
  const searchPath = opts.searchPath ?? process.env.PATH ?? '';
  switch (compression) {
    case 'none':
      return { outcome: 'ok', bytes: raw };
    case 'gzip':
      return bounded(await promisify(zlib.gunzip)(raw, { maxOutputLength: limit }).catch(tooLargeOr), limit);
    case 'xz': {
      const xz = (await findExecutable('xz', searchPath)) ?? (await findExecutable('xzcat', searchPath));
      if (xz !== undefined) return bounded(await decodeWithChild(xz, path.basename(xz) === 'xz' ? ['-dc'] : [], raw, limit), limit);
      const lzma = await import('lzma-native').catch((err: unknown) => err as Error);
      if (lzma instanceof Error) return { outcome: 'unread', reason: `no xz decoder: no xz or xzcat on PATH, and lzma-native does not load (${lzma.message.split('\n')[0] ?? ''})` };
      return bounded(await decodeWithStream(lzma.createDecompressor(), raw, limit), limit);
    }
    case 'zstd': {
      const builtIn = (zlib as unknown as { zstdDecompress?: (buf: Buffer, opts: { maxOutputLength: number }, cb: (err: Error | null, out: Buffer) => void) => void }).zstdDecompress;
      if (builtIn !== undefined) return bounded(await promisify(builtIn)(raw, { maxOutputLength: limit }).catch(tooLargeOr), limit);
      const zstd = await findExecutable('zstd', searchPath);
      if (zstd !== undefined) return bounded(await decodeWithChild(zstd, ['-dc'], raw, limit), limit);
      return { outcome: 'unread', reason: `no zstd decoder: Node ${process.version} has none built in (22.15 and later do) and there is no zstd binary on PATH` };
    }
  }
}

/** Marks output that hit the limit; the caller turns it into a rejection. */
const TOO_LARGE = Symbol('too large');

function tooLargeOr(err: unknown): typeof TOO_LARGE {
  if (errnoOf(err) === 'ERR_BUFFER_TOO_LARGE') return TOO_LARGE;
  throw err;
}

function bounded(out: Buffer | typeof TOO_LARGE, limit: number): Decoded {
  if (out === TOO_LARGE || out.length > limit) return { outcome: 'rejected', reason: `it decompresses to more than ${limit} bytes (--max-total-bytes)` };
  return { outcome: 'ok', bytes: out };
}

/** Decode `input` through a child (`xz -dc`, `zstd -dc`), keeping at most `limit` bytes of output. */
async function decodeWithChild(file: string, args: string[], input: Buffer, limit: number): Promise<Buffer | typeof TOO_LARGE> {
  // Loaded only for a compressed module: finding the kernel's archive otherwise spawns nothing.
  const { spawn } = await import('node:child_process');
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const chunks: Buffer[] = [];
    let total = 0;
    let stderr = '';
    let over = false;
    child.stdout.on('data', (chunk: Buffer) => {
      total += chunk.length;
      if (total > limit) {
        over = true;
        child.kill('SIGKILL');
        return;
      }
      chunks.push(chunk);
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => {
      if (stderr.length < 2048) stderr += s;
    });
    child.stdin.on('error', () => {}); // it may exit before reading everything: its status says why
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (over) resolve(TOO_LARGE);
      else if (code === 0) resolve(Buffer.concat(chunks, total));
      else reject(new Error(`${path.basename(file)} ${code !== null ? `exited with status ${code}` : `was killed by ${signal ?? 'a signal'}`}: ${stderr.trim().split('\n')[0] ?? ''}`));
    });
    child.stdin.end(input);
  });
}

function decodeWithStream(stream: Transform, input: Buffer, limit: number): Promise<Buffer | typeof TOO_LARGE> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let total = 0;
    let settled = false;
    stream.on('data', (chunk: Buffer) => {
      total += chunk.length;
      if (total > limit && !settled) {
        settled = true;
        resolve(TOO_LARGE);
        stream.destroy();
        return;
      }
      chunks.push(chunk);
    });
    stream.on('error', (err) => {
      if (!settled) reject(err);
    });
    stream.on('end', () => {
      if (!settled) resolve(Buffer.concat(chunks, total));
    });
    stream.end(input);
  });
}

/** The first executable called `name` in `searchPath`. */
export async function findExecutable(name: string, searchPath: string): Promise<string | undefined> {
  for (const dir of searchPath.split(path.delimiter)) {
    if (!dir) continue;
    const file = path.join(dir, name);
    const ok = await access(file, constants.X_OK).then(
      () => stat(file).then((s) => s.isFile()),
      () => false,
    );
    if (ok) return file;
  }
  return undefined;
}

/**
 * When the running kernel booted: `btime` of /proc/stat (whole seconds), else now minus the
 * uptime. A module file changed after this may not be the one the kernel was booted with.
 */
export async function readBootTime(procStat = '/proc/stat'): Promise<Date> {
  const text = await readFile(procStat, 'utf8').catch(() => '');
  const btime = /^btime\s+(\d+)$/m.exec(text);
  if (btime) return new Date(Number(btime[1]) * 1000);
  return new Date(Date.now() - os.uptime() * 1000);
}
