/**
 * Every route of the HTTP server against a real socket, on a synthetic archive ingested by the
 * real ingest (no fixture needed): JSON, files, listings, symlinks, the archive, blobs, and the
 * HTTP semantics (ETag/304, Range/206/416, HEAD, gzip), metrics, readiness, graceful close.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import http from 'node:http';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import zlib from 'node:zlib';
import type { EntrySummary } from '../src/store/summary.js';
import { isKheadersError } from '../src/errors.js';
import { startHttpServer } from '../src/serve/http/server.js';
import { archivePath, type CacheEntry } from '../src/store/entry.js';
import {
  SYNTH_RELEASE,
  bigText,
  ingestSynth,
  json,
  quietLog,
  removeDir,
  request,
  startEnv,
  synthTree,
  tempDir,
  type HttpEnv,
} from './helpers/http-env.js';

let work: string;
let env: HttpEnv;
/** The same cache served with the fast path off: file semantics must not depend on the path taken. */
let slow: HttpEnv;
let entry: CacheEntry;
let other: CacheEntry;
const tree = synthTree();
const content = (name: string): Buffer => {
  const c = tree.find((f) => f.name === `./${name}`)!.content!;
  return Buffer.isBuffer(c) ? c : Buffer.from(c);
};
const F = '/v1/kernels/current/files';
const fastEnv = (): HttpEnv => env;

before(async () => {
  work = await tempDir('http-routes');
  const cacheDir = path.join(work, 'cache');
  other = await ingestSynth(cacheDir, work, '6.5.0-old', 'b', false); // an older, non-current entry
  entry = await ingestSynth(cacheDir, work, SYNTH_RELEASE, 'a', true);
  env = await startEnv({ work, cacheDir });
  slow = await startEnv({ work, cacheDir, fastPath: false });
});

after(async () => {
  await env?.close();
  await slow?.close();
  await removeDir(work);
});

test('/healthz and /readyz', async () => {
  const h = await request(env.port, '/healthz');
  assert.equal(h.status, 200);
  assert.equal(json<{ status: string }>(h).status, 'ok');
  const r = await request(env.port, '/readyz');
  assert.equal(r.status, 200);
  assert.deepEqual(json(r), { ready: true, current: entry.manifest.id });

  env.state.ready = false;
  try {
    const nr = await request(env.port, '/readyz');
    assert.equal(nr.status, 503);
    assert.match(json<{ reason: string }>(nr).reason, /not cached yet/);
    env.state.lastIngestError = { at: new Date().toISOString(), code: 'E_ARCHIVE_NOT_FOUND', message: 'no archive' };
    const failed = await request(env.port, '/readyz');
    assert.equal(failed.status, 503);
    assert.match(json<{ reason: string }>(failed).reason, /E_ARCHIVE_NOT_FOUND/);
  } finally {
    env.state.ready = true;
    env.state.lastIngestError = null;
  }
});

test('/v1/kernels lists every entry in the shape of `ls --json`', async () => {
  const res = await request(env.port, '/v1/kernels');
  assert.equal(res.status, 200);
  assert.equal(res.headers['cache-control'], 'no-cache');
  const list = json<EntrySummary[]>(res);
  assert.deepEqual(list.map((e) => e.release).sort(), ['6.5.0-old', SYNTH_RELEASE].sort());
  const cur = list.find((e) => e.current)!;
  assert.equal(cur.release, SYNTH_RELEASE);
  assert.equal(cur.digest, entry.manifest.digest);
  for (const key of ['release', 'digest', 'kind', 'files', 'bytes', 'buildId', 'source', 'ingestedAt', 'current', 'vmlinuxH']) assert.ok(key in cur, key);
});

test('/v1/kernels/{current|release}', async () => {
  const cur = json<EntrySummary>(await request(env.port, '/v1/kernels/current'));
  assert.equal(cur.release, SYNTH_RELEASE);
  assert.equal(cur.current, true);
  const old = json<EntrySummary>(await request(env.port, '/v1/kernels/6.5.0-old'));
  assert.equal(old.digest, other.manifest.digest);
  assert.equal(old.current, false);
  const missing = await request(env.port, '/v1/kernels/9.9.9');
  assert.equal(missing.status, 404);
  assert.equal(json<{ error: { code: string } }>(missing).error.code, 'E_NOT_FOUND');
});

