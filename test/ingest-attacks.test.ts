/**
 * Attacks on the ingest's decode path, each against real xz archives: sizes at the limits and
 * one byte or one block either side (both decoders must give the same verdict), the xz child
 * killed while ingest follows the pack it writes, a staged pack truncated under it, and an `xz`
 * on PATH that is broken: short, garbage, long, refusing our options, hung. Whatever happens, no
 * entry is cached that is not the archive's tree, the error is typed, nothing hangs, and the
 * cache is as it was before.
 */
import assert from 'node:assert/strict';
import { chmod, mkdir, readFile, readdir, stat, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { KheadersError } from '../src/errors.js';
import { xzUncompressedSize } from '../src/source/xz.js';
import { createLogger } from '../src/log.js';
import { CacheStore } from '../src/store/cache.js';
import { findXzBinary } from '../src/store/decompress.js';
import { PACK_FILE } from '../src/store/entry.js';
import { ingest, type IngestOptions } from '../src/store/ingest.js';
import { generateHeaderInWorker } from '../src/store/vmlinux-h.js';
import { BtfBuilder } from './helpers/btf-builder.js';
import { goodArchive as goodArchiveOf, goodTree, makeTar, randomBytes, sha256, snapshot, tempDir, textLike, xz, xzAsync, type SynthEntry } from './helpers/archives.js';

const silent = createLogger('silent');
const DECODERS = ['xz', 'lzma-native'] as const;

/** xz stream padding (four zero bytes): legal, and it hides the index, so only the decoder's bound can stop a bomb. */
const PADDING = Buffer.alloc(4);

async function attempt(opts: IngestOptions): Promise<{ ok: true; files: number; packBytes: number } | { ok: false; err: unknown }> {
  try {
    const r = await ingest({ btf: 'off', config: 'off', log: silent, setCurrent: false, ...opts });
    return { ok: true, files: r.entry.manifest.files, packBytes: r.entry.manifest.packBytes };
  } catch (err) {
    return { ok: false, err };
  }
}

/** Nothing cached, nothing staged: what a refused ingest must leave in a fresh cache. */
async function assertEmptyCache(cacheDir: string, what: string): Promise<void> {
  if (!(await stat(cacheDir).then(() => true, () => false))) return; // refused before the cache was made
  const store = await CacheStore.open(cacheDir);
  assert.deepEqual((await store.list()).map((m) => m.id), [], `${what}: an entry was cached`);
  assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')).catch(() => []), [], `${what}: tmp/ not swept`);
}

test('--max-total-bytes at the tar size and one byte or one block either side: the same verdict from both decoders, with and without the size in the xz index', async (t) => {
  const tree: SynthEntry[] = [...goodTree('6.99.1-edge'), { name: './include/edge.h', content: textLike(40_000, 7) }];
  const tarBytes = await makeTar(tree);
  const size = tarBytes.length;
  const plain = xz(tarBytes);
  const dir = await tempDir(t);
  for (const [form, bytes] of [['index readable', plain], ['index hidden by stream padding', Buffer.concat([plain, PADDING])]] as const) {
    const archive = path.join(dir, `a-${form.length}.tar.xz`);
    await writeFile(archive, bytes);
    for (const delta of [-512, -1, 0, 1, 512]) {
      const limit = size + delta;
      for (const decoder of DECODERS) {
        const what = `${form}, ${decoder}, limit ${delta >= 0 ? '+' : ''}${delta}`;
        const cacheDir = path.join(dir, `c-${form.length}-${delta}-${decoder}`);
        const r = await attempt({ cacheDir, archive, decoder, limits: { maxTotalBytes: limit } });
        if (limit >= size) {
          assert.ok(r.ok, `${what}: refused an archive of ${size} bytes: ${r.ok ? '' : String(r.err)}`);
          assert.equal(r.packBytes, size, what);
        } else {
          assert.ok(!r.ok, `${what}: cached ${size} bytes past a ${limit}-byte limit`);
          assert.ok(r.err instanceof KheadersError && r.err.code === 'E_LIMIT', `${what}: ${String(r.err)}`);
          assert.equal(r.err.details.limit, 'maxTotalBytes', what);
          await assertEmptyCache(cacheDir, what);
        }
      }
    }
  }
});

test('--max-file-bytes at a file\'s size and one byte or one block either side: the same verdict from both decoders', async (t) => {
  const dir = await tempDir(t);
  const limit = 30_000;
  for (const delta of [-512, -1, 0, 1, 512]) {
    const fileBytes = limit + delta;
    const archive = path.join(dir, `f${delta}.tar.xz`);
    await writeFile(archive, xz(await makeTar([...goodTree('6.99.2-edge'), { name: './include/edge.h', content: randomBytes(fileBytes, 3) }])));
    for (const decoder of DECODERS) {
      const what = `${decoder}, a ${fileBytes}-byte file, limit ${limit}`;
      const cacheDir = path.join(dir, `c${delta}-${decoder}`);
      const r = await attempt({ cacheDir, archive, decoder, limits: { maxFileBytes: limit } });
      if (fileBytes <= limit) {
        assert.ok(r.ok, `${what}: refused: ${r.ok ? '' : String(r.err)}`);
      } else {
        assert.ok(!r.ok, `${what}: cached`);
        assert.ok(r.err instanceof KheadersError && r.err.code === 'E_LIMIT', `${what}: ${String(r.err)}`);
        assert.equal(r.err.details.limit, 'maxFileBytes', what);
        assert.equal(r.err.details.entry, 'include/edge.h', what);
        await assertEmptyCache(cacheDir, what);
      }
    }
  }
});

/** An `xz` on PATH that is the given shell script (`$REAL` is the real xz), for the length of a test. */
async function fakeXzOnPath(t: TestContext, dir: string, script: string): Promise<void> {
  const real = await findXzBinary();
  assert.ok(real, 'no xz binary to wrap');
  const bin = path.join(dir, `bin-${sha256(script).slice(0, 8)}`);
  await mkdir(bin, { recursive: true });
  await writeFile(path.join(bin, 'xz'), `#!/bin/sh\nREAL=${real.file}\n${script}\n`);
  await chmod(path.join(bin, 'xz'), 0o755);
  const saved = process.env.PATH;
  process.env.PATH = `${bin}:${saved ?? ''}`;
  t.after(() => {
    process.env.PATH = saved;
  });
}

/** A tree of several members; `cut` is where its first `keep` members end (a member boundary). */
async function hostileInputs(): Promise<{ tar: Buffer; archive: Buffer; cut: number; extraMember: Buffer }> {
  const tree: SynthEntry[] = [...goodTree('6.99.3-hostile'), ...Array.from({ length: 8 }, (_, i) => ({ name: `./include/more/m${i}.h`, content: textLike(30_000, 50 + i) }))];
  const tar = await makeTar(tree);
  const head = await makeTar(tree.slice(0, tree.length - 4));
  const extraMember = (await makeTar([{ name: './include/more/injected.h', content: 'int injected;\n' }])).subarray(0, -1024);
  return { tar, archive: xz(tar), cut: head.length - 1024, extraMember };
}

test('a broken xz on PATH never gets a wrong tree cached: short, long, garbage, or refusing our options', async (t) => {
  const dir = await tempDir(t);
  const h = await hostileInputs();
  const archive = path.join(dir, 'a.tar.xz');
  await writeFile(archive, h.archive);
  const extra = path.join(dir, 'extra.bin');
  await writeFile(extra, h.extraMember);
  const cases: Array<{ name: string; script: string; code: string }> = [
    // Exits 0 having written only the first members: a clean member boundary, no end marker.
    { name: 'stops early at a member boundary and exits 0', script: `"$REAL" "$@" | head -c ${h.cut}; exit 0`, code: 'E_INTERNAL' },
    // Writes the whole tree and then one member more, with a proper end marker after it.
    { name: 'writes a member more than the archive holds', script: `"$REAL" "$@" | head -c ${h.tar.length - 1024}; cat ${extra}; head -c 1024 /dev/zero`, code: 'E_INTERNAL' },
    { name: 'writes the archive and then garbage', script: `"$REAL" "$@"; printf 'garbage'`, code: 'E_ARCHIVE_CORRUPT' },
    { name: 'writes garbage only', script: 'head -c 100000 /dev/urandom', code: 'E_ARCHIVE_CORRUPT' },
    { name: 'rejects our XZ_DEFAULTS like an old or foreign xz', script: `echo "xz: XZ_DEFAULTS: unrecognized option '--no-sparse'" >&2; exit 1`, code: 'E_INTERNAL' },
  ];
  for (const c of cases) {
    await t.test(c.name, async (st) => {
      await fakeXzOnPath(st, dir, c.script);
      const cacheDir = path.join(dir, `c-${sha256(c.name).slice(0, 8)}`);
      const r = await attempt({ cacheDir, archive, decoder: 'xz' });
      assert.ok(!r.ok, `cached ${r.ok ? r.files : 0} files from a broken xz`);
      assert.ok(r.err instanceof KheadersError, String(r.err));
      assert.equal(r.err.code, c.code, r.err.message);
      await assertEmptyCache(cacheDir, c.name);
    });
  }
});

test('a hung xz on PATH is stopped: the ingest fails typed instead of waiting forever', async (t) => {
  const dir = await tempDir(t);
  const archive = path.join(dir, 'a.tar.xz');
  await writeFile(archive, (await hostileInputs()).archive);
  for (const [name, script] of [
    ['writes nothing and never exits', 'exec sleep 600'],
    ['writes half and then hangs', `"$REAL" "$@" | head -c 20000; exec sleep 600`],
  ] as const) {
    await t.test(name, async (st) => {
      await fakeXzOnPath(st, dir, script);
      const cacheDir = path.join(dir, `c-${sha256(name).slice(0, 8)}`);
      const r = await attempt({ cacheDir, archive, decoder: 'xz', decoderStallMs: 300 });
      assert.ok(!r.ok, 'cached');
      assert.ok(r.err instanceof KheadersError && r.err.code === 'E_INTERNAL', String(r.err));
      assert.match(r.err.message, /wrote nothing for/);
      await assertEmptyCache(cacheDir, name);
    });
  }
  await t.test('decodes, exits, and leaves a process holding its output and stderr open', async (st) => {
    const pidFile = path.join(dir, 'lingering.pid');
    await fakeXzOnPath(st, dir, `"$REAL" "$@"; sleep 600 & echo $! > ${pidFile}; exit 0`);
    st.after(async () => {
      const pid = Number(await readFile(pidFile, 'utf8').catch(() => ''));
      if (pid > 0) process.kill(pid, 'SIGKILL');
    });
    const r = await attempt({ cacheDir: path.join(dir, 'c-lingering'), archive, decoder: 'xz' });
    assert.ok(r.ok, String(r.ok || r.err));
  });
});

test('a valid multi-stream archive (streams and stream padding between them) still ingests with both decoders: the size check sums every index', async (t) => {
  const dir = await tempDir(t);
  const tarBytes = await makeTar(goodTree('6.99.4-multi'));
  const cutAt = 4096; // inside the tree: neither stream is a tar by itself
  const archive = path.join(dir, 'multi.tar.xz');
  await writeFile(archive, Buffer.concat([xz(tarBytes.subarray(0, cutAt)), PADDING, PADDING, xz(tarBytes.subarray(cutAt))]));
  assert.equal(xzUncompressedSize(await readFile(archive)), tarBytes.length);
  for (const decoder of DECODERS) {
    const r = await attempt({ cacheDir: path.join(dir, `c-${decoder}`), archive, decoder });
    assert.ok(r.ok, `${decoder}: ${r.ok ? '' : String(r.err)}`);
    assert.equal(r.packBytes, tarBytes.length);
  }
});

/** A ~24 MiB tree of header-like text: xz takes long enough over it to be caught mid-stream. */
async function bigInputs(): Promise<{ tar: Buffer; archive: Buffer; files: Map<string, string> }> {
  const tree = goodTree('6.99.5-big');
  const files = new Map<string, string>();
  for (let i = 0; i < 24; i++) {
    const content = textLike(1024 * 1024, 500 + i);
    files.set(`include/big/p${i}.h`, sha256(content));
    tree.push({ name: `./include/big/p${i}.h`, content });
  }
  const tar = await makeTar(tree);
  return { tar, archive: await xzAsync(tar, 0), files };
}
let big: ReturnType<typeof bigInputs> | undefined;

/** The pid of this process's child named `comm` (the xz the ingest started), if there is one now. */
async function childNamed(comm: string): Promise<number | undefined> {
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const s = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
    const close = s.lastIndexOf(')');
    if (s.slice(s.indexOf('(') + 1, close) === comm && Number(s.slice(close + 2).split(' ')[1]) === process.pid) return Number(pid);
  }
  return undefined;
}

