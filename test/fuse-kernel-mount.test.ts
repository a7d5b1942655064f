/**
 * The kernel-protocol FUSE backend (/dev/fuse spoken to by this process): the shared FUSE suite
 * (test/helpers/fuse-suite.ts) once per reader kind for the fixture and once for the mount's
 * life, then what only this backend has: the INIT it negotiates, negative-entry caching, statfs,
 * invalidations counted on a swap, one slow read stalling no other, the session's end, a lazy
 * detach of a busy mount, and its own E_FUSE causes (a missing device path, not root).
 *
 * The mount is served by this very process, so every access to it here is asynchronous
 * (fs.promises, child processes): a synchronous one would wait for an answer only this thread
 * can give. Needs root and /dev/fuse (not libfuse), and the fixture beside the checkout; each
 * test says which is missing when it skips.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdir, readFile, readlink, stat } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isKheadersError } from '../src/errors.js';
import type { FsModel } from '../src/serve/fuse/fs-model.js';
import { IndexFsModel } from '../src/serve/fuse/index-model.js';
import { isMounted } from '../src/serve/fuse/mountpoint.js';
import { FUSE_SOURCE } from '../src/serve/fuse/kernel/mount.js';
import { loopReaderAvailable, mountKernel, type KernelFuseMount, type ReaderKind } from '../src/serve/fuse/kernel/index.js';
import type { CacheEntry } from '../src/store/entry.js';
import { FIXTURE_RELEASE, fixtureSkipReason, fuseDeviceSkipReason, ingestTree, quietLog, removeDir, run, smallTree, tempDir } from './helpers/fuse-env.js';
import { fixtureMountSuite, fixtureOnce, mountLifeSuite, totalRequests, waitFor, type FuseTestBackend } from './helpers/fuse-suite.js';

// Per test, not per suite: a skipped describe() hides its tests from the count.
const deviceSkip = await fuseDeviceSkipReason();
const skip = deviceSkip ?? (await fixtureSkipReason());
const log = quietLog();

const readers: ReaderKind[] = loopReaderAvailable() ? ['loop', 'thread'] : ['thread'];
const defaultReader: ReaderKind = readers[0]!;

const kernelBackend = (reader: ReaderKind | 'auto'): FuseTestBackend<KernelFuseMount> => ({
  name: reader === 'auto' ? `kernel (${process.arch})` : `kernel (${reader} reader, ${process.arch})`,
  backend: 'kernel',
  skip: deviceSkip,
  mountSource: FUSE_SOURCE,
  mount: (mountpoint, model) => mountKernel({ mountpoint, model, log, reader }),
});

for (const reader of readers) {
  fixtureMountSuite(kernelBackend(reader), (c, suiteSkip) => {
    test('INIT negotiated the flags a read-only tree wants', { skip: suiteSkip }, () => {
      const { mount: m } = c();
      assert.equal(m.backend, 'kernel');
      assert.equal(m.reader, reader);
      assert.equal(m.init.kernelMajor, 7);
      assert.ok(m.init.minor >= 12 && m.init.minor <= 38);
      // ASYNC_READ, PARALLEL_DIROPS, CACHE_SYMLINKS, DO_READDIRPLUS, MAX_PAGES; not READDIRPLUS_AUTO
      for (const bit of [0, 18, 23, 13, 22]) assert.ok(m.init.flags & (1 << bit), `flag bit ${bit}`);
      assert.equal(m.init.flags & (1 << 14), 0, 'READDIRPLUS for every listing buffer');
      assert.equal(m.init.maxPages, 256, 'a READ of up to 1 MiB');
    });

    test('missing names are cached as negative entries (include-path probing)', { skip: suiteSkip }, async () => {
      const { mount: m } = c();
      const missing = path.join(m.mountpoint, 'current', 'include', 'linux', `no-such-${reader}.h`);
      await stat(path.dirname(missing)); // the path to it, so only the missing name is counted
      const before = m.opCounts()['lookup'] ?? 0;
      const negBefore = m.opCounts()['lookup-negative'] ?? 0;
      for (let i = 0; i < 50; i++) await assert.rejects(stat(missing), { code: 'ENOENT' });
      const after = m.opCounts()['lookup'] ?? 0;
      assert.equal(after - before, 1, 'one LOOKUP for 50 stats');
      // Counted as such (the bench reports a compile's include-path misses from this); a name
      // that exists is not.
      assert.equal((m.opCounts()['lookup-negative'] ?? 0) - negBefore, 1, 'the LOOKUP is counted as a negative entry');
      await stat(path.join(m.mountpoint, 'current', 'include', 'linux', 'types.h'));
      assert.equal((m.opCounts()['lookup-negative'] ?? 0) - negBefore, 1, 'a name that exists is no negative lookup');
    });

    test('a warm clang compile barely reaches the backend (the kernel keeps pages, attributes, entries and opens)', { skip: suiteSkip }, (t) => {
      const { clangWarm } = c().requests;
      if (!clangWarm) return t.skip('the shared clang test did not measure (skipped or failed above)');
      assert.ok(totalRequests(clangWarm) < 50, `warm compile cost ${totalRequests(clangWarm)} FUSE requests: ${JSON.stringify(clangWarm)}`);
    });

    test('statfs reports a read-only filesystem of the right size', { skip: suiteSkip }, async () => {
      const { mount: m, entry } = c();
      const { stdout } = await run('stat', ['-f', '-c', '%b %S %l %c', m.mountpoint]);
      const [blocks, bsize, namemax, files] = stdout.trim().split(' ').map(Number);
      assert.equal(bsize, 4096);
      assert.equal(namemax, 255);
      assert.ok(blocks! * 4096 >= entry.manifest.bytes);
      assert.ok(files! >= 6691);
    });
  });
}

mountLifeSuite(kernelBackend('auto'));

/** A model whose reads of one inode take `delayMs`: shows that one slow read stalls no other. */
/** `model`, except that reads of one node wait until `released` settles. */
function slowFor(model: FsModel, slowIno: () => number | undefined, released: Promise<void>): FsModel {
  return {
    lookup: (p, n) => model.lookup(p, n),
    getattr: (i) => model.getattr(i),
    readdir: (i) => model.readdir(i),
    readlink: (i) => model.readlink(i),
    read: async (i, o, l) => {
      if (i === slowIno()) await released;
      return model.read(i, o, l);
    },
    resolvePath: (p) => model.resolvePath(p),
    statfs: () => model.statfs(),
    onInvalidate: (l) => model.onInvalidate(l),
  };
}

