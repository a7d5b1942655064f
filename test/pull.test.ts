/**
 * `kheadersd pull` end to end against a running server: by --url, and by --adb through a
 * stand-in `adb` shell script (no device is attached here) that answers `devices`,
 * `forward tcp:0 tcp:7711` with the real port, and `forward --remove`.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { chmod, readFile, readlink, readdir, writeFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { after, before, test } from 'node:test';
import { cmdPull, digestFromHeaders, parseAdbDevices, pull, shellQuote, type PullOptions } from '../src/commands/pull.js';
import type { CommandIO } from '../src/commands/store-commands.js';
import { isKheadersError } from '../src/errors.js';
import { CacheStore } from '../src/store/cache.js';
import type { CacheEntry } from '../src/store/entry.js';
import {
  FIXTURE,
  SYNTH_RELEASE,
  fixtureSkipReason,
  ingestFixture,
  ingestSynth,
  quietLog,
  removeDir,
  runOk,
  startEnv,
  synthTree,
  tempDir,
  type HttpEnv,
} from './helpers/http-env.js';

let work: string;
let env: HttpEnv;
let entry: CacheEntry;
let old: CacheEntry;
let stubDir: string;
let stubLog: string;
let n = 0;

function io(): CommandIO & { out: () => string; err: () => string } {
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  let o = '';
  let e = '';
  stdout.on('data', (b: Buffer) => (o += b.toString()));
  stderr.on('data', (b: Buffer) => (e += b.toString()));
  return { stdout, stderr, log: quietLog(), out: () => o, err: () => e };
}

/** Fresh host-side dirs per pull, so pulls do not reuse each other's trees unless meant to. */
function dirs(): Pick<PullOptions, 'cacheDir' | 'out'> {
  n++;
  return { cacheDir: path.join(work, `host-cache-${n}`), out: path.join(work, `trees-${n}`) };
}

before(async () => {
  work = await tempDir('pull');
  const cacheDir = path.join(work, 'device-cache');
  old = await ingestSynth(cacheDir, work, '6.5.0-old', 'b', false);
  entry = await ingestSynth(cacheDir, work, SYNTH_RELEASE, 'a', true);
  env = await startEnv({ work, cacheDir });

  stubDir = path.join(work, 'bin');
  stubLog = path.join(work, 'adb.log');
  await runOk('mkdir', ['-p', stubDir]);
  // The stand-in answers like adb; what it prints is set per test through the environment.
  await writeFile(
    path.join(stubDir, 'adb'),
    `#!/bin/sh
echo "$*" >> "$ADB_STUB_LOG"
case "$*" in
  devices) printf 'List of devices attached\\n%b\\n' "$ADB_STUB_DEVICES" ;;
  *"forward tcp:0 tcp:7711") echo "$ADB_STUB_PORT" ;;
  *"forward --remove tcp:"*) exit 0 ;;
  *) echo "adb stub: unexpected: $*" >&2; exit 1 ;;
esac
`,
  );
  await chmod(path.join(stubDir, 'adb'), 0o755);
  process.env.ADB_STUB_LOG = stubLog;
  process.env.ADB_STUB_PORT = String(env.port);
});

after(async () => {
  await env?.close();
  await removeDir(work);
});

async function assertTree(dir: string, variant: string): Promise<void> {
  const tree = synthTree(SYNTH_RELEASE, variant);
  for (const f of tree) {
    if ((f.type ?? 'file') !== 'file') continue;
    const want = Buffer.isBuffer(f.content) ? f.content : Buffer.from(f.content ?? '');
    assert.ok((await readFile(path.join(dir, f.name))).equals(want), f.name);
  }
  assert.equal(await readlink(path.join(dir, 'include/dt-bindings/sched-link.h')), '../linux/sched.h');
  assert.equal((await readFile(path.join(dir, 'include/linux-alias/types.h'))).toString(), `#define TYPES_${variant} 1\n`);
}