/** Wait (while the ingest runs) until the staged pack holds `minBytes`; then `act` on it. */
async function whenPackGrows(tmpDir: string, minBytes: number, act: (pack: string) => Promise<void>): Promise<number> {
  for (;;) {
    for (const name of await readdir(tmpDir).catch(() => [] as string[])) {
      const pack = path.join(tmpDir, name, PACK_FILE);
      const size = await stat(pack).then((s) => s.size, () => 0);
      if (size >= minBytes) {
        await act(pack);
        return size;
      }
    }
    await new Promise((r) => setTimeout(r, 1));
  }
}

/**
 * Every big file of the cached big entry, read as any front end reads it (through its verifying
 * reader): the archive's bytes, or E_ENTRY_DAMAGED. Never other bytes. Returns how many were refused.
 */
async function assertServesOnlyTheTree(t: TestContext, cacheDir: string, files: Map<string, string>): Promise<number> {
  const store = await CacheStore.open(cacheDir);
  let refused = 0;
  for (const m of await store.list()) {
    if (m.release !== '6.99.5-big') continue;
    const entry = await store.load(m.id);
    t.after(() => entry.reader.close());
    for (const [name, digest] of files) {
      const node = entry.index.get(name);
      assert.ok(node !== undefined, `${name} is not in the entry`);
      const bytes = await entry.reader.readWhole(node.id).catch((err: unknown) => {
        assert.ok(err instanceof KheadersError && err.code === 'E_ENTRY_DAMAGED', String(err));
        return undefined;
      });
      if (bytes === undefined) refused++;
      else assert.equal(sha256(bytes), digest, `${name}: served bytes that are not the archive's`);
    }
  }
  return refused;
}