for (const mode of ['fast path', 'fastify only'] as const) {
  test(`a file: bytes, type, validators (${mode})`, async () => {
    const env = mode === 'fast path' ? fastEnv() : slow;
  const res = await request(env.port, `${F}/include/linux/sched.h`);
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, content('include/linux/sched.h'));
  assert.equal(res.headers['content-type'], 'text/x-c; charset=utf-8');
  assert.equal(res.headers['accept-ranges'], 'bytes');
  assert.equal(res.headers['cache-control'], 'no-cache');
  assert.equal(res.headers['last-modified'], 'Fri, 01 Mar 2024 12:00:00 GMT');
  assert.match(res.headers.etag ?? '', /^"[A-Za-z0-9_-]+"$/);
  assert.equal(res.headers['x-content-type-options'], 'nosniff');
  // The same file by release name and by digest carries the same tag.
  const byRelease = await request(env.port, `/v1/kernels/${SYNTH_RELEASE}/files/include/linux/sched.h`);
  const byBlob = await request(env.port, `/v1/blobs/${entry.manifest.digest}/files/include/linux/sched.h`);
  assert.equal(byRelease.headers.etag, res.headers.etag);
  assert.equal(byBlob.headers.etag, res.headers.etag);
  // Another build's file with the same path has another tag.
  const old = await request(env.port, `/v1/kernels/6.5.0-old/files/include/linux/sched.h`);
  assert.notEqual(old.headers.etag, res.headers.etag);
  assert.match(old.body.toString(), /sched\.h b/);
  // Empty file.
  const empty = await request(env.port, `${F}/include/linux/empty.h`);
  assert.equal(empty.status, 200);
  assert.equal(empty.headers['content-length'], '0');
  assert.equal(empty.body.length, 0);
  });
}

for (const mode of ['fast path', 'fastify only'] as const) {
  test(`symlinks inside the tree are followed (to a file and through a directory) (${mode})`, async () => {
    const env = mode === 'fast path' ? fastEnv() : slow;
  const viaFile = await request(env.port, `${F}/include/dt-bindings/sched-link.h`);
  assert.equal(viaFile.status, 200);
  assert.deepEqual(viaFile.body, content('include/linux/sched.h'));
  const viaDir = await request(env.port, `${F}/include/linux-alias/types.h`);
  assert.equal(viaDir.status, 200);
  assert.deepEqual(viaDir.body, content('include/linux/types.h'));
  const listing = await request(env.port, `${F}/include/linux-alias`);
  assert.equal(json<{ path: string }>(listing).path, 'include/linux');
  });
}

test('a big file is streamed whole; a missing one is 404', async () => {
  const big = await request(env.port, `${F}/include/linux/big.h`);
  assert.equal(big.status, 200);
  assert.deepEqual(big.body, bigText(600));
  assert.equal(big.headers['content-length'], String(600 * 1024));
  const missing = await request(env.port, `${F}/include/linux/nope.h`);
  assert.equal(missing.status, 404);
  assert.equal(missing.headers['cache-control'], 'no-store');
});

test('directory listings: JSON by default, escaped HTML for a browser', async () => {
  const res = await request(env.port, `${F}/include/linux/`);
  assert.equal(res.status, 200);
  assert.equal(res.headers['content-type'], 'application/json; charset=utf-8');
  const listing = json<{ release: string; path: string; entries: Array<{ name: string; type: string; size: number }> }>(res);
  assert.equal(listing.path, 'include/linux');
  assert.deepEqual(
    listing.entries.map((e) => e.name),
    ['big.h', 'empty.h', 'odd <b>&"name\'.h', 'sched.h', 'types.h'],
  );
  const root = json<{ entries: Array<{ name: string; type: string; target?: string }> }>(await request(env.port, F));
  assert.deepEqual(root.entries.map((e) => e.name), ['arch', 'include']);
  const inc = json<{ entries: Array<{ name: string; type: string; target?: string }> }>(await request(env.port, `${F}/include`));
  assert.deepEqual(inc.entries.find((e) => e.name === 'linux-alias'), { name: 'linux-alias', type: 'symlink', size: 5, mtime: '2024-03-01T12:00:00.000Z', target: 'linux' });

  const html = await request(env.port, `${F}/include/linux`, { headers: { accept: 'text/html,application/xhtml+xml,*/*;q=0.8' } });
  assert.equal(html.status, 200);
  assert.equal(html.headers['content-type'], 'text/html; charset=utf-8');
  assert.match(String(html.headers['content-security-policy']), /default-src 'none'/);
  const page = html.body.toString();
  assert.ok(page.includes('odd &lt;b&gt;&amp;&quot;name&#39;.h'), page);
  assert.ok(!page.includes('<b>&"'), 'a name is never written raw');
  assert.ok(page.includes(`href="/v1/kernels/current/files/include/linux/odd%20%3Cb%3E%26%22name&#39;.h"`), page);
  assert.notEqual(html.headers.etag, res.headers.etag);
  assert.match(html.headers.vary ?? '', /Accept\b/);
  // The odd name is reachable through the link the page gives.
  const odd = await request(env.port, `${F}/include/linux/odd%20%3Cb%3E%26%22name'.h`);
  assert.equal(odd.status, 200);
  assert.equal(odd.body.toString(), '/* an odd name */\n');
});

