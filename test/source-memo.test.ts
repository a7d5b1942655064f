/**
 * The archive's digest recalled instead of read (source-memo.ts, identifyArchive): only while its
 * source is provably the same file or kernel, never for a file that changed, and any damage to
 * the record costs a read, not a wrong entry. Real ingests of real xz archives.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, readFile, rm, stat, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Writable } from 'node:stream';
import { KheadersError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { identifyArchive } from '../src/source/locate.js';
import { ingest, locateForIngest, type IngestOptions } from '../src/store/ingest.js';
import { SOURCE_MEMO_FILE } from '../src/store/source-memo.js';
import { flipByte, goodArchive, sha256, tempDir } from './helpers/archives.js';

/** A debug logger whose lines are kept, to tell a recalled digest from a read archive. */
function recording(): { log: ReturnType<typeof createLogger>; messages: () => string[] } {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, done) {
      lines.push(...chunk.toString().split('\n').filter(Boolean));
      done();
    },
  });
  return { log: createLogger('debug', stream), messages: () => lines.map((l) => (JSON.parse(l) as { msg: string }).msg) };
}

const RECALLED = 'archive source unchanged since its digest was recorded: not read again';

async function run(opts: IngestOptions): Promise<{ reused: boolean; digest: string; recalled: boolean }> {
  const { log, messages } = recording();
  const result = await ingest({ btf: 'off', modprobe: false, ...opts, log });
  return { reused: result.reused, digest: result.entry.manifest.digest, recalled: messages().includes(RECALLED) };
}

/** Files are trusted to tell a change apart only once they are 2 s old (a coarse clock could hide a second write). */
const settle = (): Promise<void> => new Promise((r) => setTimeout(r, 2_100));

/**
 * A temp dir holding an archive of `release` (its mtime set to `mtime` when given), settled
 * unless told otherwise, and where its cache goes.
 */
async function setUp(t: TestContext, release: string, opts: { settled?: boolean; mtime?: number } = {}): Promise<{ archive: string; bytes: Buffer; cacheDir: string }> {
  const dir = await tempDir(t);
  const archive = path.join(dir, 'a.tar.xz');
  const bytes = await goodArchive(release);
  await writeFile(archive, bytes);
  if (opts.mtime !== undefined) await utimes(archive, opts.mtime, opts.mtime);
  if (opts.settled !== false) await settle();
  return { archive, bytes, cacheDir: path.join(dir, 'cache') };
}

test('an unchanged archive file is not read again: its digest is recalled, and the entry is reused', async (t) => {
  const { archive, bytes, cacheDir } = await setUp(t, '6.99.1-memo');
  const first = await run({ cacheDir, archive });
  assert.deepEqual([first.reused, first.recalled, first.digest], [false, false, sha256(bytes)]);
  const memo = JSON.parse(await readFile(path.join(cacheDir, SOURCE_MEMO_FILE), 'utf8')) as { sources: Array<{ digest: string; source: string }> };
  assert.deepEqual(memo.sources.map((s) => [s.digest, s.source]), [[sha256(bytes), `file:${archive}`]]);
  const again = await run({ cacheDir, archive });
  assert.deepEqual([again.reused, again.recalled, again.digest], [true, true, sha256(bytes)]);
  // recall: false reads it regardless.
  assert.equal((await run({ cacheDir, archive, recall: false })).recalled, false);
});

test('an archive rewritten in place, its size and mtime kept, is read again', async (t) => {
  const mtime = 1_700_000_000; // whole seconds: set again exactly after the rewrite
  const { archive, bytes, cacheDir } = await setUp(t, '6.99.2-memo', { mtime });
  assert.equal((await run({ cacheDir, archive })).reused, false);
  const before = await stat(archive);
  // Another archive of the very same size and mtime: one byte of the compressed stream changed.
  await writeFile(archive, flipByte(bytes, Math.floor(bytes.length / 2)));
  await utimes(archive, mtime, mtime);
  const after = await stat(archive);
  assert.deepEqual([after.size, after.mtimeMs], [before.size, before.mtimeMs]);
  await assert.rejects(
    run({ cacheDir, archive }),
    (err: unknown) => err instanceof KheadersError && err.code === 'E_ARCHIVE_CORRUPT',
    'the new bytes were read (and refused), not the old digest recalled',
  );
});

test('a file changed less than 2 s ago is read, and its digest not recorded, until it has settled', async (t) => {
  const { archive, cacheDir } = await setUp(t, '6.99.3-memo', { settled: false });
  const first = await run({ cacheDir, archive });
  assert.equal(first.recalled, false);
  assert.equal((await readdir(cacheDir)).includes(SOURCE_MEMO_FILE), false, 'nothing recorded for a fresh file');
  assert.equal((await run({ cacheDir, archive })).recalled, false, 'read again');
  await settle();
  assert.equal((await run({ cacheDir, archive })).recalled, false, 'read, and now recorded');
  assert.equal((await run({ cacheDir, archive })).recalled, true);
});

