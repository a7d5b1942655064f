/**
 * fastify is loaded only for the first request the fast path declines: a process serving only
 * fast-path requests never loads it (its module cache says so, and so does `serve`'s debug log);
 * requests arriving while it loads are queued and all answered; close() during the load lets the
 * queued ones finish; a failed load answers 500 and is tried again. And slow clients of the fast
 * path are answered without holding anyone else up.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { startHttpServer, type HttpLimits } from '../src/serve/http/server.js';
import { DaemonState } from '../src/serve/state.js';
import { CacheStore } from '../src/store/cache.js';
import { ingest } from '../src/store/ingest.js';
import type { CacheEntry } from '../src/store/entry.js';
import { REPO_ROOT, cleanEnv } from './helpers/archives.js';
import { SYNTH_RELEASE, bigText, json, makeTarXz, quietLog, removeDir, request, synthTree, tempDir, type Res } from './helpers/http-env.js';
import { startServe } from './helpers/serve-child.js';

const LAZY_CHILD = path.join(REPO_ROOT, 'dist/test/helpers/lazy-child.js');
const F = '/v1/kernels/current/files';
/** Under BUFFER_MAX_BYTES: answered by the fast path, in one buffer. */
const WIDE = bigText(200);
/** Only there so that a broken server fails the test instead of hanging it. */
const DEADLINE_MS = 60_000;

let work: string;
let cacheDir: string;
let archive: string;
let entry: CacheEntry;

before(async () => {
  work = await tempDir('http-lazy');
  cacheDir = path.join(work, 'cache');
  archive = await makeTarXz([...synthTree(), { name: './include/linux/wide.h', content: WIDE }], path.join(work, 'kernel.tar.xz'));
  ({ entry } = await ingest({ cacheDir, archive, release: SYNTH_RELEASE, setCurrent: true, keep: 10, log: quietLog() }));
});

after(async () => {
  await removeDir(work);
});

async function serve(opts: { beforeFastify?: () => Promise<void>; limits?: Partial<HttpLimits> } = {}) {
  const store = await CacheStore.open(cacheDir);
  const state = new DaemonState();
  state.currentId = await store.currentId();
  state.ready = true;
  return startHttpServer({ listen: { host: '127.0.0.1', port: 0 }, store, state, log: quietLog(), ...opts });
}

/** A gate the server's fastify load waits on. */
function gate(): { wait: () => Promise<void>; open: () => void; fail: (err: Error) => void } {
  let open!: () => void;
  let fail!: (err: Error) => void;
  const p = new Promise<void>((resolve, reject) => {
    open = resolve;
    fail = reject;
  });
  return { wait: () => p, open, fail };
}

