/**
 * Test helpers for the store: synthetic kernel-header archives (tar-stream's pack, or raw tar
 * blocks with correct checksums for what pack will not write), real xz compression (the xz
 * binary, or lzma-native's encoder), damaged xz streams, the shared fixtures, temp dirs that
 * clean themselves up, entry snapshots for "unchanged" checks, and a runner for the real CLI.
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { lstat, mkdtemp, readdir, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'node:test';
import * as tar from 'tar-stream';

// ---------------------------------------------------------------------------------------------
// Places

/** The compiled helpers run from dist/test/helpers/: the repository root is three levels up. */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
/**
 * The CLI as it ships: the file package.json's "bin" names (the esbuild bundle, dist/app), so that
 * every test that runs the command runs what users get. Unit tests import dist/src instead.
 */
export const CLI = path.join(REPO_ROOT, (JSON.parse(readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { bin: { kheadersd: string } }).bin.kheadersd);
export const INGEST_CHILD = path.join(REPO_ROOT, 'dist/test/helpers/ingest-child.js');
export const FIXTURES_DIR = path.resolve(REPO_ROOT, '../shared/fixtures');
export const FIXTURE_ARCHIVE = path.join(FIXTURES_DIR, 'kheaders-6.1-x86_64.tar.xz');
export const FIXTURE_OBJECT = path.join(FIXTURES_DIR, 'kheaders-6.1-x86_64.o');
export const FIXTURE_SHA256 = '1e6afab138bcb67bba113c4cca4773a2a3c04c57d562bed43eab9a5c5e8abed4';
export const FIXTURE_RELEASE = '6.1.192';
export const FIXTURE_FILES = 6368;
export const FIXTURE_DIRS = 320;
export const FIXTURE_SYMLINKS = 3;

/** Undefined when the fixture is there; otherwise the reason to give `t.skip`. */
export function fixtureMissing(file = FIXTURE_ARCHIVE): string | undefined {
  return existsSync(file) ? undefined : `fixture ${file} not present`;
}

export const sha256 = (buf: Buffer | string): string => createHash('sha256').update(buf).digest('hex');

/** A fresh temp dir under the OS temp dir, removed when the test ends. */
export async function tempDir(t: TestContext, prefix = 'kheadersd-test-'): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  // Retried: a daemon a failed test left running may still be writing there (its stop is a later hook).
  t.after(() => rm(dir, { recursive: true, force: true, maxRetries: 5 }));
  return dir;
}

// ---------------------------------------------------------------------------------------------
// Deterministic data

