/**
 * code-cache.ts: V8's compiled code is used only for the exact file it was made from, only from a
 * trusted place, only when whole; anything else costs a compile and never changes what runs.
 * Real vm.Script compiles of small CommonJS files in a temp cache directory, each in a process of
 * its own, as the daemon does once per start: within one process V8 keeps what it compiled and
 * would take a source it has seen without looking at the cached data at all.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmod, chown, mkdir, readdir, readFile, rm, stat, symlink, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { CODE_DIR, cacheFileName, nodeBuild, type CodeCacheState } from '../src/code-cache.js';
import { REPO_ROOT, tempDir } from './helpers/archives.js';

interface Run {
  state: CodeCacheState;
  why: string | undefined;
  cacheFile: string | undefined;
  exports: Record<string, unknown>;
  /** save()'s answer, when asked to save; its error's message, when it failed. */
  saved?: boolean | string;
}

const CODE_CACHE = path.join(REPO_ROOT, 'dist', 'src', 'code-cache.js');

/**
 * runBundle in a fresh node, and save() after it when `save`; with `fileSizeLimit`, under that
 * RLIMIT_FSIZE (prlimit, util-linux), where a write past it is short and the next one fails, as
 * on a full disk (node ignores SIGXFSZ); with `umask`, under that umask.
 */
async function runBundle(file: string, cacheDir: string | undefined, save = false, { fileSizeLimit, umask }: { fileSizeLimit?: number; umask?: string } = {}): Promise<Run> {
  const program = `
    const { runBundle } = await import(${JSON.stringify(CODE_CACHE)});
    const r = await runBundle(process.argv[1], process.argv[2] || undefined);
    const out = { state: r.state, why: r.why, cacheFile: r.cacheFile, exports: r.exports };
    if (process.argv[3] === 'save') out.saved = await r.save().catch((err) => err.message);
    process.stdout.write(JSON.stringify(out));`;
  const argv = [process.execPath, '--input-type=module', '-e', program, file, cacheDir ?? '', save ? 'save' : ''];
  if (fileSizeLimit !== undefined) argv.unshift('prlimit', `--fsize=${fileSizeLimit}:${fileSizeLimit}`, '--');
  if (umask !== undefined) argv.unshift('sh', '-c', `umask ${umask} && exec "$@"`, 'sh');
  const { stdout } = await promisify(execFile)(argv[0]!, argv.slice(1), { encoding: 'utf8' });
  return JSON.parse(stdout) as Run;
}

/** A CommonJS file whose exports say which version of it ran; `pad` keeps versions the same length. */
async function bundleFile(t: TestContext, version: string): Promise<{ file: string; cacheDir: string }> {
  const work = await tempDir(t, 'kheadersd-code-cache-');
  const file = path.join(work, 'commands.js');
  await writeFile(file, bundleSource(version));
  const cacheDir = path.join(work, 'cache');
  await mkdir(cacheDir, { mode: 0o755 });
  return { file, cacheDir };
}

function bundleSource(version: string): string {
  return `#!/usr/bin/env node\n"use strict";\nfunction answer(x) { return x * 2; }\nmodule.exports = { version: ${JSON.stringify(version)}, answer: answer(21), dir: __dirname, req: typeof require("node:path").join };\n`;
}

/** Run the file once without a cache and keep its code: the state of a daemon after its first start. */
async function primed(t: TestContext, version = 'a'): Promise<{ file: string; cacheDir: string; cacheFile: string }> {
  const { file, cacheDir } = await bundleFile(t, version);
  const first = await runBundle(file, cacheDir, true);
  assert.equal(first.state, 'absent');
  assert.equal(first.saved, true);
  return { file, cacheDir, cacheFile: first.cacheFile! };
}

const exportsOf = (r: Run): Record<string, unknown> => r.exports;

test('the first run compiles and keeps the code; the next runs with it; a run that used it writes nothing', async (t) => {
  const { file, cacheDir, cacheFile } = await primed(t);
  assert.equal(path.dirname(cacheFile), path.join(cacheDir, CODE_DIR));
  const second = await runBundle(file, cacheDir, true);
  assert.equal(second.state, 'used');
  assert.deepEqual(exportsOf(second), { version: 'a', answer: 42, dir: path.dirname(file), req: 'function' });
  assert.equal(second.saved, false);
  assert.deepEqual(await readdir(path.join(cacheDir, CODE_DIR)), [path.basename(cacheFile)]);
});

