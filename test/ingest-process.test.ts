/**
 * `serve` builds a new entry in a child process of its own (src/commands/ingest-process.ts): the
 * entry is the one `kheadersd ingest` makes, byte for byte; the child's failures reach the daemon
 * as the same errors (a full disk, a BTF that does not parse); a killed child fails the start and
 * leaves nothing served; a killed daemon takes the child's whole process group with it.
 */
import { execFileSync } from 'node:child_process';
import { access, open, readFile, readdir, rm, symlink, truncate, writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { CLI, FIXTURE_ARCHIVE, fixtureMissing, goodArchive, runCli, tempDir } from './helpers/archives.js';
import { serveOnce, startDaemonProcess, startServe, type Daemon } from './helpers/serve-child.js';
import { mountTmpfs } from './helpers/tmpfs.js';
import { CacheStore } from '../src/store/cache.js';
import { SOURCE_MEMO_FILE } from '../src/store/source-memo.js';
import { ERRORS } from '../src/errors.js';
import { resolveConfig } from '../src/config.js';
import { createLogger } from '../src/log.js';
import { ingest, locateForIngest } from '../src/store/ingest.js';
import { ingestInChildProcess } from '../src/commands/ingest-process.js';
import { readableElsewhere } from '../src/source/locate.js';
import { PassThrough } from 'node:stream';

const LIVE_BTF = '/sys/kernel/btf/vmlinux';

const msgs = (d: Daemon): string[] => d.logs.map((l) => String(l.msg));

/** The one entry in `cache`: its files' bytes, its manifest (less the time of ingest) and its index (less the extras' mtimes, the time of ingest). */
async function entryOf(cache: string): Promise<{ files: Map<string, Buffer>; manifest: Record<string, unknown>; nodes: unknown[] }> {
  const store = await CacheStore.open(cache);
  const [m] = await store.list();
  assert.ok(m, `an entry in ${cache}`);
  const entry = await store.load(m.id);
  const dir = path.join(cache, 'entries', m.id);
  const files = new Map<string, Buffer>();
  for (const name of (await readdir(dir)).sort()) if (name !== 'manifest.json' && name !== 'index.bin') files.set(name, await readFile(path.join(dir, name)));
  const manifest = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8')) as Record<string, unknown>;
  delete manifest.ingestedAt;
  const nodes = entry.index.nodes.map((n) => ({ ...n, mtime: n.blob !== undefined ? 0 : n.mtime }));
  return { files, manifest, nodes };
}

test('serve builds a new entry in a child process: the same entry, byte for byte, as kheadersd ingest (vmlinux.h included); a BTF that does not parse costs vmlinux.h alone, in both', async (t) => {
  try {
    await access(LIVE_BTF);
  } catch {
    return t.skip(`no ${LIVE_BTF} on this machine to make vmlinux.h from`);
  }
  const dir = await tempDir(t, 'kheadersd-ingest-process-');
  const archive = path.join(dir, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive('6.90.0-child'));
  // Cached as the running kernel's release, so that its own BTF belongs in the entry.
  const release = os.release();
  const badBtf = path.join(dir, 'bad.btf');
  await writeFile(badBtf, Buffer.alloc(4096, 0x5a));

  for (const btf of [LIVE_BTF, badBtf]) {
    const byIngest = path.join(dir, `ingest-${path.basename(btf)}`);
    const byServe = path.join(dir, `serve-${path.basename(btf)}`);
    const ing = await runCli(['ingest', '--archive', archive, '--release', release, '--cache-dir', byIngest, '--btf', btf, '--log-level', 'warn']);
    assert.equal(ing.code, 0, ing.stderr);
    const { d, code } = await serveOnce(t, ['--archive', archive, '--release', release, '--cache-dir', byServe, '--btf', btf]);
    assert.equal(code, 0, msgs(d).join('\n'));

    // Built by another process, whose log lines come through the daemon's, marked with its pid.
    const spawned = d.logs.find((l) => l.msg === 'building the entry in a child process');
    assert.ok(spawned, 'the daemon says it builds in a child process');
    const childPid = Number(spawned.ingestPid);
    assert.ok(childPid > 0 && childPid !== d.child.pid);
    const ingested = d.logs.find((l) => l.msg === 'ingested');
    assert.equal(ingested?.ingestPid, childPid, 'the ingest itself ran in the child');
    assert.ok(d.logs.some((l) => l.msg === 'kernel headers ingested' && l.reused === false && l.ingestPid === undefined), 'the daemon reports it built (not reused)');

    const [a, b] = [await entryOf(byIngest), await entryOf(byServe)];
    assert.deepEqual([...b.files.keys()], [...a.files.keys()]);
    for (const [name, bytes] of a.files) assert.ok(bytes.equals(b.files.get(name)!), `${name} is the same bytes`);
    assert.deepEqual(b.manifest, a.manifest);
    assert.deepEqual(b.nodes, a.nodes);
    if (btf === LIVE_BTF) assert.ok(a.files.has('vmlinux.h'), 'vmlinux.h made from the BTF');
    else {
      assert.ok(!a.files.has('vmlinux.h'), 'no vmlinux.h from a BTF that does not parse');
      const warned = d.logs.find((l) => String(l.msg).startsWith('no vmlinux.h for this entry: '));
      assert.match(String(warned?.msg), /malformed BTF/);
      assert.equal(warned?.ingestPid, childPid);
    }
  }
});

test('serve on a kernel without a header archive builds its vmlinux.h-only entry in the child too', async (t) => {
  try {
    await access(LIVE_BTF);
  } catch {
    return t.skip(`no ${LIVE_BTF} on this machine`);
  }
  for (const live of ['/sys/kernel/kheaders.tar.xz', '/proc/kheaders.tar.xz']) {
    const present = await access(live).then(() => true, () => false);
    if (present) return t.skip(`this kernel has ${live}: its headers would be ingested instead`);
  }
  const dir = await tempDir(t, 'kheadersd-ingest-process-');
  const cache = path.join(dir, 'cache');
  const { d, code } = await serveOnce(t, ['--cache-dir', cache, '--no-modprobe']);
  assert.equal(code, 0, msgs(d).join('\n'));
  const childPid = Number(d.logs.find((l) => l.msg === 'building the entry in a child process')?.ingestPid);
  assert.ok(childPid > 0, 'built in a child process');
  // Said once, by the daemon, which looked first; not again by the child that builds the entry.
  const said = d.logs.filter((l) => String(l.msg).startsWith('no header archive for this kernel'));
  assert.equal(said.length, 1, msgs(d).join('\n'));
  assert.equal(said[0]!.ingestPid, undefined);
  const [entry] = await readdir(path.join(cache, 'entries'));
  assert.ok(entry, 'an entry');
  assert.ok((await readdir(path.join(cache, 'entries', entry))).includes('vmlinux.h'));
  assert.ok(d.logs.some((l) => l.msg === 'kernel headers ingested' && l.reused === false && l.id === entry));
});

test('serve on a full disk: the child\'s ENOSPC is the daemon\'s E_NO_SPACE, with the same step and message as kheadersd ingest', async (t) => {
  const missing = fixtureMissing();
  if (missing) return t.skip(missing);
  // The archive (3.8 MiB) fits, its 30 MiB pack does not.
  const results: Array<{ code: number | null; message: string }> = [];
  for (const how of ['ingest', 'serve'] as const) {
    const fs = await mountTmpfs(t, '8m');
    if ('skip' in fs) return t.skip(fs.skip);
    const cache = path.join(fs.dir, 'cache');
    if (how === 'ingest') {
      const r = await runCli(['ingest', '--archive', FIXTURE_ARCHIVE, '--cache-dir', cache, '--btf', 'off', '--log-level', 'warn']);
      results.push({ code: r.code, message: r.stderr.split('\n').find((l) => l.startsWith('kheadersd: ')) ?? r.stderr });
    } else {
      const { d, code } = await serveOnce(t, ['--archive', FIXTURE_ARCHIVE, '--cache-dir', cache, '--btf', 'off']);
      const failed = d.logs.find((l) => l.code === 'E_NO_SPACE' && l.level === 50);
      assert.ok(failed, `the daemon logs E_NO_SPACE:\n${msgs(d).join('\n')}`);
      // Which write meets the full disk first, the pack's (xz) or the archive copy's (node, at the
      // same time), is a race that load decides; either is the same error in the same words.
      assert.ok(['pack', 'archive'].includes(String((failed.details as { step?: unknown }).step)), JSON.stringify(failed.details));
      results.push({ code, message: `kheadersd: ${String(failed.msg)}` });
    }
    assert.deepEqual(await readdir(path.join(cache, 'entries')), [], 'no entry');
  }
  assert.equal(results[0]!.code, ERRORS.E_NO_SPACE.exit);
  assert.match(results[0]!.message, /the cache filesystem is full \(ENOSPC\)/);
  const sameWords = (r: { code: number | null; message: string }): unknown => ({ ...r, message: r.message.replace(/while writing .*?;/, 'while writing …;') });
  assert.deepEqual(sameWords(results[1]!), sameWords(results[0]!));
});

/**
 * `serve` on an empty cache, its --btf a FIFO nobody writes: the daemon, building elsewhere, never
 * opens the BTF (only a build reads it), and its child, building, waits in that open for a writer
 * that never comes. A child caught at a known point, alive and uncommitted: the pid of that child.
 * (Caught while xz ran, the run raced the decode, which a loaded machine sometimes finished first.
 * The archive itself a FIFO no longer holds the child: the daemon builds such an archive itself.)
 */
async function serveWithWaitingChild(t: TestContext, dir: string, cache: string): Promise<{ d: Daemon; childPid: number }> {
  const fifo = path.join(dir, 'vmlinux.btf');
  execFileSync('mkfifo', [fifo]);
  const d = startServe(t, ['--archive', FIXTURE_ARCHIVE, '--cache-dir', cache, '--btf', fifo, '--decoder', 'xz', '--mount', 'off', '--http', '127.0.0.1:0', '--log-level', 'info']);
  const spawned = await d.waitFor((l) => l.msg === 'building the entry in a child process', 'the child to start');
  return { d, childPid: Number(spawned.ingestPid) };
}

/** Every live process: pid, parent, process group. */
async function processes(): Promise<Array<{ pid: number; ppid: number; pgrp: number }>> {
  const out: Array<{ pid: number; ppid: number; pgrp: number }> = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const stat = await readFile(`/proc/${name}/stat`, 'utf8').catch(() => '');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (stat !== '' && fields[0] !== 'Z') out.push({ pid: Number(name), ppid: Number(fields[1]), pgrp: Number(fields[2]) });
  }
  return out;
}

