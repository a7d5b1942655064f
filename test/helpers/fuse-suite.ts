/**
 * The FUSE tests every backend must pass, declared once and run against each backend by its own
 * test file (which keeps only what is specific to that backend).
 *
 *   fixtureMountSuite  the real fixture mounted: layout, stat, every byte against `tar -xJf`,
 *                      find counts, symlinks, EROFS, clang/BCC/bpftrace, a swap under an open fd
 *   mountLifeSuite     kernel swaps of small trees, the mount point's life (create, refuse,
 *                      unmount, remount), a stale mount after kill -9, E_FUSE without /dev/fuse
 *
 * Every test skips on its own with its reason (a skipped describe() would hide its tests from
 * the count). Everything that touches the mount is asynchronous: this process serves it on its
 * own JS thread (see fuse-env.ts).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import { chmod, link, lstat, mkdir, open, readFile, readdir, readlink, rename, rmdir, stat, symlink, truncate, unlink, utimes, writeFile, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { isKheadersError } from '../../src/errors.js';
import type { FsModel } from '../../src/serve/fuse/fs-model.js';
import { IndexFsModel } from '../../src/serve/fuse/index-model.js';
import { isMounted, mountAt, prepareMountpoint } from '../../src/serve/fuse/mountpoint.js';
import type { FuseMount, FuseOpCounts } from '../../src/serve/fuse/types.js';
import type { CacheEntry } from '../../src/store/entry.js';
import { ingest } from '../../src/store/ingest.js';
import {
  BPF_PROGRAM,
  FIXTURE,
  FIXTURE_COUNTS,
  FIXTURE_RELEASE,
  bpfCompile,
  clangResourceInclude,
  clangTaskStructSize,
  extractFixture,
  findCount,
  fixtureSkipReason,
  ingestFixture,
  ingestTree,
  makeTarXz,
  quietLog,
  removeDir,
  run,
  runOk,
  smallTree,
  tempDir,
  toolSkipReason,
} from './fuse-env.js';

/** One way of mounting, as the shared tests see it. */
export interface FuseTestBackend<M extends FuseMount = FuseMount> {
  /** For test names: 'fuse-native', 'kernel (loop reader)'. */
  name: string;
  /** What mountFuse() calls it (child processes mount through mountFuse with this). */
  backend: FuseMount['backend'];
  /** Why this backend cannot mount here, or undefined. */
  skip: string | undefined;
  /** The mount's source in /proc/self/mountinfo (each backend names it itself). */
  mountSource: string;
  mount(mountpoint: string, model: FsModel): Promise<M>;
}

/** What the fixture suite's extra, backend-specific tests may use (set once `before` has run). */
export interface FixtureMountContext<M extends FuseMount> {
  mount: M;
  model: IndexFsModel;
  entry: CacheEntry;
  /** `tar -xJf` of the fixture. */
  extracted: string;
  /** A scratch dir of this suite. */
  work: string;
  /**
   * The requests the shared toolchain tests caused, for the backend's own assertions on them
   * (what reaches a backend depends on how it lets the kernel cache): absent when the test
   * skipped or failed before measuring.
   */
  requests: { clangCold?: FuseOpCounts; clangWarm?: FuseOpCounts; bcc?: FuseOpCounts };
}

/** Requests of each kind between two opCounts() snapshots. */
export function requestsBetween(before: FuseOpCounts, after: FuseOpCounts): FuseOpCounts {
  const out: Record<string, number> = {};
  for (const [op, n] of Object.entries(after)) if (n !== (before[op] ?? 0)) out[op] = n - (before[op] ?? 0);
  return out;
}

/**
 * The requests the kernel sent, from a backend's counts: 'notify' counts messages the server
 * sent (invalidations), and 'lookup-negative' counts LOOKUPs already counted under 'lookup'.
 */
export const totalRequests = (counts: FuseOpCounts): number =>
  Object.entries(counts).reduce((sum, [op, n]) => (op === 'notify' || op === 'lookup-negative' ? sum : sum + n), 0);

const fixtureSkip = await fixtureSkipReason();
const here = path.dirname(fileURLToPath(import.meta.url));
const errno = (code: string) => (err: unknown) => (err as NodeJS.ErrnoException).code === code;
const md5 = (b: Buffer): string => createHash('md5').update(b).digest('hex');
const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The backend's request counts (every backend here counts; a benchmark-only one may not). */
export function opCounts(m: FuseMount): FuseOpCounts {
  const counts = m.opCounts?.();
  assert.ok(counts, `the ${m.backend} backend counts its requests`);
  return counts;
}