test('archive.tar.xz: the original bytes with their digest', async () => {
  const original = await readFile(archivePath(entry)!);
  const sha = createHash('sha256').update(original).digest();
  for (const url of ['/v1/kernels/current/archive.tar.xz', `/v1/kernels/${SYNTH_RELEASE}/archive.tar.xz`, `/v1/blobs/${entry.manifest.digest}/archive.tar.xz`]) {
    const res = await request(env.port, url, { headers: { 'accept-encoding': 'gzip' } });
    assert.equal(res.status, 200, url);
    assert.deepEqual(res.body, original, url);
    assert.equal(res.headers['content-type'], 'application/x-xz');
    assert.equal(res.headers['content-encoding'], undefined, 'already compressed: never gzipped');
    assert.equal(res.headers['repr-digest'], `sha-256=:${sha.toString('base64')}:`);
    assert.equal(res.headers.digest, `sha-256=${sha.toString('base64')}`);
    assert.equal(sha.toString('hex'), entry.manifest.digest);
  }
  const ranged = await request(env.port, '/v1/kernels/current/archive.tar.xz', { headers: { range: 'bytes=0-5' } });
  assert.equal(ranged.status, 206);
  assert.deepEqual(ranged.body, original.subarray(0, 6));
});

test('blobs are immutable; release URLs revalidate', async () => {
  const d = entry.manifest.digest;
  const blob = await request(env.port, `/v1/blobs/${d}/files/include/linux/types.h`);
  assert.equal(blob.status, 200);
  assert.equal(blob.headers['cache-control'], 'public, max-age=31536000, immutable');
  const blobArchive = await request(env.port, `/v1/blobs/${d}/archive.tar.xz`, { method: 'HEAD' });
  assert.equal(blobArchive.headers['cache-control'], 'public, max-age=31536000, immutable');
  const listing = await request(env.port, `/v1/blobs/${d}/files/include`);
  assert.equal(listing.status, 200);
  assert.equal(listing.headers['cache-control'], 'public, max-age=31536000, immutable');
  assert.equal((await request(env.port, `/v1/blobs/${'0'.repeat(64)}/files/include`)).status, 404);
  assert.equal((await request(env.port, `/v1/blobs/${d.slice(0, 12)}/files/include`)).status, 404);
  assert.equal((await request(env.port, `/v1/blobs/${d.toUpperCase()}/archive.tar.xz`)).status, 404);
});

for (const mode of ['fast path', 'fastify only'] as const) {
  test(`conditional GET: If-None-Match and If-Modified-Since give 304 (${mode})`, async () => {
    const env = mode === 'fast path' ? fastEnv() : slow;
  const url = `${F}/include/linux/sched.h`;
  const first = await request(env.port, url);
  const etag = first.headers.etag!;
  const inm = await request(env.port, url, { headers: { 'if-none-match': etag } });
  assert.equal(inm.status, 304);
  assert.equal(inm.body.length, 0);
  assert.equal(inm.headers.etag, etag);
  assert.equal((await request(env.port, url, { headers: { 'if-none-match': `"nope", W/${etag}` } })).status, 304);
  assert.equal((await request(env.port, url, { headers: { 'if-none-match': '"nope"' } })).status, 200);
  const lm = String(first.headers['last-modified']);
  assert.equal((await request(env.port, url, { headers: { 'if-modified-since': lm } })).status, 304);
  assert.equal((await request(env.port, url, { headers: { 'if-modified-since': 'Fri, 01 Mar 2024 11:00:00 GMT' } })).status, 200);
  // If-None-Match wins over If-Modified-Since.
  assert.equal((await request(env.port, url, { headers: { 'if-none-match': '"nope"', 'if-modified-since': lm } })).status, 200);
  // A listing revalidates too.
  const dir = await request(env.port, `${F}/include`);
  assert.equal((await request(env.port, `${F}/include`, { headers: { 'if-none-match': dir.headers.etag! } })).status, 304);
  });
}

