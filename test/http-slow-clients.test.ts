/**
 * Slow clients against the real server on loopback: a slowloris in a process of its own, from
 * one address (127.0.0.2: all of 127/8 is this machine), and normal clients from others. What is
 * asserted is that requests are answered, never how fast: each has a generous deadline, which
 * only keeps a broken server from hanging the run.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { clientKey } from '../src/serve/http/client-cap.js';
import { DEFAULT_HTTP_LIMITS } from '../src/serve/http/server.js';
import { REPO_ROOT, cleanEnv } from './helpers/archives.js';
import { ingestSynth, makeTarXz, removeDir, request, startEnv, synthTree, tempDir, type HttpEnv } from './helpers/http-env.js';
import { serveUntilListening } from './helpers/serve-process.js';

const SLOWLORIS = path.join(REPO_ROOT, 'dist/test/helpers/slowloris.js');
const FILE = '/v1/kernels/current/files/include/linux/types.h';
/** Only there so that a starved client fails the test instead of hanging it. */
const DEADLINE_MS = 60_000;

let work: string;
let cacheDir: string;

before(async () => {
  work = await tempDir('http-slow');
  cacheDir = path.join(work, 'cache');
  await ingestSynth(cacheDir, work);
});

after(async () => {
  await removeDir(work);
});

/** GET `p` from `localAddress`, retrying a refused or reset connection until the deadline; the status, or the last error. */
async function answered(port: number, p: string, localAddress: string, deadline: number): Promise<number | Error> {
  let last: Error = new Error('never tried');
  while (Date.now() < deadline) {
    try {
      return await getFrom(port, p, localAddress, deadline - Date.now());
    } catch (err) {
      last = err as Error;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  return last;
}

function getFrom(port: number, p: string, localAddress: string, timeoutMs: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port, localAddress });
    let text = '';
    socket.setTimeout(timeoutMs, () => socket.destroy(new Error('no answer before the deadline')));
    socket.on('connect', () => socket.write(`GET ${p} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`));
    socket.setEncoding('latin1');
    socket.on('data', (s: string) => (text += s));
    socket.on('error', reject);
    socket.on('close', () => {
      const m = /^HTTP\/1\.1 (\d{3})/.exec(text);
      if (m) resolve(Number(m[1]));
      else reject(new Error('closed without an answer'));
    });
  });
}

/** Start a slowloris; resolves once it has reported twice (its connections made or refused). */
async function slowloris(t: { after: (fn: () => void) => void }, port: number, connections: number, localAddress: string): Promise<() => { open: number; closed: number }> {
  const child = spawn(process.execPath, [SLOWLORIS, String(port), String(connections), localAddress], { stdio: ['ignore', 'pipe', 'inherit'], env: cleanEnv() });
  t.after(() => child.kill('SIGKILL'));
  let latest = { open: 0, closed: 0 };
  let reports = 0;
  await new Promise<void>((resolve, reject) => {
    child.on('exit', (code) => reject(new Error(`the slowloris exited (${code})`)));
    let buffered = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => {
      buffered += s;
      const lines = buffered.split('\n');
      buffered = lines.pop() ?? '';
      for (const line of lines) {
        latest = JSON.parse(line) as typeof latest;
        if (++reports === 2) resolve();
      }
    });
  });
  return () => latest;
}

test('a reconnecting slowloris of 600 connections from one address does not starve a client on another', { timeout: 180_000 }, async (t) => {
  const env: HttpEnv = await startEnv({ work, cacheDir });
  t.after(() => env.close());
  const attack = await slowloris(t, env.port, 600, '127.0.0.2');

  // One attempt per request, as curl would make: a connection closed unanswered is a failure.
  const results: Array<number | Error> = [];
  for (let i = 0; i < 40; i++) results.push(await getFrom(env.port, FILE, '127.0.0.1', DEADLINE_MS).catch((err: unknown) => err as Error));
  const ok = results.filter((r) => r === 200).length;
  // The attacker's "open" counts what the kernel completed, accepted by the server or still queued.
  t.diagnostic(`normal client: ${ok} of ${results.length} answered; the attacker: ${attack().open} connections open, ${attack().closed} closed by the server so far`);
  assert.equal(ok, results.length, `answered ${ok} of ${results.length}; first failure: ${String(results.find((r) => r !== 200))}`);
  // Header timeouts (408) and the file requests are the server's and the fast path's own.
  assert.equal(env.server.fastify, 'not loaded');
});