test('pull --url: downloads, verifies, unpacks into DIR/<release>-<digest12>, prints the exports', async () => {
  const d = dirs();
  const c = io();
  await cmdPull({ url: `http://127.0.0.1:${env.port}`, ...d }, c);
  const dir = path.join(d.out!, `${SYNTH_RELEASE}-${entry.manifest.digest.slice(0, 12)}`);
  assert.equal(c.out(), `export BCC_KERNEL_SOURCE=${dir}\nexport BPFTRACE_KERNEL_SOURCE=${dir}\n`);
  assert.match(c.err(), /pulled 6\.6\.0-synth/);
  await assertTree(dir, 'a');
  // Nothing but the tree is left in DIR (the export renamed its temp dir into place).
  assert.deepEqual(await readdir(d.out!), [path.basename(dir)]);
  // The host cache says where the tree came from, not the temp file it was downloaded to.
  const [pulled] = await (await CacheStore.open(d.cacheDir!)).list();
  assert.equal(pulled?.source, `http://127.0.0.1:${env.port}/v1/blobs/${entry.manifest.digest}/archive.tar.xz`);

  // Again: reused, nothing downloaded.
  const again = await pull({ url: `http://127.0.0.1:${env.port}/`, ...d }, io());
  assert.equal(again.reused, true);
  assert.equal(again.dir, dir);
});