describe('kernel FUSE backend: invalidations, concurrency, the session\'s end, E_FUSE causes', () => {
  let work: string | undefined;
  let entry: CacheEntry;
  let cache: string;

  before(async () => {
    if (skip) return;
    ({ entry, cache } = await fixtureOnce());
    work = await tempDir('kfuse');
  });
  after(async () => {
    if (work) await removeDir(work);
  });

  async function mountFixture(name: string, reader: ReaderKind): Promise<{ m: KernelFuseMount; dir: string; model: IndexFsModel }> {
    const model = new IndexFsModel({ log });
    model.setEntries([entry], entry.manifest.id);
    const dir = path.join(work!, name);
    const m = await mountKernel({ mountpoint: dir, model, log, reader });
    return { m, dir, model };
  }

  test('a kernel swap reaches the kernel as counted invalidations (notify)', { skip }, async (t) => {
    const next = await ingestTree(cache, work!, smallTree('6.2.0-notify', 'n'), '6.2.0-notify');
    const { m, dir, model } = await mountFixture('mnt-notify', defaultReader);
    t.after(async () => {
      await m.unmount();
      await model.close();
    });
    assert.equal(await readlink(path.join(dir, 'current')), FIXTURE_RELEASE);
    const before = m.opCounts()['notify'] ?? 0;
    model.setEntries([entry, next], next.manifest.id);
    await waitFor(() => readlink(path.join(dir, 'current')), '6.2.0-notify', 'current follows the swap');
    assert.ok((m.opCounts()['notify'] ?? 0) > before, 'the swap was pushed to the kernel, not left to time out');
  });

  test('a file looked up is read before the kernel asks: its one READ is answered from the prefetch, with the tree\'s bytes', { skip }, async (t) => {
    const { m, dir, model } = await mountFixture('mnt-prefetch', defaultReader);
    t.after(async () => {
      await m.unmount();
      await model.close();
    });
    const { extracted } = await fixtureOnce();
    const rel = 'include/linux/sched.h';
    const lookups = m.opCounts()['lookup'] ?? 0;
    await stat(path.join(dir, 'current', rel)); // LOOKUP of current, include, linux, sched.h
    assert.ok((m.opCounts()['lookup'] ?? 0) > lookups);
    const c = m.prefetchCounts();
    assert.equal(c.started - c.followed, 1, 'one regular file was looked up (the rest: the headers it includes)');
    assert.equal(c.used, 0);
    const reads = m.opCounts()['read'] ?? 0;
    assert.deepEqual(await readFile(path.join(dir, 'current', rel)), await readFile(path.join(extracted, rel)));
    assert.equal((m.opCounts()['read'] ?? 0) - reads, 1, 'a header arrives in one READ');
    assert.equal(m.prefetchCounts().used, 1);
  });

  test('the headers a looked-up header includes are read before the compiler looks them up: their READs find the bytes in hand', { skip }, async (t) => {
    const { m, dir, model } = await mountFixture('mnt-follow', defaultReader);
    t.after(async () => {
      await m.unmount();
      await model.close();
    });
    const { extracted } = await fixtureOnce();
    // LOOKUP of include/linux: the kernel's lookup of `linux` in include/ makes it an include root.
    await readFile(path.join(dir, 'current', 'include/linux/sched.h'));
    const included = /^#include <(linux\/[^>]+)>/m.exec(await readFile(path.join(extracted, 'include/linux/sched.h'), 'utf8'))![1]!;
    for (let i = 0; i < 100 && m.prefetchCounts().followed === 0; i++) await new Promise((r) => setTimeout(r, 10));
    await new Promise((r) => setTimeout(r, 50));
    const before = m.prefetchCounts();
    assert.ok(before.followed > 0, 'includes were followed');
    const reads = m.opCounts()['read'] ?? 0;
    assert.deepEqual(await readFile(path.join(dir, 'current', 'include', included)), await readFile(path.join(extracted, 'include', included)));
    const after = m.prefetchCounts();
    assert.equal((m.opCounts()['read'] ?? 0) - reads, 1);
    assert.equal(after.started - after.followed, before.started - before.followed, `its LOOKUP started no read: ${included} was read ahead`);
    assert.equal(after.ready - before.ready, 1, `the READ of ${included} found its bytes in hand`);
  });

  test('a listing fills the dentry cache past its first buffer: stat of every name after it sends no LOOKUP', { skip }, async (t) => {
    const { m, dir, model } = await mountFixture('mnt-rdplus', defaultReader);
    t.after(async () => {
      await m.unmount();
      await model.close();
    });
    const big = path.join(dir, 'current', 'include', 'linux');
    const names = await readdir(big);
    // More names than one 32 KiB listing buffer holds (~200 with attributes).
    assert.ok(names.length > 600, `${names.length} names`);
    const before = m.opCounts();
    for (const name of names) await stat(path.join(big, name));
    const after = m.opCounts();
    assert.equal((after['lookup'] ?? 0) - (before['lookup'] ?? 0), 0, 'every name came with its attributes');
    assert.ok((after['readdirplus'] ?? 0) > 0);
  });

  test('top-level names cached as missing appear when a swap adds them (release, digest, current)', { skip }, async (t) => {
    const next = await ingestTree(cache, work!, smallTree('6.3.0-neg', 'n'), '6.3.0-neg');
    // No current entry yet: `current` itself is missing at first.
    const model = new IndexFsModel({ log });
    model.setEntries([entry], null);
    const dir = path.join(work!, 'mnt-neg');
    const m = await mountKernel({ mountpoint: dir, model, log, reader: defaultReader });
    t.after(async () => {
      await m.unmount();
      await model.close();
    });
    const names = ['current', '6.3.0-neg', `by-digest/${next.manifest.digest}`];
    for (const name of names) await assert.rejects(stat(path.join(dir, name)), { code: 'ENOENT' });
    const lookups = m.opCounts()['lookup'] ?? 0;
    for (const name of names) await assert.rejects(stat(path.join(dir, name)), { code: 'ENOENT' });
    assert.equal(m.opCounts()['lookup'] ?? 0, lookups, 'the misses are cached in the kernel (negative entries)');

    model.setEntries([entry, next], next.manifest.id);
    await waitFor(() => readlink(path.join(dir, 'current')).catch(() => 'missing'), '6.3.0-neg', 'current appears and names the new release');
    await waitFor(() => readlink(path.join(dir, '6.3.0-neg')).catch(() => 'missing'), `by-digest/${next.manifest.digest}`, 'the release appears');
    assert.match(await readFile(path.join(dir, 'current/include/linux/a.h'), 'utf8'), /6\.3\.0-neg n/);
    assert.ok((await stat(path.join(dir, `by-digest/${next.manifest.digest}`))).isDirectory());
  });

  test('one slow read stalls no other request', { skip }, async (t) => {
    const index = new IndexFsModel({ log });
    index.setEntries([entry], entry.manifest.id);
    const slowPath = `by-digest/${entry.manifest.digest}/include/linux/sched.h`;
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const slow = slowFor(index, () => index.resolvePath(`/${slowPath}`)?.ino, released);
    const dir = path.join(work!, 'mnt-slow');
    const m = await mountKernel({ mountpoint: dir, model: slow, log });
    t.after(async () => {
      release();
      await m.unmount();
      await index.close();
    });
    // Readers are child processes: the kernel queues all their requests at once, and only the
    // backend decides whether one slow READ holds up the rest. The slow read is held until the
    // others are done, so a backend that serialised them would never finish them: the order
    // is the assertion, and the deadline only turns a hang into a failure (no timing judged).
    let slowDone = false;
    const slowRead = run('cat', [path.join(dir, slowPath)]).then((r) => {
      slowDone = true;
      return r;
    });
    await new Promise((r) => setTimeout(r, 100));
    const others = Promise.all(['include/linux/bpf.h', 'include/net/sock.h', 'include/linux/fs.h'].map((p) => run('cat', [path.join(dir, 'current', p)])));
    let deadline: NodeJS.Timeout | undefined;
    const hung = new Promise<'hung'>((resolve) => (deadline = setTimeout(() => resolve('hung'), 60_000)));
    const finished = await Promise.race([others, hung]);
    clearTimeout(deadline);
    assert.notEqual(finished, 'hung', 'the other reads did not finish while one read was held');
    assert.ok((finished as Awaited<typeof others>).every((o) => o.code === 0 && o.stdout.length > 0));
    assert.equal(slowDone, false, 'the held read finished before it was released');
    release();
    const r = await slowRead;
    assert.equal(r.code, 0, r.stderr);
  });

  test('unmount ends the session: closed resolves ENODEV', { skip }, async () => {
    const first = await mountFixture('mnt-again', 'thread');
    try {
      await readdir(first.dir);
      await first.m.unmount();
      await first.m.unmount(); // twice is fine
      assert.equal((await first.m.closed).code, 'ENODEV');
      assert.equal(await isMounted(first.dir), false);
    } finally {
      await first.model.close();
    }
  });

  test('a busy mount is detached lazily; its open files then see the connection end', { skip }, async () => {
    const { m, dir, model } = await mountFixture('mnt-busy', defaultReader);
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
      const r = await run('cat', [`/proc/${holder.pid}/fd/3`]);
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /not connected|aborted/i);
    } finally {
      holder.kill('SIGKILL');
      await model.close();
    }
  });

  /** A mount held by `until`: made (mount(2) done), answering nothing yet. */
  async function heldMount(name: string, reader: ReaderKind): Promise<{ made: Promise<KernelFuseMount>; dir: string; model: IndexFsModel; release: (ok: boolean) => void }> {
    const model = new IndexFsModel({ log });
    const dir = path.join(work!, name);
    let release!: (ok: boolean) => void;
    const until = new Promise<void>((resolve, reject) => (release = (ok) => (ok ? resolve() : reject(new Error('the caller gave up')))));
    let underWay = false;
    const made = mountKernel({ mountpoint: dir, model, log, reader, until, onUnderWay: () => (underWay = true) });
    made.catch(() => {}); // awaited by each test
    await waitFor(async () => underWay && (await isMounted(dir)), true, 'the held mount is made');
    return { made, dir, model, release };
  }

  const settledWithin = (p: Promise<unknown>, ms: number): Promise<boolean> =>
    Promise.race([p.then(() => true, () => true), new Promise<boolean>((resolve) => setTimeout(() => resolve(false), ms))]);

  for (const reader of readers) {
    test(`held by until (${reader} reader): the mount exists but answers nothing, INIT included, until the model is ready; then the whole tree`, { skip }, async () => {
      const { made, dir, model, release } = await heldMount(`mnt-held-${reader}`, reader);
      try {
        // The model is still empty: a listing now would show a tree without the entry.
        const listing = readdir(dir);
        assert.equal(await settledWithin(listing, 300), false, 'a listing was answered while the mount was held');
        model.setEntries([entry], entry.manifest.id);
        release(true);
        const m = await made;
        assert.equal(m.init.kernelMajor, 7);
        const names = await listing;
        assert.ok(names.includes('current') && names.includes(FIXTURE_RELEASE), `the first listing saw ${names.join(', ')}`);
        await m.unmount();
      } finally {
        await model.close();
      }
    });

    test(`held, then given up (${reader} reader): the mount comes down at once having answered nothing, with the caller's reason`, { skip }, async () => {
      const { made, dir, model, release } = await heldMount(`mnt-given-up-${reader}`, reader);
      try {
        const listing = readdir(dir);
        listing.catch(() => {});
        const started = performance.now();
        release(false);
        await assert.rejects(made, { message: 'the caller gave up' });
        // An unmount before the device is closed waits in the kernel for INIT's answer: the
        // `mount` child's 15 s bound, then the unmount fails and the mount stays.
        assert.ok(performance.now() - started < 5000, `coming down took ${Math.round(performance.now() - started)} ms`);
        assert.equal(await isMounted(dir), false);
        await assert.rejects(listing, 'the waiting listing fails, it does not hang or see an empty tree');
      } finally {
        await model.close();
      }
    });
  }

  test('E_FUSE when the device path is missing', { skip: deviceSkip }, async (t) => {
    const tmp = await tempDir('kfuse-nodev');
    t.after(() => removeDir(tmp));
    await assert.rejects(
      mountKernel({ mountpoint: path.join(tmp, 'mnt-nodev'), model: new IndexFsModel(), log, devicePath: path.join(tmp, 'no-such-fuse') }),
      (err: unknown) => isKheadersError(err, 'E_FUSE') && /no .*no-such-fuse: load the fuse module/.test((err as Error).message),
    );
  });

  test('E_FUSE when not root', { skip: deviceSkip }, async (t) => {
    // Never created: the root check comes before the mount point is looked at.
    const tmp = await tempDir('kfuse-notroot');
    t.after(() => removeDir(tmp));
    const never = path.join(tmp, 'mnt-never');
    const script = `
      import { mountKernel } from ${JSON.stringify(new URL('../src/serve/fuse/kernel/index.js', import.meta.url).href)};
      import { IndexFsModel } from ${JSON.stringify(new URL('../src/serve/fuse/index-model.js', import.meta.url).href)};
      import { createLogger } from ${JSON.stringify(new URL('../src/log.js', import.meta.url).href)};
      try { await mountKernel({ mountpoint: ${JSON.stringify(never)}, model: new IndexFsModel(), log: createLogger('silent') }); }
      catch (err) { process.stdout.write(JSON.stringify({ code: err.code, message: err.message })); }
    `;
    const { stdout, denied } = await new Promise<{ stdout: string; denied?: string }>((resolve, reject) => {
      const child = spawn(process.execPath, ['--input-type=module', '-e', script], { uid: 65534, gid: 65534, stdio: ['ignore', 'pipe', 'pipe'] });
      const out: Buffer[] = [];
      child.stdout.on('data', (b: Buffer) => out.push(b));
      child.on('error', (err: NodeJS.ErrnoException) => (err.code === 'EACCES' ? resolve({ stdout: '', denied: `${process.execPath} is not executable by uid 65534` }) : reject(err)));
      child.on('close', () => resolve({ stdout: Buffer.concat(out).toString() }));
    });
    if (denied !== undefined) return t.skip(`${denied}, so the unprivileged mount cannot be tried`);
    if (stdout === '') return t.skip('the compiled tree is not readable by uid 65534 here, so the unprivileged mount cannot be tried');
    const out = JSON.parse(stdout) as { code: string; message: string };
    assert.equal(out.code, 'E_FUSE');
    assert.match(out.message, /needs root/);
  });
});
