/**
 * `kheadersd ingest` stopped by Ctrl-C (SIGINT) or SIGTERM while it decodes: the decoder is
 * killed, the staging removed, the lock released, one line says so, and the exit status is the
 * shell's 128 + the signal's number (130, 143). A second signal exits at once.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { access, copyFile, readdir } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { CLI, FIXTURE_ARCHIVE, FIXTURE_RELEASE, cleanEnv, fixtureMissing, hasStackTrace, tempDir } from './helpers/archives.js';
import { hangableXz } from './helpers/hung-xz.js';
import { pollUntil } from './helpers/serve-child.js';

/** Well under the lock timeout and the xz stall timeout (60 s): only the stop can end it so soon. */
const STOP_BOUND_MS = 3_000;

interface Stopped {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
  ms: number;
}

/** Ingest the real fixture with an xz that hangs, send `signals` once it stages, and wait for the exit. */
async function ingestStoppedBy(t: TestContext, signals: NodeJS.Signals[]): Promise<Stopped & { cacheDir: string; leftRunning: number[] }> {
  const dir = await tempDir(t, 'kheadersd-ingest-stop-');
  const cacheDir = path.join(dir, 'cache');
  const archive = path.join(dir, 'kheaders.tar.xz');
  await copyFile(FIXTURE_ARCHIVE, archive);
  const xzs = await hangableXz(dir, true);
  const child = spawn(process.execPath, [CLI, 'ingest', '--archive', archive, '--release', FIXTURE_RELEASE, '--cache-dir', cacheDir, '--decoder', 'xz', '--btf', 'off', '--lock-timeout', '60'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: cleanEnv({ PATH: xzs.PATH }),
  });
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    for (const pid of await xzs.leftRunning()) process.kill(pid, 'SIGKILL'); // a failed run's hung xz
  });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  child.stdout.resume();
  const exited = new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('close', (code, signal) => resolve([code, signal])));
  // Staged, and xz (hung) started: the lock is held and the decode is under way.
  await pollUntil(async () => (await readdir(path.join(cacheDir, 'tmp'))).find((n) => n.startsWith('ingest-')), 'the ingest to stage its pack');
  await pollUntil(async () => ((await xzs.leftRunning()).length > 0 ? true : undefined), 'the hung xz to start');
  const t0 = performance.now();
  for (const s of signals) child.kill(s);
  let timer: NodeJS.Timeout | undefined;
  const result = await Promise.race([exited, new Promise<'still running'>((r) => (timer = setTimeout(() => r('still running'), STOP_BOUND_MS)))]);
  clearTimeout(timer);
  const ms = performance.now() - t0;
  assert.notEqual(result, 'still running', `the ingest did not stop within ${STOP_BOUND_MS} ms: ${stderr}`);
  const [code, signal] = result as [number | null, NodeJS.Signals | null];
  // xz is killed by the stop, not left to be reaped later.
  const leftRunning = await xzs.leftRunning();
  return { code, signal, stderr, ms, cacheDir, leftRunning };
}

async function assertNothingLeft(cacheDir: string, leftRunning: number[]): Promise<void> {
  assert.deepEqual(leftRunning, [], 'the hung xz outlived the ingest');
  assert.deepEqual(await readdir(path.join(cacheDir, 'tmp')), [], 'the staging was left behind');
  assert.deepEqual(await readdir(path.join(cacheDir, 'entries')), [], 'something was cached');
  await assert.rejects(access(path.join(cacheDir, 'lock')), 'the lock was left behind');
}

for (const [signal, status] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
  test(`kheadersd ingest, ${signal} while it decodes: xz killed, staging removed, lock released, one line, exit ${status}`, { skip: fixtureMissing(), timeout: 120_000 }, async (t) => {
    const r = await ingestStoppedBy(t, [signal]);
    assert.equal(r.signal, null, `killed by ${r.signal ?? ''} rather than stopping: ${r.stderr}`);
    assert.equal(r.code, status, r.stderr);
    assert.deepEqual(r.stderr.trim().split('\n'), [`kheadersd: ingest stopped by ${signal}: nothing was cached (the decoder killed, its staging removed, the lock released)`]);
    assert.ok(!hasStackTrace(r.stderr));
    await assertNothingLeft(r.cacheDir, r.leftRunning);
  });
}

test('kheadersd ingest, a second signal: exits at once with the second signal\'s status, the decoder not left running', { skip: fixtureMissing(), timeout: 120_000 }, async (t) => {
  const r = await ingestStoppedBy(t, ['SIGTERM', 'SIGINT']);
  assert.equal(r.signal, null, r.stderr);
  assert.ok(r.code === 130 || r.code === 143, `exit ${r.code}: ${r.stderr}`);
  assert.ok(!hasStackTrace(r.stderr), r.stderr);
  assert.deepEqual(r.leftRunning, [], 'the hung xz outlived the ingest');
});