test('no cache directory: compiled from source, nothing written', async (t) => {
  const { file } = await bundleFile(t, 'a');
  const r = await runBundle(file, undefined, true);
  assert.equal(r.state, 'off');
  assert.equal(exportsOf(r)['answer'], 42);
  assert.equal(r.saved, false);
});

test('a new file of the same length does not run the old code, and the old code is removed when the new is kept', async (t) => {
  const { file, cacheDir, cacheFile } = await primed(t, 'a');
  // V8 checks only the source's length: same length, other content.
  await writeFile(file, bundleSource('b'));
  const r = await runBundle(file, cacheDir, true);
  assert.equal(r.state, 'absent');
  assert.equal(exportsOf(r)['version'], 'b');
  assert.notEqual(r.cacheFile, cacheFile);
  assert.equal(r.saved, true);
  assert.deepEqual(await readdir(path.join(cacheDir, CODE_DIR)), [path.basename(r.cacheFile!)]);
  assert.equal((await runBundle(file, cacheDir)).state, 'used');
});

test('damaged, torn or foreign data is refused before V8 sees it, and the next save replaces it', async (t) => {
  const { file, cacheDir, cacheFile } = await primed(t);
  const good = await readFile(cacheFile);
  const cases: Array<[string, Buffer]> = [
    ['a flipped byte', Buffer.concat([good.subarray(0, good.length - 10), Buffer.from([good[good.length - 10]! ^ 0xff]), good.subarray(good.length - 9)])],
    ['torn', good.subarray(0, good.length >> 1)],
    ['empty', Buffer.alloc(0)],
    ['no magic', Buffer.concat([Buffer.from('NOTMAGIC'), good.subarray(8)])],
  ];
  for (const [what, bytes] of cases) {
    await writeFile(cacheFile, bytes);
    const r = await runBundle(file, cacheDir, true);
    assert.equal(r.state, 'damaged', what);
    assert.ok(r.why, what);
    assert.equal(exportsOf(r)['answer'], 42, what);
    assert.equal(r.saved, true, what);
    assert.equal((await runBundle(file, cacheDir)).state, 'used', what);
  }
});

test("data whose digest is right but which V8 refuses (another node's, say) is compiled from source", async (t) => {
  const { file, cacheDir, cacheFile } = await primed(t);
  const payload = Buffer.alloc(4096, 0x5a);
  await writeFile(cacheFile, Buffer.concat([Buffer.from('KHV8CODE'), createHash('sha256').update(payload).digest(), payload]));
  const r = await runBundle(file, cacheDir, true);
  assert.equal(r.state, 'rejected');
  assert.equal(exportsOf(r)['answer'], 42);
  assert.equal(r.saved, true);
  assert.equal((await runBundle(file, cacheDir)).state, 'used');
});

test('the code is used only from a trusted place: not writable by others, owned by this user or root, not through a symlink', async (t) => {
  const uid = process.getuid?.() ?? 0;
  const { file, cacheDir, cacheFile } = await primed(t);
  const codeDir = path.dirname(cacheFile);
  const untrusted = async (what: string): Promise<void> => {
    const r = await runBundle(file, cacheDir);
    assert.equal(r.state, 'untrusted', what);
    assert.ok(r.why, what);
    assert.equal(exportsOf(r)['answer'], 42, what);
  };

  await chmod(cacheFile, 0o666);
  await untrusted('a world-writable file');
  await chmod(cacheFile, 0o644);

  await chmod(codeDir, 0o775);
  await untrusted('a group-writable code/');
  await chmod(codeDir, 0o755);

  await chmod(cacheDir, 0o777);
  await untrusted('a world-writable cache directory');
  await chmod(cacheDir, 0o755);

  if (uid === 0) {
    await chown(cacheFile, 4321, 4321);
    await untrusted("a file owned by another user (root's own code must be root's)");
    await chown(cacheFile, 0, 0);
  } else t.diagnostic('not root: the foreign-owner case needs chown');

  const real = `${cacheFile}.real`;
  await writeFile(real, await readFile(cacheFile), { mode: 0o644 });
  await writeFile(cacheFile, ''); // replaced by a symlink below
  await rm(cacheFile);
  await symlink(real, cacheFile);
  await untrusted('a symlink');
  await rm(cacheFile);
  await rm(real);

  // A FIFO must not hang the start.
  await promisify(execFile)('mkfifo', [cacheFile]);
  await untrusted('a FIFO');
  await rm(cacheFile);

  // Trusted again: used.
  const again = await runBundle(file, cacheDir, true);
  assert.equal(again.state, 'absent');
  assert.equal(again.saved, true);
  assert.equal((await runBundle(file, cacheDir)).state, 'used');
});