test('the xz child killed (SIGKILL) while ingest follows its pack: a typed error, the cache as it was, and a retry that works', async (t) => {
  const b = await (big ??= bigInputs());
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const before = path.join(dir, 'before.tar.xz');
  await writeFile(before, await goodArchiveOf('6.99.0-before'));
  const first = await attempt({ cacheDir, archive: before, decoder: 'xz' });
  assert.ok(first.ok);
  const entriesBefore = await snapshot(path.join(cacheDir, 'entries'));
  const archive = path.join(dir, 'big.tar.xz');
  await writeFile(archive, b.archive);

  const running = attempt({ cacheDir, archive, decoder: 'xz' });
  let killed: number | undefined;
  const at = await whenPackGrows(path.join(cacheDir, 'tmp'), 2 * 1024 * 1024, async () => {
    killed = await childNamed('xz');
    assert.ok(killed !== undefined, 'no xz child found');
    process.kill(killed, 'SIGKILL');
  });
  const r = await running;
  t.diagnostic(`xz (pid ${killed}) killed with ${(at / 2 ** 20).toFixed(1)} of ${(b.tar.length / 2 ** 20).toFixed(1)} MiB in the pack`);
  assert.ok(at < b.tar.length, 'xz had finished before the kill');
  assert.ok(!r.ok, 'a pack cut short by a killed xz was cached');
  // Killed (the OOM killer's SIGKILL on a phone): the environment's doing, not a bug (E_INTERNAL, exit 1).
  assert.ok(r.err instanceof KheadersError && r.err.code === 'E_KILLED', String(r.err));
  assert.equal(r.err.exitCode, 5);
  assert.match(r.err.message, /was killed by SIGKILL \(the out-of-memory killer, or another process\)/);
  assert.deepEqual(await snapshot(path.join(cacheDir, 'entries')), entriesBefore, 'the cache changed');
  assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), []);

  const retry = await attempt({ cacheDir, archive, decoder: 'xz' });
  assert.ok(retry.ok, retry.ok ? '' : String(retry.err));
  assert.equal(retry.packBytes, b.tar.length);
  assert.equal(await assertServesOnlyTheTree(t, cacheDir, b.files), 0);
});

