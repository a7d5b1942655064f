/**
 * `kheadersd pull`: the developer host's side of HTTP. Asks a device's daemon for its current
 * entry (or --release), downloads the original archive by its digest, verifies it, and makes
 * it a plain directory tree for BCC/bpftrace:
 *
 *   GET /v1/kernels/{current|R}            → release, digest
 *   DIR/<release>-<digest12>/ exists?      → reuse it, nothing downloaded
 *   GET /v1/blobs/{digest}/archive.tar.xz  → temp file, sha256 checked against the JSON *and*
 *                                            the Repr-Digest/Digest header
 *   ingest (host cache) + exportEntry      → DIR/<release>-<digest12>/, renamed into place
 *
 * The archive is unpacked by the project's own ingest and export, not by `tar`: the same
 * traversal, symlink and size checks that guard the device guard the host, and the tree appears
 * by one rename (a crash leaves it absent, never half-written). The blob URL is used for the
 * download because it names exactly the bytes the JSON described, even if the device swaps
 * kernels between the two requests, and because an HTTP cache may answer it.
 *
 * With --adb, `adb forward tcp:0 tcp:7711` picks a free host port, and the forward is removed
 * afterwards, whatever happens.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, open, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { KheadersError, errnoOf, isKheadersError } from '../errors.js';
import { isDigest, validRelease } from '../store/cache.js';
import { exportEntry } from '../store/export.js';
import { ingest } from '../store/ingest.js';
import { readTokenFile } from '../token.js';
import type { CommandIO } from './store-commands.js';
import { humanBytes, progressBar, type EntrySummary } from './format.js';

export const DEFAULT_DEVICE_PORT = 7711;
export const DEFAULT_PULL_URL = `http://127.0.0.1:${DEFAULT_DEVICE_PORT}`;
const REQUEST_TIMEOUT_MS = 30_000;
const ADB_TIMEOUT_MS = 30_000;
/** The same bound ingest puts on a compressed archive (--max-total-bytes' default). */
const MAX_ARCHIVE_BYTES = 1024 ** 3;

export interface PullOptions {
  /** The daemon's base URL (default http://127.0.0.1:7711). Exclusive with `adb`. */
  url?: string;
  /** Reach the device through `adb forward`. */
  adb?: boolean;
  /** adb's -s: which device, when several are attached. */
  serial?: string;
  /** The adb binary (default: $ADB, else `adb` on PATH). */
  adbPath?: string;
  /** The daemon's port on the device (default 7711). */
  devicePort?: number;
  /** Where trees go: DIR/<release>-<digest12>/ (default <cacheDir>/trees). */
  out?: string;
  /** Pull this release instead of the device's current one. */
  release?: string;
  /** The host-side cache ingest writes to (default $XDG_CACHE_HOME/kheadersd, ~/.cache/kheadersd). */
  cacheDir?: string;
  /** Bearer token, when the daemon has --token-file. */
  token?: string;
  /** A file holding the token, checked by the same rule as the daemon's (token.ts). Exclusive with `token`. */
  tokenFile?: string;
  /** Host-cache entries to keep (default 3); exported trees are never removed. */
  keep?: number;
  /** A request (or a download that stops moving) fails after this long. */
  timeoutMs?: number;
}

export interface PullResult {
  dir: string;
  release: string;
  digest: string;
  /** The tree was already there: nothing was downloaded. */
  reused: boolean;
  /** Where the daemon was reached. */
  url: string;
}

export function defaultHostCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const base = env.XDG_CACHE_HOME && path.isAbsolute(env.XDG_CACHE_HOME) ? env.XDG_CACHE_HOME : path.join(os.homedir(), '.cache');
  return path.join(base, 'kheadersd');
}

/** The CLI entry: pull, then print the two export lines on stdout (and a summary on stderr). */
export async function cmdPull(opts: PullOptions, io: CommandIO): Promise<void> {
  const r = await pull(opts, io);
  io.stderr.write(`${r.reused ? 'already pulled' : 'pulled'} ${r.release} (sha256 ${r.digest.slice(0, 12)}) from ${r.url} into ${r.dir}\n`);
  io.stdout.write(`export BCC_KERNEL_SOURCE=${shellQuote(r.dir)}\nexport BPFTRACE_KERNEL_SOURCE=${shellQuote(r.dir)}\n`);
}