test('a damaged record file is ignored (the archive is read) and written anew', async (t) => {
  const { archive, bytes, cacheDir } = await setUp(t, '6.99.4-memo');
  await run({ cacheDir, archive });
  const file = path.join(cacheDir, SOURCE_MEMO_FILE);
  const good = await readFile(file, 'utf8');
  const damaged = [
    good.slice(0, good.length / 2), // torn
    '',
    good.replace(/"digest":"[0-9a-f]+"/, '"digest":"not a digest"'),
    good.replace(sha256(bytes), 'f'.repeat(64)).replace('"total":', '"total":"many", "x":'), // a rule broken
    JSON.stringify({ format: 99, sources: [] }),
  ];
  for (const text of damaged) {
    await writeFile(file, text);
    const r = await run({ cacheDir, archive });
    assert.deepEqual([r.reused, r.recalled, r.digest], [true, false, sha256(bytes)], text.slice(0, 60));
    assert.equal(await readFile(file, 'utf8').then((s) => s.includes(sha256(bytes))), true, 'recorded again');
  }
  // A record naming a digest the cache does not hold: the archive is read after all, and built.
  await writeFile(file, good.replace(sha256(bytes), 'e'.repeat(64)));
  const r = await run({ cacheDir, archive });
  assert.deepEqual([r.reused, r.recalled, r.digest], [true, true, sha256(bytes)], 'recalled e…e, found nothing, read: the real digest');
});

test("a record holds the source's facts and its own key and time, nothing more; a recall returns the facts alone", async (t) => {
  const { archive, bytes, cacheDir } = await setUp(t, '6.99.6-memo');
  await run({ cacheDir, archive });
  const file = path.join(cacheDir, SOURCE_MEMO_FILE);
  const memo = JSON.parse(await readFile(file, 'utf8')) as { format: number; sources: Array<Record<string, unknown>> };
  const [record] = memo.sources;
  assert.deepEqual(Object.keys(record!).sort(), ['at', 'buildId', 'digest', 'key', 'live', 'obtained', 'source', 'total']);
  // What a damaged or later file may add to a valid record is not recalled with it.
  await writeFile(file, JSON.stringify({ ...memo, sources: [{ ...record, bytes: 'AAAA', module: { file: '/x.ko' }, extra: 1 }] }));
  const located = await locateForIngest({ cacheDir, archive, modprobe: false });
  assert.equal(located.digest, sha256(bytes));
  assert.deepEqual(located.source, { source: `file:${archive}`, obtained: 'file', live: false, buildId: null });
});

test('an entry gone since its digest was recorded: the archive is read and the entry built again', async (t) => {
  const { archive, bytes, cacheDir } = await setUp(t, '6.99.5-memo');
  await run({ cacheDir, archive });
  await rm(path.join(cacheDir, 'entries'), { recursive: true, force: true });
  const rebuilt = await run({ cacheDir, archive });
  assert.deepEqual([rebuilt.reused, rebuilt.recalled, rebuilt.digest], [false, true, sha256(bytes)]);
  assert.equal((await run({ cacheDir, archive })).reused, true);
});

test('what identifies a source: a file by its inode, size and times; the live archive by where it is; none for what cannot be told', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.tar.xz');
  await writeFile(file, 'x');
  const base = { modprobe: false, unloadModule: false, maxArchiveBytes: 1 << 20 };
  const id = await identifyArchive({ ...base, archive: file });
  assert.ok(id);
  assert.deepEqual(id.sources, [`file:${file}`, `elf:${file}`]);
  assert.equal(id.settled, false, 'written just now');
  const facts = JSON.parse(id.key) as Record<string, string>;
  assert.deepEqual([facts.kind, facts.path, facts.size], ['file', file, '1']);
  await writeFile(file, 'y');
  assert.notEqual((await identifyArchive({ ...base, archive: file }))!.key, id.key, 'same size, rewritten: another identity');
  // A regular file standing in for the kernel's: told by its inode and times too.
  const live = await identifyArchive({ ...base, livePaths: [path.join(dir, 'absent'), file], moduleDirs: [path.join(dir, 'none')] });
  assert.deepEqual([(JSON.parse(live!.key) as { kind: string }).kind, live!.sources], ['live-file', [file]]);
  // Nothing there at all: nothing to identify.
  assert.equal(await identifyArchive({ ...base, archive: path.join(dir, 'absent') }), undefined);
  assert.equal(await identifyArchive({ ...base, livePaths: [path.join(dir, 'absent')], moduleDirs: [path.join(dir, 'none')] }), undefined);
});
