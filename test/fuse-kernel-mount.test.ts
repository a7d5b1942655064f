/**
 * The kernel-protocol FUSE backend against the real kernel: the real fixture ingested, mounted
 * through /dev/fuse by this process, and checked with the same assertions as the fuse-native
 * backend's tests (every file byte-identical to `tar -xJf`, find counts, symlinks, EROFS, a BCC
 * compile, bpftrace, a kernel swap under an open descriptor).
 *
 * The mount is served by this very process, so every access to it here is asynchronous
 * (fs.promises, execFile): a synchronous one would wait for an answer only this thread can give.
 * Needs root and /dev/fuse (not libfuse), and the fixture beside the checkout; each test says
 * which is missing when it skips.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { constants as fsc } from 'node:fs';
import { chmod, lstat, mkdir, mkdtemp, open, readFile, readdir, readlink, rename, rm, rmdir, stat, symlink, truncate, unlink, utimes, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import tar from 'tar-stream';
import { isKheadersError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import type { FsModel } from '../src/serve/fuse/fs-model.js';
import { IndexFsModel } from '../src/serve/fuse/index-model.js';
import { isMounted } from '../src/serve/fuse/mountpoint.js';
import { loopReaderAvailable, mountKernel, type KernelFuseMount, type ReaderKind } from '../src/serve/fuse/kernel/index.js';
import type { CacheEntry } from '../src/store/entry.js';
import { ingest } from '../src/store/ingest.js';
import { FIXTURE, FIXTURE_RELEASE, fixtureSkipReason, fuseDeviceSkipReason } from './helpers/fuse-env.js';

const run = promisify(execFile);
const log = createLogger(process.env.KHEADERSD_TEST_LOG === '1' ? 'debug' : 'silent');

// Per test, not per suite: a skipped describe() hides its tests from the count.
const deviceSkip = await fuseDeviceSkipReason();
const skip = deviceSkip ?? (await fixtureSkipReason());
const have = async (cmd: string): Promise<boolean> => run('sh', ['-c', `command -v ${cmd}`]).then(() => true, () => false);

/** BCC's kernel include flags (src/cc/frontends/clang/kbuild_helper.cc), rooted at `k`. */
function bccFlags(k: string, arch = 'x86'): string[] {
  return [
    '-nostdinc',
    '-I' + `${k}/arch/${arch}/include`,
    '-I' + `${k}/arch/${arch}/include/generated`,
    '-I' + `${k}/include`,
    '-I' + `${k}/arch/${arch}/include/uapi`,
    '-I' + `${k}/arch/${arch}/include/generated/uapi`,
    '-I' + `${k}/include/uapi`,
    '-I' + `${k}/include/generated/uapi`,
    '-include',
    `${k}/include/linux/kconfig.h`,
    '-D__KERNEL__',
    '-D__BPF_TRACING__',
    '-DKBUILD_MODNAME="bcc"',
    '-Wno-unused-value',
    '-Wno-pointer-sign',
    '-Wno-gnu-variable-sized-type-not-at-end',
    '-Wno-address-of-packed-member',
    '-Wno-tautological-compare',
    '-Wno-unknown-warning-option',
    '-fno-stack-protector',
  ];
}

const BPF_PROGRAM = `#include <linux/sched.h>
#include <linux/bpf.h>
#include <net/sock.h>
#include <linux/ptrace.h>

struct event { u32 pid; u16 family; char comm[TASK_COMM_LEN]; };

int trace_connect(struct pt_regs *ctx, struct sock *sk)
{
	struct task_struct *task = (struct task_struct *)ctx->di;
	struct event ev = {};
	ev.pid = task->tgid;
	ev.family = sk->__sk_common.skc_family;
	__builtin_memcpy(ev.comm, task->comm, sizeof(ev.comm));
	return ev.pid + ev.family;
}
`;

/** clang → LLVM IR → BPF object, the way BCC builds a program. */
async function compileBpf(kdir: string, src: string, out: string): Promise<void> {
  const { stdout: resource } = await run('clang', ['-print-resource-dir']);
  const args = [...bccFlags(kdir), '-isystem', `${resource.trim()}/include`, '-O2', '-emit-llvm', '-c', src, '-o', `${out}.bc`];
  await run('clang', args, { maxBuffer: 64 << 20 });
  await run('llc', ['-march=bpf', '-filetype=obj', '-o', out, `${out}.bc`]);
}

/** Every path under `dir`, relative, with its kind: the tree as lstat sees it. */
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