test('a save into a code/ that is not trusted writes nothing and says why', async (t) => {
  const { file, cacheDir } = await bundleFile(t, 'a');
  await mkdir(path.join(cacheDir, CODE_DIR), { mode: 0o777 });
  await chmod(path.join(cacheDir, CODE_DIR), 0o777);
  const r = await runBundle(file, cacheDir, true);
  assert.equal(r.state, 'untrusted');
  assert.match(String(r.saved), /writable by everyone/);
  assert.deepEqual(await readdir(path.join(cacheDir, CODE_DIR)), []);
});

test("what a crash left half-written and other nodes' code for the same file are swept by the next save; other files' code and saves under way stay", async (t) => {
  const { file, cacheDir } = await bundleFile(t, 'a');
  const codeDir = path.join(cacheDir, CODE_DIR);
  await mkdir(codeDir, { mode: 0o755 });
  const source = await readFile(file);
  const ours = cacheFileName(file, source, nodeBuild());
  // Half-written by a crash: an hour old, in the names saves gave them before and since the random suffix.
  const torn = [`.${ours}.99999.tmp`, `.${ours}.99998-0123456789ab.tmp`];
  const leftovers = [...torn, ours.replace(process.version, 'v18.0.0'), 'commands-0123456789abcdef-v20.0.0-x64-01234567.v8', ours.replace(/-[0-9a-f]{8}\.v8$/, '-89abcdef.v8')];
  // Another bundle file's, even one whose name starts like this one's; and another process's
  // save under way (written just now), which it will rename or remove itself.
  const others = [
    'ingest-0123456789abcdef-v20.0.0-x64-01234567.v8',
    'commands-extra-0123456789abcdef-v20.0.0-x64-01234567.v8',
    '.commands-extra-0123456789abcdef-v20.0.0-x64-01234567.v8.1.tmp',
    'README',
    `.${ours}.99997.tmp`,
    `.${ours}.99996-ba9876543210.tmp`,
  ];
  for (const n of [...leftovers, ...others]) await writeFile(path.join(codeDir, n), 'x');
  const hourAgo = new Date(Date.now() - 3600_000);
  for (const n of torn) await utimes(path.join(codeDir, n), hourAgo, hourAgo);
  const r = await runBundle(file, cacheDir, true);
  assert.equal(r.saved, true);
  assert.deepEqual((await readdir(codeDir)).sort(), [ours, ...others].sort());
});

test('a save leaves alone the temporary file of another daemon with the same pid (another container on the same cache volume)', async (t) => {
  const { file, cacheDir } = await bundleFile(t, 'a');
  const codeDir = path.join(cacheDir, CODE_DIR);
  await mkdir(codeDir, { mode: 0o755 });
  // The other daemon's save is under way when this one's starts: its file is named with this
  // process's pid, as the other's pid is the same in its own pid namespace.
  const program = `
    const { readFileSync, writeFileSync } = await import('node:fs');
    const path = await import('node:path');
    const { runBundle } = await import(${JSON.stringify(CODE_CACHE)});
    const r = await runBundle(process.argv[1], process.argv[2]);
    const theirs = path.join(process.argv[3], '.' + path.basename(r.cacheFile) + '.' + process.pid + '.tmp');
    writeFileSync(theirs, 'theirs');
    const saved = await r.save().catch((err) => err.message);
    let left;
    try { left = readFileSync(theirs, 'utf8'); } catch (err) { left = err.code; }
    process.stdout.write(JSON.stringify({ saved, left }));`;
  const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', program, file, cacheDir, codeDir], { encoding: 'utf8' });
  assert.deepEqual(JSON.parse(stdout), { saved: true, left: 'theirs' });
});

