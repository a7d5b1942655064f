/**
 * The commands that work on the cache alone: ingest, ls, cat, export, gc. Each takes the
 * resolved configuration and where to write, and returns nothing but effects; errors are
 * KheadersErrors that cli.ts turns into a message and an exit status.
 */
import { createReadStream } from 'node:fs';
import { once } from 'node:events';
import type { Config } from '../config.js';
import { KheadersError } from '../errors.js';
import type { Logger } from '../log.js';
import { CacheStore } from '../store/cache.js';
import { dataLocation } from '../store/entry.js';
import { exportEntry } from '../store/export.js';
import { ingest, type IngestResult } from '../store/ingest.js';
import { readLiveKernel } from '../store/kernel-match.js';
import { normaliseEntryPath } from '../store/tree-index.js';
import { humanBytes, progressBar, summarise, table } from './format.js';

export interface CommandIO {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream & { isTTY?: boolean };
  log: Logger;
}

/** Ingest the configured archive (or the running kernel's), with eviction afterwards. */
export async function ingestWithConfig(cfg: Config, io: CommandIO, extra: { setCurrent?: boolean } = {}): Promise<IngestResult> {
  const tty = io.stderr.isTTY === true;
  return ingest({
    cacheDir: cfg.cacheDir,
    ...(cfg.archive !== undefined ? { archive: cfg.archive } : {}),
    ...(cfg.release !== undefined ? { release: cfg.release } : {}),
    modprobe: cfg.modprobe,
    unloadModule: cfg.unloadModule,
    limits: { maxTotalBytes: cfg.maxTotalBytes, maxEntries: cfg.maxEntries, maxFileBytes: cfg.maxFileBytes },
    decoder: cfg.decoder,
    btf: cfg.btf,
    origins: {
      ...(cfg.origins.archive !== undefined ? { archive: cfg.origins.archive } : {}),
      ...(cfg.origins.release !== undefined ? { release: cfg.origins.release } : {}),
      ...(cfg.origins.btf !== undefined ? { btf: cfg.origins.btf } : {}),
    },
    keep: cfg.keep,
    ...(cfg.maxCacheBytes !== undefined ? { maxCacheBytes: cfg.maxCacheBytes } : {}),
    lockTimeoutMs: cfg.lockTimeout * 1000,
    ...(extra.setCurrent !== undefined ? { setCurrent: extra.setCurrent } : {}),
    log: io.log,
    ...(tty
      ? {
          onProgress: (p) =>
            io.stderr.write(progressBar(p.total ? p.bytes / p.total : undefined, `${humanBytes(p.bytes)}, ${p.entries} entries`)),
        }
      : {}),
  }).finally(() => {
    if (tty) io.stderr.write('\n');
  });
}

