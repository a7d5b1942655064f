/**
 * `kheadersd pull`: the developer host's side of HTTP. Asks a device's daemon for its current
 * entry (or --release), downloads the original archive by its digest, verifies it, and makes
 * it a plain directory tree for BCC/bpftrace:
 *
 *   GET /v1/kernels/{current|R}            → release, digest
 *   DIR/<release>-<digest12>/ exists?      → reuse it, nothing downloaded
 *   GET /v1/blobs/{digest}/archive.tar.xz  → temp file, sha256 checked against the JSON *and*
 *                                            the Repr-Digest/Digest header
 *   ingest (host cache) + exportEntry      → the tree, in a staging directory
 *   GET /v1/blobs/{digest}/files/          → the files made beside the archive on the device
 *   GET /v1/blobs/{digest}/files/<name>      (vmlinux.h, .config): each checked against the
 *                                            sha256 the listing and its Repr-Digest state
 *   rename                                 → DIR/<release>-<digest12>/, complete or absent
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
import { chmod, mkdir, mkdtemp, open, readdir, rename, rm, stat, utimes } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { KheadersError, errnoOf } from '../errors.js';
import { isDigest, validRelease } from '../store/cache.js';
import { CONFIG_PATH } from '../store/entry.js';
import { exportEntry } from '../store/export.js';
import { ingest } from '../store/ingest.js';
import { readTokenFile } from '../token.js';
import type { CommandIO } from './store-commands.js';
import type { EntrySummary } from '../store/summary.js';
import { humanBytes, progressBar } from './format.js';

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
  /** The entry has the header tree (not only vmlinux.h). */
  headers: boolean;
  /** Files beside the tree, at its root: vmlinux.h, .config. */
  extras: string[];
  /** The kernel's architecture as the tree names it (arch/<name>), when it has one. */
  arch: string | undefined;
}

/** One file at the root of the device's entry, as its listing gives it. */
interface RootFile {
  name: string;
  size: number;
  sha256: string | undefined;
  mtime: string | null;
}

/** A file made beside the archive is a few MiB (vmlinux.h); anything far larger is refused. */
const MAX_EXTRA_BYTES = 256 * 1024 * 1024;

export function defaultHostCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const base = env.XDG_CACHE_HOME && path.isAbsolute(env.XDG_CACHE_HOME) ? env.XDG_CACHE_HOME : path.join(os.homedir(), '.cache');
  return path.join(base, 'kheadersd');
}

/** The CLI entry: pull, then print the variables on stdout (for `eval`) and how to use them on stderr. */
export async function cmdPull(opts: PullOptions, io: CommandIO): Promise<void> {
  const r = await pull(opts, io);
  const what = [r.headers ? 'headers' : '', ...r.extras].filter(Boolean).join(', ');
  io.stderr.write(`${r.reused ? 'already pulled' : 'pulled'} ${r.release} (sha256 ${r.digest.slice(0, 12)}) from ${r.url} into ${r.dir}: ${what}\n`);
  const vars = exportsFor(r);
  io.stdout.write(vars.map(([name, value]) => `export ${name}=${shellQuote(value)}\n`).join(''));
  const hints = [
    ...(r.headers ? ['BCC and bpftrace: the BCC_KERNEL_SOURCE and BPFTRACE_KERNEL_SOURCE above point them at the headers'] : []),
    ...(r.extras.includes('vmlinux.h') ? ['CO-RE programs (#include "vmlinux.h"): clang -O2 -g $KHEADERS_BPF_CFLAGS -c prog.bpf.c'] : []),
    ...(r.extras.includes(CONFIG_PATH) ? ["the kernel's configuration: $KHEADERS_CONFIG"] : []),
  ];
  for (const h of hints) io.stderr.write(`  ${h}\n`);
}