test('a process that exits while it saves (serve stopped just after ready) leaves no half-written file', async (t) => {
  const { file, cacheDir } = await bundleFile(t, 'a');
  const codeDir = path.join(cacheDir, CODE_DIR);
  // The save's temporary file is watched for, and the process exits the moment it appears, as
  // serve's stop does with process.exit() while the save is still writing or syncing.
  const program = `
    const { readdirSync } = await import('node:fs');
    const { runBundle } = await import(${JSON.stringify(CODE_CACHE)});
    const r = await runBundle(process.argv[1], process.argv[2]);
    void r.save();
    const watch = () => {
      let names = [];
      try { names = readdirSync(process.argv[3]); } catch {}
      if (names.some((n) => n.endsWith('.tmp'))) { process.stdout.write('exit during the save'); process.exit(0); }
      if (names.some((n) => n.endsWith('.v8'))) { process.stdout.write('the save finished first'); process.exit(0); }
      setImmediate(watch);
    };
    watch();`;
  const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', program, file, cacheDir, codeDir], { encoding: 'utf8' });
  assert.equal(stdout, 'exit during the save');
  assert.deepEqual(await readdir(codeDir), [], 'a half-written file was left');
});

test('saves asked for at once are written in turn: each is kept, with one exit listener at a time (no MaxListenersExceededWarning)', async (t) => {
  const { file, cacheDir } = await bundleFile(t, 'a');
  // In a child: the warning is the process's, and its exit listeners are what is counted.
  const program = `
    const { runBundle } = await import(${JSON.stringify(CODE_CACHE)});
    const warnings = [];
    process.on('warning', (w) => warnings.push(w.name));
    const r = await runBundle(process.argv[1], process.argv[2]);
    const before = process.listenerCount('exit');
    let most = 0;
    const saves = Array.from({ length: 12 }, () => r.save());
    const count = setInterval(() => (most = Math.max(most, process.listenerCount('exit') - before)), 0);
    const outcomes = await Promise.allSettled(saves);
    clearInterval(count);
    await new Promise((resolve) => setImmediate(resolve)); // a warning is emitted on the next tick
    process.stdout.write(JSON.stringify({ outcomes: outcomes.map((o) => o.status === 'fulfilled' ? o.value : String(o.reason)), warnings, most, after: process.listenerCount('exit') - before }));`;
  const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', program, file, cacheDir], { encoding: 'utf8' });
  const got = JSON.parse(stdout) as { outcomes: unknown[]; warnings: string[]; most: number; after: number };
  assert.deepEqual(got.outcomes, Array.from({ length: 12 }, () => true));
  assert.deepEqual(got.warnings, []);
  assert.ok(got.most <= 1, `${got.most} exit listeners at once`);
  assert.equal(got.after, 0);
  const names = await readdir(path.join(cacheDir, CODE_DIR));
  assert.equal(names.length, 1, names.join(' '));
  assert.match(names[0]!, /\.v8$/);
});

test('a disk that fills up during the save keeps no torn file: the save fails and says so, and the next start compiles', async (t) => {
  const { file, cacheDir, cacheFile } = await primed(t);
  const whole = (await readFile(cacheFile)).length;
  await rm(cacheFile);
  const r = await runBundle(file, cacheDir, true, { fileSizeLimit: whole >> 1 });
  assert.equal(r.state, 'absent');
  assert.match(String(r.saved), /EFBIG/);
  assert.deepEqual(await readdir(path.dirname(cacheFile)), [], 'a torn file or its temporary was left');
  const next = await runBundle(file, cacheDir, true);
  assert.equal(next.state, 'absent');
  assert.equal(next.saved, true);
});

test('a cache directory that is not trusted is reported as such even before it has a code/', async (t) => {
  const { file, cacheDir } = await bundleFile(t, 'a');
  await chmod(cacheDir, 0o777);
  const r = await runBundle(file, cacheDir);
  assert.equal(r.state, 'untrusted');
  assert.match(String(r.why), /writable by everyone/);
  assert.equal(exportsOf(r)['answer'], 42);
});