for (const mode of ['fast path', 'fastify only'] as const) {
  test(`Range: 206, 416, suffix, ignored multi-range, If-Range (${mode})`, async () => {
    const env = mode === 'fast path' ? fastEnv() : slow;
  const url = `${F}/include/linux/big.h`;
  const whole = bigText(600);
  const r = await request(env.port, url, { headers: { range: 'bytes=100-199' } });
  assert.equal(r.status, 206);
  assert.equal(r.headers['content-range'], `bytes 100-199/${whole.length}`);
  assert.equal(r.headers['content-length'], '100');
  assert.deepEqual(r.body, whole.subarray(100, 200));
  const tail = await request(env.port, url, { headers: { range: 'bytes=-10' } });
  assert.deepEqual(tail.body, whole.subarray(whole.length - 10));
  // A range that crosses the streaming threshold.
  const mid = await request(env.port, url, { headers: { range: 'bytes=1000-400000' } });
  assert.equal(mid.status, 206);
  assert.deepEqual(mid.body, whole.subarray(1000, 400001));
  const bad = await request(env.port, url, { headers: { range: `bytes=${whole.length}-` } });
  assert.equal(bad.status, 416);
  assert.equal(bad.headers['content-range'], `bytes */${whole.length}`);
  const multi = await request(env.port, url, { headers: { range: 'bytes=0-1,5-6' } });
  assert.equal(multi.status, 200);
  assert.equal(multi.body.length, whole.length);
  const etag = r.headers.etag!;
  assert.equal((await request(env.port, url, { headers: { range: 'bytes=0-9', 'if-range': etag } })).status, 206);
  assert.equal((await request(env.port, url, { headers: { range: 'bytes=0-9', 'if-range': '"stale"' } })).status, 200);
  const small = await request(env.port, `${F}/include/linux/sched.h`, { headers: { range: 'bytes=3-8', 'accept-encoding': 'gzip' } });
  assert.equal(small.status, 206);
  assert.equal(small.headers['content-encoding'], undefined, 'no gzip for ranges');
  assert.deepEqual(small.body, content('include/linux/sched.h').subarray(3, 9));
  });
}

for (const mode of ['fast path', 'fastify only'] as const) {
  test(`HEAD: the headers of GET, no body (${mode})`, async () => {
    const env = mode === 'fast path' ? fastEnv() : slow;
  const url = `${F}/include/linux/sched.h`;
  const get = await request(env.port, url);
  const head = await request(env.port, url, { method: 'HEAD' });
  assert.equal(head.status, 200);
  assert.equal(head.body.length, 0);
  for (const h of ['content-length', 'content-type', 'etag', 'last-modified', 'accept-ranges', 'cache-control']) assert.equal(head.headers[h], get.headers[h], h);
  const bigHead = await request(env.port, `${F}/include/linux/big.h`, { method: 'HEAD' });
  assert.equal(bigHead.headers['content-length'], String(600 * 1024));
  const archiveHead = await request(env.port, '/v1/kernels/current/archive.tar.xz', { method: 'HEAD' });
  assert.equal(archiveHead.headers['content-length'], String(entry.manifest.archiveBytes));
  assert.ok(archiveHead.headers['repr-digest']);
  assert.equal((await request(env.port, '/v1/kernels', { method: 'HEAD' })).status, 200);
  });
}