/** The variables a pulled tree is used through: the tools' own, and ours for builds. */
export function exportsFor(r: PullResult): Array<[string, string]> {
  const vars: Array<[string, string]> = [];
  if (r.headers) vars.push(['BCC_KERNEL_SOURCE', r.dir], ['BPFTRACE_KERNEL_SOURCE', r.dir]);
  vars.push(['KHEADERS_DIR', r.dir]);
  if (r.extras.includes('vmlinux.h')) {
    vars.push(['KHEADERS_VMLINUX_H', path.join(r.dir, 'vmlinux.h')]);
    // libbpf's bpf_tracing.h wants the target architecture by its kernel name (x86, arm64, …).
    vars.push(['KHEADERS_BPF_CFLAGS', ['-target', 'bpf', ...(r.arch !== undefined ? [`-D__TARGET_ARCH_${r.arch}`] : []), `-I${r.dir}`].join(' ')]);
  }
  if (r.extras.includes(CONFIG_PATH)) vars.push(['KHEADERS_CONFIG', path.join(r.dir, CONFIG_PATH)]);
  return vars;
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

  const asked = AbortSignal.timeout(timeoutMs);
  const res = await request(endpoint(base, `v1/kernels/${encodeURIComponent(ref)}`), headers, asked, where);
  const summary = validSummary(await jsonBody(res, asked, timeoutMs, where, `its answer for ${ref}`), where);
  const { release, digest } = summary;
  const withHeaders = summary.kind !== 'btf-only';
  const dir = path.join(out, `${release}-${digest.slice(0, 12)}`);
  const root = await rootFiles(base, digest, headers, timeoutMs, where);
  const result = (reused: boolean, extras: readonly RootFile[], arch: string | undefined): PullResult => ({
    dir,
    release,
    digest,
    reused,
    url: where,
    headers: withHeaders,
    extras: extras.map((f) => f.name),
    arch,
  });
  // A tree pulled before is reused when it has every file the entry has beside its headers.
  if (await nonEmptyDir(dir)) {
    const have = await Promise.all(root.map(async (f) => (await stat(path.join(dir, f.name)).catch(() => undefined))?.size === f.size));
    if (have.every(Boolean)) {
      io.log.info({ dir }, 'already pulled: reusing it');
      return result(true, root, await archOf(dir));
    }
    io.log.info({ dir }, 'pulled before without every file of the entry: pulling it again');
  }

  await mkdir(out, { recursive: true });
  const staging = await mkdtemp(path.join(out, `.${path.basename(dir)}.pull-`));
  try {
    const tree = path.join(staging, 'tree');
    let extras = root;
    if (withHeaders) {
      const archive = path.join(staging, 'archive.tar.xz');
      const archiveUrl = endpoint(base, `v1/blobs/${digest}/archive.tar.xz`);
      await download(archiveUrl, { ...headers, accept: 'application/x-xz', 'accept-encoding': 'identity' }, archive, { sha256: digest, size: undefined, stated: 'required' }, timeoutMs, io, where, 'the archive');
      const ingested = await ingest({ cacheDir, archive, sourceLabel: archiveUrl, release, setCurrent: false, keep: opts.keep ?? 3, btf: 'off', config: 'off', log: io.log });
      if (ingested.entry.manifest.digest !== digest) throw new KheadersError('E_INTERNAL', 'the ingested archive has another digest than the one verified');
      await exportEntry(ingested.entry, tree);
      // What is at the root of the device's entry but not in the archive was made beside it.
      extras = root.filter((f) => ingested.entry.index.get(f.name) === undefined);
    } else {
      await mkdir(tree, { mode: 0o755 });
    }
    for (const f of extras) {
      const file = path.join(tree, f.name);
      await download(endpoint(base, `v1/blobs/${digest}/files/${encodeURIComponent(f.name)}`), { ...headers, accept: '*/*', 'accept-encoding': 'identity' }, file, { sha256: f.sha256, size: f.size, stated: 'optional' }, timeoutMs, io, where, f.name);
      await chmod(file, 0o444);
      const mtime = f.mtime === null ? NaN : Date.parse(f.mtime) / 1000;
      if (Number.isFinite(mtime)) await utimes(file, mtime, mtime);
    }
    // Into place in one rename; a tree pulled before without the extras is replaced.
    if (await nonEmptyDir(dir)) await rename(dir, path.join(staging, 'replaced'));
    try {
      await rename(tree, dir);
    } catch (err) {
      // Another pull of the same tree finished first: its tree is as good as ours.
      if ((errnoOf(err) === 'ENOTEMPTY' || errnoOf(err) === 'EEXIST') && (await nonEmptyDir(dir))) return result(true, extras, await archOf(dir));
      throw err;
    }
    return result(false, extras, await archOf(dir));
  } finally {
    await rm(staging, { recursive: true, force: true });
  }
}