export async function pull(options: PullOptions, io: CommandIO): Promise<PullResult> {
  if (options.token !== undefined && options.tokenFile !== undefined) throw new KheadersError('E_USAGE', 'give the token or the token file, not both');
  const opts = options.tokenFile !== undefined ? { ...options, token: await readTokenFile(options.tokenFile) } : options;
  if (opts.url !== undefined && opts.adb) throw new KheadersError('E_USAGE', '--url and --adb are exclusive: --adb sets up its own forward');
  if (opts.serial !== undefined && !opts.adb) throw new KheadersError('E_USAGE', '--serial only makes sense with --adb');
  if (opts.release !== undefined && !validRelease(opts.release)) throw new KheadersError('E_USAGE', `--release ${JSON.stringify(opts.release)} is not a valid kernel release`);
  const cacheDir = path.resolve(opts.cacheDir ?? defaultHostCacheDir());
  const out = path.resolve(opts.out ?? path.join(cacheDir, 'trees'));

  if (!opts.adb) return pullFrom(baseUrl(opts.url ?? DEFAULT_PULL_URL), opts, io, cacheDir, out);

  const adb = opts.adbPath ?? process.env.ADB ?? 'adb';
  const serial = await pickDevice(adb, opts.serial);
  const hostPort = await adbForward(adb, serial, opts.devicePort ?? DEFAULT_DEVICE_PORT);
  io.log.debug({ serial, hostPort }, 'adb forward set up');
  try {
    return await pullFrom(new URL(`http://127.0.0.1:${hostPort}`), opts, io, cacheDir, out);
  } finally {
    const r = await runAdb(adb, ['-s', serial, 'forward', '--remove', `tcp:${hostPort}`]).catch((err: unknown) => ({ code: -1, stdout: '', stderr: String(err) }));
    if (r.code !== 0) io.log.warn({ serial, hostPort, stderr: r.stderr.trim() }, 'could not remove the adb forward');
  }
}