test('the staged pack truncated by another process while xz writes it: never an entry whose bytes are not the archive\'s, and the refusal blames the staging, not the archive', async (t) => {
  const b = await (big ??= bigInputs());
  const dir = await tempDir(t);
  const archive = path.join(dir, 'big.tar.xz');
  await writeFile(archive, b.archive);
  const refused = async (r: Awaited<ReturnType<typeof attempt>>, cacheDir: string, what: string): Promise<KheadersError> => {
    // Before xz's stdout was opened O_APPEND, xz went on writing at its own offset: the bytes
    // before it read as zeros (a hole) and the digests vouched for them, at the right size.
    if (r.ok) assert.fail(`${what}: a pack truncated while xz wrote it was cached (${await assertServesOnlyTheTree(t, cacheDir, b.files)} files refused as damaged)`);
    assert.ok(r.err instanceof KheadersError, String(r.err));
    await assertEmptyCache(cacheDir, what);
    return r.err;
  };
  // The truncation at a known point: the real xz's output held after `heldAt` bytes until the
  // ingest has read them all, then the pack truncated and the rest let through. Early, the rest
  // is read where the first bytes were (they differ now); late, the pack ends up shorter than
  // what was read.
  for (const [name, heldAt] of [['early', 2 * 1024 * 1024], ['late', 20 * 1024 * 1024]] as const) {
    await t.test(`truncated once ${name === 'early' ? 2 : 20} MiB were read`, async (st) => {
      const go = path.join(dir, `go-${name}`);
      await fakeXzOnPath(st, dir, `"$REAL" "$@" | { head -c ${heldAt}; while [ ! -e '${go}' ]; do sleep 0.01; done; exec cat; }`);
      const cacheDir = path.join(dir, `cache-held-${name}`);
      let hasRead!: () => void;
      const readToHold = new Promise<void>((resolve) => (hasRead = resolve));
      const running = attempt({ cacheDir, archive, decoder: 'xz', onProgress: (p) => p.bytes >= heldAt && hasRead() });
      await whenPackGrows(path.join(cacheDir, 'tmp'), heldAt, async (pack) => {
        await readToHold;
        await truncate(pack, 0);
        await writeFile(go, '');
      });
      const err = await refused(await running, cacheDir, name);
      // The archive was fine (xz checked it): what went wrong is the cache's staging, an environment error.
      assert.equal(err.code, 'E_STAGING_CHANGED', `${name}: ${err.message}`);
      assert.equal(err.exitCode, 5);
      assert.match(err.message, /staged copy of the decoded archive .* changed while xz wrote it/);
      assert.match(err.message, /the archive was not at fault/);
    });
  }
  // The real xz, truncated whenever the pack reaches the size: always refused. Usually named as
  // above; not when the ingest had read nothing before the truncation (nothing then tells a
  // changed pack from a decoder that wrote garbage).
  for (const [name, minBytes] of [['early', 2 * 1024 * 1024], ['late', 20 * 1024 * 1024]] as const) {
    const cacheDir = path.join(dir, `cache-${name}`);
    const running = attempt({ cacheDir, archive, decoder: 'xz' });
    const at = await whenPackGrows(path.join(cacheDir, 'tmp'), minBytes, (pack) => truncate(pack, 0));
    const r = await running;
    t.diagnostic(`${name}, racing: truncated at ${(at / 2 ** 20).toFixed(1)} MiB: ${r.ok ? 'cached' : `${(r.err as KheadersError).code}: ${String(r.err)}`}`);
    await refused(r, cacheDir, `${name}, racing`);
  }
});

