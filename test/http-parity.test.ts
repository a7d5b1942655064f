/**
 * The fast path answers exactly as fastify would. Two servers over the same cache and the same
 * daemon state, one with the fast path and one without (fastify answers everything), are asked
 * the same requests, in the same order, for every route the fast path claims; status, headers
 * (but Date) and bodies must be equal, and so must the request and byte counters each server's
 * /metrics reports afterwards (same route labels, same statuses, same bytes). Meanwhile the fast
 * server must never have loaded fastify: that is what shows these were the fast path's answers.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { startHttpServer, type HttpServerHandle } from '../src/serve/http/server.js';
import { DaemonState } from '../src/serve/state.js';
import { CacheStore } from '../src/store/cache.js';
import type { CacheEntry } from '../src/store/entry.js';
import { SYNTH_RELEASE, ingestSynth, quietLog, removeDir, request, tempDir, type Res } from './helpers/http-env.js';

const TOKEN = 'parity-token-0123456789';
let work: string;
let store: CacheStore;
let state: DaemonState;
let entry: CacheEntry;
let other: CacheEntry;
const servers: HttpServerHandle[] = [];

async function pair(token?: string): Promise<{ fast: HttpServerHandle; slow: HttpServerHandle }> {
  const base = { listen: { host: '127.0.0.1', port: 0 }, store, state, log: quietLog(), ...(token !== undefined ? { token } : {}) };
  const fast = await startHttpServer(base);
  const slow = await startHttpServer({ ...base, fastPath: false });
  servers.push(fast, slow);
  return { fast, slow };
}

before(async () => {
  work = await tempDir('http-parity');
  const cacheDir = path.join(work, 'cache');
  other = await ingestSynth(cacheDir, work, '6.5.0-old', 'b', false);
  entry = await ingestSynth(cacheDir, work, SYNTH_RELEASE, 'a', true);
  store = await CacheStore.open(cacheDir);
  state = new DaemonState();
  state.currentId = await store.currentId();
  state.ready = true;
});

after(async () => {
  for (const s of servers) await s.close();
  await removeDir(work);
});

type Case = { path: string; method?: string; headers?: Record<string, string> };

function comparable(res: Res): { status: number; headers: Record<string, unknown>; body: string } {
  const headers = Object.fromEntries(Object.entries(res.headers).filter(([k]) => k !== 'date'));
  return { status: res.status, headers, body: res.body.toString('latin1') };
}

/** Ask both; /healthz's uptime may tick over between the two: ask again then. */
async function same(fast: HttpServerHandle, slow: HttpServerHandle, c: Case): Promise<Res> {
  for (let attempt = 0; ; attempt++) {
    const opts = { method: c.method ?? 'GET', headers: c.headers ?? {} };
    const a = await request(fast.port, c.path, opts);
    const b = await request(slow.port, c.path, opts);
    const what = `${opts.method} ${c.path} ${JSON.stringify(opts.headers)}`;
    if (attempt < 3 && c.path.startsWith('/healthz') && !a.body.equals(b.body)) continue;
    assert.deepEqual(comparable(a), comparable(b), what);
    return a;
  }
}

