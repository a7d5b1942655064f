/**
 * IndexFsModel without a mount: layout, inode blocks, permissions, reads, and what a swap
 * changes (and announces). Entries come from the real ingest, on small generated archives and
 * on the real fixture.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { constants as fsc } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { BY_DIGEST_INO, CURRENT_INO, IndexFsModel } from '../src/serve/fuse/index-model.js';
import { ROOT_INO, type FsAttr, type FsInvalidation } from '../src/serve/fuse/fs-model.js';
import type { CacheEntry } from '../src/store/entry.js';
import { FIXTURE_COUNTS, FIXTURE_RELEASE, extractFixture, fixtureSkipReason, ingestFixture, ingestTree, quietLog, removeDir, smallTree, tempDir } from './helpers/fuse-env.js';

const S_IFMT = fsc.S_IFMT;

function must<T>(x: T | undefined, what: string): T {
  assert.ok(x !== undefined, `${what} is missing`);
  return x;
}

describe('IndexFsModel on small archives', () => {
  let cache: string;
  let work: string;
  let A: CacheEntry; // 1.0.0, first build
  let A2: CacheEntry; // 1.0.0 rebuilt: other bytes, same sizes, same mtimes
  let B: CacheEntry; // 2.0.0
  const models: IndexFsModel[] = [];
  const newModel = (): IndexFsModel => {
    const m = new IndexFsModel({ log: quietLog() });
    models.push(m);
    return m;
  };

  before(async () => {
    cache = await tempDir('model-cache');
    work = await tempDir('model-work');
    const mtime = new Date('2024-01-01T00:00:00Z');
    A = await ingestTree(cache, work, smallTree('1.0.0', 'one', mtime), '1.0.0');
    A2 = await ingestTree(cache, work, smallTree('1.0.0', 'two', mtime), '1.0.0');
    B = await ingestTree(cache, work, smallTree('2.0.0', 'bee', mtime), '2.0.0');
  });
  after(async () => {
    await Promise.all(models.map((m) => m.close()));
    await removeDir(cache);
    await removeDir(work);
  });

  test('root shows current, by-digest and one directory per release', () => {
    const m = newModel();
    m.setEntries([A, B], A.manifest.id);
    const names = must(m.readdir(ROOT_INO), 'root listing').map((d) => d.name);
    assert.deepEqual(names, ['current', 'by-digest', '1.0.0', '2.0.0']);
    const cur = must(m.lookup(ROOT_INO, 'current'), 'current');
    assert.equal(cur.ino, CURRENT_INO);
    assert.equal(cur.kind, 'symlink');
    assert.equal(cur.mode, fsc.S_IFLNK | 0o777);
    assert.equal(m.readlink(CURRENT_INO), '1.0.0');
    assert.equal(cur.size, '1.0.0'.length);
    const byDigest = must(m.readdir(BY_DIGEST_INO), 'by-digest listing');
    assert.deepEqual(byDigest.map((d) => d.name), [A.manifest.digest, B.manifest.digest].sort());
    // A release is a symlink to its tree under by-digest/ (per-build paths: see index-model.ts).
    const release = must(m.lookup(ROOT_INO, '1.0.0'), 'release');
    assert.equal(release.mode, fsc.S_IFLNK | 0o777);
    assert.equal(m.readlink(release.ino), `by-digest/${A.manifest.digest}`);
    assert.equal(must(m.lookup(BY_DIGEST_INO, A.manifest.digest), 'by digest').kind, 'dir');
    assert.equal(m.getattr(ROOT_INO)?.mode, fsc.S_IFDIR | 0o555);
    assert.equal(m.lookup(ROOT_INO, 'nope'), undefined);
  });

  test('files 0444, dirs 0555, symlinks 0777 served as archived, uid-free attrs', () => {
    const m = newModel();
    m.setEntries([A], A.manifest.id);
    const tree = `/by-digest/${A.manifest.digest}`;
    const file = must(m.resolvePath(`${tree}/include/linux/a.h`), 'a.h');
    assert.equal(file.kind, 'file');
    assert.equal(file.mode, fsc.S_IFREG | 0o444);
    assert.equal(file.nlink, 1);
    assert.equal(file.size, A.index.get('include/linux/a.h')!.size);
    const dir = must(m.resolvePath(`${tree}/include`), 'include');
    assert.equal(dir.mode, fsc.S_IFDIR | 0o555);
    // include/ holds linux, dt, generated: 2 + 3 links.
    assert.equal(dir.nlink, 5);
    const link = must(m.resolvePath(`${tree}/include/dt/link.h`), 'link.h');
    assert.equal(link.mode & S_IFMT, fsc.S_IFLNK);
    assert.equal(link.mode & 0o7777, 0o777);
    assert.equal(m.readlink(link.ino), '../linux/a.h');
    assert.equal(m.readlink(file.ino), undefined);
    // No symlink is followed by path resolution: the kernel does that itself.
    assert.equal(m.resolvePath('/current/include/linux/a.h'), undefined);
    assert.equal(m.resolvePath('/1.0.0/include/linux/a.h'), undefined);
    assert.equal(m.resolvePath(`${tree}/include/../include/linux/a.h`), undefined);
    assert.equal(m.resolvePath(`${tree}/include/linux/a.h/x`), undefined);
    assert.equal(m.readdir(file.ino), undefined);
    assert.deepEqual(must(m.readdir(dir.ino), 'include listing').map((d) => d.name), ['dt', 'generated', 'linux']);
    // The release name leads to that same tree.
    const release = must(m.resolvePath('/1.0.0'), 'release link');
    assert.equal(release.kind, 'symlink');
    assert.equal(m.readlink(release.ino), tree.slice(1));
  });

  test('setEntries walks no tree; a directory\'s links are counted when it is first asked for', () => {
    // setEntries runs on the serving thread before the mount answers: it must not read every
    // node of every entry (it did, for st_nlink, ~12-45 ms a start with two real entries).
    const index = B.index;
    let reads = 0;
    const kindOf = index.kindOf.bind(index);
    const parentOf = index.parentOf.bind(index);
    Object.assign(index, { kindOf: (id: number) => (reads++, kindOf(id)), parentOf: (id: number) => (reads++, parentOf(id)) });
    try {
      const m = newModel();
      m.setEntries([B], B.manifest.id);
      assert.equal(reads, 0, 'nodes read by setEntries');
      // Every directory's st_nlink is still 2 + its subdirectories, asked in any order, twice.
      const dirs: number[] = [];
      for (let id = 0; id < index.nodeCount; id++) if (kindOf(id) === 'dir') dirs.push(id);
      const tree = must(m.lookup(BY_DIGEST_INO, B.manifest.digest), 'the tree');
      for (const id of [...dirs].reverse().concat(dirs)) {
        let want = 2;
        for (let c = 0; c < index.nodeCount; c++) if (c !== 0 && parentOf(c) === id && kindOf(c) === 'dir') want++;
        assert.equal(must(m.getattr(tree.ino + id), `dir ${id}`).nlink, want, index.pathOf(id));
      }
    } finally {
      delete (index as unknown as Record<string, unknown>)['kindOf'];
      delete (index as unknown as Record<string, unknown>)['parentOf'];
    }
  });

  test('mtimes are the archived seconds; the millisecond part tells entries apart', () => {
    const m = newModel();
    m.setEntries([A, A2], A.manifest.id);
    const a = must(m.resolvePath('/by-digest/' + A.manifest.digest + '/include/linux/big.bin'), 'A big');
    const a2 = must(m.resolvePath('/by-digest/' + A2.manifest.digest + '/include/linux/big.bin'), 'A2 big');
    assert.equal(a.size, a2.size, 'the two builds have same-size files');
    assert.equal(Math.floor(a.mtimeMs / 1000), Date.parse('2024-01-01T00:00:00Z') / 1000);
    assert.equal(Math.floor(a2.mtimeMs / 1000), Math.floor(a.mtimeMs / 1000));
    assert.notEqual(a.mtimeMs, a2.mtimeMs);
  });

  test('read returns the archived bytes, any range, in one or many chunks', async () => {
    const m = newModel();
    m.setEntries([A], A.manifest.id);
    const tree = smallTree('1.0.0', 'one');
    const want = Buffer.from(tree.find((f) => f.name.endsWith('big.bin'))!.content as Buffer);
    const big = must(m.resolvePath(`/by-digest/${A.manifest.digest}/include/linux/big.bin`), 'big.bin');
    assert.deepEqual(await m.read(big.ino, 0, big.size), want);
    assert.deepEqual(await m.read(big.ino, 1000, 4096), want.subarray(1000, 5096));
    assert.deepEqual(await m.read(big.ino, big.size - 10, 4096), want.subarray(want.length - 10));
    assert.equal((await m.read(big.ino, big.size, 100)).length, 0);
    assert.equal((await m.read(big.ino, big.size + 5, 100)).length, 0);
    // Many concurrent reads share one FileHandle.
    const parts = await Promise.all(Array.from({ length: 75 }, (_, i) => m.read(big.ino, i * 4096, 4096)));
    assert.deepEqual(Buffer.concat(parts), want);
    const dir = must(m.resolvePath(`/by-digest/${A.manifest.digest}/include`), 'include');
    await assert.rejects(m.read(dir.ino, 0, 10), (err: Error & { details?: { errno?: string } }) => err.details?.errno === 'EISDIR');
    await assert.rejects(m.read(999_999, 0, 10), /no inode/);
  });

  test('each entry keeps its inode block; a swap re-points current and announces it', async () => {
    const m = newModel();
    const seen: FsInvalidation[] = [];
    const off = m.onInvalidate((i) => seen.push(i));
    m.setEntries([A], A.manifest.id);
    const inTree = (e: CacheEntry, p: string): string => `/by-digest/${e.manifest.digest}/${p}`;
    const aFile = must(m.resolvePath(inTree(A, 'include/linux/a.h')), 'a.h');
    const aLink = must(m.lookup(ROOT_INO, '1.0.0'), '1.0.0');
    seen.length = 0;

    // A new release: current moves, 2.0.0 appears, A's inodes mean what they meant.
    m.setEntries([A, B], B.manifest.id);
    assert.equal(m.readlink(CURRENT_INO), '2.0.0');
    assert.deepEqual(m.resolvePath(inTree(A, 'include/linux/a.h')), aFile);
    assert.equal(m.readlink(must(m.lookup(ROOT_INO, '1.0.0'), '1.0.0').ino), `by-digest/${A.manifest.digest}`);
    const bFile = must(m.resolvePath(inTree(B, 'include/linux/a.h')), 'B a.h');
    assert.notEqual(bFile.ino, aFile.ino);
    const key = (i: FsInvalidation): string => `${i.parentIno}/${i.name}/${i.oldIno ?? '-'}`;
    assert.deepEqual(seen.map(key).sort(), [`${ROOT_INO}/current/${CURRENT_INO}`, `${ROOT_INO}/2.0.0/-`, `${BY_DIGEST_INO}/${B.manifest.digest}/-`].sort());

    // Same release rebuilt: <release> is re-pointed (its link inode named), the old inode still reads.
    seen.length = 0;
    m.setEntries([A, B, A2], A2.manifest.id);
    const a2Link = must(m.lookup(ROOT_INO, '1.0.0'), 'A2 link');
    assert.equal(a2Link.ino, aLink.ino, 'one link inode per release name');
    assert.equal(m.readlink(a2Link.ino), `by-digest/${A2.manifest.digest}`);
    assert.notEqual(must(m.lookup(BY_DIGEST_INO, A2.manifest.digest), 'A2 root').ino, must(m.lookup(BY_DIGEST_INO, A.manifest.digest), 'A root').ino);
    assert.equal(m.readlink(CURRENT_INO), '1.0.0');
    assert.ok(seen.some((i) => i.parentIno === ROOT_INO && i.name === '1.0.0' && i.oldIno === aLink.ino), JSON.stringify(seen));
    assert.ok(seen.some((i) => i.name === 'current'), 'current changed target');
    const oldBytes = (await m.read(aFile.ino, 0, aFile.size)).toString();
    const newFile = must(m.resolvePath(inTree(A2, 'include/linux/a.h')), 'A2 a.h');
    assert.match(oldBytes, /"one"/);
    assert.match((await m.read(newFile.ino, 0, newFile.size)).toString(), /"two"/);

    // An entry dropped from the cache leaves the listings but stays readable by inode.
    seen.length = 0;
    m.setEntries([A2], A2.manifest.id);
    assert.equal(m.lookup(ROOT_INO, '2.0.0'), undefined);
    assert.equal(m.lookup(BY_DIGEST_INO, B.manifest.digest), undefined);
    assert.match((await m.read(bFile.ino, 0, bFile.size)).toString(), /"bee"/);
    assert.ok(seen.some((i) => i.name === '2.0.0'));
    assert.ok(seen.some((i) => i.parentIno === BY_DIGEST_INO && i.name === B.manifest.digest));

    // Nothing changes, nothing is announced.
    seen.length = 0;
    m.setEntries([A2], A2.manifest.id);
    assert.deepEqual(seen, []);
    off();
    m.setEntries([A, A2], A.manifest.id);
    assert.deepEqual(seen, [], 'unsubscribed');
  });

  test('<release> prefers the current entry, else the most recently ingested', () => {
    const m = newModel();
    const older = A.manifest.ingestedAt < A2.manifest.ingestedAt ? A : A2;
    const newer = older === A ? A2 : A;
    const target = (): string | undefined => m.readlink(must(m.lookup(ROOT_INO, '1.0.0'), '1.0.0').ino);
    m.setEntries([newer, older], null);
    assert.equal(m.lookup(ROOT_INO, 'current'), undefined, 'no current without a current id (and no entry of the running release)');
    assert.equal(target(), `by-digest/${newer.manifest.digest}`);
    m.setEntries([newer, older], older.manifest.id);
    assert.equal(target(), `by-digest/${older.manifest.digest}`);
    // An unknown current id shows no current rather than a dangling link.
    m.setEntries([newer], 'no-such-id');
    assert.equal(m.lookup(ROOT_INO, 'current'), undefined);
    assert.ok(!must(m.readdir(ROOT_INO), 'root').some((d) => d.name === 'current'));
  });

  test('statfs counts what is shown; close() ends reads', async () => {
    const m = newModel();
    m.setEntries([A, B], A.manifest.id);
    const s = m.statfs();
    assert.equal(s.files, 3 + 2 /* the two release links */ + A.index.nodes.length + B.index.nodes.length);
    assert.equal(s.blocks, Math.ceil((A.index.totalBytes + B.index.totalBytes) / s.blockSize));
    const f = must(m.resolvePath(`/by-digest/${A.manifest.digest}/include/linux/a.h`), 'a.h');
    await m.read(f.ino, 0, 10);
    await m.close();
    await assert.rejects(m.read(f.ino, 0, 10), /closed/);
  });
});