/** The pids in process group `pgid` (the child and the xz it started). */
test('the ingest child reads the archive at once: the daemon recalled a digest whose entry is gone and read the archive before asking for the build', async (t) => {
  const dir = await tempDir(t, 'kheadersd-ingest-process-');
  const cache = path.join(dir, 'cache');
  const archive = path.join(dir, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive('6.90.2-child'));
  await new Promise((r) => setTimeout(r, 2_100)); // settled: only then is its digest recorded (source-memo.ts)
  const first = await runCli(['ingest', '--archive', archive, '--cache-dir', cache, '--btf', 'off', '--log-level', 'warn']);
  assert.equal(first.code, 0, first.stderr);
  await rm(path.join(cache, 'entries'), { recursive: true, force: true });

  const { d, code } = await serveOnce(t, ['--archive', archive, '--cache-dir', cache, '--btf', 'off']);
  assert.equal(code, 0, msgs(d).join('\n'));
  const childPid = Number(d.logs.find((l) => l.msg === 'building the entry in a child process')?.ingestPid);
  assert.ok(childPid > 0, 'built in a child process');
  const recalled = d.logs.filter((l) => l.msg === 'archive source unchanged since its digest was recorded: not read again');
  assert.deepEqual(recalled.map((l) => l.ingestPid), [undefined], 'recalled once, by the daemon, not again by the child');
  assert.ok(d.logs.some((l) => l.msg === 'kernel headers ingested' && l.reused === false), msgs(d).join('\n'));
  assert.equal((await readdir(path.join(cache, 'entries'))).length, 1);
});