/** The request and byte counters of a server's /metrics (latencies differ by nature, and so the bytes of /metrics itself). */
async function counters(port: number, token?: string): Promise<string[]> {
  const res = await request(port, '/metrics', { headers: token ? { authorization: `Bearer ${token}` } : {} });
  assert.equal(res.status, 200);
  return res.body
    .toString()
    .split('\n')
    .filter((l) => /^kheadersd_http_(requests|response_bytes)_total\{/.test(l) && !l.startsWith('kheadersd_http_response_bytes_total{route="/metrics"}'));
}

test('every route the fast path claims answers as fastify does, without loading fastify', async () => {
  const { fast, slow } = await pair();
  const F = '/v1/kernels/current/files';
  const sched = `${F}/include/linux/sched.h`;
  const etag = (await request(slow.port, sched)).headers.etag!;
  const gzEtag = (await request(slow.port, sched, { headers: { 'accept-encoding': 'gzip' } })).headers.etag!;
  await request(fast.port, sched); // the same two warm-ups on both sides, for the counters
  await request(fast.port, sched, { headers: { 'accept-encoding': 'gzip' } });
  const lm = 'Fri, 01 Mar 2024 12:00:00 GMT';
  const variants: Array<Record<string, string>> = [
    {},
    { 'accept-encoding': 'gzip, deflate' },
    { 'accept-encoding': 'gzip;q=0' },
    { 'accept-encoding': 'identity' },
    { range: 'bytes=5-20' },
    { range: 'bytes=-7', 'if-range': etag },
    { range: 'bytes=0-3', 'if-range': '"stale"' },
    { range: 'bytes=0-1,4-5' },
    { 'if-none-match': etag },
    { 'if-none-match': gzEtag, 'accept-encoding': 'gzip' },
    { 'if-none-match': '"nope"' },
    { 'if-modified-since': lm },
    { 'if-modified-since': 'Fri, 01 Mar 2024 11:00:00 GMT' },
    { 'if-none-match': '"nope"', 'if-modified-since': lm },
  ];
  const files = [
    sched,
    `${F}/include/linux/types.h`,
    `${F}/include/linux/empty.h`,
    `${F}/include/dt-bindings/sched-link.h`,
    `${F}/include/linux-alias/types.h`,
    `${F}/include/linux/odd%20%3Cb%3E%26%22name'.h`,
    `/v1/kernels/${SYNTH_RELEASE}/files/include/linux/sched.h`,
    `/v1/kernels/6.5.0-old/files/include/linux/sched.h?x=1`,
    `/v1/blobs/${entry.manifest.digest}/files/include/linux/sched.h`,
    `/v1/blobs/${other.manifest.digest}/files/arch/x86/include/asm/ptrace.h`,
  ];
  const cases: Case[] = [];
  for (const method of ['GET', 'HEAD']) {
    for (const p of ['/healthz', '/readyz', '/readyz?verbose', '/v1/kernels', '/v1/kernels/current', `/v1/kernels/${SYNTH_RELEASE}`, '/v1/kernels/6.5.0-old', '/metrics']) {
      cases.push({ path: p, method });
    }
    // Not in the tree, and a file asked for as a directory: 404s.
    for (const p of [`${F}/include/linux/nope.h`, `${F}/nope/deeper/x.h`, `${F}/include/linux/sched.h/`, `/v1/blobs/${entry.manifest.digest}/files/include/linux/types.h/`]) {
      cases.push({ path: p, method });
    }
    for (const p of files) for (const headers of variants) cases.push({ path: p, method, headers });
  }
  for (const c of cases) {
    // /metrics bodies differ (each server counts its own latencies): its headers but the length must not.
    if (c.path === '/metrics') {
      const a = await request(fast.port, c.path, { method: c.method! });
      const b = await request(slow.port, c.path, { method: c.method! });
      const strip = (r: Res) => Object.fromEntries(Object.entries(comparable(r).headers).filter(([k]) => k !== 'content-length'));
      assert.equal(a.status, b.status);
      assert.deepEqual(strip(a), strip(b));
      continue;
    }
    await same(fast, slow, c);
    // A second time: the fast path answers a URL it knows from what it made the first time.
    await same(fast, slow, c);
  }

  // Not ready: the 503s, with and without an ingest error.
  state.ready = false;
  try {
    await same(fast, slow, { path: '/readyz' });
    state.lastIngestError = { at: '2024-01-01T00:00:00.000Z', code: 'E_ARCHIVE_NOT_FOUND', message: 'no archive' };
    await same(fast, slow, { path: '/readyz' });
    await same(fast, slow, { path: '/readyz', method: 'HEAD' });
  } finally {
    state.ready = true;
    state.lastIngestError = null;
  }

  assert.equal(fast.fastify, 'not loaded', 'the fast path declined one of the requests above');
  assert.equal(slow.fastify, 'loaded');
  const [a, b] = [await counters(fast.port), await counters(slow.port)];
  assert.deepEqual(a, b);
  assert.ok(a.some((l) => l.startsWith('kheadersd_http_requests_total{route="/v1/kernels/:ref/files/*",status="304"}')), a.join('\n'));
  assert.ok(a.some((l) => l.startsWith('kheadersd_http_requests_total{route="/readyz",status="503"}')), a.join('\n'));
});

test('with a token: the 401s and the authorised answers are fastify\'s, from the fast path', async () => {
  const { fast, slow } = await pair(TOKEN);
  const paths = ['/healthz', '/readyz', '/metrics', '/v1/kernels', '/v1/kernels/current', '/v1/kernels/current/files/include/linux/sched.h', '/v1/kernels/current/files/include/linux/nope.h'];
  const auths: Array<Record<string, string>> = [{}, { authorization: 'Bearer wrong-token-0123456789' }, { authorization: 'Basic eDp5' }, { authorization: `Bearer ${TOKEN}` }, { authorization: `bearer  ${TOKEN}` }];
  for (const method of ['GET', 'HEAD']) {
    for (const p of paths) {
      for (const headers of auths) {
        const authorised = headers.authorization?.toLowerCase().endsWith(TOKEN.toLowerCase()) ?? false;
        if (p === '/metrics' && authorised) continue; // its body counts what came before; compared below
        const res = await same(fast, slow, { path: p, method, headers });
        assert.equal(res.status, p === '/healthz' || authorised ? (p.endsWith('nope.h') ? 404 : 200) : 401, `${method} ${p} ${JSON.stringify(headers)}`);
        // The second time round, for a file URL the fast path now knows.
        await same(fast, slow, { path: p, method, headers });
      }
    }
  }
  assert.equal(fast.fastify, 'not loaded');
  assert.deepEqual(await counters(fast.port, TOKEN), await counters(slow.port, TOKEN));
});

test('what the fast path declines, fastify answers on the same server, as on a fastify-only one', async () => {
  const { fast, slow } = await pair();
  const F = '/v1/kernels/current/files';
  for (const c of [
    { path: `${F}/include/linux/` },
    { path: `${F}` },
    { path: `${F}/include/linux/big.h`, headers: { range: 'bytes=0-9' } },
    { path: `${F}/include/linux/sched.h`, headers: { range: 'bytes=99999-' } },
    { path: '/v1/kernels/current/archive.tar.xz', method: 'HEAD' },
    { path: '/v1/kernels/9.9.9' },
    { path: '/v1/kernels/current/' },
    { path: `/v1/blobs/${entry.manifest.digest.slice(0, 12)}/files/include/linux/types.h` },
    { path: `${F}/include/%2e%2e/secret.h` },
    { path: '/nope' },
    { path: '/healthz', method: 'POST' },
  ] as Case[]) {
    await same(fast, slow, c);
  }
  assert.equal(fast.fastify, 'loaded');
});
