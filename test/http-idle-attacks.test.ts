/**
 * The idle timeout is armed only while a response is in flight: hostile clients against the real
 * server on loopback. A reader that stops reading a large file must still be cut after the idle
 * timeout; a GET whose body trickles in forever must be cut by the request timeout, its answer
 * sent or not. Each wait has a generous deadline, which only keeps a broken server from hanging
 * the run: what is asserted is that the connection is closed, never how fast.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { after, before, test, type TestContext } from 'node:test';
import { startHttpServer, type HttpLimits } from '../src/serve/http/server.js';
import { DaemonState } from '../src/serve/state.js';
import { CacheStore } from '../src/store/cache.js';
import { ingest } from '../src/store/ingest.js';
import { SYNTH_RELEASE, bigText, makeTarXz, quietLog, removeDir, request, synthTree, tempDir } from './helpers/http-env.js';

const F = '/v1/kernels/current/files';
/** Larger than loopback's socket buffers take from a reader that has stopped: the answer stays in flight. */
const HUGE = bigText(24 * 1024);
const DEADLINE_MS = 60_000;
/** Long enough for fastify to stream its first bytes on a loaded machine; the stall is three of them. */
const IDLE_MS = 1000;

let work: string;
let cacheDir: string;

before(async () => {
  work = await tempDir('http-idle');
  cacheDir = path.join(work, 'cache');
  const archive = await makeTarXz([...synthTree(), { name: './include/linux/huge.h', content: HUGE }], path.join(work, 'kernel.tar.xz'));
  await ingest({ cacheDir, archive, release: SYNTH_RELEASE, setCurrent: true, keep: 10, log: quietLog() });
});

after(async () => {
  await removeDir(work);
});

/** A server closed when the test ends, however it ends (an open server would keep the file running). */
async function serve(t: TestContext, limits: Partial<HttpLimits>) {
  const server = await start(limits);
  t.after(() => server.close());
  // fastify (which streams large files) is loaded by the first request it must answer: load it
  // now, so that the stall below is the only thing that keeps a connection still. On a loaded
  // machine loading it can outlast the short idle timeout, which then cuts that first answer
  // (the server doing its job); the load goes on, and a second request finds it done.
  for (let attempt = 1; ; attempt++) {
    const listing = await request(server.port, `${F}/include/linux/`).catch((err: unknown) => {
      if (attempt === 3) throw err;
      return undefined;
    });
    if (listing === undefined) continue;
    assert.equal(listing.status, 200);
    return server;
  }
}

async function start(limits: Partial<HttpLimits>) {
  const store = await CacheStore.open(cacheDir);
  const state = new DaemonState();
  state.currentId = await store.currentId();
  state.ready = true;
  return startHttpServer({ listen: { host: '127.0.0.1', port: 0 }, store, state, log: quietLog(), limits });
}

async function connect(port: number): Promise<{ socket: net.Socket; received: () => number; closed: Promise<boolean> }> {
  const socket = net.connect({ host: '127.0.0.1', port });
  let received = 0;
  socket.on('data', (b: Buffer) => (received += b.length));
  socket.on('error', () => {});
  const closed = Promise.race([new Promise<boolean>((r) => socket.once('close', () => r(true))), new Promise<boolean>((r) => setTimeout(() => r(false), DEADLINE_MS).unref())]);
  await new Promise((r) => socket.once('connect', r));
  return { socket, received: () => received, closed };
}

/**
 * Stop reading for three idle timeouts, then read again: a paused socket sees no end of stream,
 * so whether the server cut it shows only once the reader drains what reached it before the cut.
 */
async function stallThenResume(socket: net.Socket): Promise<void> {
  socket.pause();
  await new Promise((r) => setTimeout(r, 3 * IDLE_MS));
  socket.resume();
}

test('a reader that stops reading a large file is cut after the idle timeout, though the keep-alive timeout is long', { timeout: 120_000 }, async (t) => {
  const server = await serve(t, { idleTimeoutMs: IDLE_MS, keepAliveTimeoutMs: 60_000 });
  const c = await connect(server.port);
  t.after(() => c.socket.destroy());
  c.socket.write(`GET ${F}/include/linux/huge.h HTTP/1.1\r\nHost: x\r\n\r\n`);
  await new Promise((r) => c.socket.once('data', r));
  await stallThenResume(c.socket);
  assert.equal(await c.closed, true, 'the connection was never closed');
  assert.ok(c.received() < HUGE.length, `a stalled reader got the whole file (${c.received()} bytes) after the idle timeout: its connection was not cut`);
});

test('a GET whose body trickles in forever is cut by the request timeout', { timeout: 120_000 }, async (t) => {
  const server = await serve(t, { idleTimeoutMs: IDLE_MS, keepAliveTimeoutMs: 60_000, headersTimeoutMs: 500, requestTimeoutMs: 1000, timeoutCheckIntervalMs: 100 });
  for (const p of [`${F}/include/linux/sched.h`, `${F}/include/linux/`]) {
    const c = await connect(server.port);
    t.after(() => c.socket.destroy());
    c.socket.write(`GET ${p} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n`);
    const dripping = setInterval(() => c.socket.write('x'), 50);
    t.after(() => clearInterval(dripping));
    assert.equal(await c.closed, true, `a GET of ${p} with a body dripping in held its connection`);
    clearInterval(dripping);
  }
});

test('a pipelined burst behind a stalled large answer is cut with it after the idle timeout', { timeout: 120_000 }, async (t) => {
  const server = await serve(t, { idleTimeoutMs: IDLE_MS, keepAliveTimeoutMs: 60_000 });
  const c = await connect(server.port);
  t.after(() => c.socket.destroy());
  const one = (p: string): string => `GET ${p} HTTP/1.1\r\nHost: x\r\n\r\n`;
  c.socket.write(one(`${F}/include/linux/huge.h`) + one(`${F}/include/linux/sched.h`).repeat(20) + one(`${F}/include/linux/`));
  await new Promise((r) => c.socket.once('data', r));
  await stallThenResume(c.socket);
  assert.equal(await c.closed, true, 'a stalled pipelined connection was never cut');
  assert.ok(c.received() < HUGE.length, `a stalled pipelined reader got the whole file (${c.received()} bytes): its connection was not cut`);
});
