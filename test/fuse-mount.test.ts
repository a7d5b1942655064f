/**
 * Real mounts with the fuse-native backend: the fixture read back byte for byte, counted,
 * compiled against by clang, BCC and bpftrace; kernel swaps; the mount point's life (stale
 * mounts after kill -9). Skipped, with the reason, where /dev/fuse, the fixture or a tool is
 * missing.
 *
 * Everything that touches the mount is asynchronous (fs.promises, child processes): this
 * process serves the mount on its JS thread, so a synchronous call on the mount deadlocks.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmod, link, mkdir, open, readFile, readdir, readlink, rename, rmdir, stat, symlink, truncate, unlink, utimes, writeFile, lstat } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { isKheadersError } from '../src/errors.js';
import { IndexFsModel } from '../src/serve/fuse/index-model.js';
import { mountFuse } from '../src/serve/fuse/index.js';
import { isMounted, mountAt, prepareMountpoint } from '../src/serve/fuse/mountpoint.js';
import type { FuseMount } from '../src/serve/fuse/types.js';
import type { CacheEntry } from '../src/store/entry.js';
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
  fuseSkipReason,
  ingestFixture,
  ingestTree,
  quietLog,
  removeDir,
  run,
  runOk,
  smallTree,
  tempDir,
  toolSkipReason,
} from './helpers/fuse-env.js';

const errno = (code: string) => (err: unknown) => (err as NodeJS.ErrnoException).code === code;
const md5 = (b: Buffer): string => createHash('md5').update(b).digest('hex');
const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function readVia(fh: Awaited<ReturnType<typeof open>>, n: number): Promise<Buffer> {
  const b = Buffer.alloc(n);
  const { bytesRead } = await fh.read(b, 0, n, 0);
  return b.subarray(0, bytesRead);
}

describe('fuse-native: the real fixture through the mount', () => {
  let skip: string | undefined;
  let cache: string | undefined;
  let work: string | undefined;
  let extracted: string | undefined;
  let model: IndexFsModel | undefined;
  let mount: FuseMount | undefined;
  let entry: CacheEntry | undefined;
  let cur = '';

  before(async () => {
    skip = (await fuseSkipReason()) ?? (await fixtureSkipReason());
    if (skip) return;
    cache = await tempDir('mount-cache');
    work = await tempDir('mount-work');
    entry = await ingestFixture(cache);
    extracted = await extractFixture();
    model = new IndexFsModel({ log: quietLog() });
    model.setEntries([entry], entry.manifest.id);
    mount = await mountFuse({ mountpoint: path.join(work, 'mnt'), model, log: quietLog(), backend: 'native' });
    cur = path.join(mount.mountpoint, 'current');
  });
  after(async () => {
    await mount?.unmount();
    await model?.close();
    for (const d of [cache, work, extracted]) if (d) await removeDir(d);
  });

  test('layout: current -> release, by-digest, attributes read-only and root-owned', async (t) => {
    if (skip) return t.skip(skip);
    assert.equal(await readlink(cur), FIXTURE_RELEASE);
    assert.deepEqual((await readdir(mount!.mountpoint)).sort(), [FIXTURE_RELEASE, 'by-digest', 'current']);
    assert.deepEqual(await readdir(path.join(mount!.mountpoint, 'by-digest')), [entry!.manifest.digest]);
    const f = await stat(path.join(cur, 'include/linux/sched.h'));
    assert.equal(f.mode & 0o7777, 0o444);
    assert.equal(f.uid, 0);
    assert.equal(f.gid, 0);
    assert.equal(f.ino, model!.resolvePath(`/by-digest/${entry!.manifest.digest}/include/linux/sched.h`)!.ino, 'st_ino is the model inode');
    // The release is a link to its tree under by-digest/: per-build paths (see index-model.ts).
    assert.equal(await readlink(path.join(mount!.mountpoint, FIXTURE_RELEASE)), `by-digest/${entry!.manifest.digest}`);
    assert.equal((await stat(path.join(cur, 'include'))).mode & 0o7777, 0o555);
    assert.equal((await lstat(path.join(cur, 'include/dt-bindings/input/linux-event-codes.h'))).mode & 0o7777, 0o777);
    const m = await mountAt(mount!.mountpoint);
    assert.equal(m?.source, 'kheaders');
    assert.ok(m?.options.includes('ro'), `mounted read-only: ${m?.options.join(',')}`);
  });

  test('every file is byte-identical to tar -xJf, symlinks included (diff -r)', async (t) => {
    if (skip) return t.skip(skip);
    // The trailing slash makes diff enter current/ (a symlink) instead of comparing it as a link.
    const r = await run('diff', ['-r', '--no-dereference', `${extracted!}/`, `${cur}/`]);
    assert.equal(r.code, 0, `diff found differences:\n${r.stdout.slice(0, 3000)}${r.stderr.slice(0, 1000)}`);
  });

  test('files read from this process (async fs) match too', async (t) => {
    if (skip) return t.skip(skip);
    const list = (await runOk('sh', ['-c', 'cd "$1" && find . -type f | sort', 'sh', extracted!])).stdout.trim().split('\n');
    assert.equal(list.length, FIXTURE_COUNTS.files);
    // Every 7th file, one at a time. Not concurrently: each read of the mount holds a libuv
    // threadpool thread until the FUSE read it causes is answered, and answering it needs a
    // threadpool thread to pread the pack; four reads in flight (UV_THREADPOOL_SIZE) deadlock
    // this process with itself.
    for (const rel of list.filter((_, i) => i % 7 === 0)) {
      const a = await readFile(path.join(extracted!, rel));
      const b = await readFile(path.join(cur, rel));
      assert.ok(a.equals(b), rel);
    }
  });

  test('find counts match the archive', async (t) => {
    if (skip) return t.skip(skip);
    const listing = (await runOk('tar', ['-tvJf', FIXTURE])).stdout.trim().split('\n');
    const archive = { f: 0, d: 0, l: 0 };
    for (const line of listing) {
      const type = line[0] === '-' ? 'f' : line[0] === 'd' ? 'd' : line[0] === 'l' ? 'l' : undefined;
      if (type) archive[type]++;
    }
    assert.deepEqual(archive, { f: FIXTURE_COUNTS.files, d: FIXTURE_COUNTS.dirs, l: FIXTURE_COUNTS.symlinks });
    for (const type of ['f', 'd', 'l'] as const) {
      const [viaMount, viaTar] = await Promise.all([findCount(cur, type), findCount(extracted!, type)]);
      // find -mindepth 1 does not count the root, which the archive lists as './'.
      assert.equal(viaMount, archive[type] - (type === 'd' ? 1 : 0), `find -type ${type} on the mount`);
      assert.equal(viaMount, viaTar, `find -type ${type}: mount vs tar -xJf`);
    }
  });

  test('readlink of the three symlinks matches the archive', async (t) => {
    if (skip) return t.skip(skip);
    const links = (await runOk('sh', ['-c', 'cd "$1" && find . -type l | sort', 'sh', extracted!])).stdout.trim().split('\n');
    assert.equal(links.length, 3);
    for (const rel of links) {
      assert.equal(await readlink(path.join(cur, rel)), await readlink(path.join(extracted!, rel)), rel);
      // And they resolve inside the tree: reading through them gives the target's bytes.
      assert.ok((await readFile(path.join(cur, rel))).equals(await readFile(path.join(extracted!, rel))), rel);
    }
  });

  test('every write fails with EROFS', async (t) => {
    if (skip) return t.skip(skip);
    const file = path.join(cur, 'include/linux/sched.h');
    const dir = path.join(cur, 'include/linux');
    const rofs = errno('EROFS');
    await assert.rejects(writeFile(path.join(dir, 'new.h'), 'x'), rofs, 'create');
    await assert.rejects(open(file, 'r+'), rofs, 'open for writing');
    await assert.rejects(open(file, 'a'), rofs, 'append');
    await assert.rejects(truncate(file, 0), rofs, 'truncate');
    await assert.rejects(unlink(file), rofs, 'unlink');
    await assert.rejects(rename(file, `${file}.x`), rofs, 'rename');
    await assert.rejects(mkdir(path.join(dir, 'd')), rofs, 'mkdir');
    await assert.rejects(rmdir(path.join(cur, 'include/uapi')), rofs, 'rmdir');
    await assert.rejects(chmod(file, 0o644), rofs, 'chmod');
    await assert.rejects(utimes(file, new Date(), new Date()), rofs, 'utimens');
    await assert.rejects(symlink('sched.h', path.join(dir, 'l.h')), rofs, 'symlink');
    await assert.rejects(link(file, path.join(dir, 'h.h')), rofs, 'link');
    const chown = await run('chown', ['1:1', file]);
    assert.match(chown.stderr, /Read-only file system/, 'chown');
    const mknod = await run('mknod', [path.join(dir, 'p'), 'p']);
    assert.match(mknod.stderr, /Read-only file system/, 'mknod');
    if (!(await toolSkipReason('setfattr'))) {
      const x = await run('setfattr', ['-n', 'user.k', '-v', '1', file]);
      assert.match(x.stderr, /Read-only file system/, 'setxattr');
    }
    // Nothing changed.
    assert.ok((await readFile(file)).equals(await readFile(path.join(extracted!, 'include/linux/sched.h'))));
  });

  test('clang compiles a BPF program (sched.h, bpf.h, net/sock.h) against DIR/current with BCC flags', async (t) => {
    if (skip) return t.skip(skip);
    const noClang = await toolSkipReason('clang');
    if (noClang) return t.skip(noClang);
    const resource = await clangResourceInclude();
    const size = await clangTaskStructSize(extracted!, resource, work!);
    assert.equal(await clangTaskStructSize(cur, resource, work!), size, 'sizeof(struct task_struct) via the mount');
    const src = path.join(work!, 'prog.c');
    await writeFile(src, BPF_PROGRAM);
    const before = mount!.opCounts!();
    await bpfCompile(cur, resource, src, path.join(work!, 'mount.o'), size);
    const opens = (mount!.opCounts!()['open'] ?? 0) - (before['open'] ?? 0);
    await bpfCompile(extracted!, resource, src, path.join(work!, 'plain.o'), size);
    const [a, b] = await Promise.all([readFile(path.join(work!, 'mount.o')), readFile(path.join(work!, 'plain.o'))]);
    assert.ok(a.equals(b), 'the BPF object built from the mount equals the one built from tar -xJf');
    assert.match((await run('file', [path.join(work!, 'mount.o')])).stdout, /eBPF/);
    t.diagnostic(`sizeof(struct task_struct) = ${size}; ${opens} header opens through FUSE`);
    assert.ok(opens > 100, 'the compile read its headers through the mount');
  });

  test('BCC (python3 + bcc) compiles and loads a tracepoint program with BCC_KERNEL_SOURCE=DIR/current', async (t) => {
    if (skip) return t.skip(skip);
    const probe = await run('/usr/bin/python3', ['-c', 'import bcc']);
    if (probe.code !== 0) return t.skip(`python3-bpfcc is not importable: ${probe.stderr.trim().split('\n').pop()}`);
    const noClang = await toolSkipReason('clang');
    if (noClang) return t.skip(noClang);
    const size = await clangTaskStructSize(extracted!, await clangResourceInclude(), work!);
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
    const before = mount!.opCounts!();
    const r = await run('/usr/bin/python3', ['-c', script], { env: { ...process.env, BCC_KERNEL_SOURCE: cur }, timeoutMs: 240_000 });
    if (r.code !== 0 && /Operation not permitted|CAP_BPF|EPERM/.test(r.stderr)) return t.skip(`BPF programs cannot be loaded here: ${r.stderr.trim().split('\n').pop()}`);
    assert.equal(r.code, 0, r.stderr.slice(-3000));
    assert.match(r.stdout, /attached: sched_switch/);
    const opens = (mount!.opCounts!()['open'] ?? 0) - (before['open'] ?? 0);
    assert.ok(opens > 50, `BCC read its headers through the mount (${opens} opens)`);
    t.diagnostic(`BCC loaded against ${FIXTURE_RELEASE} headers on a ${(await run('uname', ['-r'])).stdout.trim()} kernel; ${opens} opens`);
  });

  test('bpftrace with BPFTRACE_KERNEL_SOURCE=DIR/current prints the headers\' sizeof(struct task_struct)', async (t) => {
    if (skip) return t.skip(skip);
    const missing = (await toolSkipReason('bpftrace')) ?? (await toolSkipReason('clang'));
    if (missing) return t.skip(missing);
    const size = await clangTaskStructSize(cur, await clangResourceInclude(), work!);
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
});

describe('fuse-native: kernel swaps', () => {
  let skip: string | undefined;
  let cache: string | undefined;
  let work: string | undefined;
  let model: IndexFsModel | undefined;
  let mount: FuseMount | undefined;
  let A: CacheEntry; // 1.0.0
  let A2: CacheEntry; // 1.0.0 rebuilt: other bytes, same sizes, same archived mtimes
  let B: CacheEntry; // 2.0.0

  before(async () => {
    skip = await fuseSkipReason();
    if (skip) return;
    cache = await tempDir('swap-cache');
    work = await tempDir('swap-work');
    const mtime = new Date('2024-01-01T00:00:00Z');
    A = await ingestTree(cache, work, smallTree('1.0.0', 'one', mtime), '1.0.0');
    A2 = await ingestTree(cache, work, smallTree('1.0.0', 'two', mtime), '1.0.0');
    B = await ingestTree(cache, work, smallTree('2.0.0', 'bee', mtime), '2.0.0');
    model = new IndexFsModel({ log: quietLog() });
    model.setEntries([A], A.manifest.id);
    mount = await mountFuse({ mountpoint: path.join(work, 'mnt'), model, log: quietLog(), backend: 'native' });
  });
  after(async () => {
    await mount?.unmount();
    await model?.close();
    for (const d of [cache, work]) if (d) await removeDir(d);
  });

  // Reads go through child processes too: that is how compilers see the mount.
  const catVia = async (p: string): Promise<string> => (await runOk('cat', [p])).stdout;
  const md5Via = async (p: string): Promise<string> => (await runOk('md5sum', [p])).stdout.split(' ')[0]!;

  test('two releases: current follows, both trees stay listed', async (t) => {
    if (skip) return t.skip(skip);
    const mnt = mount!.mountpoint;
    assert.match(await catVia(path.join(mnt, 'current/include/linux/a.h')), /"one"/);
    model!.setEntries([A, B], B.manifest.id);
    await delay(50);
    assert.equal(await readlink(path.join(mnt, 'current')), '2.0.0');
    assert.match(await catVia(path.join(mnt, 'current/include/linux/a.h')), /"bee"/);
    assert.match(await catVia(path.join(mnt, '1.0.0/include/linux/a.h')), /"one"/);
    assert.deepEqual((await readdir(mnt)).sort(), ['1.0.0', '2.0.0', 'by-digest', 'current']);
    model!.setEntries([A, B], A.manifest.id);
    await delay(50);
    assert.match(await catVia(path.join(mnt, 'current/include/linux/a.h')), /"one"/);
  });

  test('same release, other content: new opens see the new build, an open fd keeps the old bytes', async (t) => {
    if (skip) return t.skip(skip);
    const mnt = mount!.mountpoint;
    const small = path.join(mnt, 'current/include/linux/a.h');
    const big = path.join(mnt, 'current/include/linux/big.bin');
    const bigOne = md5(Buffer.from(smallTree('1.0.0', 'one').find((f) => f.name.endsWith('big.bin'))!.content as Buffer));
    const bigTwo = md5(Buffer.from(smallTree('1.0.0', 'two').find((f) => f.name.endsWith('big.bin'))!.content as Buffer));
    assert.notEqual(bigOne, bigTwo);

    // Cached in the kernel (page cache, attributes) before the swap, and held open across it.
    assert.match(await catVia(small), /"one"/);
    assert.equal(await md5Via(big), bigOne);
    const oldSmall = await open(small);
    const oldBig = await open(big);
    try {
      assert.match((await readVia(oldSmall, 4096)).toString(), /"one"/);

      model!.setEntries([A, B, A2], A2.manifest.id);
      await delay(50);

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
    await delay(50);
    assert.match(await catVia(small), /"one"/);
    assert.equal(await md5Via(big), bigOne);
    assert.equal(await md5Via(path.join(mnt, `by-digest/${A2.manifest.digest}/include/linux/big.bin`)), bigTwo);
  });
});

describe('fuse-native: mount point life', () => {
  let skip: string | undefined;
  let work: string | undefined;

  before(async () => {
    skip = await fuseSkipReason();
    if (!skip) work = await tempDir('life');
  });
  after(async () => {
    if (work) {
      // Whatever a failed test left: never leave a mount behind.
      for (const name of await readdir(work).catch(() => [] as string[])) {
        const p = path.join(work, name);
        if (await isMounted(p)) await run('umount', ['-l', p]);
      }
      await removeDir(work);
    }
  });

  test('creates a missing mount point, refuses a non-empty one, unmount is idempotent', async (t) => {
    if (skip) return t.skip(skip);
    const model = new IndexFsModel({ log: quietLog() });
    model.setEntries([], null);
    const mnt = path.join(work!, 'deep/er/mnt');
    const m = await mountFuse({ mountpoint: mnt, model, log: quietLog(), backend: 'native' });
    try {
      assert.equal(m.backend, 'native');
      assert.ok(await isMounted(mnt));
      assert.deepEqual(await readdir(mnt), ['by-digest']);
      await assert.rejects(prepareMountpoint(mnt, quietLog()), (err) => isKheadersError(err, 'E_FUSE') && /already a live FUSE mount/.test(err.message));
    } finally {
      await m.unmount();
      await m.unmount();
      await model.close();
    }
    assert.equal(await isMounted(mnt), false);
    const full = path.join(work!, 'full');
    await mkdir(full);
    await writeFile(path.join(full, 'x'), '');
    await assert.rejects(prepareMountpoint(full, quietLog()), (err) => isKheadersError(err, 'E_FUSE') && /not empty/.test(err.message));
  });

  test('a mount left by kill -9 (ENOTCONN) is detected and cleared, then mounted again', async (t) => {
    if (skip) return t.skip(skip);
    const mnt = path.join(work!, 'stale');
    const here = path.dirname(fileURLToPath(import.meta.url));
    const script = path.join(work!, 'serve.mjs');
    await writeFile(
      script,
      `import { IndexFsModel } from ${JSON.stringify(path.join(here, '../src/serve/fuse/index-model.js'))};
import { mountNative } from ${JSON.stringify(path.join(here, '../src/serve/fuse/native.js'))};
import { createLogger } from ${JSON.stringify(path.join(here, '../src/log.js'))};
const model = new IndexFsModel();
model.setEntries([], null);
await mountNative({ mountpoint: process.argv[2], model, log: createLogger('silent') });
process.stdout.write('mounted\\n');
setInterval(() => {}, 60000);
`,
    );
    const child = spawn(process.execPath, [script, mnt], { stdio: ['ignore', 'pipe', 'inherit'] });
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
    const m = await mountFuse({ mountpoint: mnt, model, log: quietLog(), backend: 'native' });
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

  test('E_FUSE names the cause: no /dev/fuse, no libfuse.so.2 (in a private mount namespace)', async (t) => {
    if (skip) return t.skip(skip);
    const noUnshare = await toolSkipReason('unshare');
    if (noUnshare) return t.skip(noUnshare);
    const lib = (await run('sh', ['-c', "ldconfig -p | awk '/libfuse.so.2 /{print $NF; exit}'"])).stdout.trim();
    const here = path.dirname(fileURLToPath(import.meta.url));
    const script = path.join(work!, 'try-mount.mjs');
    await writeFile(
      script,
      `import { IndexFsModel } from ${JSON.stringify(path.join(here, '../src/serve/fuse/index-model.js'))};
import { mountNative } from ${JSON.stringify(path.join(here, '../src/serve/fuse/native.js'))};
import { createLogger } from ${JSON.stringify(path.join(here, '../src/log.js'))};
const model = new IndexFsModel();
model.setEntries([], null);
try {
  const m = await mountNative({ mountpoint: process.argv[2], model, log: createLogger('silent') });
  await m.unmount();
  console.log(JSON.stringify({ mounted: true }));
} catch (e) {
  console.log(JSON.stringify({ code: e.code, message: e.message, details: e.details }));
}
`,
    );
    const inNamespace = async (setup: string): Promise<{ code?: string; message?: string; details?: Record<string, unknown> }> => {
      // Mounts made inside a private namespace vanish with it: nothing leaks to this machine.
      const r = await run('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `${setup} && exec "$0" "$1" "$2"`, process.execPath, script, path.join(work!, 'ns-mnt')]);
      if (r.code !== 0) throw new Error(r.stderr);
      return JSON.parse(r.stdout.trim().split('\n').pop()!) as { code?: string; message?: string };
    };
    const noDevice = await inNamespace('mount -t tmpfs tmpfs /dev && mknod -m 666 /dev/null c 1 3 && mknod -m 666 /dev/urandom c 1 9');
    assert.equal(noDevice.code, 'E_FUSE');
    assert.match(noDevice.message ?? '', /no \/dev\/fuse/);
    if (!lib) return t.skip('libfuse.so.2 is not in the ldconfig cache');
    const empty = path.join(work!, 'empty.so');
    await writeFile(empty, '');
    const noLib = await inNamespace(`mount --bind ${JSON.stringify(empty)} ${JSON.stringify(lib)}`);
    assert.equal(noLib.code, 'E_FUSE');
    assert.match(noLib.message ?? '', /libfuse\.so\.2 is not installed/);
    assert.equal(noLib.details?.['unavailable'], true, 'the cause is marked: fuse-native cannot load here');
  });

  test('mountFuse dispatches: auto is the kernel backend as root (measured faster), native and kernel load their own', async (t) => {
    if (skip) return t.skip(skip);
    const model = new IndexFsModel({ log: quietLog() });
    model.setEntries([], null);
    try {
      const auto = await mountFuse({ mountpoint: path.join(work!, 'auto'), model, log: quietLog(), backend: 'auto' });
      try {
        // The kernel backend mounts only as root; without root, auto falls back to fuse-native.
        assert.equal(auto.backend, process.getuid?.() === 0 ? 'kernel' : 'native');
      } finally {
        await auto.unmount();
      }
      const n = await mountFuse({ mountpoint: path.join(work!, 'n'), model, log: quietLog(), backend: 'native' });
      try {
        assert.equal(n.backend, 'native');
      } finally {
        await n.unmount();
      }
      const kernelBuilt = await stat(path.join(path.dirname(fileURLToPath(import.meta.url)), '../src/serve/fuse/kernel/index.js')).then(
        () => true,
        () => false,
      );
      if (!kernelBuilt) return t.skip('src/serve/fuse/kernel/ is not built');
      const k = await mountFuse({ mountpoint: path.join(work!, 'k'), model, log: quietLog(), backend: 'kernel' });
      try {
        assert.equal(k.backend, 'kernel');
        assert.deepEqual(await readdir(k.mountpoint), ['by-digest']);
      } finally {
        await k.unmount();
      }
      assert.equal(await isMounted(path.join(work!, 'k')), false);
    } finally {
      await model.close();
    }
  });
});