async function readVia(fh: FileHandle, n: number): Promise<Buffer> {
  const b = Buffer.alloc(n);
  const { bytesRead } = await fh.read(b, 0, n, 0);
  return b.subarray(0, bytesRead);
}

/**
 * Poll `read` until it gives `want`: a swap reaches the kernel as invalidations, which a backend
 * may write from another thread a moment later. Fails (with the last value) after 5 s.
 */
export async function waitFor<T>(read: () => Promise<T>, want: T, what: string): Promise<void> {
  let got: T | undefined;
  for (let i = 0; i < 250; i++) {
    got = await read();
    if (got === want) return;
    await delay(20);
  }
  assert.equal(got, want, what);
}

// ---- the fixture, ingested and extracted once per file ------------------------------------------

export interface Fixture {
  /** The cache the fixture was ingested into (tests may ingest more there). */
  cache: string;
  entry: CacheEntry;
  extracted: string;
}
let fixture: Promise<Fixture> | undefined;

/** The fixture ingested through the real ingest and extracted with tar, shared by a file's suites. */
export function fixtureOnce(): Promise<Fixture> {
  fixture ??= (async () => {
    const cache = await tempDir('suite-cache');
    const entry = await ingestFixture(cache);
    const extracted = await extractFixture();
    return { cache, entry, extracted };
  })();
  return fixture;
}

after(async () => {
  if (!fixture) return;
  const f = await fixture.catch(() => undefined);
  for (const d of [f?.cache, f?.extracted]) if (d) await removeDir(d);
});

// ---- the real fixture through the mount ---------------------------------------------------------