function baseUrl(text: string): URL {
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    throw new KheadersError('E_USAGE', `--url ${JSON.stringify(text)} is not a URL (e.g. http://127.0.0.1:7711)`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new KheadersError('E_USAGE', `--url must be http:// or https:// (got ${u.protocol})`);
  if (!u.pathname.endsWith('/')) u.pathname += '/';
  u.search = '';
  u.hash = '';
  return u;
}

/** `api` is relative (no leading slash), so a daemon behind a proxy path prefix works. */
function endpoint(base: URL, api: string): string {
  return new URL(api, base).toString();
}

async function pullFrom(base: URL, opts: PullOptions, io: CommandIO, cacheDir: string, out: string): Promise<PullResult> {
  const timeoutMs = opts.timeoutMs ?? REQUEST_TIMEOUT_MS;
  const headers: Record<string, string> = { accept: 'application/json' };
  if (opts.token !== undefined) headers.authorization = `Bearer ${opts.token}`;
  const ref = opts.release ?? 'current';
  const where = base.origin + base.pathname.replace(/\/$/, '');

  const res = await request(endpoint(base, `v1/kernels/${encodeURIComponent(ref)}`), headers, AbortSignal.timeout(timeoutMs), where);
  const summary = validSummary(await res.json().catch(() => undefined), where);
  const { release, digest } = summary;
  const dir = path.join(out, `${release}-${digest.slice(0, 12)}`);
  if (await nonEmptyDir(dir)) {
    io.log.info({ dir }, 'already pulled: reusing it');
    return { dir, release, digest, reused: true, url: where };
  }

  const tmp = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-pull-'));
  try {
    const archive = path.join(tmp, 'archive.tar.xz');
    const archiveUrl = endpoint(base, `v1/blobs/${digest}/archive.tar.xz`);
    await download(archiveUrl, { ...headers, accept: 'application/x-xz', 'accept-encoding': 'identity' }, archive, digest, timeoutMs, io, where);
    const result = await ingest({ cacheDir, archive, sourceLabel: archiveUrl, release, setCurrent: false, keep: opts.keep ?? 3, log: io.log });
    if (result.entry.manifest.digest !== digest) throw new KheadersError('E_INTERNAL', 'the ingested archive has another digest than the one verified');
    try {
      await exportEntry(result.entry, dir);
    } catch (err) {
      // Another pull of the same tree finished first: its tree is as good as ours.
      if (isKheadersError(err, 'E_USAGE') && (await nonEmptyDir(dir))) return { dir, release, digest, reused: true, url: where };
      throw err;
    }
    return { dir, release, digest, reused: false, url: where };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

function validSummary(body: unknown, where: string): EntrySummary {
  const s = body as Partial<EntrySummary> | undefined;
  if (!s || typeof s.release !== 'string' || typeof s.digest !== 'string') throw new KheadersError('E_HTTP', `${where} did not answer with an entry (is it a kheadersd daemon?)`);
  // Both become a directory name on this host: check them as strictly as ingest does.
  if (!validRelease(s.release)) throw new KheadersError('E_HTTP', `${where} names an invalid release ${JSON.stringify(s.release)}`);
  if (!isDigest(s.digest)) throw new KheadersError('E_HTTP', `${where} names an invalid digest ${JSON.stringify(s.digest)}`);
  if (s.kind !== undefined && s.kind !== 'headers') throw new KheadersError('E_HTTP', `${s.release} on ${where} has no header archive (only vmlinux.h from BTF)`);
  return s as EntrySummary;
}

async function request(url: string, headers: Record<string, string>, signal: AbortSignal, where: string): Promise<Response> {
  let res: Response;
  try {
    res = await fetch(url, { headers, signal, redirect: 'error' });
  } catch (err) {
    const cause = (err as { cause?: unknown }).cause;
    const code = errnoOf(cause) ?? (err instanceof Error && err.name === 'TimeoutError' ? 'timed out' : undefined) ?? (err instanceof Error ? err.message : String(err));
    throw new KheadersError('E_HTTP', `cannot reach kheadersd at ${where} (${code}): is \`kheadersd serve\` running there with HTTP on?`, { url }, { cause: err });
  }
  if (res.ok) return res;
  const message = await res
    .json()
    .then((b: unknown) => (b as { error?: { message?: string } }).error?.message)
    .catch(() => undefined);
  if (res.status === 401) throw new KheadersError('E_HTTP', `${where} requires a token: pass --token-file with the daemon's token`, { url, status: 401 });
  if (res.status === 404) throw new KheadersError('E_NOT_FOUND', `${where}: ${message ?? 'not found'}`, { url, status: 404 });
  throw new KheadersError('E_HTTP', `${where} answered ${res.status}${message ? `: ${message}` : ''}`, { url, status: res.status });
}

/** The sha256 a Repr-Digest (RFC 9530) or Digest (RFC 3230) header states, as hex. */
export function digestFromHeaders(h: Headers): string | undefined {
  const repr = /(?:^|,)\s*sha-256=:([A-Za-z0-9+/]+=*):/i.exec(h.get('repr-digest') ?? '');
  const legacy = /(?:^|,)\s*sha-256=([A-Za-z0-9+/]+=*)/i.exec(h.get('digest') ?? '');
  const b64 = repr?.[1] ?? legacy?.[1];
  return b64 === undefined ? undefined : Buffer.from(b64, 'base64').toString('hex');
}

async function download(url: string, headers: Record<string, string>, file: string, digest: string, timeoutMs: number, io: CommandIO, where: string): Promise<void> {
  const abort = new AbortController();
  let idle = setTimeout(() => abort.abort(), timeoutMs);
  const res = await request(url, headers, abort.signal, where).finally(() => clearTimeout(idle));
  const stated = digestFromHeaders(res.headers);
  if (stated === undefined) throw new KheadersError('E_HTTP', `${where} sent the archive without a Repr-Digest or Digest header: cannot verify it`, { url });
  if (stated !== digest) throw new KheadersError('E_HTTP', `${where}: the archive's Digest header (${stated.slice(0, 12)}) is not the digest the entry names (${digest.slice(0, 12)})`, { url });
  if (res.headers.get('content-encoding') && res.headers.get('content-encoding') !== 'identity') {
    throw new KheadersError('E_HTTP', `${where} sent the archive with Content-Encoding ${res.headers.get('content-encoding')}: cannot verify it`);
  }
  const total = Number(res.headers.get('content-length') ?? NaN);
  if (total > MAX_ARCHIVE_BYTES) throw new KheadersError('E_LIMIT', `the archive is ${total} bytes, over the limit of ${MAX_ARCHIVE_BYTES}`);
  const tty = io.stderr.isTTY === true;
  const hash = createHash('sha256');
  const fh = await open(file, 'wx', 0o600);
  let received = 0;
  let lastDraw = 0;
  const draw = (): void => {
    io.stderr.write(progressBar(Number.isFinite(total) && total > 0 ? received / total : undefined, `${humanBytes(received)}${Number.isFinite(total) ? ` of ${humanBytes(total)}` : ''}`));
  };
  try {
    if (!res.body) throw new KheadersError('E_HTTP', `${where} sent no body for the archive`);
    idle = setTimeout(() => abort.abort(), timeoutMs);
    for await (const chunk of res.body as AsyncIterable<Uint8Array>) {
      idle.refresh();
      received += chunk.length;
      if (received > MAX_ARCHIVE_BYTES) throw new KheadersError('E_LIMIT', `the archive exceeds ${MAX_ARCHIVE_BYTES} bytes`);
      hash.update(chunk);
      await fh.write(chunk);
      if (tty && performance.now() - lastDraw > 100) {
        lastDraw = performance.now();
        draw();
      }
    }
  } catch (err) {
    if (abort.signal.aborted) throw new KheadersError('E_HTTP', `the download from ${where} stalled for ${timeoutMs / 1000} s`, { url }, { cause: err });
    if (err instanceof KheadersError) throw err;
    throw new KheadersError('E_HTTP', `the download from ${where} failed: ${err instanceof Error ? err.message : String(err)}`, { url }, { cause: err });
  } finally {
    clearTimeout(idle);
    await fh.close();
    if (tty) {
      draw();
      io.stderr.write('\n');
    }
  }
  if (Number.isFinite(total) && received !== total) throw new KheadersError('E_HTTP', `the download from ${where} was cut short (${received} of ${total} bytes)`, { url });
  const got = hash.digest('hex');
  if (got !== digest) throw new KheadersError('E_HTTP', `the archive from ${where} has sha256 ${got.slice(0, 12)}…, not ${digest.slice(0, 12)}… as announced: refusing it`, { url, expected: digest, got });
}

// ---- adb -----------------------------------------------------------------------------------------

interface AdbRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

function runAdb(adb: string, args: readonly string[]): Promise<AdbRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(adb, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const timer = setTimeout(() => child.kill('SIGKILL'), ADB_TIMEOUT_MS);
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(
        errnoOf(e) === 'ENOENT'
          ? new KheadersError('E_ADB', `adb not found (${adb}): install the Android platform-tools, put adb on PATH, or set ADB=/path/to/adb`, { adb })
          : new KheadersError('E_ADB', `cannot run ${adb}: ${e.message}`, { adb }),
      );
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
  });
}

export interface AdbDevice {
  serial: string;
  state: string;
}

/** `adb devices` output → devices (the header, daemon messages and blank lines skipped). */
export function parseAdbDevices(text: string): AdbDevice[] {
  const devices: AdbDevice[] = [];
  for (const line of text.split('\n')) {
    const m = /^(\S+)\s+(\S+)/.exec(line.trim());
    if (!m || line.startsWith('*') || line.startsWith('List of devices')) continue;
    devices.push({ serial: m[1]!, state: m[2]! });
  }
  return devices;
}

async function pickDevice(adb: string, serial: string | undefined): Promise<string> {
  const r = await runAdb(adb, ['devices']);
  if (r.code !== 0) throw new KheadersError('E_ADB', `\`adb devices\` failed: ${r.stderr.trim() || `exit ${r.code}`}`);
  const all = parseAdbDevices(r.stdout);
  const hint = (d: AdbDevice): string =>
    d.state === 'unauthorized' ? `${d.serial} is unauthorized: accept the USB debugging prompt on the device` : `${d.serial} is ${d.state}`;
  if (serial !== undefined) {
    const d = all.find((x) => x.serial === serial);
    if (!d) throw new KheadersError('E_ADB', `no device ${serial} attached (adb sees: ${all.map((x) => x.serial).join(', ') || 'none'})`, { serial });
    if (d.state !== 'device') throw new KheadersError('E_ADB', hint(d), { serial });
    return serial;
  }
  const usable = all.filter((d) => d.state === 'device');
  if (usable.length === 0) {
    const others = all.map(hint).join('; ');
    throw new KheadersError('E_ADB', `no device attached${others ? ` (${others})` : ''}: connect one with USB debugging on, or use --url`, {});
  }
  if (usable.length > 1) {
    throw new KheadersError('E_ADB', `several devices attached (${usable.map((d) => d.serial).join(', ')}): choose one with --serial`, { serials: usable.map((d) => d.serial) });
  }
  return usable[0]!.serial;
}

async function adbForward(adb: string, serial: string, devicePort: number): Promise<number> {
  const r = await runAdb(adb, ['-s', serial, 'forward', 'tcp:0', `tcp:${devicePort}`]);
  const port = Number(r.stdout.trim());
  if (r.code !== 0 || !Number.isInteger(port) || port <= 0 || port > 65535) {
    throw new KheadersError('E_ADB', `\`adb forward tcp:0 tcp:${devicePort}\` failed: ${r.stderr.trim() || r.stdout.trim() || `exit ${r.code}`}`, { serial });
  }
  return port;
}

// ---- small helpers ---------------------------------------------------------------------------

async function nonEmptyDir(dir: string): Promise<boolean> {
  try {
    return (await readdir(dir)).length > 0;
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return false;
    throw err;
  }
}

export function shellQuote(s: string): string {
  return /^[A-Za-z0-9_/.,:+@%=-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}