for (const mode of ['fast path', 'fastify only'] as const) {
  test(`gzip when accepted, with its own ETag; identity otherwise (${mode})`, async () => {
    const env = mode === 'fast path' ? fastEnv() : slow;
  const url = `${F}/include/linux/sched.h`;
  const plain = await request(env.port, url);
  const gz = await request(env.port, url, { headers: { 'accept-encoding': 'gzip, deflate' } });
  assert.equal(gz.status, 200);
  assert.equal(gz.headers['content-encoding'], 'gzip');
  assert.match(gz.headers.vary ?? '', /Accept-Encoding/);
  assert.match(plain.headers.vary ?? '', /Accept-Encoding/);
  assert.ok(gz.body.length < plain.body.length);
  assert.deepEqual(zlib.gunzipSync(gz.body), plain.body);
  assert.notEqual(gz.headers.etag, plain.headers.etag);
  assert.equal(gz.headers['content-length'], String(gz.body.length));
  // Either tag revalidates.
  assert.equal((await request(env.port, url, { headers: { 'accept-encoding': 'gzip', 'if-none-match': gz.headers.etag! } })).status, 304);
  assert.equal((await request(env.port, url, { headers: { 'accept-encoding': 'gzip', 'if-none-match': plain.headers.etag! } })).status, 304);
  // A second request is served from the compressed-body cache, identically.
  assert.deepEqual((await request(env.port, url, { headers: { 'accept-encoding': 'gzip' } })).body, gz.body);
  // Streamed compression of a big file.
  const big = await request(env.port, `${F}/include/linux/big.h`, { headers: { 'accept-encoding': 'gzip' } });
  assert.equal(big.headers['content-encoding'], 'gzip');
  assert.deepEqual(zlib.gunzipSync(big.body), bigText(600));
  assert.equal((await request(env.port, url, { headers: { 'accept-encoding': 'gzip;q=0' } })).headers['content-encoding'], undefined);
  // Tiny files are not worth it.
  assert.equal((await request(env.port, `${F}/include/linux/types.h`, { headers: { 'accept-encoding': 'gzip' } })).headers['content-encoding'], undefined);
  // HEAD with gzip gives the compressed length.
  const head = await request(env.port, url, { method: 'HEAD', headers: { 'accept-encoding': 'gzip' } });
  assert.equal(head.headers['content-length'], String(gz.body.length));
  });
}

test('the fast path and fastify answer with the same status, headers and bytes', async () => {
  const cases: Array<Record<string, string>> = [
    {},
    { 'accept-encoding': 'gzip' },
    { range: 'bytes=5-20' },
    { range: 'bytes=999999-' },
    { 'if-none-match': '"nope"' },
    { 'if-modified-since': 'Fri, 01 Mar 2024 12:00:00 GMT' },
  ];
  for (const p of [`${F}/include/linux/sched.h`, `${F}/include/dt-bindings/sched-link.h`, `/v1/blobs/${entry.manifest.digest}/files/include/linux/types.h`]) {
    for (const headers of cases) {
      for (const method of ['GET', 'HEAD']) {
        const a = await request(env.port, p, { headers, method });
        const b = await request(slow.port, p, { headers, method });
        const what = `${method} ${p} ${JSON.stringify(headers)}`;
        assert.equal(a.status, b.status, what);
        assert.deepEqual(a.body, b.body, what);
        const strip = (h: typeof a.headers) => Object.fromEntries(Object.entries(h).filter(([k]) => k !== 'date' && k !== 'connection'));
        assert.deepEqual(strip(a.headers), strip(b.headers), what);
      }
    }
  }
});

test('/metrics counts requests by route and status, bytes, latency, cache and ingest', async () => {
  await request(env.port, `${F}/include/linux/types.h`);
  await request(env.port, `${F}/include/linux/nope.h`);
  env.state.lastIngest = { at: new Date().toISOString(), durationMs: 1234, id: entry.manifest.id, reused: false };
  const res = await request(env.port, '/metrics');
  assert.equal(res.status, 200);
  assert.match(res.headers['content-type'] ?? '', /^text\/plain; version=0\.0\.4/);
  const text = res.body.toString();
  assert.match(text, /^kheadersd_http_requests_total\{route="\/v1\/kernels\/:ref\/files\/\*",status="200"\} \d+$/m);
  assert.match(text, /^kheadersd_http_requests_total\{route="\/v1\/kernels\/:ref\/files\/\*",status="404"\} \d+$/m);
  assert.match(text, /^kheadersd_http_response_bytes_total\{route="\/v1\/kernels\/:ref\/files\/\*"\} [1-9]\d*$/m);
  assert.match(text, /^kheadersd_http_request_duration_seconds_bucket\{route="\/v1\/kernels\/:ref\/files\/\*",le="\+Inf"\} \d+$/m);
  assert.match(text, /^kheadersd_cache_entries 2$/m);
  const bytes = [entry, other].reduce((s, e) => s + e.manifest.packBytes + e.manifest.archiveBytes, 0);
  assert.match(text, new RegExp(`^kheadersd_cache_bytes ${bytes}$`, 'm'));
  assert.match(text, /^kheadersd_ingest_duration_seconds 1\.234$/m);
  assert.match(text, /^kheadersd_ingest_last_error\{code=""\} 0$/m);
  assert.match(text, /^kheadersd_ready 1$/m);
});