/** The files at the root of an entry, from its listing (directories and links are the archive's business). */
async function rootFiles(base: URL, digest: string, headers: Record<string, string>, timeoutMs: number, where: string): Promise<RootFile[]> {
  const asked = AbortSignal.timeout(timeoutMs);
  const res = await request(endpoint(base, `v1/blobs/${digest}/files/`), { ...headers, accept: 'application/json' }, asked, where);
  const body = (await jsonBody(res, asked, timeoutMs, where, "the entry's listing")) as { entries?: unknown } | undefined;
  if (!body || !Array.isArray(body.entries)) throw new KheadersError('E_HTTP', `${where} did not answer the entry's listing with JSON`);
  const files: RootFile[] = [];
  for (const raw of body.entries as Array<Record<string, unknown>>) {
    if (raw.type !== 'file') continue;
    const name = raw.name;
    const size = raw.size;
    // Each becomes a file name on this host: one plain name, nothing else.
    if (typeof name !== 'string' || !/^[A-Za-z0-9._+-]{1,255}$/.test(name) || name === '.' || name === '..') throw new KheadersError('E_HTTP', `${where} lists an invalid file name ${JSON.stringify(name)}`);
    if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0 || size > MAX_EXTRA_BYTES) throw new KheadersError('E_HTTP', `${where} lists ${name} with an invalid size`);
    const sha256 = typeof raw.sha256 === 'string' && isDigest(raw.sha256) ? raw.sha256 : undefined;
    files.push({ name, size, sha256, mtime: typeof raw.mtime === 'string' ? raw.mtime : null });
  }
  return files;
}

/** The architecture a kernel-header tree is for: its one directory under arch/. */
async function archOf(dir: string): Promise<string | undefined> {
  const names = await readdir(path.join(dir, 'arch')).catch(() => [] as string[]);
  return names.length === 1 && /^[a-z0-9]+$/.test(names[0]!) ? names[0] : undefined;
}

/**
 * An answer's body as JSON; undefined when it is not JSON (the caller says what was expected).
 * A body that stops coming until `asked` times out is said to have stalled: it was not a wrong
 * answer, and "did not answer with an entry" sent users looking for the wrong fault.
 */
async function jsonBody(res: Response, asked: AbortSignal, timeoutMs: number, where: string, what: string): Promise<unknown> {
  try {
    return await res.json();
  } catch (err) {
    if (asked.aborted) throw new KheadersError('E_HTTP', `${where} stalled: ${what} did not arrive in full within ${timeoutMs / 1000} s`, { url: res.url }, { cause: err });
    return undefined;
  }
}