test('a stop (IngestOptions.signal) while either decoder writes the pack: the decode stops at once, nothing is cached or staged, and the ingest fails as stopped', async (t) => {
  const b = await (big ??= bigInputs());
  const dir = await tempDir(t);
  const archive = path.join(dir, 'big.tar.xz');
  await writeFile(archive, b.archive);
  for (const decoder of DECODERS) {
    const cacheDir = path.join(dir, `cache-stop-${decoder}`);
    const stop = new AbortController();
    const running = attempt({ cacheDir, archive, decoder, signal: stop.signal });
    const at = await whenPackGrows(path.join(cacheDir, 'tmp'), 2 * 1024 * 1024, async () => stop.abort());
    const r = await running;
    t.diagnostic(`${decoder}: stopped at ${(at / 2 ** 20).toFixed(1)} of ${(b.tar.length / 2 ** 20).toFixed(1)} MiB`);
    assert.ok(at < b.tar.length, `${decoder}: the decode had finished before the stop`);
    assert.ok(!r.ok, `${decoder}: a stopped build was cached`);
    assert.equal((r.err as Error).name, 'AbortError', `${decoder}: ${String(r.err)}`);
    await assertEmptyCache(cacheDir, decoder);
    if (decoder === 'xz') assert.equal(await childNamed('xz'), undefined, 'the xz child outlived the stop');
  }
});

test('a stop while vmlinux.h is generated: the worker thread is ended, not waited for, and writes nothing', async (t) => {
  const dir = await tempDir(t);
  const b = new BtfBuilder();
  b.struct('task_struct', 4, [{ name: 'pid', type: b.int('int', 4, { signed: true }), bitOffset: 0 }]);
  const btf = path.join(dir, 'small.btf');
  await writeFile(btf, b.build());
  const outFile = path.join(dir, 'vmlinux.h');
  const stop = new AbortController();
  const made = generateHeaderInWorker({ btf, outFile }, 'vmlinux.h for the test', stop.signal);
  stop.abort(); // before the worker has even started
  await assert.rejects(made, (e: unknown) => e instanceof Error && e.name === 'AbortError');
  // A worker left running would write the file a moment later.
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(await stat(outFile).then(() => 'written', () => 'absent'), 'absent');
  await assert.rejects(generateHeaderInWorker({ btf, outFile }, 'vmlinux.h for the test', stop.signal), (e: unknown) => e instanceof Error && e.name === 'AbortError', 'stopped before it starts');
});