describe('IndexFsModel on the real fixture', () => {
  let cache: string | undefined;
  let extracted: string | undefined;
  let entry: CacheEntry | undefined;
  let model: IndexFsModel | undefined;
  let skip: string | undefined;

  before(async () => {
    skip = await fixtureSkipReason();
    if (skip) return;
    cache = await tempDir('model-fixture');
    entry = await ingestFixture(cache);
    extracted = await extractFixture();
    model = new IndexFsModel({ log: quietLog() });
    model.setEntries([entry], entry.manifest.id);
  });
  after(async () => {
    await model?.close();
    if (cache) await removeDir(cache);
    if (extracted) await removeDir(extracted);
  });

  test('counts, symlinks and every byte match tar -xJf', async (t) => {
    if (skip) return t.skip(skip);
    const m = model!;
    assert.equal(entry!.manifest.release, FIXTURE_RELEASE);
    const counts = { file: 0, dir: 1, symlink: 0 }; // the archive's 320 dirs include './'
    const walk = async (dirAttr: FsAttr, rel: string): Promise<void> => {
      for (const d of must(m.readdir(dirAttr.ino), rel)) {
        const childRel = rel === '' ? d.name : `${rel}/${d.name}`;
        counts[d.attr.kind]++;
        if (d.attr.kind === 'dir') await walk(d.attr, childRel);
        else if (d.attr.kind === 'symlink') {
          const { readlink } = await import('node:fs/promises');
          assert.equal(m.readlink(d.attr.ino), await readlink(path.join(extracted!, childRel)), childRel);
        } else {
          const want = await readFile(path.join(extracted!, childRel));
          assert.equal(d.attr.size, want.length, childRel);
          assert.ok((await m.read(d.attr.ino, 0, d.attr.size)).equals(want), `${childRel} differs`);
        }
      }
    };
    assert.equal(m.readlink(must(m.lookup(ROOT_INO, FIXTURE_RELEASE), 'release link').ino), `by-digest/${entry!.manifest.digest}`);
    await walk(must(m.lookup(BY_DIGEST_INO, entry!.manifest.digest), 'the tree'), '');
    assert.deepEqual(counts, { file: FIXTURE_COUNTS.files, dir: FIXTURE_COUNTS.dirs, symlink: FIXTURE_COUNTS.symlinks });
  });
});