test('pull --release picks another cached entry', async () => {
  const d = dirs();
  const r = await pull({ url: `http://127.0.0.1:${env.port}`, release: '6.5.0-old', ...d }, io());
  assert.equal(r.release, '6.5.0-old');
  assert.equal(r.digest, old.manifest.digest);
  assert.match((await readFile(path.join(r.dir, 'include/linux/types.h'))).toString(), /TYPES_b/);
  await assert.rejects(pull({ url: `http://127.0.0.1:${env.port}`, release: '9.9.9', ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_NOT_FOUND'));
  await assert.rejects(pull({ url: `http://127.0.0.1:${env.port}`, release: '../x', ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_USAGE'));
});

test('pull --adb with a stand-in adb on PATH: forward tcp:0, use its port, remove it', async (t) => {
  const savedPath = process.env.PATH;
  process.env.PATH = `${stubDir}:${savedPath ?? ''}`;
  t.after(() => {
    process.env.PATH = savedPath;
  });
  process.env.ADB_STUB_DEVICES = 'emulator-5554\\tdevice';
  await writeFile(stubLog, '');
  const d = dirs();
  const c = io();
  await cmdPull({ adb: true, ...d }, c);
  assert.match(c.out(), /^export BCC_KERNEL_SOURCE=.*\nexport BPFTRACE_KERNEL_SOURCE=.*\n$/);
  const calls = (await readFile(stubLog, 'utf8')).trim().split('\n');
  assert.deepEqual(calls, ['devices', '-s emulator-5554 forward tcp:0 tcp:7711', `-s emulator-5554 forward --remove tcp:${env.port}`]);
  await assertTree(path.join(d.out!, `${SYNTH_RELEASE}-${entry.manifest.digest.slice(0, 12)}`), 'a');

  // Several devices: one must be chosen; --serial chooses it.
  process.env.ADB_STUB_DEVICES = 'emulator-5554\\tdevice\\nR58M1234\\tdevice';
  await assert.rejects(pull({ adb: true, ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_ADB') && /several devices/.test(err.message) && /--serial/.test(err.message));
  await writeFile(stubLog, '');
  const r = await pull({ adb: true, serial: 'R58M1234', ...dirs() }, io());
  assert.equal(r.reused, false);
  assert.match(await readFile(stubLog, 'utf8'), /-s R58M1234 forward tcp:0 tcp:7711/);
  await assert.rejects(pull({ adb: true, serial: 'nope', ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_ADB') && /no device nope/.test(err.message));

  // No device (or only an unauthorized one).
  process.env.ADB_STUB_DEVICES = '';
  await assert.rejects(pull({ adb: true, ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_ADB') && /no device attached/.test(err.message));
  process.env.ADB_STUB_DEVICES = 'R58M1234\\tunauthorized';
  await assert.rejects(pull({ adb: true, ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_ADB') && /USB debugging prompt/.test(err.message));

  // The forward is removed even when the pull fails.
  process.env.ADB_STUB_DEVICES = 'emulator-5554\\tdevice';
  await writeFile(stubLog, '');
  await assert.rejects(pull({ adb: true, release: '9.9.9', ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_NOT_FOUND'));
  assert.match(await readFile(stubLog, 'utf8'), /forward --remove tcp:\d+/);
});

test('pull --adb without adb is a clear E_ADB', async () => {
  await assert.rejects(pull({ adb: true, adbPath: path.join(work, 'no-such-adb'), ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_ADB') && /adb not found/.test(err.message));
  await assert.rejects(pull({ adb: true, url: 'http://x', ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_USAGE'));
});

test('pull with a token; without it a clear message', async (t) => {
  const guarded = await startEnv({ work, cacheDir: env.cacheDir, token: 'tok-123' });
  t.after(() => guarded.close());
  const u = `http://127.0.0.1:${guarded.port}`;
  await assert.rejects(pull({ url: u, ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_HTTP') && /token/.test(err.message));
  const r = await pull({ url: u, token: 'tok-123', ...dirs() }, io());
  assert.equal(r.digest, entry.manifest.digest);
});

test('pull refuses an archive whose bytes or Digest header do not match', async (t) => {
  const archive = await readFile(path.join(entry.dir, 'archive.tar.xz'));
  const real = createHash('sha256').update(archive).digest();
  let mode: 'bad-bytes' | 'bad-header' | 'no-header' = 'bad-bytes';
  // A lying server: announces the real digest, then misbehaves in one way per mode.
  const liar = http.createServer((req, res) => {
    if (req.url === '/v1/kernels/current') {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ release: SYNTH_RELEASE, digest: real.toString('hex'), kind: 'headers' }));
      return;
    }
    const body = mode === 'bad-bytes' ? Buffer.concat([archive.subarray(0, -1), Buffer.from([archive.at(-1)! ^ 1])]) : archive;
    if (mode !== 'no-header') res.setHeader('repr-digest', `sha-256=:${(mode === 'bad-header' ? createHash('sha256').update('x').digest() : real).toString('base64')}:`);
    res.setHeader('content-length', body.length);
    res.end(body);
  });
  await new Promise<void>((resolve) => liar.listen(0, '127.0.0.1', resolve));
  t.after(() => liar.close());
  const u = `http://127.0.0.1:${(liar.address() as { port: number }).port}`;
  for (const m of ['bad-bytes', 'bad-header', 'no-header'] as const) {
    mode = m;
    const d = dirs();
    await assert.rejects(pull({ url: u, ...d }, io()), (err: unknown) => isKheadersError(err, 'E_HTTP'), m);
    await assert.rejects(readdir(d.out!), /ENOENT/, `${m}: nothing may be left in DIR`);
  }
});

test('an unreachable daemon is a clear E_HTTP', async () => {
  const probe = http.createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const port = (probe.address() as { port: number }).port;
  await new Promise<void>((resolve) => probe.close(() => resolve()));
  await assert.rejects(pull({ url: `http://127.0.0.1:${port}`, ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_HTTP') && /ECONNREFUSED/.test(err.message));
  await assert.rejects(pull({ url: 'ftp://x', ...dirs() }, io()), (err: unknown) => isKheadersError(err, 'E_USAGE'));
});

test('helpers: adb devices parsing, digest headers, shell quoting', () => {
  assert.deepEqual(parseAdbDevices('* daemon not running; starting now at tcp:5037\n* daemon started successfully\nList of devices attached\nemulator-5554\tdevice\nR58\tunauthorized\n\n'), [
    { serial: 'emulator-5554', state: 'device' },
    { serial: 'R58', state: 'unauthorized' },
  ]);
  const b64 = createHash('sha256').update('x').digest('base64');
  const hex = createHash('sha256').update('x').digest('hex');
  assert.equal(digestFromHeaders(new Headers({ 'repr-digest': `sha-512=:AAAA:, sha-256=:${b64}:` })), hex);
  assert.equal(digestFromHeaders(new Headers({ digest: `SHA-256=${b64}` })), hex);
  assert.equal(digestFromHeaders(new Headers({})), undefined);
  assert.equal(shellQuote('/home/u/.cache/kheadersd/trees/6.1-abc'), '/home/u/.cache/kheadersd/trees/6.1-abc');
  assert.equal(shellQuote("/tmp/it's here"), `'/tmp/it'\\''s here'`);
});

test('pull of the real archive equals tar -xJf', { skip: await fixtureSkipReason() }, async (t) => {
  const dev = path.join(work, 'fixture-device');
  const fx = await ingestFixture(dev);
  const server = await startEnv({ work, cacheDir: dev });
  t.after(() => server.close());
  const d = dirs();
  const r = await pull({ url: `http://127.0.0.1:${server.port}`, ...d }, io());
  assert.equal(r.release, '6.1.192');
  assert.equal(r.digest, fx.manifest.digest);
  const ref = path.join(work, 'fixture-ref');
  await runOk('mkdir', ['-p', ref]);
  await runOk('tar', ['-xJf', FIXTURE, '-C', ref]);
  // Same file list, same bytes, same link targets (diff -r compares contents; --no-dereference links).
  await runOk('diff', ['-r', '--no-dereference', ref, r.dir]);
});