test('serve on an archive source this cache has not read, whose entry is cached all the same: no ingest process is started ahead (nor any), and the entry is reused', async (t) => {
  const dir = await tempDir(t, 'kheadersd-ingest-process-');
  const cache = path.join(dir, 'cache');
  const archive = path.join(dir, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive('6.90.3-ahead'));
  const first = await runCli(['ingest', '--archive', archive, '--cache-dir', cache, '--btf', 'off', '--log-level', 'warn']);
  assert.equal(first.code, 0, first.stderr);
  // The digest's record gone (or never made): the daemon reads the archive; an entry of its
  // release is cached, so no child is started for a build that is most likely not needed.
  await rm(path.join(cache, SOURCE_MEMO_FILE), { force: true });

  for (const release of [[], ['--release', '6.90.3-ahead']]) {
    const { d, code } = await serveOnce(t, ['--archive', archive, '--cache-dir', cache, '--btf', 'off', ...release]);
    assert.equal(code, 0, msgs(d).join('\n'));
    assert.ok(!d.logs.some((l) => l.ingestPid !== undefined), `an ingest process was started:\n${msgs(d).join('\n')}`);
    assert.ok(d.logs.some((l) => l.msg === 'kernel unchanged' && l.reused === true), msgs(d).join('\n'));
    assert.equal((await readdir(path.join(cache, 'entries'))).length, 1);
    assert.deepEqual(await readdir(path.join(cache, 'tmp')), [], 'it left nothing in tmp/');
  }
});