/** xorshift32: deterministic pseudo-random numbers, so failures reproduce. */
export function pseudoRandom(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

export function randomBytes(length: number, seed: number): Buffer {
  const next = pseudoRandom(seed);
  const buf = Buffer.allocUnsafe(length + 3);
  for (let i = 0; i < length; i += 4) buf.writeUInt32LE(next(), i);
  return buf.subarray(0, length);
}

const WORDS = 'struct int long unsigned const static inline void return define include ifdef endif u32 u64 __u8 __be16 size_t spinlock_t list_head atomic_t rcu_head'.split(' ');

/**
 * C-ish text from a small vocabulary: compresses about 4:1 like real headers, so xz has real
 * work to do when decoding it (unlike zeros or random bytes, which decode at memcpy speed).
 */
export function textLike(length: number, seed: number): Buffer {
  const next = pseudoRandom(seed);
  const words = WORDS.map((w) => Buffer.from(w));
  const buf = Buffer.allocUnsafe(length + 64);
  let pos = 0;
  while (pos < length) {
    const r = next();
    const w = words[r % words.length]!;
    w.copy(buf, pos);
    pos += w.length;
    buf[pos++] = (r >>> 8) % 7 === 0 ? 0x0a : (r >>> 8) % 11 === 0 ? 0x3b : 0x20;
    if ((r >>> 16) % 5 === 0) pos += buf.write(String(r % 100000), pos, 'latin1');
  }
  return buf.subarray(0, length);
}

// ---------------------------------------------------------------------------------------------
// Tar archives

export type SynthType = 'file' | 'directory' | 'symlink' | 'link' | 'character-device' | 'block-device' | 'fifo';

export interface SynthEntry {
  name: string;
  type?: SynthType;
  content?: string | Buffer;
  linkname?: string;
  mode?: number;
  mtime?: Date;
  /** Extra pax records (tar-stream writes a pax header for the entry when this is set). */
  pax?: Record<string, string>;
}

export const DEFAULT_MTIME = new Date(1_700_000_000_000);

/** A tar stream from tar-stream's `pack()`, entries in the order given, with the end marker. */
export async function makeTar(entries: readonly SynthEntry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const collected = new Promise<void>((resolve, reject) => {
    pack.on('data', (chunk: unknown) => void chunks.push(chunk as Buffer));
    pack.on('end', () => resolve());
    pack.on('error', reject);
  });
  for (const e of entries) {
    const type = e.type ?? 'file';
    const header: Partial<tar.Header> & { name: string } = {
      name: e.name,
      type,
      mode: e.mode ?? (type === 'directory' ? 0o755 : 0o644),
      mtime: e.mtime ?? DEFAULT_MTIME,
      ...(e.linkname !== undefined ? { linkname: e.linkname } : {}),
      ...(type === 'character-device' || type === 'block-device' ? { devmajor: 1, devminor: 3 } : {}),
      ...(e.pax ? { pax: e.pax } : {}),
    };
    await new Promise<void>((resolve, reject) => {
      // A body-less entry is written as soon as it is added (tar-stream calls back at once).
      if (type === 'file') pack.entry(header, e.content ?? '', (err) => (err ? reject(err) : resolve()));
      else pack.entry(header, (err) => (err ? reject(err) : resolve()));
    });
  }
  pack.finalize();
  await collected;
  return Buffer.concat(chunks);
}

/**
 * makeTar, xz-compressed by the xz tool (CRC64, like gen_kheaders.sh), written to `out`.
 * Entries without an mtime get `mtime`.
 */
export async function writeTarXz(entries: readonly SynthEntry[], out: string, mtime = DEFAULT_MTIME): Promise<string> {
  const tarBytes = await makeTar(entries.map((e) => ({ mtime, ...e })));
  await writeFile(out, await xzAsync(tarBytes, 6));
  return out;
}

/** The release every synthetic "good" tree names in its utsrelease.h. */
export const SYNTH_RELEASE = '6.99.0-synth';

export function utsrelease(release: string): string {
  return `#define UTS_RELEASE "${release}"\n`;
}

/**
 * A small, valid kernel-header tree, shaped like the real one: `./` names, explicit directories,
 * include/generated/utsrelease.h naming the release, and one in-tree symlink.
 */
export function goodTree(release = SYNTH_RELEASE, salt = ''): SynthEntry[] {
  return [
    { name: './', type: 'directory' },
    { name: './include/', type: 'directory' },
    { name: './include/generated/', type: 'directory' },
    { name: './include/generated/utsrelease.h', content: utsrelease(release) },
    { name: './include/linux/', type: 'directory' },
    { name: './include/linux/types.h', content: `/* SPDX-License-Identifier: GPL-2.0 */\ntypedef unsigned int u32;${salt}\n` },
    { name: './include/linux/sched.h', content: textLike(20_000, 42) },
    { name: './include/linux/empty.h', content: '' },
    { name: './include/uapi/', type: 'directory' },
    { name: './include/uapi/linux/', type: 'directory' },
    { name: './include/uapi/linux/input-event-codes.h', content: '#define KEY_A 30\n' },
    { name: './include/dt-bindings/', type: 'directory' },
    { name: './include/dt-bindings/input/', type: 'directory' },
    { name: './include/dt-bindings/input/linux-event-codes.h', type: 'symlink', linkname: '../../uapi/linux/input-event-codes.h' },
    { name: './arch/x86/include/asm/ptrace.h', content: 'struct pt_regs { unsigned long ip; };\n' },
  ];
}

export async function goodArchive(release = SYNTH_RELEASE, salt = ''): Promise<Buffer> {
  return xz(await makeTar(goodTree(release, salt)));
}

// Raw blocks, for what tar-stream's pack will not write (GNU long names, base-256 numbers, bad
// checksums, NUL bytes in names).

export interface RawHeader {
  name: string | Buffer;
  mode?: number;
  size?: number;
  /** Write size as GNU base-256 (high bit set) instead of octal. */
  base256Size?: boolean;
  mtime?: number;
  typeflag?: string;
  linkname?: string;
  /** 'ustar' (POSIX, with prefix), 'gnu' ("ustar  \0"), or 'v7' (no magic). */
  format?: 'ustar' | 'gnu' | 'v7';
  prefix?: string;
  /** Corrupt the checksum by this much (0: correct). */
  checksumDelta?: number;
}

function octal(n: number, width: number): string {
  return n.toString(8).padStart(width - 1, '0') + '\0';
}

/** One 512-byte tar header block with a correct checksum (unless asked otherwise). */
export function rawHeader(h: RawHeader): Buffer {
  const block = Buffer.alloc(512);
  (typeof h.name === 'string' ? Buffer.from(h.name) : h.name).copy(block, 0, 0, 100);
  block.write(octal(h.mode ?? 0o644, 8), 100, 'latin1');
  block.write(octal(0, 8), 108, 'latin1');
  block.write(octal(0, 8), 116, 'latin1');
  const size = h.size ?? 0;
  if (h.base256Size) {
    block[124] = 0x80;
    let v = size;
    for (let i = 135; i > 124; i--) {
      block[i] = v % 256;
      v = Math.floor(v / 256);
    }
  } else block.write(octal(size, 12), 124, 'latin1');
  block.write(octal(h.mtime ?? 1_700_000_000, 12), 136, 'latin1');
  block.write(h.typeflag ?? '0', 156, 'latin1');
  if (h.linkname) block.write(h.linkname, 157, 'utf8');
  const format = h.format ?? 'ustar';
  if (format === 'ustar') {
    block.write('ustar\0', 257, 'latin1');
    block.write('00', 263, 'latin1');
    if (h.prefix) block.write(h.prefix, 345, 'utf8');
  } else if (format === 'gnu') {
    block.write('ustar  \0', 257, 'latin1');
  }
  setChecksum(block, h.checksumDelta ?? 0);
  return block;
}

/** (Re)compute a header block's checksum in place; `delta` makes it deliberately wrong. */
export function setChecksum(block: Buffer, delta = 0): Buffer {
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += block[i]!;
  block.write((sum + delta).toString(8).padStart(6, '0') + '\0 ', 148, 'latin1');
  return block;
}

/** Body padded to whole blocks. */
export function padBody(body: Buffer): Buffer {
  const padded = Buffer.alloc(Math.ceil(body.length / 512) * 512);
  body.copy(padded);
  return padded;
}

/** A member: header (size taken from the body) plus its padded body. */
export function rawMember(h: RawHeader, body: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([rawHeader({ size: body.length, ...h }), padBody(body)]);
}

/** A pax extended-header body: "<len> key=value\n" records with exact lengths. */
export function paxBody(records: ReadonlyArray<readonly [string, string]>): Buffer {
  const parts: Buffer[] = [];
  for (const [k, v] of records) {
    const payload = Buffer.from(` ${k}=${v}\n`);
    let len = payload.length + 1;
    while (String(len).length + payload.length !== len) len++;
    parts.push(Buffer.concat([Buffer.from(String(len)), payload]));
  }
  return Buffer.concat(parts);
}

/** A GNU ././@LongLink member carrying a long name ('L') or long link target ('K'). */
export function gnuLongMember(kind: 'L' | 'K', value: string): Buffer {
  const body = Buffer.concat([Buffer.from(value), Buffer.from([0])]);
  return rawMember({ name: '././@LongLink', typeflag: kind, format: 'gnu', mode: 0 }, body);
}

export const END_OF_ARCHIVE = Buffer.alloc(1024);

// ---------------------------------------------------------------------------------------------
// xz

/** A real xz stream with a CRC64 check, like the kernel's, from the xz binary. */
export function xz(input: Buffer, preset = 6): Buffer {
  return execFileSync('xz', ['--format=xz', '--check=crc64', `-${preset}`, '-c', '-T1'], { input, maxBuffer: 1024 ** 3, stdio: ['pipe', 'pipe', 'pipe'] });
}

/** The same through lzma-native's encoder (for machines without the xz binary). */
export async function xzWithLzmaNative(input: Buffer, preset = 6): Promise<Buffer> {
  const lzma = await import('lzma-native');
  const enc = lzma.createCompressor({ preset, check: lzma.CHECK_CRC64 });
  const chunks: Buffer[] = [];
  const done = (async () => {
    for await (const c of enc) chunks.push(c as Buffer);
  })();
  enc.end(input);
  await done;
  return Buffer.concat(chunks);
}

/** xz-compress a big input without holding an extra copy in a pipe buffer; async. */
export function xzAsync(input: Buffer, preset = 0): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn('xz', ['--format=xz', '--check=crc64', `-${preset}`, '-c', '-T2'], { stdio: ['pipe', 'pipe', 'inherit'] });
    const chunks: Buffer[] = [];
    child.stdout.on('data', (c: Buffer) => chunks.push(c));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(Buffer.concat(chunks)) : reject(new Error(`xz exited ${code}`))));
    child.stdin.end(input);
  });
}