test('unknown routes and methods are JSON 404s', async () => {
  for (const p of ['/', '/v1', '/v1/kernels/current/nope', '/v2/kernels']) {
    const res = await request(env.port, p);
    assert.equal(res.status, 404, p);
    assert.equal(json<{ error: { code: string } }>(res).error.code, 'E_NOT_FOUND');
  }
  assert.equal((await request(env.port, '/v1/kernels', { method: 'POST' })).status, 404);
  assert.equal((await request(env.port, '/v1/kernels', { method: 'DELETE' })).status, 404);
});

test('an entry ingested while serving appears, and a kernel swap moves `current`', async () => {
  const third = await ingestSynth(env.cacheDir, work, '6.7.0-new', 'c', true);
  env.state.currentId = third.manifest.id;
  env.state.changed();
  const cur = json<EntrySummary>(await request(env.port, '/v1/kernels/current'));
  assert.equal(cur.release, '6.7.0-new');
  const file = await request(env.port, `${F}/include/linux/types.h`);
  assert.equal(file.body.toString(), '#define TYPES_c 1\n');
  env.state.currentId = entry.manifest.id;
  env.state.changed();
  assert.equal(json<EntrySummary>(await request(env.port, '/v1/kernels/current')).release, SYNTH_RELEASE);
});

test('a port already in use is a clear E_HTTP', async () => {
  await assert.rejects(
    startHttpServer({ listen: { host: '127.0.0.1', port: env.port }, store: env.store, state: env.state, log: quietLog() }),
    (err: unknown) => isKheadersError(err, 'E_HTTP') && /already in use/.test(err.message),
  );
});

test('close() lets an in-flight response finish', async (t) => {
  const cacheDir = env.cacheDir;
  const own = await startEnv({ work, cacheDir });
  t.after(() => own.close());
  const whole = bigText(600);
  const agent = new http.Agent({ keepAlive: true });
  t.after(() => agent.destroy());
  const body = await new Promise<Buffer>((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port: own.port, path: `${F}/include/linux/big.h`, agent }, (res) => {
      res.pause(); // hold the response in flight while the server closes
      const chunks: Buffer[] = [];
      let closed: Promise<void> | undefined;
      setTimeout(() => {
        closed = own.close();
        setTimeout(() => res.resume(), 200);
      }, 100);
      res.on('data', (b: Buffer) => chunks.push(b));
      res.on('end', () => {
        void closed?.then(() => resolve(Buffer.concat(chunks)), reject);
      });
      res.on('error', reject);
    });
    req.on('error', reject);
  });
  assert.deepEqual(body, whole);
  await assert.rejects(request(own.port, '/healthz'), /ECONNREFUSED/);
});

for (const [label, getEnv] of [
  ['fast path', fastEnv],
  ['fastify only', (): HttpEnv => slow],
] as const) {
  test(`a file asked for with a trailing slash is 404, as the kernel says ENOTDIR (${label})`, async () => {
    const port = getEnv().port;
    for (const p of [`${F}/include/linux/sched.h/`, `${F}/include/dt-bindings/sched-link.h/`, `/v1/blobs/${entry.manifest.digest}/files/include/linux/types.h/`]) {
      const res = await request(port, p);
      assert.equal(res.status, 404, p);
      assert.match(json<{ error: { message: string } }>(res).error.message, /not a directory/, p);
    }
    // A directory with its slash is still a listing, and the file without one is the file.
    assert.equal((await request(port, `${F}/include/linux/`)).status, 200);
    assert.ok((await request(port, `${F}/include/linux/sched.h`)).body.equals(content('include/linux/sched.h')));
  });
}