test('serve of a new release on a cache that holds another: one ingest process (started ahead of the read) builds it', async (t) => {
  const dir = await tempDir(t, 'kheadersd-ingest-process-');
  const cache = path.join(dir, 'cache');
  const old = path.join(dir, 'old.tar.xz');
  const archive = path.join(dir, 'kernel.tar.xz');
  await writeFile(old, await goodArchive('6.90.4-old'));
  await writeFile(archive, await goodArchive('6.90.5-new'));
  const first = await runCli(['ingest', '--archive', old, '--release', '6.90.4-old', '--cache-dir', cache, '--btf', 'off', '--log-level', 'warn']);
  assert.equal(first.code, 0, first.stderr);
  const { d, code } = await serveOnce(t, ['--archive', archive, '--release', '6.90.5-new', '--cache-dir', cache, '--btf', 'off']);
  assert.equal(code, 0, msgs(d).join('\n'));
  const pids = new Set(d.logs.filter((l) => l.ingestPid !== undefined).map((l) => l.ingestPid));
  assert.equal(pids.size, 1, `one ingest process:\n${msgs(d).join('\n')}`);
  assert.ok(d.logs.some((l) => l.msg === 'building the entry in a child process'), msgs(d).join('\n'));
  assert.equal((await readdir(path.join(cache, 'entries'))).length, 2);
});

async function groupMembers(pgid: number): Promise<number[]> {
  return (await processes()).filter((p) => p.pgrp === pgid).map((p) => p.pid);
}

test('the ingest child killed: serve fails to start naming it, nothing is served, and the next start builds the entry', async (t) => {
  const missing = fixtureMissing();
  if (missing) return t.skip(missing);
  const dir = await tempDir(t, 'kheadersd-ingest-process-');
  const cache = path.join(dir, 'cache');
  const { d, childPid } = await serveWithWaitingChild(t, dir, cache);
  process.kill(childPid, 'SIGKILL');
  assert.equal(await d.exited, ERRORS.E_KILLED.exit);
  assert.ok(
    d.logs.some((l) => l.code === 'E_KILLED' && String(l.msg).startsWith(`the ingest process (pid ${childPid}) was killed by SIGKILL`)),
    msgs(d).join('\n'),
  );
  assert.deepEqual(await readdir(path.join(cache, 'entries')), []);

  const again = await serveOnce(t, ['--archive', FIXTURE_ARCHIVE, '--cache-dir', cache, '--btf', 'off']);
  assert.equal(again.code, 0, msgs(again.d).join('\n'));
  assert.equal((await readdir(path.join(cache, 'entries'))).length, 1);
});