export async function cmdIngest(cfg: Config, io: CommandIO, json: boolean): Promise<void> {
  const result = await ingestWithConfig(cfg, io);
  const store = await CacheStore.open(cfg.cacheDir);
  const summary = summarise(result.entry.manifest, await store.currentId(), await readLiveKernel());
  if (json) {
    io.stdout.write(JSON.stringify({ ...summary, reused: result.reused, evicted: result.evicted, durationMs: result.durationMs }) + '\n');
    return;
  }
  const m = result.entry.manifest;
  if (m.kind === 'btf-only') {
    io.stderr.write(
      `no header archive for ${m.release} (the kernel lacks CONFIG_IKHEADERS): cached vmlinux.h only, generated from ${m.source.replace(/^btf:/, '')}.\n` +
        `CO-RE programs can use it now (kheadersd cat current vmlinux.h); for the headers, see \`kheadersd doctor\`.\n`,
    );
    return;
  }
  const extras = [m.btf ? 'vmlinux.h' : '', m.config ? '.config' : ''].filter(Boolean).join(' and ');
  io.stderr.write(
    `${result.reused ? 'already cached' : 'ingested'}: ${m.release} (sha256 ${m.digest.slice(0, 12)}), ${m.files} files, ${humanBytes(m.bytes)}` +
      `${extras ? `, with ${extras}` : ''}${summary.current ? ', current' : ''} in ${result.durationMs} ms\n`,
  );
  if (summary.runningKernel !== 'yes') {
    io.stderr.write(`note: this is not${summary.runningKernel === 'unknown' ? ' known to be' : ''} the running kernel's entry: ${summary.runningKernelNote ?? ''}${summary.current ? '' : `; \`current\` still means the running kernel: use \`${m.release}\` to name this entry`}\n`);
  }
  for (const note of m.notes ?? []) io.stderr.write(`note: ${note}\n`);
}

export async function cmdLs(cfg: Config, io: CommandIO, json: boolean): Promise<void> {
  const store = await CacheStore.open(cfg.cacheDir);
  const current = await store.currentId();
  const live = await readLiveKernel();
  const entries = (await store.list()).map((m) => summarise(m, current, live));
  if (json) {
    io.stdout.write(JSON.stringify(entries, null, 2) + '\n');
    return;
  }
  if (entries.length === 0) {
    io.stdout.write(`no entries in ${store.dir}: run \`kheadersd ingest\`\n`);
    return;
  }
  const rows = [['RELEASE', 'DIGEST', 'FILES', 'SIZE', 'BUILD-ID', 'INGESTED', 'CURRENT', 'RUNNING', 'EXTRAS', 'SOURCE']];
  for (const e of entries) {
    rows.push([
      e.release,
      e.digest.slice(0, 12),
      String(e.files),
      humanBytes(e.bytes),
      e.buildId ? e.buildId.slice(0, 12) : '-',
      e.ingestedAt.replace(/\.\d+Z$/, 'Z'),
      e.current ? 'yes' : '',
      e.runningKernel === 'yes' ? 'yes' : e.runningKernel === 'unknown' ? '?' : 'no',
      [e.vmlinuxH ? 'vmlinux.h' : '', e.config ? '.config' : ''].filter(Boolean).join(',') || '-',
      e.kind === 'btf-only' ? `${e.source} (vmlinux.h only: no header archive)` : e.source,
    ]);
  }
  io.stdout.write(table(rows));
  const cur = entries.find((e) => e.current);
  if (cur && cur.runningKernel !== 'yes') {
    io.stdout.write(
      `\ncurrent is ${cur.release} (sha256 ${cur.digest.slice(0, 12)}), ${cur.runningKernel === 'no' ? 'NOT the running kernel' : 'not known to be the running kernel'}: ${cur.runningKernelNote ?? ''}.\n` +
        `Tools on this machine that read \`current\` get these headers, not the running kernel's (${live.release}).\n`,
    );
  } else if (!cur) {
    io.stdout.write(`\nno entry is current: the running kernel (${live.release}) is not cached\n`);
  }
}

export async function cmdCat(cfg: Config, io: CommandIO, ref: string, file: string): Promise<void> {
  const store = await CacheStore.open(cfg.cacheDir);
  const entry = await store.resolve(ref);
  const node = entry.index.resolve(userPath(file));
  if (!node) throw new KheadersError('E_NOT_FOUND', `${file}: no such file in ${entry.manifest.release} (${entry.manifest.digest.slice(0, 12)})`, { path: file });
  if (node.kind !== 'file') throw new KheadersError('E_USAGE', `${file} is a directory`, { path: file });
  if (node.size === 0) return;
  const { file: dataFile, offset } = dataLocation(entry, node);
  const stream = createReadStream(dataFile, { start: offset, end: offset + node.size - 1 });
  for await (const chunk of stream) {
    if (!io.stdout.write(chunk as Buffer)) await once(io.stdout, 'drain');
  }
}

/** A path the user typed: one inside the tree, or a usage error (not a bad archive). */
function userPath(file: string): string {
  try {
    return normaliseEntryPath(file);
  } catch {
    throw new KheadersError('E_USAGE', `${JSON.stringify(file)} is not a path inside the header tree (no "..", not absolute)`, { path: file });
  }
}

export async function cmdExport(cfg: Config, io: CommandIO, ref: string, dir: string): Promise<void> {
  const store = await CacheStore.open(cfg.cacheDir);
  const entry = await store.resolve(ref);
  const result = await exportEntry(entry, dir);
  io.stderr.write(`exported ${entry.manifest.release}: ${result.files} files, ${result.dirs} directories, ${result.symlinks} symlinks to ${result.dir}\n`);
  io.stderr.write(`use it with: export BCC_KERNEL_SOURCE=${result.dir} BPFTRACE_KERNEL_SOURCE=${result.dir}\n`);
}

export async function cmdGc(cfg: Config, io: CommandIO, json: boolean): Promise<void> {
  const store = await CacheStore.open(cfg.cacheDir, { write: true, lockTimeoutMs: cfg.lockTimeout * 1000 });
  const { swept, evicted } = await store.locked(async () => ({
    swept: await store.sweepTmp(),
    evicted: await store.gc({ keep: cfg.keep, ...(cfg.maxCacheBytes !== undefined ? { maxBytes: cfg.maxCacheBytes } : {}) }),
  }));
  if (json) io.stdout.write(JSON.stringify({ evicted, swept }) + '\n');
  else io.stderr.write(evicted.length ? `evicted ${evicted.length}: ${evicted.join(', ')}\n` : 'nothing to evict\n');
}