function validSummary(body: unknown, where: string): EntrySummary {
  const s = body as Partial<EntrySummary> | undefined;
  if (!s || typeof s.release !== 'string' || typeof s.digest !== 'string') throw new KheadersError('E_HTTP', `${where} did not answer with an entry (is it a kheadersd daemon?)`);
  // Both become a directory name on this host: check them as strictly as ingest does.
  if (!validRelease(s.release)) throw new KheadersError('E_HTTP', `${where} names an invalid release ${JSON.stringify(s.release)}`);
  if (!isDigest(s.digest)) throw new KheadersError('E_HTTP', `${where} names an invalid digest ${JSON.stringify(s.digest)}`);
  if (s.kind !== undefined && s.kind !== 'headers' && s.kind !== 'btf-only') throw new KheadersError('E_HTTP', `${where} names an unknown kind of entry ${JSON.stringify(s.kind)}`);
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

interface Expect {
  /** The sha256 the bytes must have (from the entry's summary or listing), when known. */
  sha256: string | undefined;
  size: number | undefined;
  /** 'required': the response must state its digest (Repr-Digest/Digest); 'optional': checked when stated. */
  stated: 'required' | 'optional';
}

async function download(url: string, headers: Record<string, string>, file: string, expect: Expect, timeoutMs: number, io: CommandIO, where: string, what: string): Promise<void> {
  const abort = new AbortController();
  let idle = setTimeout(() => abort.abort(), timeoutMs);
  const res = await request(url, headers, abort.signal, where).finally(() => clearTimeout(idle));
  try {
    const stated = digestFromHeaders(res.headers);
    if (stated === undefined && expect.stated === 'required') throw new KheadersError('E_HTTP', `${where} sent ${what} without a Repr-Digest or Digest header: cannot verify it`, { url });
    if (stated !== undefined && expect.sha256 !== undefined && stated !== expect.sha256) {
      throw new KheadersError('E_HTTP', `${where}: the Digest header of ${what} (${stated.slice(0, 12)}) is not the digest the entry names (${expect.sha256.slice(0, 12)})`, { url });
    }
    const want = expect.sha256 ?? stated;
    if (want === undefined) io.log.warn({ url }, `${where} states no digest for ${what}: it is checked by its size only`);
    if (res.headers.get('content-encoding') && res.headers.get('content-encoding') !== 'identity') {
      throw new KheadersError('E_HTTP', `${where} sent ${what} with Content-Encoding ${res.headers.get('content-encoding')}: cannot verify it`);
    }
    const limit = expect.size ?? MAX_ARCHIVE_BYTES;
    const total = Number(res.headers.get('content-length') ?? NaN);
    if (total > limit) throw new KheadersError('E_LIMIT', `${what} is ${total} bytes, over the limit of ${limit}`);
    const tty = io.stderr.isTTY === true;
    const hash = createHash('sha256');
    const fh = await open(file, 'wx', 0o600);
    let received = 0;
    let lastDraw = 0;
    const draw = (): void => {
      io.stderr.write(progressBar(Number.isFinite(total) && total > 0 ? received / total : undefined, `${humanBytes(received)}${Number.isFinite(total) ? ` of ${humanBytes(total)}` : ''}`));
    };
    try {
      if (!res.body) throw new KheadersError('E_HTTP', `${where} sent no body for ${what}`);
      idle = setTimeout(() => abort.abort(), timeoutMs);
      for await (const chunk of res.body as AsyncIterable<Uint8Array>) {
        idle.refresh();
        received += chunk.length;
        if (received > limit) throw new KheadersError('E_LIMIT', `${what} exceeds ${limit} bytes`);
        hash.update(chunk);
        await fh.write(chunk);
        if (tty && performance.now() - lastDraw > 100) {
          lastDraw = performance.now();
          draw();
        }
      }
    } catch (err) {
      if (abort.signal.aborted) throw new KheadersError('E_HTTP', `the download of ${what} from ${where} stalled for ${timeoutMs / 1000} s`, { url }, { cause: err });
      if (err instanceof KheadersError) throw err;
      throw new KheadersError('E_HTTP', `the download of ${what} from ${where} failed: ${err instanceof Error ? err.message : String(err)}`, { url }, { cause: err });
    } finally {
      clearTimeout(idle);
      await fh.close();
      if (tty) {
        draw();
        io.stderr.write('\n');
      }
    }
    if (Number.isFinite(total) && received !== total) throw new KheadersError('E_HTTP', `the download of ${what} from ${where} was cut short (${received} of ${total} bytes)`, { url });
    if (expect.size !== undefined && received !== expect.size) throw new KheadersError('E_HTTP', `${what} from ${where} is ${received} bytes, not ${expect.size} as listed: refusing it`, { url });
    const got = hash.digest('hex');
    if (want !== undefined && got !== want) throw new KheadersError('E_HTTP', `${what} from ${where} has sha256 ${got.slice(0, 12)}…, not ${want.slice(0, 12)}… as announced: refusing it`, { url, expected: want, got });
  } finally {
    // However the download ended, the request is over. A body refused before it was read (no
    // digest stated, another digest, too large, a file that could not be created) would
    // otherwise keep its connection, and with it this process, open until the daemon finished
    // sending or a GC collected the Response: `pull` printed its error and did not exit.
    // Aborting a request already read to its end changes nothing.
    abort.abort();
  }
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