/** Where the single block's check field (CRC64) lies in an xz stream of one block. */
export function xzCheckOffset(stream: Buffer): number {
  const footer = stream.length - 12;
  if (stream.toString('latin1', footer + 10, footer + 12) !== 'YZ') throw new Error('no xz footer');
  const indexStart = footer - (stream.readUInt32LE(footer + 4) + 1) * 4;
  return indexStart - 8; // CRC64 is 8 bytes, right before the index
}

/** A copy with one byte XORed. */
export function flipByte(buf: Buffer, offset: number, mask = 0x55): Buffer {
  const copy = Buffer.from(buf);
  copy[offset] = copy[offset]! ^ mask;
  return copy;
}

// ---------------------------------------------------------------------------------------------
// Snapshots: what "unchanged" means for an entry

export interface FileSnap {
  kind: 'file' | 'dir' | 'symlink';
  ino: number;
  mtimeMs: number;
  sha256?: string;
  target?: string;
}

/** Every path under `dir` with its inode, mtime, and content hash (files) or target (links). */
export async function snapshot(dir: string): Promise<Map<string, FileSnap>> {
  const out = new Map<string, FileSnap>();
  const walk = async (rel: string): Promise<void> => {
    const abs = path.join(dir, rel);
    const st = await lstat(abs);
    if (st.isSymbolicLink()) out.set(rel, { kind: 'symlink', ino: st.ino, mtimeMs: st.mtimeMs, target: await readlink(abs) });
    else if (st.isDirectory()) {
      out.set(rel, { kind: 'dir', ino: st.ino, mtimeMs: st.mtimeMs });
      for (const name of (await readdir(abs)).sort()) await walk(rel === '' ? name : `${rel}/${name}`);
    } else out.set(rel, { kind: 'file', ino: st.ino, mtimeMs: st.mtimeMs, sha256: sha256(await readFile(abs)) });
  };
  await walk('');
  return out;
}

