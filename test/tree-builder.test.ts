/**
 * The index built one record at a time while an archive is decoded (TreeBuilder, as ingest uses
 * it) against the index built from all the records at the end: the same bytes for the same tree,
 * whatever the order the records arrive in and however the stream was cut, and the same refusal
 * of the same record for a hostile archive.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { createLogger } from '../src/log.js';
import { INDEX_FILE } from '../src/store/entry.js';
import { ingest } from '../src/store/ingest.js';
import { TarIndexer } from '../src/store/tar-indexer.js';
import { TreeBuilder, TreeIndex, type IndexRecord } from '../src/store/tree-index.js';
import { FIXTURE_ARCHIVE, fixtureMissing, goodTree, makeTar, tempDir, xz, type SynthEntry } from './helpers/archives.js';

const silent = createLogger('silent');

/** A deterministic shuffle (the same permutation on every run, so a failure can be replayed). */
function shuffled<T>(items: readonly T[], seed: number): T[] {
  const out = [...items];
  let s = seed >>> 0;
  for (let i = out.length - 1; i > 0; i--) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    const j = s % (i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

const file = (p: string, offset = 0, size = 1): IndexRecord => ({ path: p, kind: 'file', mode: 0o644, mtime: 7, size, offset });
const dir = (p: string): IndexRecord => ({ path: p, kind: 'dir', mode: 0o755, mtime: 9, size: 0 });
const link = (p: string, target: string): IndexRecord => ({ path: p, kind: 'symlink', mode: 0o777, mtime: 3, size: Buffer.byteLength(target), target });

function built(records: readonly IndexRecord[]): Buffer {
  const b = new TreeBuilder();
  for (const r of records) b.add(r);
  return b.build().encode();
}

function refusal(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    return (err as Error).message;
  }
  assert.fail('expected a refusal');
}

/** A wide, deep tree: directories far past the sort batch, names that sort differently as UTF-8 and UTF-16, a chain 300 deep. */
function bigTree(): IndexRecord[] {
  const records: IndexRecord[] = [dir('include')];
  let offset = 512;
  const add = (p: string): void => {
    records.push(file(p, offset, 3));
    offset += 1024;
  };
  for (let i = 0; i < 700; i++) add(`include/wide/f${(i * 7919) % 1000}.h`);
  // Exactly a sort batch, and exactly the next: directories the last add left sorted.
  for (let i = 32; i > 0; i--) add(`include/batch32/f${i}.h`);
  for (let i = 96; i > 0; i--) add(`include/batch96/f${i}.h`);
  for (const name of ['a', 'a-b', 'a.b', 'a/b', 'A', '\u00e9', '\uffff', '\u{1f600}', 'z', 'a0']) add(`include/mixed/${name}.h`);
  let deep = 'include/deep';
  for (let i = 0; i < 300; i++) deep += `/d${i % 3}`;
  add(`${deep}/bottom.h`);
  records.push(dir('include/wide'), link('include/wide/l', 'f1.h'), link('include/mixed/up', '../wide/f2.h'));
  return records;
}

test('the same tree in any record order gives the same index (directories sorted as records arrive)', () => {
  const records = bigTree();
  const reference = TreeIndex.fromRecords(records);
  const packBytes = reference.packBytes;
  // The bytes decode as a valid index (children sorted, every record in range).
  TreeIndex.decode(reference.encode(), { packBytes });
  assert.ok(built(records).equals(reference.encode()), 'the same records in the same order: the same bytes');
  for (const order of [[...records].reverse(), shuffled(records, 1), shuffled(records, 2), shuffled(records, 3)]) {
    // A directory's own header may come after its children: its mode and mtime then replace the
    // implicit ones. Put it back at the start for a tree that must come out the same.
    const dirsFirst = [...order.filter((r) => r.kind === 'dir'), ...order.filter((r) => r.kind !== 'dir')];
    // Names sit in the strings in the order they arrived; the nodes, their ids and fields do not depend on it.
    const again = TreeIndex.decode(built(dirsFirst), { packBytes });
    assert.deepEqual(again.nodes, reference.nodes, 'same nodes, same ids');
  }
});

test('a hostile set is refused with the same message in whatever order it is built', () => {
  const wide = Array.from({ length: 200 }, (_, i) => file(`include/w/f${i}.h`, i * 1024));
  const cases: Array<[string, IndexRecord[], RegExp]> = [
    ['a path repeated far past the sort batch', [...wide, file('include/w/f3.h', 999_000)], /"include\/w\/f3\.h".*appears twice/],
    ['a path three times', [...wide, file('include/w/f150.h', 999_000), file('include/w/f150.h', 998_000)], /"include\/w\/f150\.h".*appears twice/],
    ['a file later used as a directory', [...wide, file('include/w/f9.h/x.h', 999_000)], /"include\/w\/f9\.h".*both as a directory and as a file/],
    ['a directory header twice', [dir('include'), ...wide, dir('include')], /"include".*appears twice/],
    ['a symlink out of the tree', [...wide, link('include/w/out', '../../../etc/passwd')], /leaves the tree/],
    ['a symlink escaping through another', [...wide, dir('include/a/b'), link('include/a/b/up', '../../..'), link('include/a/b/leak', 'up/../secret')], /leaves the tree through another symlink/],
  ];
  for (const [label, records, want] of cases) {
    const once = refusal(() => TreeIndex.fromRecords(records));
    assert.match(once, want, label);
    // Added one by one, with the refused record anywhere in the stream: refused by build, not add.
    const b = new TreeBuilder();
    for (const r of records) b.add(r);
    assert.equal(refusal(() => b.build()), once, `${label}: same refusal`);
  }
});

test('ingest of the real archive: the index built while xz decodes equals the one built from all its records at the end', async (t) => {
  const missing = fixtureMissing();
  if (missing) return t.skip(missing);
  const tarBytes = execFileSync('xz', ['-dc', FIXTURE_ARCHIVE], { maxBuffer: 1024 ** 3 });
  // Cut at odd places (not the 1 MiB the ingest reads): the records must not depend on the cuts.
  const indexer = new TarIndexer();
  for (let i = 0; i < tarBytes.length; i += 77_777) indexer.push(tarBytes.subarray(i, i + 77_777));
  const atEnd = TreeIndex.fromRecords(indexer.finish(), { pack: indexer.packDigests() }).encode();
  for (const decoder of ['xz', 'lzma-native'] as const) {
    const cacheDir = await tempDir(t);
    const result = await ingest({ cacheDir, archive: FIXTURE_ARCHIVE, btf: 'off', config: 'off', decoder, log: silent });
    const onDisk = await readFile(path.join(result.entry.dir, INDEX_FILE));
    assert.ok(onDisk.equals(atEnd), `${decoder}: index.bin equals the index built at the end (${onDisk.length} vs ${atEnd.length} bytes)`);
  }
});

test('ingest of hostile archives: a path repeated, a file used as a directory, a hard link, deep directories', async (t) => {
  const base = goodTree('6.1.0-test');
  const wide: SynthEntry[] = Array.from({ length: 150 }, (_, i) => ({ name: `./include/wide/f${i}.h`, content: `/* ${i} */\n` }));
  let deep = './include/deep';
  for (let i = 0; i < 120; i++) deep += `/d${i}`;
  const cases: Array<[string, SynthEntry[], RegExp | undefined]> = [
    ['a path repeated after many', [...wide, { name: './include/wide/f7.h', content: 'again' }], /"include\/wide\/f7\.h".*appears twice/],
    ['a file used as a directory after many', [...wide, { name: './include/wide/f7.h/x.h', content: 'x' }], /"include\/wide\/f7\.h".*both as a directory and as a file/],
    ['a hard link', [...wide, { name: './include/wide/hard.h', type: 'link', linkname: './include/wide/f1.h' }], /is a hard link/],
    ['deep directories', [...wide, { name: `${deep}/bottom.h`, content: 'deep' }], undefined],
  ];
  for (const [label, extra, want] of cases) {
    const dir = await tempDir(t);
    const tarBytes = await makeTar([...base, ...extra]);
    const archive = path.join(dir, 'a.tar.xz');
    await writeFile(archive, xz(tarBytes));
    const run = ingest({ cacheDir: path.join(dir, 'cache'), archive, btf: 'off', config: 'off', log: silent });
    if (want) {
      await assert.rejects(run, (err: Error) => {
        assert.match(err.message, want, label);
        return true;
      });
      continue;
    }
    const result = await run;
    const indexer = new TarIndexer();
    indexer.push(tarBytes);
    const atEnd = TreeIndex.fromRecords(indexer.finish(), { pack: indexer.packDigests() }).encode();
    assert.ok((await readFile(path.join(result.entry.dir, INDEX_FILE))).equals(atEnd), `${label}: same index`);
  }
});
