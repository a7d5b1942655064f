/**
 * What the HTTP and pull tests share: a synthetic kernel-like archive (built with tar-stream and
 * the xz tool, so it runs without the fixture), entries made by the real ingest, a real server
 * on a loopback port, and raw HTTP requests that nothing normalises.
 */
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import type { Logger } from '../../src/log.js';
import { startHttpServer, type HttpLimits, type HttpServerHandle } from '../../src/serve/http/server.js';
import { DaemonState } from '../../src/serve/state.js';
import type { ModuleHeaderSource } from '../../src/store/module-btf.js';
import { CacheStore } from '../../src/store/cache.js';
import type { CacheEntry } from '../../src/store/entry.js';
import { ingest } from '../../src/store/ingest.js';
import { writeTarXz, type SynthEntry } from './archives.js';

// The fixture, skip reasons, processes and temp dirs are the FUSE tests' own helpers.
import { FIXTURE, quietLog } from './fuse-env.js';
export { FIXTURE, FIXTURE_RELEASE, fixtureSkipReason, quietLog, removeDir, run, runOk, tempDir, type RunResult } from './fuse-env.js';

export const SYNTH_RELEASE = '6.6.0-synth';

// ---- a synthetic archive ----------------------------------------------------------------------

/** An entry of a synthetic archive (the core tests' type). */
export type TarSpec = SynthEntry;

export const SYNTH_MTIME = new Date('2024-03-01T12:00:00Z');

/** A tar built with tar-stream and compressed by `xz`, like the kernel's own archive. */
export function makeTarXz(files: readonly TarSpec[], out: string): Promise<string> {
  return writeTarXz(files, out, SYNTH_MTIME);
}

/** A big text file (over the server's one-pread buffer size, so it is streamed). */
export function bigText(kib: number): Buffer {
  const lines: string[] = [];
  let length = 0;
  for (let i = 0; length < kib * 1024; i++) {
    const line = `#define BIG_CONSTANT_${i.toString().padStart(6, '0')} ${i * 7}\n`;
    lines.push(line);
    length += line.length;
  }
  return Buffer.from(lines.join('').slice(0, kib * 1024));
}

/** Names a listing must escape, a symlink to a file and one to a directory, an empty file. */
export function synthTree(release = SYNTH_RELEASE, variant = 'a'): TarSpec[] {
  return [
    { name: './', type: 'directory' },
    { name: './include/', type: 'directory' },
    { name: './include/linux/', type: 'directory' },
    { name: './include/linux/sched.h', content: `/* sched.h ${variant} */\n#ifndef _LINUX_SCHED_H\n#define _LINUX_SCHED_H\n${'struct task_struct { int pid; };\n'.repeat(40)}#endif\n` },
    { name: './include/linux/types.h', content: `#define TYPES_${variant} 1\n` },
    { name: './include/linux/empty.h', content: '' },
    { name: './include/linux/big.h', content: bigText(600) },
    { name: './include/linux/odd <b>&"name\'.h', content: '/* an odd name */\n' },
    { name: './include/dt-bindings/', type: 'directory' },
    { name: './include/dt-bindings/sched-link.h', type: 'symlink', linkname: '../linux/sched.h' },
    { name: './include/linux-alias', type: 'symlink', linkname: 'linux' },
    { name: './include/generated/', type: 'directory' },
    { name: './include/generated/utsrelease.h', content: `#define UTS_RELEASE "${release}"\n` },
    { name: './arch/x86/include/asm/', type: 'directory' },
    { name: './arch/x86/include/asm/ptrace.h', content: `struct pt_regs { unsigned long di; }; /* ${variant} */\n` },
  ];
}

export async function ingestSynth(cacheDir: string, work: string, release = SYNTH_RELEASE, variant = 'a', setCurrent = true): Promise<CacheEntry> {
  const archive = await makeTarXz(synthTree(release, variant), path.join(work, `synth-${release}-${variant}.tar.xz`));
  const { entry } = await ingest({ cacheDir, archive, release, setCurrent, keep: 100, log: quietLog() });
  return entry;
}

export async function ingestFixture(cacheDir: string, setCurrent = true): Promise<CacheEntry> {
  const { entry } = await ingest({ cacheDir, archive: FIXTURE, setCurrent, keep: 100, log: quietLog() });
  return entry;
}

// ---- a server ---------------------------------------------------------------------------------

export interface HttpEnv {
  work: string;
  cacheDir: string;
  store: CacheStore;
  state: DaemonState;
  server: HttpServerHandle;
  port: number;
  close(): Promise<void>;
}

/** A real server on 127.0.0.1:<free port> over the cache in `cacheDir`. */
export async function startEnv(opts: {
  work: string;
  cacheDir: string;
  token?: string;
  ready?: boolean;
  log?: Logger;
  limits?: Partial<HttpLimits>;
  fastPath?: boolean;
  /** Module headers, shown under the entry `runningId` (the running kernel's). */
  modules?: ModuleHeaderSource;
  runningId?: string;
  /** The running kernel's BTF file, for /buildid/<id>/section/.BTF. */
  liveBtf?: string;
}): Promise<HttpEnv> {
  const store = await CacheStore.open(opts.cacheDir);
  const state = new DaemonState();
  state.currentId = await store.currentId();
  state.runningId = opts.runningId ?? null;
  state.ready = opts.ready ?? state.currentId !== null;
  const server = await startHttpServer({
    listen: { host: '127.0.0.1', port: 0 },
    store,
    state,
    log: opts.log ?? quietLog(),
    ...(opts.token !== undefined ? { token: opts.token } : {}),
    ...(opts.limits ? { limits: opts.limits } : {}),
    ...(opts.fastPath !== undefined ? { fastPath: opts.fastPath } : {}),
    ...(opts.modules ? { modules: opts.modules } : {}),
    ...(opts.liveBtf !== undefined ? { liveBtf: opts.liveBtf } : {}),
  });
  return { work: opts.work, cacheDir: opts.cacheDir, store, state, server, port: server.port, close: () => server.close() };
}

// ---- requests ---------------------------------------------------------------------------------

export interface Res {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

/** A request whose path is sent exactly as given (http.request does not normalise it). */
export function request(port: number, rawPath: string, opts: { method?: string; headers?: http.OutgoingHttpHeaders; agent?: http.Agent | false } = {}): Promise<Res> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path: rawPath, method: opts.method ?? 'GET', headers: opts.headers ?? {}, agent: opts.agent ?? false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (b: Buffer) => chunks.push(b));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

export function json<T = unknown>(res: Res): T {
  return JSON.parse(res.body.toString('utf8')) as T;
}

/**
 * Send raw bytes as the request target over a plain socket: for what http.request refuses to
 * send (NUL, spaces, raw non-ASCII). Returns the status code (0 if the server just closed).
 */
export function rawStatus(port: number, target: Buffer): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    sock.on('connect', () => {
      sock.write(Buffer.concat([Buffer.from('GET '), target, Buffer.from(' HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n')]));
    });
    sock.on('data', (b: Buffer) => chunks.push(b));
    sock.on('end', () => {
      const text = Buffer.concat(chunks).toString('latin1');
      const m = /^HTTP\/1\.1 (\d{3})/.exec(text);
      resolve({ status: m ? Number(m[1]) : 0, text });
    });
    sock.on('error', reject);
    sock.setTimeout(10_000, () => sock.destroy(new Error('raw request timed out')));
  });
}