async function xzTar(files: Record<string, string>, out: string): Promise<void> {
  const pack = tar.pack();
  const xz = spawn('xz', ['-c', '--check=crc64'], { stdio: ['pipe', 'pipe', 'inherit'] });
  const chunks: Buffer[] = [];
  xz.stdout.on('data', (c: Buffer) => chunks.push(c));
  const done = new Promise<void>((resolve, reject) => xz.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`xz ${code}`)))));
  pack.pipe(xz.stdin);
  const dirs = new Set<string>();
  for (const name of Object.keys(files)) {
    const parts = name.split('/');
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join('/'));
  }
  for (const d of [...dirs].sort()) pack.entry({ name: `./${d}/`, type: 'directory', mode: 0o755, mtime: new Date(1_700_000_000_000) });
  for (const [name, body] of Object.entries(files)) pack.entry({ name: `./${name}`, mode: 0o644, mtime: new Date(1_700_000_000_000) }, body);
  pack.finalize();
  await done;
  await writeFile(out, Buffer.concat(chunks));
}

/** A model whose reads of one inode take `delayMs`: shows that one slow read stalls no other. */
function slowFor(model: FsModel, slowIno: () => number | undefined, delayMs: number): FsModel {
  return {
    lookup: (p, n) => model.lookup(p, n),
    getattr: (i) => model.getattr(i),
    readdir: (i) => model.readdir(i),
    readlink: (i) => model.readlink(i),
    read: async (i, o, l) => {
      if (i === slowIno()) await new Promise((r) => setTimeout(r, delayMs));
      return model.read(i, o, l);
    },
    resolvePath: (p) => model.resolvePath(p),
    statfs: () => model.statfs(),
    onInvalidate: (l) => model.onInvalidate(l),
  };
}

interface Shared {
  tmp: string;
  plain: string;
  cache: string;
  entry: CacheEntry;
}

let shared: Shared | undefined;

async function setup(): Promise<Shared> {
  if (shared) return shared;
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'kheaders-kfuse-'));
  const plain = path.join(tmp, 'plain');
  await mkdir(plain);
  await run('tar', ['-xJf', FIXTURE, '-C', plain]);
  const { entry } = await ingest({ cacheDir: path.join(tmp, 'cache'), archive: FIXTURE, log, modprobe: false, btf: 'off', setCurrent: true });
  shared = { tmp, plain, cache: path.join(tmp, 'cache'), entry };
  return shared;
}

after(async () => {
  if (shared) await rm(shared.tmp, { recursive: true, force: true });
});

async function mountFresh(s: Shared, name: string, reader: ReaderKind, model?: FsModel): Promise<{ m: KernelFuseMount; dir: string; model: IndexFsModel }> {
  const index = new IndexFsModel({ log });
  index.setEntries([s.entry], s.entry.manifest.id);
  const dir = path.join(s.tmp, name);
  const m = await mountKernel({ mountpoint: dir, model: model ?? index, log, reader });
  return { m, dir, model: index };
}

const readers: ReaderKind[] = loopReaderAvailable() ? ['loop', 'thread'] : ['thread'];