export function fixtureMountSuite<M extends FuseMount>(backend: FuseTestBackend<M>, extra?: (ctx: () => FixtureMountContext<M>, skip: string | undefined) => void,
): void {
  describe(`${backend.name}: the real fixture through the mount`, () => {
    const skip = backend.skip ?? fixtureSkip;
    let ctx: FixtureMountContext<M> | undefined;
    let cur = '';
    const c = (): FixtureMountContext<M> => {
      assert.ok(ctx, 'the suite mounted the fixture');
      return ctx;
    };

    before(async () => {
      if (skip) return;
      const { entry, extracted } = await fixtureOnce();
      const work = await tempDir('suite-work');
      const model = new IndexFsModel({ log: quietLog() });
      model.setEntries([entry], entry.manifest.id);
      const mount = await backend.mount(path.join(work, 'mnt'), model);
      ctx = { mount, model, entry, extracted, work, requests: {} };
      cur = path.join(mount.mountpoint, 'current');
    });
    after(async () => {
      if (!ctx) return;
      await ctx.mount.unmount();
      await ctx.model.close();
      assert.equal(await isMounted(ctx.mount.mountpoint), false, 'nothing left mounted');
      await removeDir(ctx.work);
    });

    test('layout: current -> release -> by-digest/<digest>, mounted read-only under the backend\'s source name', { skip }, async () => {
      const { mount, entry } = c();
      assert.deepEqual((await readdir(mount.mountpoint)).sort(), [FIXTURE_RELEASE, 'by-digest', 'current']);
      assert.equal(await readlink(cur), FIXTURE_RELEASE);
      assert.deepEqual(await readdir(path.join(mount.mountpoint, 'by-digest')), [entry.manifest.digest]);
      // The release is a link to its tree under by-digest/: per-build paths (see index-model.ts).
      assert.equal(await readlink(path.join(mount.mountpoint, FIXTURE_RELEASE)), `by-digest/${entry.manifest.digest}`);
      const m = await mountAt(mount.mountpoint);
      assert.equal(m?.source, backend.mountSource);
      assert.ok(m?.options.includes('ro'), `mounted read-only: ${m?.options.join(',')}`);
    });

    test('stat: read-only root-owned modes, the archive\'s sizes and mtimes, st_ino is the model inode', { skip }, async () => {
      const { model, entry, extracted } = c();
      const rel = 'include/linux/sched.h';
      const [a, b] = await Promise.all([stat(path.join(extracted, rel)), stat(path.join(cur, rel))]);
      assert.equal(b.mode, fsc.S_IFREG | 0o444);
      assert.equal(b.uid, 0);
      assert.equal(b.gid, 0);
      assert.equal(b.size, a.size);
      assert.equal(Math.floor(b.mtimeMs / 1000), Math.floor(a.mtimeMs / 1000));
      assert.equal(b.ino, model.resolvePath(`/by-digest/${entry.manifest.digest}/${rel}`)?.ino, 'st_ino is the model inode');
      assert.equal((await stat(path.join(cur, 'include'))).mode, fsc.S_IFDIR | 0o555);
      assert.equal((await lstat(path.join(cur, 'include/dt-bindings/input/linux-event-codes.h'))).mode, fsc.S_IFLNK | 0o777);
      assert.equal((await lstat(cur)).mode & fsc.S_IFMT, fsc.S_IFLNK);
    });

    test('every file is byte-identical to tar -xJf (diff -r), every dir and symlink is there', { skip }, async () => {
      const { extracted } = c();
      const want = await walk(extracted);
      const got = await walk(cur);
      assert.equal(got.size, want.size);
      assert.deepEqual([...got.entries()].sort(), [...want.entries()].sort());
      // Contents compared by a child (diff reads with its own blocking I/O). The trailing slash
      // makes diff enter current/ (a symlink) instead of comparing it as a link.
      const r = await run('diff', ['-r', '--no-dereference', `${extracted}/`, `${cur}/`]);
      assert.equal(r.code, 0, `diff found differences:\n${r.stdout.slice(0, 3000)}${r.stderr.slice(0, 1000)}`);
    });

    test('files read from this process (async fs) match too', { skip }, async () => {
      const { extracted } = c();
      const list = (await runOk('sh', ['-c', 'cd "$1" && find . -type f | sort', 'sh', extracted])).stdout.trim().split('\n');
      assert.equal(list.length, FIXTURE_COUNTS.files);
      // Every 7th file, one at a time. Not concurrently: each read of the mount holds a libuv
      // threadpool thread until the FUSE read it causes is answered, and answering it needs a
      // threadpool thread to pread the pack; four reads in flight (UV_THREADPOOL_SIZE) deadlock
      // this process with itself.
      for (const rel of list.filter((_, i) => i % 7 === 0)) {
        const a = await readFile(path.join(extracted, rel));
        const b = await readFile(path.join(cur, rel));
        assert.ok(a.equals(b), rel);
      }
    });

    test('find counts match the archive', { skip }, async () => {
      const { extracted } = c();
      const listing = (await runOk('tar', ['-tvJf', FIXTURE])).stdout.trim().split('\n');
      const archive = { f: 0, d: 0, l: 0 };
      for (const line of listing) {
        const type = line[0] === '-' ? 'f' : line[0] === 'd' ? 'd' : line[0] === 'l' ? 'l' : undefined;
        if (type) archive[type]++;
      }
      assert.deepEqual(archive, { f: FIXTURE_COUNTS.files, d: FIXTURE_COUNTS.dirs, l: FIXTURE_COUNTS.symlinks });
      for (const type of ['f', 'd', 'l'] as const) {
        const [viaMount, viaTar] = await Promise.all([findCount(cur, type), findCount(extracted, type)]);
        // find -mindepth 1 does not count the root, which the archive lists as './'.
        assert.equal(viaMount, archive[type] - (type === 'd' ? 1 : 0), `find -type ${type} on the mount`);
        assert.equal(viaMount, viaTar, `find -type ${type}: mount vs tar -xJf`);
      }
    });

    test('readlink of the three symlinks matches the archive, and they resolve', { skip }, async () => {
      const { extracted } = c();
      const links = (await runOk('sh', ['-c', 'cd "$1" && find . -type l | sort', 'sh', extracted])).stdout.trim().split('\n');
      assert.equal(links.length, FIXTURE_COUNTS.symlinks);
      for (const rel of links) {
        assert.equal(await readlink(path.join(cur, rel)), await readlink(path.join(extracted, rel)), rel);
        // And they resolve inside the tree: reading through them gives the target's bytes.
        assert.ok((await readFile(path.join(cur, rel))).equals(await readFile(path.join(extracted, rel))), rel);
      }
    });

    test('every kind of write fails with EROFS, and nothing changes', { skip }, async () => {
      const { mount, extracted } = c();
      const file = path.join(cur, 'include/linux/sched.h');
      const dir = path.join(cur, 'include/linux');
      const attempts: Array<[string, () => Promise<unknown>]> = [
        ['write', () => writeFile(file, 'x')],
        ['create', () => writeFile(path.join(dir, 'new.h'), 'x')],
        ['root create', () => writeFile(path.join(mount.mountpoint, 'x'), 'x')],
        ['open O_WRONLY', () => open(file, fsc.O_WRONLY).then((h) => h.close())],
        ['open O_RDWR', () => open(file, 'r+').then((h) => h.close())],
        ['open O_APPEND', () => open(file, 'a').then((h) => h.close())],
        ['truncate', () => truncate(file, 0)],
        ['unlink', () => unlink(file)],
        ['rename', () => rename(file, `${file}.x`)],
        ['mkdir', () => mkdir(path.join(dir, 'd'))],
        ['rmdir', () => rmdir(path.join(cur, 'include/uapi'))],
        ['chmod', () => chmod(file, 0o644)],
        ['utimens', () => utimes(file, new Date(), new Date())],
        ['symlink', () => symlink('sched.h', path.join(dir, 'l.h'))],
        ['link', () => link(file, path.join(dir, 'h.h'))],
      ];
      for (const [what, attempt] of attempts) await assert.rejects(attempt(), errno('EROFS'), what);
      const chown = await run('chown', ['1:1', file]);
      assert.match(chown.stderr, /Read-only file system/, 'chown');
      const mknod = await run('mknod', [path.join(dir, 'p'), 'p']);
      assert.match(mknod.stderr, /Read-only file system/, 'mknod');
      assert.ok((await readFile(file)).equals(await readFile(path.join(extracted, 'include/linux/sched.h'))), 'nothing changed');
    });

    test('setxattr fails with EROFS', { skip }, async (t) => {
      const noSetfattr = await toolSkipReason('setfattr');
      if (noSetfattr) return t.skip(noSetfattr);
      const x = await run('setfattr', ['-n', 'user.k', '-v', '1', path.join(cur, 'include/linux/sched.h')]);
      assert.match(x.stderr, /Read-only file system/, 'setxattr');
    });

    test('clang compiles a BPF program (sched.h, bpf.h, net/sock.h) against DIR/current with BCC flags, same object as tar -xJf\'s', { skip }, async (t) => {
      const noClang = await toolSkipReason('clang');
      if (noClang) return t.skip(noClang);
      const { mount, extracted, work } = c();
      const resource = await clangResourceInclude();
      const size = await clangTaskStructSize(extracted, resource, work);
      assert.equal(await clangTaskStructSize(cur, resource, work), size, 'sizeof(struct task_struct) via the mount');
      const src = path.join(work, 'prog.c');
      await writeFile(src, BPF_PROGRAM);
      const before = opCounts(mount);
      await bpfCompile(cur, resource, src, path.join(work, 'mount.o'), size);
      const cold = requestsBetween(before, opCounts(mount));
      await bpfCompile(extracted, resource, src, path.join(work, 'plain.o'), size);
      const [a, b] = await Promise.all([readFile(path.join(work, 'mount.o')), readFile(path.join(work, 'plain.o'))]);
      assert.ok(a.length > 0);
      assert.ok(a.equals(b), 'the BPF object built from the mount equals the one built from tar -xJf');
      assert.match((await run('file', [path.join(work, 'mount.o')])).stdout, /eBPF/);
      // A second compile, warm: what it costs the backend is the backend's own test.
      const warmBefore = opCounts(mount);
      await bpfCompile(cur, resource, src, path.join(work, 'mount2.o'), size);
      const warm = requestsBetween(warmBefore, opCounts(mount));
      assert.ok((await readFile(path.join(work, 'mount2.o'))).equals(b), 'the warm compile builds the same object');
      c().requests.clangCold = cold;
      c().requests.clangWarm = warm;
      t.diagnostic(`sizeof(struct task_struct) = ${size}; FUSE requests: cold ${JSON.stringify(cold)}, warm ${JSON.stringify(warm)}`);
    });

    test('BCC (python3 + bcc) compiles and loads a tracepoint program with BCC_KERNEL_SOURCE=DIR/current', { skip }, async (t) => {
      const probe = await run('/usr/bin/python3', ['-c', 'import bcc']);
      if (probe.code !== 0) return t.skip(`python3-bpfcc is not importable: ${probe.stderr.trim().split('\n').pop()}`);
      const noClang = await toolSkipReason('clang');
      if (noClang) return t.skip(noClang);
      const { mount, extracted, work } = c();
      const size = await clangTaskStructSize(extracted, await clangResourceInclude(), work);
      // A raw tracepoint needs no tracefs (this kernel has no kprobes and no tracefs mounted); the
      // _Static_assert proves BCC compiled against these headers (BTF's task_struct differs).
      const script = `
import sys
from bcc import BPF
prog = r'''
#include <linux/sched.h>
_Static_assert(sizeof(struct task_struct) == ${size}, "task_struct from the mounted headers");
RAW_TRACEPOINT_PROBE(sched_switch)
{
    struct task_struct *next = (struct task_struct *)ctx->args[2];
    u32 pid = 0;
    bpf_probe_read_kernel(&pid, sizeof(pid), &next->pid);
    return 0;
}
'''
b = BPF(text=prog)
print("attached:", ",".join(k.decode() for k in b.raw_tracepoint_fds.keys()))
b.cleanup()
`;
      const before = opCounts(mount);
      const r = await run('/usr/bin/python3', ['-c', script], { env: { ...process.env, BCC_KERNEL_SOURCE: cur }, timeoutMs: 240_000 });
      if (r.code !== 0 && /Operation not permitted|CAP_BPF|EPERM/.test(r.stderr)) return t.skip(`BPF programs cannot be loaded here: ${r.stderr.trim().split('\n').pop()}`);
      assert.equal(r.code, 0, r.stderr.slice(-3000));
      assert.match(r.stdout, /attached: sched_switch/);
      const requests = requestsBetween(before, opCounts(mount));
      c().requests.bcc = requests;
      t.diagnostic(`BCC loaded against ${FIXTURE_RELEASE} headers on a ${(await run('uname', ['-r'])).stdout.trim()} kernel; FUSE requests ${JSON.stringify(requests)}`);
    });

    test('bpftrace --emit-elf parses the headers from BPFTRACE_KERNEL_SOURCE=DIR/current (and fails without them)', { skip }, async (t) => {
      const missing = await toolSkipReason('bpftrace');
      if (missing) return t.skip(missing);
      const { work } = c();
      const script = path.join(work, 'p.bt');
      await writeFile(script, '#include <linux/sched.h>\nkprobe:vfs_read { printf("%d %s\\n", ((struct task_struct *)curtask)->tgid, ((struct task_struct *)curtask)->comm); exit(); }\n');
      const elf = path.join(work, 'p.elf');
      // --emit-elf: a dry run that parses the headers and generates the program, without loading it.
      await runOk('bpftrace', ['--emit-elf', elf, script], { env: { ...process.env, BPFTRACE_KERNEL_SOURCE: cur }, timeoutMs: 240_000 });
      assert.ok((await stat(elf)).size > 0);
      // And it really read them from there: a tree without them fails.
      const without = await run('bpftrace', ['--emit-elf', `${elf}.2`, script], { env: { ...process.env, BPFTRACE_KERNEL_SOURCE: path.join(work, 'nonexistent') }, timeoutMs: 240_000 });
      assert.notEqual(without.code, 0, 'bpftrace without the headers fails');
    });

    test('bpftrace with BPFTRACE_KERNEL_SOURCE=DIR/current prints the headers\' sizeof(struct task_struct)', { skip }, async (t) => {
      const missing = (await toolSkipReason('bpftrace')) ?? (await toolSkipReason('clang'));
      if (missing) return t.skip(missing);
      const { work } = c();
      const size = await clangTaskStructSize(cur, await clangResourceInclude(), work);
      const prog = '#include <linux/sched.h>\nBEGIN { printf("%d\\n", sizeof(struct task_struct)); exit(); }';
      const r = await run('bpftrace', ['-e', prog], { env: { ...process.env, BPFTRACE_KERNEL_SOURCE: cur }, timeoutMs: 240_000 });
      if (r.code !== 0 && /Operation not permitted|EPERM/.test(r.stderr)) return t.skip(`bpftrace cannot load programs here: ${r.stderr.trim().split('\n').pop()}`);
      assert.equal(r.code, 0, r.stderr.slice(-3000));
      const printed = r.stdout.split('\n').map((l) => l.trim()).filter((l) => /^\d+$/.test(l));
      assert.deepEqual(printed, [String(size)], r.stdout);
      // Without the include bpftrace takes the running kernel's BTF; a different number shows the
      // one above really came from the mounted headers.
      const btf = await run('bpftrace', ['-e', 'BEGIN { printf("%d\\n", sizeof(struct task_struct)); exit(); }'], { timeoutMs: 120_000 });
      const btfSize = btf.stdout.split('\n').find((l) => /^\d+$/.test(l.trim()))?.trim();
      t.diagnostic(`headers: ${size}; running kernel's BTF: ${btfSize ?? 'n/a'}`);
    });

    test('a kernel swap re-points current; an fd opened before it reads the old header to the end', { skip }, async (t) => {
      const { entry, extracted, work } = c();
      const mtime = new Date('2024-01-01T00:00:00Z');
      const archive = await makeTarXz(
        [
          { name: './', type: 'directory', mtime },
          { name: './include/', type: 'directory', mtime },
          { name: './include/linux/', type: 'directory', mtime },
          { name: './include/linux/sched.h', content: '/* the swapped-in kernel */\n#define SWAPPED 1\n', mtime },
          { name: './include/generated/', type: 'directory', mtime },
          { name: './include/generated/utsrelease.h', content: '#define UTS_RELEASE "6.2.0-swap"\n', mtime },
        ],
        path.join(work, 'swap.tar.xz'),
      );
      const { cache } = await fixtureOnce();
      const { entry: next } = await ingest({ cacheDir: cache, archive, release: '6.2.0-swap', setCurrent: false, keep: 100, log: quietLog() });
      // Its own mount: this test changes what the model serves.
      const model = new IndexFsModel({ log: quietLog() });
      model.setEntries([entry], entry.manifest.id);
      const m = await backend.mount(path.join(work, 'mnt-swap'), model);
      t.after(async () => {
        await m.unmount();
        await model.close();
      });
      const dir = m.mountpoint;
      const rel = 'include/linux/sched.h';
      const oldBytes = await readFile(path.join(extracted, rel));
      assert.equal(await readlink(path.join(dir, 'current')), FIXTURE_RELEASE);

      const fh = await open(path.join(dir, 'current', rel), 'r');
      try {
        const head = Buffer.alloc(100);
        await fh.read(head, 0, 100, 0);
        assert.ok(head.equals(oldBytes.subarray(0, 100)));

        model.setEntries([entry, next], next.manifest.id);
        await waitFor(() => readlink(path.join(dir, 'current')), '6.2.0-swap', 'current follows the swap');
        assert.deepEqual((await readdir(dir)).sort(), [FIXTURE_RELEASE, '6.2.0-swap', 'by-digest', 'current']);
        assert.equal(await readFile(path.join(dir, 'current', rel), 'utf8'), '/* the swapped-in kernel */\n#define SWAPPED 1\n');

        // The descriptor opened before the swap still reads the old kernel's header, to the end.
        const rest = Buffer.alloc(oldBytes.length);
        const { bytesRead } = await fh.read(rest, 0, rest.length, 0);
        assert.equal(bytesRead, oldBytes.length);
        assert.ok(rest.equals(oldBytes));
        // And the old release is still reachable by name.
        assert.ok((await readFile(path.join(dir, FIXTURE_RELEASE, rel))).equals(oldBytes));
      } finally {
        await fh.close();
      }
    });

    // The backend's own tests on this mount, skipped for the same reason as the ones above.
    extra?.(c, skip);
  });
}