test('the per-client cap: one address past it is refused at once, others are not; parallel requests up to it are all answered', { timeout: 120_000 }, async (t) => {
  const cap = 8;
  const env = await startEnv({ work, cacheDir, limits: { maxConnectionsPerClient: cap } });
  t.after(() => env.close());
  // `cap` idle connections from 127.0.0.2 are kept; the next one from there is closed unanswered.
  const held: net.Socket[] = [];
  t.after(() => held.forEach((s) => s.destroy()));
  for (let i = 0; i < cap; i++) {
    const s = net.connect({ host: '127.0.0.1', port: env.port, localAddress: '127.0.0.2' });
    await new Promise((r) => s.once('connect', r));
    held.push(s);
  }
  await assert.rejects(getFrom(env.port, FILE, '127.0.0.2', DEADLINE_MS), /closed without an answer|ECONNRESET/);
  // Another address is served, `cap` requests at once.
  const parallel = await Promise.all(Array.from({ length: cap }, () => getFrom(env.port, FILE, '127.0.0.3', DEADLINE_MS)));
  assert.deepEqual(parallel, Array<number>(cap).fill(200));
  // Once 127.0.0.2 closes one, it may open one again.
  held.pop()!.destroy();
  assert.equal(await answered(env.port, FILE, '127.0.0.2', Date.now() + DEADLINE_MS), 200);
});

test('with the default cap, a host pulling 32 files at once through adb forward (all from 127.0.0.1) gets every answer', { timeout: 120_000 }, async (t) => {
  const env = await startEnv({ work, cacheDir });
  t.after(() => env.close());
  assert.ok(DEFAULT_HTTP_LIMITS.maxConnectionsPerClient >= 32);
  const statuses = await Promise.all(Array.from({ length: 32 }, () => request(env.port, FILE).then((r) => r.status)));
  assert.deepEqual(statuses, Array<number>(32).fill(200));
});

test('a client that never finishes its headers is answered 408 and closed after the header timeout', { timeout: 60_000 }, async (t) => {
  const env = await startEnv({ work, cacheDir, limits: { headersTimeoutMs: 500, timeoutCheckIntervalMs: 100 } });
  t.after(() => env.close());
  const socket = net.connect({ host: '127.0.0.1', port: env.port });
  let text = '';
  socket.setEncoding('latin1').on('data', (s: string) => (text += s));
  await new Promise((r) => socket.once('connect', r));
  socket.write('GET /v1/kernels HTTP/1.1\r\nHost: localhost\r\n');
  const drip = setInterval(() => socket.write('X-Slow: 1\r\n'), 100);
  t.after(() => clearInterval(drip));
  const closed = await new Promise<boolean>((resolve) => {
    socket.on('close', () => resolve(true));
    setTimeout(() => resolve(false), DEADLINE_MS).unref();
  });
  clearInterval(drip);
  assert.ok(closed, 'the connection was still open at the deadline');
  assert.match(text, /^HTTP\/1\.1 408 /);
});

test('clients are counted by address, IPv6 by /64', () => {
  assert.equal(clientKey('127.0.0.2'), '127.0.0.2');
  assert.equal(clientKey('::ffff:10.1.2.3'), '10.1.2.3');
  assert.equal(clientKey('2001:db8:1:2:aaaa:bbbb:cccc:dddd'), '2001:db8:1:2::/64');
  assert.equal(clientKey('2001:db8:1:2::1'), '2001:db8:1:2::/64');
  assert.equal(clientKey('2001:db8::1'), '2001:db8:0:0::/64');
  assert.equal(clientKey('2001:0db8:0001:0002::ffff'), '2001:db8:1:2::/64');
  assert.equal(clientKey('::1'), '0:0:0:0::/64');
  assert.equal(clientKey('fe80::1%eth0'), 'fe80:0:0:0::/64');
});

test('serve takes the per-client cap from its configuration', { timeout: 180_000 }, async (t) => {
  const dir = await tempDir('http-slow-serve');
  t.after(() => removeDir(dir));
  const archive = await makeTarXz(synthTree(), path.join(dir, 'kernel.tar.xz'));
  const served = await serveUntilListening(t, ['--archive', archive, '--cache-dir', path.join(dir, 'cache'), '--mount', 'off', '--http', '127.0.0.1:0', '--btf', 'off', '--http-max-connections-per-client', '2']);
  assert.ok(served.listening, JSON.stringify(served));
  const port = Number(new URL(served.url).port);
  const held: net.Socket[] = [];
  t.after(() => held.forEach((s) => s.destroy()));
  for (let i = 0; i < 2; i++) {
    const s = net.connect({ host: '127.0.0.1', port, localAddress: '127.0.0.2' });
    await new Promise((r) => s.once('connect', r));
    held.push(s);
  }
  await assert.rejects(getFrom(port, FILE, '127.0.0.2', DEADLINE_MS), /closed without an answer|ECONNRESET/);
  assert.equal(await getFrom(port, FILE, '127.0.0.1', DEADLINE_MS), 200);
});