for (const reader of readers) {
  describe(`kernel FUSE backend (${reader} reader, ${process.arch})`, () => {
    let s: Shared;
    let m: KernelFuseMount;
    let dir: string;
    let model: IndexFsModel;

    before(async () => {
      if (skip) return;
      s = await setup();
      ({ m, dir, model } = await mountFresh(s, `mnt-${reader}`, reader));
    });
    after(async () => {
      await m?.unmount();
      await model?.close();
      if (dir) assert.equal(await isMounted(dir), false, 'nothing left mounted');
    });

    test('INIT negotiated the flags a read-only tree wants', { skip }, () => {
      assert.equal(m.backend, 'kernel');
      assert.equal(m.reader, reader);
      assert.equal(m.init.kernelMajor, 7);
      assert.ok(m.init.minor >= 12 && m.init.minor <= 38);
      // ASYNC_READ, PARALLEL_DIROPS, CACHE_SYMLINKS, DO_READDIRPLUS, READDIRPLUS_AUTO
      for (const bit of [0, 18, 23, 13, 14]) assert.ok(m.init.flags & (1 << bit), `flag bit ${bit}`);
    });

    test('the root shows current, the release and by-digest', { skip }, async () => {
      const names = (await readdir(dir)).sort();
      assert.deepEqual(names, [FIXTURE_RELEASE, 'by-digest', 'current']);
      assert.equal(await readlink(path.join(dir, 'current')), FIXTURE_RELEASE);
      assert.deepEqual(await readdir(path.join(dir, 'by-digest')), [s.entry.manifest.digest]);
    });

    test('every file is byte-identical to tar -xJf, every dir and symlink is there', { skip }, async () => {
      const want = await walk(s.plain);
      const got = await walk(path.join(dir, 'current'));
      assert.equal(got.size, want.size);
      assert.deepEqual([...got.entries()].sort(), [...want.entries()].sort());
      // Contents compared by a child (diff reads with its own blocking I/O). Reading the mount
      // through this process's fs.promises would park libuv threadpool threads on FUSE reads
      // whose answers need that same pool for the pack reads: with 4 of them, a deadlock.
      await run('diff', ['-r', '--no-dereference', `${s.plain}/`, `${dir}/current/`], { maxBuffer: 16 << 20 });
      // And a sample through Node, never more than two mount reads at a time (see above).
      const paths = [...want].filter(([, k]) => k === 'file').map(([p]) => p);
      assert.equal(paths.length, 6368);
      for (const p of paths.filter((_, i) => i % 50 === 0)) {
        const [a, b] = await Promise.all([readFile(path.join(s.plain, p)), readFile(path.join(dir, 'current', p))]);
        assert.ok(a.equals(b), `${p} differs`);
      }
    });

    test('find counts match the plain tree', { skip }, async () => {
      for (const type of ['f', 'd', 'l']) {
        const count = async (root: string): Promise<number> => Number((await run('sh', ['-c', `find ${root}/ -type ${type} | wc -l`])).stdout.trim());
        assert.equal(await count(path.join(dir, 'current')), await count(s.plain), `find -type ${type}`);
      }
      assert.equal(Number((await run('sh', ['-c', `find ${dir}/current/ -type f | wc -l`])).stdout.trim()), 6368);
    });

    test('the three symlinks read back as archived, and resolve', { skip }, async () => {
      const links = [...(await walk(s.plain))].filter(([, k]) => k === 'symlink').map(([p]) => p);
      assert.equal(links.length, 3);
      for (const p of links) {
        assert.equal(await readlink(path.join(dir, 'current', p)), await readlink(path.join(s.plain, p)));
        assert.ok((await readFile(path.join(dir, 'current', p))).equals(await readFile(path.join(s.plain, p))));
      }
    });

    test('stat shows read-only modes, sizes and mtimes', { skip }, async () => {
      const rel = 'include/linux/sched.h';
      const [a, b] = await Promise.all([stat(path.join(s.plain, rel)), stat(path.join(dir, 'current', rel))]);
      assert.equal(b.size, a.size);
      assert.equal(b.mode, fsc.S_IFREG | 0o444);
      assert.equal(Math.floor(b.mtimeMs / 1000), Math.floor(a.mtimeMs / 1000));
      assert.equal((await stat(path.join(dir, 'current', 'include'))).mode, fsc.S_IFDIR | 0o555);
      assert.equal((await lstat(path.join(dir, 'current'))).mode & fsc.S_IFMT, fsc.S_IFLNK);
    });

    test('every kind of write fails with EROFS', { skip }, async () => {
      const f = path.join(dir, 'current', 'include/linux/sched.h');
      const d = path.join(dir, 'current', 'include');
      const attempts: Array<[string, () => Promise<unknown>]> = [
        ['write', () => writeFile(f, 'x')],
        ['create', () => writeFile(path.join(d, 'new.h'), 'x')],
        ['open O_WRONLY', () => open(f, fsc.O_WRONLY).then((h) => h.close())],
        ['open O_RDWR', () => open(f, fsc.O_RDWR).then((h) => h.close())],
        ['truncate', () => truncate(f, 0)],
        ['mkdir', () => mkdir(path.join(d, 'newdir'))],
        ['unlink', () => unlink(f)],
        ['rmdir', () => rmdir(path.join(d, 'uapi'))],
        ['rename', () => rename(f, `${f}.old`)],
        ['symlink', () => symlink('x', path.join(d, 'lnk'))],
        ['chmod', () => chmod(f, 0o644)],
        ['utimes', () => utimes(f, new Date(), new Date())],
        ['root write', () => writeFile(path.join(dir, 'x'), 'x')],
      ];
      for (const [what, attempt] of attempts) {
        await assert.rejects(attempt(), (err: NodeJS.ErrnoException) => {
          assert.equal(err.code, 'EROFS', what);
          return true;
        });
      }
    });

    test('missing names are cached as negative entries (include-path probing)', { skip }, async () => {
      const before = m.opCounts()['lookup'] ?? 0;
      const missing = path.join(dir, 'current', 'include', 'linux', `no-such-${reader}.h`);
      for (let i = 0; i < 50; i++) await assert.rejects(stat(missing), { code: 'ENOENT' });
      const after = m.opCounts()['lookup'] ?? 0;
      assert.equal(after - before, 1, 'one LOOKUP for 50 stats');
    });

    test('clang compiles a BPF program with BCC flags through current/, same object as the plain tree', { skip }, async (t) => {
      if (!(await have('clang')) || !(await have('llc'))) return t.skip('clang/llc not installed');
      const src = path.join(s.tmp, `prog-${reader}.bpf.c`);
      await writeFile(src, BPF_PROGRAM);
      await compileBpf(path.join(dir, 'current'), src, path.join(s.tmp, `mnt-${reader}.o`));
      await compileBpf(s.plain, src, path.join(s.tmp, `plain-${reader}.o`));
      const [a, b] = await Promise.all([readFile(path.join(s.tmp, `mnt-${reader}.o`)), readFile(path.join(s.tmp, `plain-${reader}.o`))]);
      assert.ok(a.length > 0);
      assert.ok(a.equals(b), 'the BPF object does not depend on where the headers came from');
      // Warm: everything is in the kernel's caches, so a second compile barely reaches us.
      const before = Object.values(m.opCounts()).reduce((x, y) => x + y, 0);
      await compileBpf(path.join(dir, 'current'), src, path.join(s.tmp, `mnt2-${reader}.o`));
      const requests = Object.values(m.opCounts()).reduce((x, y) => x + y, 0) - before;
      assert.ok(requests < 50, `warm compile cost ${requests} FUSE requests`);
    });

    test('bpftrace parses the kernel headers from BPFTRACE_KERNEL_SOURCE=DIR/current', { skip }, async (t) => {
      if (!(await have('bpftrace'))) return t.skip('bpftrace not installed');
      const script = path.join(s.tmp, `p-${reader}.bt`);
      await writeFile(script, '#include <linux/sched.h>\nkprobe:vfs_read { printf("%d %s\\n", ((struct task_struct *)curtask)->tgid, ((struct task_struct *)curtask)->comm); exit(); }\n');
      const elf = path.join(s.tmp, `p-${reader}.elf`);
      // --emit-elf: a dry run that parses the headers and generates the program, without loading it.
      const env = { ...process.env, BPFTRACE_KERNEL_SOURCE: path.join(dir, 'current') };
      await run('bpftrace', ['--emit-elf', elf, script], { env }).catch((err: Error & { stderr?: string }) => {
        throw new Error(`bpftrace failed: ${err.stderr ?? String(err)}`);
      });
      assert.ok((await stat(elf)).size > 0);
      // And it really read them from there: a tree without them fails.
      await assert.rejects(run('bpftrace', ['--emit-elf', `${elf}.2`, script], { env: { ...process.env, BPFTRACE_KERNEL_SOURCE: path.join(s.tmp, 'nonexistent') } }));
    });

    test('statfs reports a read-only filesystem of the right size', { skip }, async () => {
      const { stdout } = await run('stat', ['-f', '-c', '%b %S %l %c', dir]);
      const [blocks, bsize, namemax, files] = stdout.trim().split(' ').map(Number);
      assert.equal(bsize, 4096);
      assert.equal(namemax, 255);
      assert.ok(blocks! * 4096 >= s.entry.manifest.bytes);
      assert.ok(files! >= 6691);
    });
  });
}