test('code/ and its file are readable by all whatever the umask: the users who are not root read root\'s code (ls, cat)', async (t) => {
  const { file, cacheDir } = await bundleFile(t, 'a');
  const r = await runBundle(file, cacheDir, true, { umask: '077' });
  assert.equal(r.saved, true);
  assert.equal((await stat(path.join(cacheDir, CODE_DIR))).mode & 0o777, 0o755);
  assert.equal((await stat(r.cacheFile!)).mode & 0o777, 0o644);
});

/** shipCompiledCode(file) in a fresh node, as the build's last step runs it: the file it wrote. */
async function ship(file: string): Promise<string> {
  const program = `
    const { shipCompiledCode } = await import(${JSON.stringify(CODE_CACHE)});
    process.stdout.write(await shipCompiledCode(process.argv[1]));`;
  const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', program, file], { encoding: 'utf8' });
  return stdout;
}

test('the code shipped beside the file runs a start whose cache directory has none; that start keeps its own, which the next start prefers', async (t) => {
  const { file, cacheDir } = await bundleFile(t, 'a');
  const shipped = await ship(file);
  assert.equal(path.dirname(shipped), path.join(path.dirname(file), CODE_DIR));
  assert.equal(path.basename(shipped), cacheFileName(file, await readFile(file), nodeBuild()));
  const first = await runBundle(file, cacheDir, true);
  assert.equal(first.state, 'shipped');
  assert.deepEqual(exportsOf(first), { version: 'a', answer: 42, dir: path.dirname(file), req: 'function' });
  // Kept in the cache directory, as after a compile from source: it holds what the start ran.
  assert.equal(first.saved, true);
  assert.deepEqual(await readdir(path.join(cacheDir, CODE_DIR)), [path.basename(shipped)]);
  const second = await runBundle(file, cacheDir, true);
  assert.equal(second.state, 'used');
  assert.equal(second.saved, false);
  // Without a cache directory (a command given none), the shipped code still runs it; nothing is written.
  const off = await runBundle(file, undefined, true);
  assert.equal(off.state, 'shipped');
  assert.equal(off.saved, false);
});

test("shipped code is held to the same rule: another file's (same length), a damaged one, one in an untrusted place or V8's refusal each cost a compile, never what runs", async (t) => {
  const { file, cacheDir } = await bundleFile(t, 'a');
  const shipped = await ship(file);
  const good = await readFile(shipped);

  // The file changed after the build (same length: V8 alone would run the old code).
  await writeFile(file, bundleSource('b'));
  const changed = await runBundle(file, cacheDir);
  assert.equal(changed.state, 'absent');
  assert.equal(exportsOf(changed)['version'], 'b');
  await writeFile(file, bundleSource('a'));
  assert.equal((await runBundle(file, cacheDir)).state, 'shipped');

  await writeFile(shipped, Buffer.concat([good.subarray(0, good.length - 10), Buffer.from([good[good.length - 10]! ^ 0xff]), good.subarray(good.length - 9)]));
  const damaged = await runBundle(file, cacheDir);
  assert.equal(damaged.state, 'absent');
  assert.match(String(damaged.why), /digest/);
  assert.equal(exportsOf(damaged)['answer'], 42);

  const payload = Buffer.alloc(4096, 0x5a);
  await writeFile(shipped, Buffer.concat([Buffer.from('KHV8CODE'), createHash('sha256').update(payload).digest(), payload]));
  const refused = await runBundle(file, cacheDir, true);
  assert.equal(refused.state, 'rejected');
  assert.equal(exportsOf(refused)['answer'], 42);
  assert.equal(refused.saved, true, 'a start V8 refused the shipped code keeps its own');
  await rm(path.join(cacheDir, CODE_DIR), { recursive: true });

  await writeFile(shipped, good);
  await chmod(shipped, 0o666);
  const writable = await runBundle(file, cacheDir);
  assert.equal(writable.state, 'absent');
  assert.match(String(writable.why), /writable by others/);
  await chmod(shipped, 0o644);
  await chmod(path.dirname(shipped), 0o777);
  const openDir = await runBundle(file, cacheDir);
  assert.equal(openDir.state, 'absent');
  assert.match(String(openDir.why), /writable by everyone/);
  assert.equal(exportsOf(openDir)['answer'], 42);
});