test('serve killed (-9) while its child works: the child\'s whole process group dies with it, and the next ingest takes the cache over', async (t) => {
  const missing = fixtureMissing();
  if (missing) return t.skip(missing);
  const dir = await tempDir(t, 'kheadersd-ingest-process-');
  const cache = path.join(dir, 'cache');
  const { d, childPid } = await serveWithWaitingChild(t, dir, cache);
  // Whatever the child starts joins this group: it must lead one of its own. (The xz of a staged
  // build is the daemon's, outside it: test/serve-daemon-xz.test.ts shows the child kills that one.)
  const group = await groupMembers(childPid);
  assert.ok(group.includes(childPid), `the child leads its own process group (${group.join(', ')})`);
  d.child.kill('SIGKILL');
  await d.exited;
  const deadline = Date.now() + 10_000;
  let left = await groupMembers(childPid);
  while (left.length > 0 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    left = await groupMembers(childPid);
  }
  // Without its disconnect handler the child would wait on the BTF's FIFO for ever.
  assert.deepEqual(left, [], `processes of the ingest still running after the daemon died (they were ${group.join(', ')})`);
  assert.deepEqual(await readdir(path.join(cache, 'entries')), []);

  const r = await runCli(['ingest', '--archive', FIXTURE_ARCHIVE, '--cache-dir', cache, '--btf', 'off', '--log-level', 'warn']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal((await readdir(path.join(cache, 'entries'))).length, 1);
});

test('no ingest process can be started (spawn fails): the entry is built in the daemon, with a warning, and the start goes on', async (t) => {
  const dir = await tempDir(t, 'kheadersd-nospawn-');
  const archive = path.join(dir, 'k.tar.xz');
  await writeFile(archive, await goodArchive('6.6.0-nospawn'));
  const cacheDir = path.join(dir, 'cache');
  const cfg = resolveConfig({ flags: { cacheDir, archive, release: '6.6.0-nospawn', btf: 'off' }, env: {}, file: {}, fileName: 'none' });
  const out = new PassThrough();
  let logged = '';
  out.setEncoding('utf8').on('data', (s: string) => (logged += s));
  const log = createLogger('warn', out);
  const io = { stdout: process.stdout, stderr: process.stderr, log };
  const missingNode = path.join(dir, 'no-such-node');
  const result = await ingest({ cacheDir, archive, release: '6.6.0-nospawn', btf: 'off', log, buildElsewhere: () => ingestInChildProcess(cfg, io, missingNode) });
  assert.equal(result.reused, false);
  assert.equal(result.entry.manifest.release, '6.6.0-nospawn');
  await new Promise((r) => setImmediate(r));
  assert.match(logged, /cannot start the ingest process .*no-such-node.*building the entry in the daemon instead/);
  const store = await CacheStore.open(cacheDir);
  assert.equal((await store.list()).length, 1, 'one entry, built in this process');
});

test('no ingest process can be started and the archive was a FIFO written once: the daemon builds from what it read, not from a second read that waits for a writer for good', async (t) => {
  const dir = await tempDir(t, 'kheadersd-nospawn-fifo-');
  const fifo = path.join(dir, 'k.tar.xz');
  execFileSync('mkfifo', [fifo]);
  const bytes = await goodArchive('6.6.1-nospawn');
  const fed = writeFile(fifo, bytes); // one reader: the hash
  const cacheDir = path.join(dir, 'cache');
  const cfg = resolveConfig({ flags: { cacheDir, archive: fifo, release: '6.6.1-nospawn', btf: 'off' }, env: {}, file: {}, fileName: 'none' });
  const log = createLogger('warn', new PassThrough());
  const io = { stdout: process.stdout, stderr: process.stderr, log };
  const missingNode = path.join(dir, 'no-such-node');
  const built = ingest({ cacheDir, archive: fifo, release: '6.6.1-nospawn', btf: 'off', log, buildElsewhere: () => ingestInChildProcess(cfg, io, missingNode) }).then(
    (result) => ({ result }),
    (err: unknown) => ({ err }),
  );
  // A second read of the FIFO waits in open(2) for a writer: one that writes nothing ends it (at
  // EOF, an empty archive), so that the test fails instead of hanging its process for good.
  let waited = false;
  const deadline = setTimeout(() => {
    waited = true;
    void writeFile(fifo, Buffer.alloc(0));
  }, 10_000);
  const outcome = await built;
  clearTimeout(deadline);
  await fed;
  assert.ok(!waited, 'the archive was read again, and that read waited for a writer');
  assert.ok('result' in outcome, `the ingest failed: ${'err' in outcome ? String(outcome.err) : ''}`);
  assert.equal(outcome.result.reused, false);
  assert.equal(outcome.result.entry.manifest.digest, createHash('sha256').update(bytes).digest('hex'), 'the entry is the bytes the FIFO gave');
  const store = await CacheStore.open(cacheDir);
  assert.equal((await store.list()).length, 1, 'one entry, built in this process');
});

/** `d` once it says 'serving' (failing if it exits or takes 60 s): its HTTP URL. */
async function servingUrl(d: Daemon): Promise<string> {
  // Polled, not waitFor(): its timer would keep the test alive after a start that fails.
  const deadline = Date.now() + 60_000;
  while (d.child.exitCode === null && !d.logs.some((l) => l.msg === 'serving')) {
    if (Date.now() > deadline) assert.fail(`serve did not start serving in 60 s:\n${msgs(d).join('\n')}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.equal(d.child.exitCode, null, `serve exited:\n${msgs(d).join('\n')}`);
  return String(d.logs.find((l) => l.msg === 'HTTP listening')?.url);
}

/** What a serve started on an empty cache with an archive no other process can read again serves: built in the daemon, from what it read. */
async function servesWhatItRead(d: Daemon, salt: string): Promise<void> {
  try {
    const url = await servingUrl(d);
    assert.equal((await fetch(`${url}/readyz`)).status, 200);
    const res = await fetch(`${url}/v1/kernels/current/files/include/linux/types.h`);
    assert.equal(res.status, 200);
    assert.equal(await res.text(), `/* SPDX-License-Identifier: GPL-2.0 */\ntypedef unsigned int u32;${salt}\n`);
    assert.ok(!d.logs.some((l) => l.ingestPid !== undefined), `an ingest process was asked to read it again:\n${msgs(d).join('\n')}`);
  } finally {
    await d.stop();
  }
}

const SERVE_ARGS = ['--btf', 'off', '--mount', 'off', '--http', '127.0.0.1:0', '--log-level', 'info'];

test('serve --archive /dev/stdin, a pipe, on an empty cache: built from what the daemon read, and served', async (t) => {
  const dir = await tempDir(t, 'kheadersd-stdin-pipe-');
  const archive = path.join(dir, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive('6.90.8-pipe', '/* piped */'));
  // A pipe (node's own stdio 'pipe' is a socket, which /dev/stdin cannot open), and exec: the daemon keeps the pid stopped at the end.
  const argv = ['-c', 'exec "$0" "$@" < <(cat "$KH_TEST_ARCHIVE")', process.execPath, CLI, 'serve', '--archive', '/dev/stdin', '--cache-dir', path.join(dir, 'cache'), ...SERVE_ARGS];
  const d = startDaemonProcess(t, '/bin/bash', argv, { KH_TEST_ARCHIVE: archive });
  await servesWhatItRead(d, '/* piped */');
});

test('serve --archive /dev/stdin < FILE on an empty cache: built from what the daemon read (a child\'s /dev/stdin is its own), and served', async (t) => {
  const dir = await tempDir(t, 'kheadersd-stdin-file-');
  const archive = path.join(dir, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive('6.90.9-redirect', '/* redirected */'));
  const argv = ['-c', 'exec "$0" "$@" < "$KH_TEST_ARCHIVE"', process.execPath, CLI, 'serve', '--archive', '/dev/stdin', '--cache-dir', path.join(dir, 'cache'), ...SERVE_ARGS];
  const d = startDaemonProcess(t, '/bin/sh', argv, { KH_TEST_ARCHIVE: archive });
  await servesWhatItRead(d, '/* redirected */');
});

test('serve --archive FIFO written once, on an empty cache: built from what the daemon read (no second open that waits for a writer for good), and served', async (t) => {
  const dir = await tempDir(t, 'kheadersd-fifo-once-');
  const fifo = path.join(dir, 'kernel.tar.xz');
  execFileSync('mkfifo', [fifo]);
  const fed = writeFile(fifo, await goodArchive('6.90.10-fifo', '/* fifo */')); // one reader: the daemon
  const d = startServe(t, ['--archive', fifo, '--cache-dir', path.join(dir, 'cache'), ...SERVE_ARGS]);
  await fed;
  await servesWhatItRead(d, '/* fifo */');
});

test('which archives another process can read again: a regular file by any shared name, not a FIFO nor a name for this process\'s own descriptors', async (t) => {
  const dir = await tempDir(t, 'kheadersd-elsewhere-');
  const file = path.join(dir, 'k.tar.xz');
  await writeFile(file, 'x');
  await symlink(file, path.join(dir, 'link.tar.xz'));
  execFileSync('mkfifo', [path.join(dir, 'fifo')]);
  assert.equal(await readableElsewhere(file), true);
  assert.equal(await readableElsewhere(path.join(dir, 'link.tar.xz')), true, 'through a link');
  assert.equal(await readableElsewhere(path.join(dir, 'fifo')), false, 'a FIFO');
  assert.equal(await readableElsewhere(path.join(dir, 'missing')), false);
  const fh = await open(file, 'r');
  try {
    // A regular file all the same, but by a name another process reads as its own descriptor.
    for (const name of [`/dev/fd/${fh.fd}`, `/proc/self/fd/${fh.fd}`, `/proc/${process.pid}/fd/${fh.fd}`]) {
      assert.equal(await readableElsewhere(name), false, name);
    }
  } finally {
    await fh.close();
  }
});

/** This process's anonymous memory now (KiB): what V8 and the C allocator hold dirty. */
const privateDirtyKiB = (): number => Number(/^Private_Dirty:\s+(\d+) kB/m.exec(readFileSync('/proc/self/smaps_rollup', 'utf8'))?.[1]);

test("an ingest built elsewhere (serve's) gives the archive's memory back once it is hashed, not at V8's next full collection", async (t) => {
  const dir = await tempDir(t, 'kheadersd-hashonly-');
  // 64 MiB that start as an xz stream: only hashed here, never decoded. Sparse, so that making it costs this process no memory.
  const archive = path.join(dir, 'big.tar.xz');
  await writeFile(archive, Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00, 0x04]));
  await truncate(archive, 64 << 20);
  const digest = createHash('sha256');
  digest.update(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00, 0x04]));
  digest.update(Buffer.alloc((64 << 20) - 8));
  const want = digest.digest('hex');
  const opts = { cacheDir: path.join(dir, 'cache'), archive, release: '6.6.0-hashonly', btf: 'off', limits: { maxTotalBytes: 128 << 20 } };
  const before = privateDirtyKiB();
  const located = await locateForIngest({ ...opts, buildElsewhere: () => Promise.resolve() });
  const grown = privateDirtyKiB() - before;
  assert.equal(located.digest, want);
  assert.equal(located.source.bytes, undefined, 'no bytes kept: the build elsewhere reads the archive itself');
  // Held until V8 collects it, the archive's buffer alone is 64 MiB.
  assert.ok(grown < 16 * 1024, `the process grew ${grown} KiB hashing a 64 MiB archive`);
  // A build here (ingest's own read) keeps them, to decode.
  const kept = await locateForIngest(opts);
  assert.equal(kept.source.bytes?.length, 64 << 20);
  assert.equal(kept.digest, want);
});