/** Every path under `dir`, relative, with its kind: the tree as lstat sees it (one readdir at a time). */
async function walk(dir: string, rel = ''): Promise<Map<string, 'file' | 'dir' | 'symlink'>> {
  const out = new Map<string, 'file' | 'dir' | 'symlink'>();
  for (const d of await readdir(path.join(dir, rel), { withFileTypes: true })) {
    const p = rel === '' ? d.name : `${rel}/${d.name}`;
    if (d.isDirectory()) {
      out.set(p, 'dir');
      for (const [k, v] of await walk(dir, p)) out.set(k, v);
    } else if (d.isSymbolicLink()) out.set(p, 'symlink');
    else out.set(p, 'file');
  }
  return out;
}

// ---- swaps of small trees and the mount point's life --------------------------------------------

/**
 * A child process's module that mounts an empty model with `mountFuse(backend)` from this
 * checkout: with `hold`, it says 'mounted' and waits to be killed; without, it prints what the
 * mount gave (`{mounted}` or the error's code, message, details) as JSON.
 */
async function writeMountChild(work: string, name: string, hold: boolean): Promise<string> {
  const script = path.join(work, name);
  const importOf = (rel: string): string => JSON.stringify(path.join(here, rel));
  await writeFile(
    script,
    `import { IndexFsModel } from ${importOf('../../src/serve/fuse/index-model.js')};
import { mountFuse } from ${importOf('../../src/serve/fuse/index.js')};
import { createLogger } from ${importOf('../../src/log.js')};
const [mountpoint, backend] = process.argv.slice(2);
const model = new IndexFsModel();
model.setEntries([], null);
${
  hold
    ? `await mountFuse({ mountpoint, backend, model, log: createLogger('silent') });
process.stdout.write('mounted\\n');
setInterval(() => {}, 60000);`
    : `try {
  const m = await mountFuse({ mountpoint, backend, model, log: createLogger('silent') });
  await m.unmount();
  console.log(JSON.stringify({ mounted: true }));
} catch (e) {
  console.log(JSON.stringify({ code: e.code, message: e.message, details: e.details }));
}`
}
`,
  );
  return script;
}