/** Wait (on the event loop, not a clock) until the server is loading fastify. */
async function untilLoading(server: { fastify: string }): Promise<void> {
  const deadline = Date.now() + DEADLINE_MS;
  while (server.fastify !== 'loading') {
    if (Date.now() > deadline) throw new Error(`fastify never started loading (${server.fastify})`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

test('a process that serves only fast-path requests never loads fastify; the first request it declines does', { timeout: 120_000 }, async () => {
  const fastOnes = ['/healthz', '/readyz', '/metrics', '/v1/kernels', '/v1/kernels/current', `${F}/include/linux/sched.h`, `${F}/include/linux/wide.h`, `${F}/include/linux/nope.h`, `/v1/blobs/${entry.manifest.digest}/files/include/linux/types.h`];
  const child = spawn(process.execPath, [LAZY_CHILD, cacheDir, ...fastOnes, `${F}/include/linux/`, '/healthz'], { stdio: ['ignore', 'pipe', 'inherit'], env: cleanEnv() });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  assert.equal(code, 0, out);
  const lines = out
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { path: string | null; status: number | null; fastifyLoaded: boolean; state: string });
  assert.equal(lines.length, fastOnes.length + 3, out);
  for (const l of lines.slice(0, fastOnes.length + 1)) {
    assert.equal(l.fastifyLoaded, false, `fastify was loaded by ${l.path}`);
    assert.equal(l.state, 'not loaded', String(l.path));
  }
  assert.deepEqual(
    lines.slice(1, fastOnes.length + 1).map((l) => l.status),
    [200, 200, 200, 200, 200, 200, 200, 404, 200],
  );
  const listing = lines[fastOnes.length + 1]!;
  assert.deepEqual([listing.status, listing.fastifyLoaded, listing.state], [200, true, 'loaded']);
  assert.equal(lines.at(-1)!.status, 200);
});

test('`serve` logs loading fastify only once a request needs it', { timeout: 120_000 }, async (t) => {
  const daemon = startServe(t, ['--archive', archive, '--release', SYNTH_RELEASE, '--cache-dir', path.join(work, 'serve-cache'), '--mount', 'off', '--http', '127.0.0.1:0', '--btf', 'off', '--no-modprobe', '--log-level', 'debug']);
  const listening = await daemon.waitFor((l) => l['msg'] === 'HTTP listening' && typeof l['url'] === 'string', 'HTTP listening');
  const port = Number(new URL(String(listening['url'])).port);
  for (const p of ['/readyz', '/healthz', '/v1/kernels/current', `${F}/include/linux/sched.h`, `${F}/include/linux/sched.h`]) assert.equal((await request(port, p)).status, 200, p);
  const loaded = (l: Record<string, unknown>): boolean => typeof l['msg'] === 'string' && l['msg'].startsWith('fastify loaded');
  assert.ok(!daemon.logs.some(loaded), JSON.stringify(daemon.logs.filter(loaded)));
  assert.equal((await request(port, '/v1/kernels/current/archive.tar.xz', { method: 'HEAD' })).status, 200);
  await daemon.waitFor(loaded, 'the fastify-loaded debug line');
  assert.equal(daemon.logs.filter(loaded).length, 1);
  // One "HTTP listening" line, with all it has to say (the server's own; serve used to add a second).
  const listenings = daemon.logs.filter((l) => l['msg'] === 'HTTP listening');
  assert.equal(listenings.length, 1, JSON.stringify(listenings));
  assert.deepEqual([listenings[0]!['component'], listenings[0]!['url'], listenings[0]!['token']], ['http', listening['url'], false]);
});

test('requests that need fastify, the first and several more while it loads, are all answered; the fast path is not held up meanwhile', { timeout: 120_000 }, async (t) => {
  const g = gate();
  const server = await serve({ beforeFastify: g.wait });
  t.after(() => server.close());
  const first = request(server.port, `${F}/include/linux/`);
  await untilLoading(server);
  const more: Array<[string, http.OutgoingHttpHeaders, number]> = [
    ['/v1/kernels/current/archive.tar.xz', {}, 200],
    [`${F}/include/linux/`, { accept: 'text/html' }, 200],
    ['/nope', {}, 404],
    ['/v1/kernels/9.9.9', {}, 404],
    [`${F}/include/linux/big.h`, {}, 200],
    [`${F}/include/%2e%2e/x.h`, {}, 400],
  ];
  const queued = more.map(([p, headers]) => request(server.port, p, { headers }));
  // While fastify is held: the fast path still answers.
  const meanwhile = await request(server.port, `${F}/include/linux/wide.h`);
  assert.equal(meanwhile.status, 200);
  assert.ok(meanwhile.body.equals(WIDE));
  assert.equal((await request(server.port, '/readyz')).status, 200);
  assert.equal(server.fastify, 'loading');
  g.open();
  const listing = await first;
  assert.equal(listing.status, 200);
  assert.deepEqual(
    json<{ entries: Array<{ name: string }> }>(listing).entries.map((e) => e.name),
    ['big.h', 'empty.h', 'odd <b>&"name\'.h', 'sched.h', 'types.h', 'wide.h'],
  );
  const answers = await Promise.all(queued);
  assert.deepEqual(
    answers.map((r) => r.status),
    more.map(([, , s]) => s),
  );
  assert.equal(answers[0]!.body.length, entry.manifest.archiveBytes);
  assert.match(answers[1]!.body.toString(), /^<!DOCTYPE html>/);
  assert.ok(answers[4]!.body.equals(bigText(600)));
  assert.equal(server.fastify, 'loaded');
});

test('close() while fastify loads: the queued request is answered, new connections are refused, close resolves', { timeout: 120_000 }, async () => {
  const g = gate();
  const server = await serve({ beforeFastify: g.wait });
  const agent = new http.Agent({ keepAlive: true });
  const queued = request(server.port, `${F}/include/linux/`, { agent });
  // An idle keep-alive connection, which close() must cut rather than wait for.
  const idle = new http.Agent({ keepAlive: true });
  assert.equal((await request(server.port, '/healthz', { agent: idle })).status, 200);
  await untilLoading(server);
  const closed = server.close();
  await assert.rejects(request(server.port, '/healthz'), /ECONNREFUSED/);
  g.open();
  const res = await queued;
  assert.equal(res.status, 200);
  assert.equal(json<{ path: string }>(res).path, 'include/linux');
  await closed;
  agent.destroy();
  idle.destroy();
});

test('the idle timeout cuts a connection whose answer is in flight with nothing moving; between requests the keep-alive timeout rules', { timeout: 120_000 }, async (t) => {
  const g = gate();
  const server = await serve({ beforeFastify: g.wait, limits: { idleTimeoutMs: 300, keepAliveTimeoutMs: 30_000 } });
  t.after(async () => {
    g.open();
    await server.close();
  });
  const connect = async (): Promise<{ socket: net.Socket; text: () => string; closed: Promise<void> }> => {
    const socket = net.connect({ host: '127.0.0.1', port: server.port });
    t.after(() => socket.destroy());
    let text = '';
    socket.setEncoding('latin1').on('data', (d: string) => (text += d));
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    await new Promise((r) => socket.once('connect', r));
    return { socket, text: () => text, closed };
  };
  const answers = async (c: { text: () => string }, n: number): Promise<void> => {
    const deadline = Date.now() + DEADLINE_MS;
    while ((c.text().match(/^HTTP\/1\.1 200 /gm) ?? []).length < n) {
      if (Date.now() > deadline) throw new Error(`no answer: ${c.text()}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  };

  // Answered by the fast path, then silent for three idle timeouts: the keep-alive timeout (30 s)
  // is the one that applies, so the connection is still there for the next request.
  const kept = await connect();
  kept.socket.write(`GET ${F}/include/linux/sched.h HTTP/1.1\r\nHost: x\r\n\r\n`);
  await answers(kept, 1);
  await new Promise((r) => setTimeout(r, 900));
  assert.equal(kept.socket.destroyed, false, 'a kept-alive connection was cut by the idle timeout');
  kept.socket.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n');
  await answers(kept, 2);

  // A request fastify must answer, held while fastify loads: nothing moves on that connection,
  // and it is cut after the idle timeout without an answer.
  const held = await connect();
  held.socket.write(`GET ${F}/include/linux/ HTTP/1.1\r\nHost: x\r\n\r\n`);
  await untilLoading(server);
  const cut = await Promise.race([held.closed.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), DEADLINE_MS).unref())]);
  assert.ok(cut, 'the connection of a request in flight with nothing moving was never cut');
  assert.equal(held.text(), '');
  assert.equal(server.fastify, 'loading');
});

test('a failed load answers the queued requests 500 and is tried again on the next one', { timeout: 60_000 }, async (t) => {
  let attempts = 0;
  const server = await serve({
    beforeFastify: async () => {
      if (++attempts === 1) throw new Error('cannot load (on purpose)');
    },
  });
  t.after(() => server.close());
  const failed = await request(server.port, `${F}/include/linux/`);
  assert.equal(failed.status, 500);
  assert.equal(json<{ error: { code: string } }>(failed).error.code, 'E_INTERNAL');
  assert.equal(server.fastify, 'not loaded');
  assert.equal((await request(server.port, `${F}/include/linux/`)).status, 200);
  assert.equal(server.fastify, 'loaded');
});

test('slow clients of the fast path: a reader that stalls and a client that drips its headers are answered, others meanwhile', { timeout: 120_000 }, async (t) => {
  const server = await serve();
  t.after(() => server.close());
  // A client that asks for a 200 KiB header and then stops reading for a while.
  const socket = net.connect({ host: '127.0.0.1', port: server.port });
  t.after(() => socket.destroy());
  await new Promise((r) => socket.once('connect', r));
  socket.write(`GET ${F}/include/linux/wide.h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
  const chunks: Buffer[] = [];
  const ended = new Promise<void>((resolve) => socket.on('end', resolve));
  socket.once('data', (b: Buffer) => {
    chunks.push(b);
    socket.pause();
  });
  await new Promise((r) => setTimeout(r, 50)); // let its answer be written into the socket's buffers
  // Another client, then one that sends its headers a line at a time.
  const others: Res[] = [];
  for (let i = 0; i < 5; i++) others.push(await request(server.port, `${F}/include/linux/sched.h`));
  assert.deepEqual(
    others.map((r) => r.status),
    [200, 200, 200, 200, 200],
  );
  const drip = net.connect({ host: '127.0.0.1', port: server.port });
  t.after(() => drip.destroy());
  let dripped = '';
  drip.setEncoding('latin1').on('data', (s: string) => (dripped += s));
  const dripClosed = new Promise((r) => drip.once('close', r));
  await new Promise((r) => drip.once('connect', r));
  for (const line of ['GET /readyz HTTP/1.1\r\n', 'Host: x\r\n', 'X-Slow: 1\r\n', 'Connection: close\r\n', '\r\n']) {
    drip.write(line);
    await new Promise((r) => setTimeout(r, 100));
  }
  await dripClosed;
  assert.match(dripped, /^HTTP\/1\.1 200 /);
  // The stalled reader resumes and gets every byte.
  socket.on('data', (b: Buffer) => chunks.push(b));
  socket.resume();
  await ended;
  const text = Buffer.concat(chunks);
  const split = text.indexOf('\r\n\r\n');
  assert.match(text.subarray(0, split).toString('latin1'), /^HTTP\/1\.1 200 /);
  assert.ok(text.subarray(split + 4).equals(WIDE));
  assert.equal(server.fastify, 'not loaded');
});