describe('kernel FUSE backend: swap, concurrency, lifecycle', () => {
  let s: Shared;
  before(async () => {
    if (skip) return;
    s = await setup();
  });

  test('a kernel swap re-points current; an open fd keeps reading the old tree', { skip }, async (t) => {
    const archive = path.join(s.tmp, 'swap.tar.xz');
    await xzTar(
      {
        'include/linux/sched.h': '/* the swapped-in kernel */\n#define SWAPPED 1\n',
        'include/generated/utsrelease.h': '#define UTS_RELEASE "6.2.0-swap"\n',
      },
      archive,
    );
    const { entry: next } = await ingest({ cacheDir: s.cache, archive, release: '6.2.0-swap', log, modprobe: false, btf: 'off', setCurrent: false });
    const { m, dir, model } = await mountFresh(s, 'mnt-swap', loopReaderAvailable() ? 'loop' : 'thread');
    t.after(async () => {
      await m.unmount();
      await model.close();
    });
    const rel = 'include/linux/sched.h';
    const oldBytes = await readFile(path.join(s.plain, rel));
    assert.equal(await readlink(path.join(dir, 'current')), FIXTURE_RELEASE);

    const fh = await open(path.join(dir, 'current', rel), 'r');
    try {
      const head = Buffer.alloc(100);
      await fh.read(head, 0, 100, 0);
      assert.ok(head.equals(oldBytes.subarray(0, 100)));

      model.setEntries([s.entry, next], next.manifest.id);
      // The invalidations are written by the notifier thread: give them a moment.
      let target = '';
      for (let i = 0; i < 50 && target !== '6.2.0-swap'; i++) {
        target = await readlink(path.join(dir, 'current'));
        if (target !== '6.2.0-swap') await new Promise((r) => setTimeout(r, 20));
      }
      assert.equal(target, '6.2.0-swap');
      assert.deepEqual((await readdir(dir)).sort(), [FIXTURE_RELEASE, '6.2.0-swap', 'by-digest', 'current']);
      assert.equal(await readFile(path.join(dir, 'current', rel), 'utf8'), '/* the swapped-in kernel */\n#define SWAPPED 1\n');

      // The descriptor opened before the swap still reads the old kernel's header, to the end.
      const rest = Buffer.alloc(oldBytes.length);
      const { bytesRead } = await fh.read(rest, 0, rest.length, 0);
      assert.equal(bytesRead, oldBytes.length);
      assert.ok(rest.equals(oldBytes));
      // And the old release is still reachable by name.
      assert.ok((await readFile(path.join(dir, FIXTURE_RELEASE, rel))).equals(oldBytes));
      assert.ok((m.opCounts()['notify'] ?? 0) > 0);
    } finally {
      await fh.close();
    }
  });

  test('one slow read stalls no other request', { skip }, async (t) => {
    const index = new IndexFsModel({ log });
    index.setEntries([s.entry], s.entry.manifest.id);
    const slowPath = `by-digest/${s.entry.manifest.digest}/include/linux/sched.h`;
    const slow = slowFor(index, () => index.resolvePath(`/${slowPath}`)?.ino, 1500);
    const dir = path.join(s.tmp, 'mnt-slow');
    const m = await mountKernel({ mountpoint: dir, model: slow, log });
    t.after(async () => {
      await m.unmount();
      await index.close();
    });
    // Readers are child processes: the kernel queues all their requests at once, and only the
    // backend decides whether one slow READ holds up the rest.
    const started = performance.now();
    const slowRead = run('cat', [path.join(dir, slowPath)], { maxBuffer: 16 << 20 }).then(() => performance.now() - started);
    await new Promise((r) => setTimeout(r, 100));
    const t0 = performance.now();
    const others = await Promise.all(['include/linux/bpf.h', 'include/net/sock.h', 'include/linux/fs.h'].map((p) => run('cat', [path.join(dir, 'current', p)], { maxBuffer: 16 << 20 })));
    const fast = performance.now() - t0;
    assert.ok(others.every((o) => o.stdout.length > 0));
    assert.ok(fast < 1000, `other reads took ${fast} ms while one read was slow`);
    assert.ok((await slowRead) >= 1400);
  });

  test('unmount ends the session; remounting the same directory works', { skip }, async () => {
    const first = await mountFresh(s, 'mnt-again', 'thread');
    await readdir(first.dir);
    await first.m.unmount();
    await first.m.unmount(); // twice is fine
    assert.equal((await first.m.closed).code, 'ENODEV');
    assert.equal(await isMounted(first.dir), false);
    const second = await mountFresh(s, 'mnt-again', loopReaderAvailable() ? 'loop' : 'thread');
    try {
      assert.deepEqual((await readdir(second.dir)).sort(), [FIXTURE_RELEASE, 'by-digest', 'current']);
    } finally {
      await second.m.unmount();
      await first.model.close();
      await second.model.close();
    }
  });

  test('a busy mount is detached lazily; its open files then see the connection end', { skip }, async () => {
    const { m, dir, model } = await mountFresh(s, 'mnt-busy', loopReaderAvailable() ? 'loop' : 'thread');
    // Another process holds a header open, as a compiler would while the daemon exits. (Not this
    // process: its children would inherit the descriptor and close it on exec, and that close
    // waits for a FLUSH only this process's event loop can answer — which is blocked in spawn()
    // until the exec completes.)
    const file = path.join(dir, 'current', 'include/linux/fs.h');
    const holder = spawn('sh', ['-c', 'exec 3<"$1"; echo held; exec sleep 30', 'sh', file], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((resolve, reject) => {
        holder.stdout.once('data', () => resolve());
        holder.once('exit', (code) => reject(new Error(`holder exited ${code}`)));
      });
      await m.unmount(); // umount fails with EBUSY, umount -l detaches, closing /dev/fuse aborts
      assert.equal(await isMounted(dir), false);
      assert.ok(['ENODEV', 'ECONNABORTED', 'STOPPED'].includes((await m.closed).code));
      // The held file (never read, so not in the page cache) now fails instead of hanging.
      await assert.rejects(run('cat', [`/proc/${holder.pid}/fd/3`]), (err: { stderr?: string }) => /not connected|aborted/i.test(err.stderr ?? ''));
    } finally {
      holder.kill('SIGKILL');
      await model.close();
    }
  });

  test('a stale mount left by a killed daemon is cleared on start', { skip }, async () => {
    const dir = path.join(s.tmp, 'mnt-stale');
    // A child process mounts and is killed -9: the mount stays, ENOTCONN.
    const script = `
      import { mountKernel } from ${JSON.stringify(new URL('../src/serve/fuse/kernel/index.js', import.meta.url).href)};
      import { IndexFsModel } from ${JSON.stringify(new URL('../src/serve/fuse/index-model.js', import.meta.url).href)};
      import { createLogger } from ${JSON.stringify(new URL('../src/log.js', import.meta.url).href)};
      await mountKernel({ mountpoint: ${JSON.stringify(dir)}, model: new IndexFsModel(), log: createLogger('silent') });
      process.stdout.write('mounted\\n');
      setInterval(() => {}, 1000);
    `;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => d.toString().includes('mounted') && resolve());
      child.on('exit', (code) => reject(new Error(`child exited ${code}`)));
    });
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    assert.equal(await isMounted(dir), true);
    await assert.rejects(stat(dir), (err: NodeJS.ErrnoException) => err.code === 'ENOTCONN' || err.code === 'ECONNABORTED');
    const { m, model } = await mountFresh(s, 'mnt-stale', 'thread');
    try {
      assert.equal(await readlink(path.join(dir, 'current')), FIXTURE_RELEASE);
    } finally {
      await m.unmount();
      await model.close();
    }
  });

  test('E_FUSE when /dev/fuse is missing', { skip: deviceSkip }, async (t) => {
    const tmp = await mkdtemp(path.join(os.tmpdir(), 'kheaders-kfuse-nodev-'));
    t.after(() => rm(tmp, { recursive: true, force: true }));
    await assert.rejects(
      mountKernel({ mountpoint: path.join(tmp, 'mnt-nodev'), model: new IndexFsModel(), log, devicePath: path.join(tmp, 'no-such-fuse') }),
      (err: unknown) => isKheadersError(err, 'E_FUSE') && /no .*no-such-fuse: load the fuse module/.test((err as Error).message),
    );
  });

  test('E_FUSE when not root', { skip: deviceSkip }, async (t) => {
    const script = `
      import { mountKernel } from ${JSON.stringify(new URL('../src/serve/fuse/kernel/index.js', import.meta.url).href)};
      import { IndexFsModel } from ${JSON.stringify(new URL('../src/serve/fuse/index-model.js', import.meta.url).href)};
      import { createLogger } from ${JSON.stringify(new URL('../src/log.js', import.meta.url).href)};
      try { await mountKernel({ mountpoint: '/tmp/kheadersd-never', model: new IndexFsModel(), log: createLogger('silent') }); }
      catch (err) { process.stdout.write(JSON.stringify({ code: err.code, message: err.message })); }
    `;
    const { stdout } = await run(process.execPath, ['--input-type=module', '-e', script], { uid: 65534, gid: 65534 }).catch((err: { stdout?: string; stderr?: string }) => ({ stdout: err.stdout ?? '', stderr: err.stderr }));
    if (stdout === '') return t.skip('the compiled tree is not readable by uid 65534 here, so the unprivileged mount cannot be tried');
    const out = JSON.parse(stdout) as { code: string; message: string };
    assert.equal(out.code, 'E_FUSE');
    assert.match(out.message, /needs root/);
  });
});