export interface NamespaceMountResult {
  mounted?: boolean;
  code?: string;
  message?: string;
  details?: Record<string, unknown>;
}

/**
 * Try to mount with `backend` in a child inside a private mount namespace, after `setup` (shell)
 * has changed what that namespace sees. Mounts made there vanish with it: nothing leaks.
 */
export async function mountInNamespace(work: string, backend: FuseMount['backend'], setup: string): Promise<NamespaceMountResult> {
  const script = await writeMountChild(work, 'try-mount.mjs', false);
  const r = await run('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `${setup} && exec "$0" "$1" "$2" "$3"`, process.execPath, script, path.join(work, 'ns-mnt'), backend]);
  if (r.code !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as NamespaceMountResult;
}

export function mountLifeSuite<M extends FuseMount>(backend: FuseTestBackend<M>): void {
  describe(`${backend.name}: kernel swaps`, () => {
    const skip = backend.skip;
    let cache: string | undefined;
    let work: string | undefined;
    let model: IndexFsModel | undefined;
    let mount: M | undefined;
    let A: CacheEntry; // 1.0.0
    let A2: CacheEntry; // 1.0.0 rebuilt: other bytes, same sizes, same archived mtimes
    let B: CacheEntry; // 2.0.0

    before(async () => {
      if (skip) return;
      cache = await tempDir('swap-cache');
      work = await tempDir('swap-work');
      const mtime = new Date('2024-01-01T00:00:00Z');
      A = await ingestTree(cache, work, smallTree('1.0.0', 'one', mtime), '1.0.0');
      A2 = await ingestTree(cache, work, smallTree('1.0.0', 'two', mtime), '1.0.0');
      B = await ingestTree(cache, work, smallTree('2.0.0', 'bee', mtime), '2.0.0');
      model = new IndexFsModel({ log: quietLog() });
      model.setEntries([A], A.manifest.id);
      mount = await backend.mount(path.join(work, 'mnt'), model);
    });
    after(async () => {
      await mount?.unmount();
      await model?.close();
      for (const d of [cache, work]) if (d) await removeDir(d);
    });

    // Reads go through child processes too: that is how compilers see the mount.
    const catVia = async (p: string): Promise<string> => (await runOk('cat', [p])).stdout;
    const md5Via = async (p: string): Promise<string> => (await runOk('md5sum', [p])).stdout.split(' ')[0]!;

    test('two releases: current follows, both trees stay listed', { skip }, async () => {
      const mnt = mount!.mountpoint;
      assert.match(await catVia(path.join(mnt, 'current/include/linux/a.h')), /"one"/);
      model!.setEntries([A, B], B.manifest.id);
      await waitFor(() => readlink(path.join(mnt, 'current')), '2.0.0', 'current follows to 2.0.0');
      assert.match(await catVia(path.join(mnt, 'current/include/linux/a.h')), /"bee"/);
      assert.match(await catVia(path.join(mnt, '1.0.0/include/linux/a.h')), /"one"/);
      assert.deepEqual((await readdir(mnt)).sort(), ['1.0.0', '2.0.0', 'by-digest', 'current']);
      model!.setEntries([A, B], A.manifest.id);
      await waitFor(() => readlink(path.join(mnt, 'current')), '1.0.0', 'current follows back to 1.0.0');
      assert.match(await catVia(path.join(mnt, 'current/include/linux/a.h')), /"one"/);
    });

    test('same release, other content: new opens see the new build, an open fd keeps the old bytes', { skip }, async () => {
      const mnt = mount!.mountpoint;
      const small = path.join(mnt, 'current/include/linux/a.h');
      const big = path.join(mnt, 'current/include/linux/big.bin');
      const bigOne = md5(Buffer.from(smallTree('1.0.0', 'one').find((f) => f.name.endsWith('big.bin'))!.content as Buffer));
      const bigTwo = md5(Buffer.from(smallTree('1.0.0', 'two').find((f) => f.name.endsWith('big.bin'))!.content as Buffer));
      assert.notEqual(bigOne, bigTwo);
      // current names the same release throughout; the release's link names the build.
      const buildOf = () => readlink(path.join(mnt, '1.0.0'));

      // Cached in the kernel (page cache, attributes) before the swap, and held open across it.
      assert.match(await catVia(small), /"one"/);
      assert.equal(await md5Via(big), bigOne);
      const oldSmall = await open(small);
      const oldBig = await open(big);
      try {
        assert.match((await readVia(oldSmall, 4096)).toString(), /"one"/);

        model!.setEntries([A, B, A2], A2.manifest.id);
        await waitFor(buildOf, `by-digest/${A2.manifest.digest}`, '1.0.0 names the new build');

        // The descriptor opened before the swap reads the old tree (its reads reach the old inode).
        assert.match((await readVia(oldSmall, 4096)).toString(), /"one"/);
        assert.equal(md5(await readVia(oldBig, 400 * 1024)), bigOne);
        // New opens read the new build, although sizes and archived mtimes are identical and the
        // old files are still open (their dentries pinned in the kernel).
        assert.match(await catVia(small), /"two"/);
        assert.equal(await md5Via(big), bigTwo);
        assert.match((await readFile(small)).toString(), /"two"/);
      } finally {
        await oldSmall.close();
        await oldBig.close();
      }

      // And back, with nothing held open.
      model!.setEntries([A, B, A2], A.manifest.id);
      await waitFor(buildOf, `by-digest/${A.manifest.digest}`, '1.0.0 names the first build again');
      assert.match(await catVia(small), /"one"/);
      assert.equal(await md5Via(big), bigOne);
      assert.equal(await md5Via(path.join(mnt, `by-digest/${A2.manifest.digest}/include/linux/big.bin`)), bigTwo);
    });
  });

  describe(`${backend.name}: mount point life`, () => {
    const skip = backend.skip;
    let work: string | undefined;

    before(async () => {
      if (!skip) work = await tempDir('life');
    });
    after(async () => {
      if (!work) return;
      // Whatever a failed test left: never leave a mount behind.
      for (const name of await readdir(work).catch(() => [] as string[])) {
        const p = path.join(work, name);
        if (await isMounted(p)) await run('umount', ['-l', p]);
      }
      await removeDir(work);
    });

    test('creates a missing mount point, refuses a live or non-empty one, unmount is idempotent, the directory mounts again', { skip }, async () => {
      const model = new IndexFsModel({ log: quietLog() });
      model.setEntries([], null);
      const mnt = path.join(work!, 'deep/er/mnt');
      try {
        const m = await backend.mount(mnt, model);
        try {
          assert.equal(m.backend, backend.backend);
          assert.ok(await isMounted(mnt));
          assert.deepEqual(await readdir(mnt), ['by-digest']);
          await assert.rejects(prepareMountpoint(mnt, quietLog()), (err) => isKheadersError(err, 'E_FUSE') && /already a live FUSE mount/.test(err.message));
        } finally {
          await m.unmount();
          await m.unmount();
        }
        assert.equal(await isMounted(mnt), false);
        const again = await backend.mount(mnt, model);
        try {
          assert.deepEqual(await readdir(mnt), ['by-digest']);
        } finally {
          await again.unmount();
        }
        assert.equal(await isMounted(mnt), false);
      } finally {
        await model.close();
      }
      const full = path.join(work!, 'full');
      await mkdir(full);
      await writeFile(path.join(full, 'x'), '');
      await assert.rejects(prepareMountpoint(full, quietLog()), (err) => isKheadersError(err, 'E_FUSE') && /not empty/.test(err.message));
    });

    test('a mount left by kill -9 (ENOTCONN) is detected and cleared, then mounted again', { skip }, async () => {
      const mnt = path.join(work!, 'stale');
      const script = await writeMountChild(work!, 'serve.mjs', true);
      const child = spawn(process.execPath, [script, mnt, backend.backend], { stdio: ['ignore', 'pipe', 'inherit'] });
      try {
        await new Promise<void>((resolve, reject) => {
          child.stdout.on('data', (b: Buffer) => b.toString().includes('mounted') && resolve());
          child.on('exit', (code) => reject(new Error(`the mounting child exited ${code}`)));
        });
        assert.ok(await isMounted(mnt));
      } finally {
        child.kill('SIGKILL');
        await new Promise((r) => child.once('exit', r).once('error', r));
      }
      await assert.rejects(stat(mnt), errno('ENOTCONN'), 'the server is gone: the mount is stale');
      assert.ok(await isMounted(mnt));

      const model = new IndexFsModel({ log: quietLog() });
      model.setEntries([], null);
      const m = await backend.mount(mnt, model);
      try {
        assert.deepEqual(await readdir(mnt), ['by-digest']);
        const mounts = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter((l) => l.split(' ')[4] === mnt);
        assert.equal(mounts.length, 1, 'the stale mount was detached, not mounted over');
      } finally {
        await m.unmount();
        await model.close();
      }
      assert.equal(await isMounted(mnt), false);
    });

    test('E_FUSE names the cause when /dev/fuse is missing (in a private mount namespace)', { skip }, async (t) => {
      const noUnshare = await toolSkipReason('unshare');
      if (noUnshare) return t.skip(noUnshare);
      const noDevice = await mountInNamespace(work!, backend.backend, 'mount -t tmpfs tmpfs /dev && mknod -m 666 /dev/null c 1 3 && mknod -m 666 /dev/urandom c 1 9');
      assert.equal(noDevice.code, 'E_FUSE', JSON.stringify(noDevice));
      assert.match(noDevice.message ?? '', /no \/dev\/fuse/);
    });
  });
}