/** Files, dirs and symlinks of a tree, as comparable content: path → 'file:<sha>' | 'dir' | 'link:<target>'. */
export async function treeContent(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const [p, s] of await snapshot(dir)) out.set(p, s.kind === 'file' ? `file:${s.sha256}` : s.kind === 'dir' ? 'dir' : `link:${s.target}`);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Processes

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** The environment for child processes: ours without any KHEADERSD_* setting. */
export function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('KHEADERSD_')) env[k] = v;
  return { ...env, ...extra };
}

/** Run `node <the shipped CLI> ...args` to completion. */
export function runCli(args: readonly string[], opts: { env?: Record<string, string>; timeoutMs?: number } = {}): Promise<RunResult> {
  return runProcess(process.execPath, [CLI, ...args], opts);
}

export function runProcess(file: string, args: readonly string[], opts: { env?: Record<string, string>; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(file, args, { env: cleanEnv(opts.env), timeout: opts.timeoutMs ?? 120_000, maxBuffer: 64 * 1024 ** 2 }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number | string; signal?: NodeJS.Signals }) | null;
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, signal: e?.signal ?? null, stdout, stderr });
    });
  });
}

/** Is this a stack trace (an internal error leaking to the user)? */
export function hasStackTrace(text: string): boolean {
  return /^\s+at .+\(.+:\d+:\d+\)$/m.test(text) || /^\s+at .+:\d+:\d+$/m.test(text);
}
