/**
 * Where the header archive comes from: the running kernel (sysfs, the legacy proc path, or after
 * `modprobe kheaders`), or a file the user names — an .tar.xz, or an ELF (kheaders.ko, vmlinux,
 * kheaders.o) that embeds one. Returns the xz bytes in memory: the compressed archive is a few
 * MiB, and holding it lets ingest hash it before deciding whether to decode at all.
 */
import { execFile } from 'node:child_process';
import { access, open } from 'node:fs/promises';
import os from 'node:os';
import { KheadersError, errnoOf } from '../errors.js';
import type { Logger } from '../log.js';
import { findEmbeddedArchive, isElf } from './elf.js';
import { readLiveBuildId } from './notes.js';
import { isXz } from './xz.js';

export const LIVE_ARCHIVE_PATHS = ['/sys/kernel/kheaders.tar.xz', '/proc/kheaders.tar.xz'] as const;
export const BTF_PATH = '/sys/kernel/btf/vmlinux';

export interface ArchiveSource {
  /** The exact xz stream. */
  bytes: Buffer;
  /** Human-readable origin for the manifest: a path, 'modprobe kheaders', 'elf:/x.ko'. */
  source: string;
  /** True when it is the running kernel's own archive. */
  live: boolean;
  /** The release the source itself names (uname -r for live, vermagic for a .ko). */
  release?: string;
  buildId: string | null;
}

export interface LocateOptions {
  /** A file to use instead of the running kernel's archive. */
  archive?: string;
  /** Where `archive` was set (`--archive`, `KHEADERSD_ARCHIVE`, a config file's key), for messages. */
  archiveOrigin?: string;
  /** Try `modprobe kheaders` when no live archive is present. */
  modprobe: boolean;
  /** Unload the module afterwards if this process loaded it (it pins ~4 MiB of kernel memory). */
  unloadModule: boolean;
  /** Upper bound on the compressed size read into memory. */
  maxArchiveBytes: number;
  log?: Logger;
  /** For tests: where to look for the live archive, and the module's sysfs directory. */
  livePaths?: readonly string[];
  moduleDir?: string;
  notesPath?: string;
}

export async function locateArchive(opts: LocateOptions): Promise<ArchiveSource> {
  if (opts.archive !== undefined) return readArchiveFile(opts.archive, opts.maxArchiveBytes, opts.archiveOrigin ?? '--archive');

  const livePaths = opts.livePaths ?? LIVE_ARCHIVE_PATHS;
  const tried: string[] = [];
  const buildId = await readLiveBuildId(opts.notesPath);
  const fromLive = async (): Promise<ArchiveSource | undefined> => {
    for (const p of livePaths) {
      if (!(await exists(p))) {
        tried.push(`${p} (absent)`);
        continue;
      }
      const bytes = await readBounded(p, opts.maxArchiveBytes);
      if (!isXz(bytes)) throw notXz(p, bytes);
      return { bytes, source: p, live: true, release: os.release(), buildId };
    }
    return undefined;
  };

  const found = await fromLive();
  if (found) return found;

  if (opts.modprobe) {
    const moduleDir = opts.moduleDir ?? '/sys/module/kheaders';
    const loadedBefore = await exists(moduleDir);
    const result = await run('modprobe', ['kheaders']);
    opts.log?.info({ modprobe: result }, 'ran modprobe kheaders');
    tried.push(`modprobe kheaders (${result.ok ? 'loaded' : result.message})`);
    if (result.ok) {
      try {
        const afterLoad = await fromLive();
        if (afterLoad) return { ...afterLoad, source: `${afterLoad.source} (after modprobe kheaders)` };
      } finally {
        if (!loadedBefore && opts.unloadModule) {
          const unload = await run('modprobe', ['-r', 'kheaders']);
          opts.log?.info({ unload }, 'unloaded the kheaders module we loaded');
        }
      }
    }
  } else {
    tried.push('modprobe kheaders (not tried: --no-modprobe)');
  }

  const hasBtf = await exists(BTF_PATH);
  throw new KheadersError(
    'E_ARCHIVE_NOT_FOUND',
    [
      'no kernel header archive found for the running kernel ' + os.release() + '.',
      'Tried: ' + tried.join('; ') + '.',
      'The kernel was built without CONFIG_IKHEADERS (or its kheaders module is not installed).',
      'To fix: build the kernel with CONFIG_IKHEADERS=y (or =m and install the module), or pass',
      '--archive FILE (a kheaders.tar.xz, kheaders.ko or vmlinux) together with --release R.',
      ...(hasBtf ? [`This kernel has BTF (${BTF_PATH}): \`kheadersd btf\` makes a vmlinux.h for CO-RE programs.`] : []),
    ].join('\n'),
    { tried, btf: hasBtf },
  );
}

async function readArchiveFile(file: string, maxBytes: number, origin: string): Promise<ArchiveSource> {
  let bytes: Buffer;
  try {
    bytes = await readBounded(file, maxBytes);
  } catch (err) {
    const code = errnoOf(err);
    if (code === 'ENOENT' || code === 'EACCES' || code === 'EISDIR') {
      throw new KheadersError('E_ARCHIVE_NOT_FOUND', `cannot read ${origin} ${file}: ${code}`, { file, origin });
    }
    throw err;
  }
  if (isXz(bytes)) return { bytes, source: `file:${file}`, live: false, buildId: null };
  if (isElf(bytes)) {
    const embedded = findEmbeddedArchive(bytes);
    return {
      bytes: embedded.data,
      source: `elf:${file}`,
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
 * procfs files report 0, so read until EOF rather than trusting stat.
 */
export async function readBounded(file: string, maxBytes: number): Promise<Buffer> {
  const fh = await open(file, 'r');
  try {
    const chunks: Buffer[] = [];
    let total = 0;
    for (;;) {
      const buf = Buffer.allocUnsafe(1024 * 1024);
      const { bytesRead } = await fh.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      total += bytesRead;
      if (total > maxBytes) {
        throw new KheadersError('E_LIMIT', `${file} is larger than ${maxBytes} bytes; refusing to read it`, { file, limit: 'maxArchiveBytes' });
      }
      chunks.push(bytesRead === buf.length ? buf : buf.subarray(0, bytesRead));
    }
    return Buffer.concat(chunks, total);
  } finally {
    await fh.close();
  }
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

function run(file: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(file, args, { timeout: 30_000 }, (err, _stdout, stderr) => {
      if (!err) resolve({ ok: true, message: 'ok' });
      else if (errnoOf(err) === 'ENOENT') resolve({ ok: false, message: `${file} is not installed` });
      else resolve({ ok: false, message: (stderr || err.message).trim().split('\n')[0] ?? err.message });
    });
  });
}
