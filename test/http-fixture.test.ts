/**
 * The real kernel archive (6.1.192) through HTTP: files byte-equal to `tar -xJf`, listings equal
 * to the extracted directories, the whole archive byte-equal to the fixture, and a bounded
 * concurrent load (2,000 requests, 100 at a time) with zero errors.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readdir, readFile, readlink } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { after, before, test } from 'node:test';
import zlib from 'node:zlib';
import type { CacheEntry } from '../src/store/entry.js';
import {
  FIXTURE,
  FIXTURE_RELEASE,
  fixtureSkipReason,
  ingestFixture,
  json,
  removeDir,
  request,
  runOk,
  startEnv,
  tempDir,
  type HttpEnv,
} from './helpers/http-env.js';

const skip = await fixtureSkipReason();
let work: string;
let extracted: string;
let env: HttpEnv;
let entry: CacheEntry;

before(async () => {
  if (skip) return;
  work = await tempDir('http-fixture');
  extracted = path.join(work, 'tree');
  await runOk('mkdir', ['-p', extracted]);
  await Promise.all([runOk('tar', ['-xJf', FIXTURE, '-C', extracted]), ingestFixture(path.join(work, 'cache')).then((e) => (entry = e))]);
  env = await startEnv({ work, cacheDir: path.join(work, 'cache') });
});

after(async () => {
  await env?.close();
  if (work) await removeDir(work);
});

/** Every Nth file of the index, plus the ones BPF tools need most and every symlink. */
function sample(every: number): string[] {
  const nodes = entry.index.nodes;
  const files = nodes.filter((n) => n.kind === 'file').map((n) => n.path);
  const picked = new Set(files.filter((_, i) => i % every === 0));
  for (const p of ['include/generated/autoconf.h', 'include/generated/utsrelease.h', 'include/linux/sched.h', 'include/linux/bpf.h', 'arch/x86/include/generated/asm/syscalls_64.h']) {
    if (entry.index.get(p)) picked.add(p);
  }
  for (const n of nodes) if (n.kind === 'symlink') picked.add(n.path);
  return [...picked];
}

const url = (p: string): string => `/v1/kernels/current/files/${p.split('/').map(encodeURIComponent).join('/')}`;

test('files are byte-equal to tar -xJf (a sample of ~350, and every symlink)', { skip }, async () => {
  const paths = sample(20);
  assert.ok(paths.length > 300);
  for (const p of paths) {
    const res = await request(env.port, url(p));
    assert.equal(res.status, 200, p);
    const want = await readFile(path.join(extracted, p));
    assert.ok(res.body.equals(want), `${p}: ${res.body.length} bytes served, ${want.length} on disk`);
    if (p.endsWith('.h')) assert.equal(res.headers['content-type'], 'text/x-c; charset=utf-8', p);
  }
  // The release-named and content-addressed URLs agree.
  const byBlob = await request(env.port, `/v1/blobs/${entry.manifest.digest}/files/include/generated/utsrelease.h`);
  assert.match(byBlob.body.toString(), new RegExp(`"${FIXTURE_RELEASE.replace(/\./g, '\\.')}"`));
});

test('gzip bodies of real headers decompress to the same bytes', { skip }, async () => {
  for (const p of sample(400)) {
    const res = await request(env.port, url(p), { headers: { 'accept-encoding': 'gzip' } });
    const body = res.headers['content-encoding'] === 'gzip' ? zlib.gunzipSync(res.body) : res.body;
    assert.ok(body.equals(await readFile(path.join(extracted, p))), p);
  }
});

test('listings match the extracted directories (names, kinds, link targets)', { skip }, async () => {
  for (const dir of ['', 'include', 'include/linux', 'include/dt-bindings/input', 'arch/x86/include/generated/uapi/asm']) {
    const res = await request(env.port, url(dir));
    assert.equal(res.status, 200, dir);
    const listing = json<{ entries: Array<{ name: string; type: string; target?: string }> }>(res);
    const onDisk = await readdir(path.join(extracted, dir), { withFileTypes: true });
    assert.deepEqual(listing.entries.map((e) => e.name).sort(), onDisk.map((d) => d.name).sort(), dir);
    for (const d of onDisk) {
      const e = listing.entries.find((x) => x.name === d.name)!;
      assert.equal(e.type, d.isDirectory() ? 'dir' : d.isSymbolicLink() ? 'symlink' : 'file', `${dir}/${d.name}`);
      if (d.isSymbolicLink()) assert.equal(e.target, await readlink(path.join(extracted, dir, d.name)));
    }
  }
});

test('the whole archive is the fixture, with its sha256 in Repr-Digest and Digest', { skip }, async () => {
  const want = await readFile(FIXTURE);
  const sha = createHash('sha256').update(want).digest();
  assert.equal(sha.toString('hex'), '1e6afab138bcb67bba113c4cca4773a2a3c04c57d562bed43eab9a5c5e8abed4');
  for (const u of ['/v1/kernels/current/archive.tar.xz', `/v1/kernels/${FIXTURE_RELEASE}/archive.tar.xz`, `/v1/blobs/${sha.toString('hex')}/archive.tar.xz`]) {
    const res = await request(env.port, u);
    assert.equal(res.status, 200, u);
    assert.ok(res.body.equals(want), u);
    assert.equal(res.headers['repr-digest'], `sha-256=:${sha.toString('base64')}:`);
    assert.equal(res.headers.digest, `sha-256=${sha.toString('base64')}`);
  }
  // Resuming a download with a range gives the rest, exactly.
  const rest = await request(env.port, '/v1/kernels/current/archive.tar.xz', { headers: { range: `bytes=${want.length - 100_000}-` } });
  assert.equal(rest.status, 206);
  assert.ok(rest.body.equals(want.subarray(want.length - 100_000)));
});

test('bounded concurrent load: 2,000 requests, 100 at a time, zero errors', { skip }, async (t) => {
  const paths = sample(32).filter((p) => entry.index.resolve(p)?.kind === 'file').slice(0, 200);
  const sizes = new Map(paths.map((p) => [p, entry.index.resolve(p)!.size]));
  const agent = new http.Agent({ keepAlive: true, maxSockets: 100 });
  const failures: string[] = [];
  let next = 0;
  let done = 0;
  const started = performance.now();
  const worker = async (): Promise<void> => {
    while (next < 2000) {
      const i = next++;
      const p = paths[i % paths.length]!;
      try {
        const res = await request(env.port, url(p), { agent, headers: i % 5 === 0 ? { 'accept-encoding': 'gzip' } : {} });
        const body = res.headers['content-encoding'] === 'gzip' ? zlib.gunzipSync(res.body) : res.body;
        if (res.status !== 200 || body.length !== sizes.get(p)) failures.push(`${p}: ${res.status}, ${body.length} bytes`);
      } catch (err) {
        failures.push(`${p}: ${(err as Error).message}`);
      }
      done++;
    }
  };
  await Promise.all(Array.from({ length: 100 }, worker));
  agent.destroy();
  const seconds = (performance.now() - started) / 1000;
  assert.equal(done, 2000);
  assert.deepEqual(failures, []);
  const metrics = (await request(env.port, '/metrics')).body.toString();
  const served = Number(/^kheadersd_http_requests_total\{route="\/v1\/kernels\/:ref\/files\/\*",status="200"\} (\d+)$/m.exec(metrics)?.[1]);
  assert.ok(served >= 2000, `metrics count ${served}`);
  t.diagnostic(`2,000 requests in ${seconds.toFixed(2)} s (${Math.round(2000 / seconds)}/s)`);
});
