/**
 * LookupPrefetch (src/serve/fuse/prefetch.ts) over a real IndexFsModel of a small ingested tree:
 * what a READ is answered with, which lookups start no read, and the bounds that keep it from
 * holding memory (count, bytes, age). The same behaviour through a real mount is in
 * fuse-kernel-mount.test.ts.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { FsAttr } from '../src/serve/fuse/fs-model.js';
import { IndexFsModel } from '../src/serve/fuse/index-model.js';
import { LookupPrefetch } from '../src/serve/fuse/prefetch.js';
import type { CacheEntry } from '../src/store/entry.js';
import { ingestTree, quietLog, removeDir, smallTree, tempDir } from './helpers/fuse-env.js';

describe('LookupPrefetch', () => {
  let cache: string;
  let work: string;
  let entry: CacheEntry;
  let model: IndexFsModel;
  const file = (p: string): FsAttr => {
    const a = model.resolvePath(`/by-digest/${entry.manifest.digest}/${p}`);
    assert.ok(a, `${p} is in the tree`);
    return a;
  };

  before(async () => {
    cache = await tempDir('prefetch-cache');
    work = await tempDir('prefetch-work');
    entry = await ingestTree(cache, work, smallTree('3.0.0', 'pre'), '3.0.0');
    model = new IndexFsModel({ log: quietLog() });
    model.setEntries([entry], entry.manifest.id);
  });
  after(async () => {
    await model.close();
    await removeDir(cache);
    await removeDir(work);
  });

  test('a READ from offset 0 after the lookup is answered with the same bytes, once', async () => {
    const p = new LookupPrefetch(model);
    const a = file('include/linux/a.h');
    p.looked(a);
    assert.deepEqual(p.counts(), { started: 1, used: 0, dropped: 0, followed: 0, ready: 0, held: 1 });
    // The kernel asks for whole pages: more than the file holds.
    const got = p.take(a.ino, 0, 4096);
    assert.ok(got, 'answered from the prefetch');
    assert.deepEqual(await got, await model.read(a.ino, 0, 4096));
    assert.equal(p.take(a.ino, 0, 4096), undefined, 'used once: the kernel keeps the pages');
    assert.deepEqual(p.counts(), { started: 1, used: 1, dropped: 0, followed: 0, ready: 0, held: 0 });
  });

  test('a large file: only its first window is read, and only a READ within it is answered', async () => {
    const p = new LookupPrefetch(model, { maxFileBytes: 64 * 1024 });
    const big = file('include/linux/big.bin');
    assert.ok(big.size > 64 * 1024);
    p.looked(big);
    assert.equal(p.take(big.ino, 0, 128 * 1024), undefined, 'more than was read: read afresh');
    p.looked(big);
    assert.equal(p.take(big.ino, 4096, 4096), undefined, 'not from offset 0: read afresh');
    p.looked(big);
    const part = p.take(big.ino, 0, 1000);
    assert.ok(part);
    assert.deepEqual(await part, await model.read(big.ino, 0, 1000));
    assert.deepEqual({ ...p.counts(), ready: 0 }, { started: 3, used: 1, dropped: 2, followed: 0, ready: 0, held: 0 });
  });

  test('directories, symlinks, empty and volatile files start no read', () => {
    const p = new LookupPrefetch(model);
    p.looked(file('include/linux'));
    p.looked(file('include/dt/link.h'));
    const a = file('include/linux/a.h');
    p.looked({ ...a, size: 0 });
    p.looked({ ...a, volatile: true });
    assert.deepEqual(p.counts(), { started: 0, used: 0, dropped: 0, followed: 0, ready: 0, held: 0 });
  });

  test('bounded by count and bytes (oldest dropped first) and by age', async () => {
    const a = file('include/linux/a.h');
    const u = file('include/generated/utsrelease.h');
    const big = file('include/linux/big.bin');

    const byCount = new LookupPrefetch(model, { maxEntries: 1 });
    byCount.looked(a);
    byCount.looked(u);
    assert.equal(byCount.take(a.ino, 0, 4096), undefined, 'a.h was dropped for utsrelease.h');
    assert.ok(byCount.take(u.ino, 0, 4096));

    const byBytes = new LookupPrefetch(model, { maxBytes: 96 * 1024 + 10, maxFileBytes: 96 * 1024 });
    byBytes.looked(a);
    byBytes.looked(big);
    assert.deepEqual(byBytes.counts(), { started: 2, used: 0, dropped: 1, followed: 0, ready: 0, held: 1 });
    assert.ok(byBytes.take(big.ino, 0, 96 * 1024));

    const byAge = new LookupPrefetch(model, { ttlMs: 30 });
    byAge.looked(a);
    await new Promise((r) => setTimeout(r, 120));
    assert.deepEqual(byAge.counts(), { started: 1, used: 0, dropped: 1, followed: 0, ready: 0, held: 0 }, 'nothing is held once idle');

    const cleared = new LookupPrefetch(model);
    cleared.looked(a);
    cleared.clear();
    assert.equal(cleared.counts().held, 0);
  });

  test('the headers a prefetched header includes are read ahead, depth first, and only those', async () => {
    const mtime = new Date('2024-01-01T00:00:00Z');
    const tree = [
      { name: './', type: 'directory' as const, mtime },
      { name: './include/', type: 'directory' as const, mtime },
      { name: './include/linux/', type: 'directory' as const, mtime },
      { name: './include/linux/top.h', content: '#include <linux/mid.h>\n#include "near.h"\n  #  include <asm/arch.h>\n#include <linux/missing.h>\n', mtime },
      { name: './include/linux/mid.h', content: '#ifndef MID\n#include <linux/leaf.h>\n#endif\n', mtime },
      { name: './include/linux/near.h', content: '#define NEAR 1\n', mtime },
      { name: './include/linux/leaf.h', content: '#define LEAF 1\n', mtime },
      { name: './include/linux/unused.h', content: '#define UNUSED 1\n', mtime },
      { name: './arch/', type: 'directory' as const, mtime },
      { name: './arch/x86/', type: 'directory' as const, mtime },
      { name: './arch/x86/include/', type: 'directory' as const, mtime },
      { name: './arch/x86/include/asm/', type: 'directory' as const, mtime },
      { name: './arch/x86/include/asm/arch.h', content: '#define ARCH 1\n', mtime },
    ];
    const e = await ingestTree(cache, work, tree, '4.0.0');
    const m = new IndexFsModel({ log: quietLog() });
    m.setEntries([e], e.manifest.id);
    try {
      const at = (p: string): FsAttr => m.resolvePath(`/by-digest/${e.manifest.digest}/${p}`)!;
      const p = new LookupPrefetch(m, { includeReads: 1 });
      // The compiler's search of its -I directories, as the kernel's lookups show it.
      p.probed(at('arch/x86/include').ino, 'linux');
      p.probed(at('include').ino, 'linux');
      p.probed(at('arch/x86/include').ino, 'asm');
      p.looked(at('include/linux/top.h'), at('include/linux').ino);
      for (let i = 0; i < 50 && p.counts().started < 5; i++) await new Promise((r) => setTimeout(r, 10));
      await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(p.counts(), { started: 5, used: 0, dropped: 0, followed: 4, ready: 0, held: 5 }, 'mid.h, leaf.h (inside #ifndef), near.h, asm/arch.h');
      for (const h of ['include/linux/mid.h', 'include/linux/leaf.h', 'include/linux/near.h', 'arch/x86/include/asm/arch.h']) {
        const a = at(h);
        const got = p.take(a.ino, 0, 4096);
        assert.ok(got, `${h} was read ahead`);
        assert.deepEqual(await got, await m.read(a.ino, 0, 4096));
      }
      assert.equal(p.take(at('include/linux/unused.h').ino, 0, 4096), undefined, 'a header nothing includes is not read');
      assert.equal(p.counts().ready, 4, 'each READ found its bytes already in hand');
      p.clear();
    } finally {
      await m.close();
    }
  });

  test('without the directory a header was found in, or with includeReads 0, nothing is followed', async () => {
    const p = new LookupPrefetch(model);
    p.probed(file('include').ino, 'linux');
    p.looked(file('include/generated/utsrelease.h'));
    const q = new LookupPrefetch(model, { includeReads: 0 });
    q.probed(file('include').ino, 'linux');
    q.looked(file('include/linux/a.h'), file('include/linux').ino);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(p.counts().followed + q.counts().followed, 0);
    p.clear();
    q.clear();
  });

  test('a failing read fails the READ that takes it, and nothing else', async () => {
    const p = new LookupPrefetch(model);
    // An inode no entry owns: the model's read rejects (ENOENT), as a vanished node would.
    const ghost: FsAttr = { ...file('include/linux/a.h'), ino: 0x7000_0000 };
    p.looked(ghost);
    await new Promise((r) => setImmediate(r)); // no unhandled rejection while it waits
    const got = p.take(ghost.ino, 0, 4096);
    assert.ok(got);
    await assert.rejects(got, { code: 'E_NOT_FOUND' });
  });
});
