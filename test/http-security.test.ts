/**
 * Traversal attempts sent raw (http.request and a bare socket, so nothing normalises them), and
 * the bearer token on and off.
 */
import assert from 'node:assert/strict';
import { chmod, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { isKheadersError } from '../src/errors.js';
import { readTokenFile } from '../src/serve/http/server.js';
import type { CacheEntry } from '../src/store/entry.js';
import { ingestSynth, json, rawStatus, removeDir, request, startEnv, tempDir, type HttpEnv } from './helpers/http-env.js';

const SECRET = 'TOP-SECRET-MARKER-5f1c';
let work: string;
let env: HttpEnv;
let entry: CacheEntry;

before(async () => {
  work = await tempDir('http-sec');
  const cacheDir = path.join(work, 'cache');
  entry = await ingestSynth(cacheDir, work);
  // Files a traversal would love to reach: next to the cache, inside it, inside the entry.
  await writeFile(path.join(work, 'secret.h'), SECRET);
  await writeFile(path.join(cacheDir, 'secret.h'), SECRET);
  await writeFile(path.join(entry.dir, 'secret.h'), SECRET);
  env = await startEnv({ work, cacheDir });
});

after(async () => {
  await env?.close();
  await removeDir(work);
});

const TRAVERSALS = [
  '/v1/kernels/current/files/../../../../../../etc/passwd',
  '/v1/kernels/current/files/include/../../secret.h',
  '/v1/kernels/current/files/include/../../../secret.h',
  '/v1/kernels/current/files/%2e%2e/%2e%2e/%2e%2e/secret.h',
  '/v1/kernels/current/files/%2E%2E/%2E%2E/etc/passwd',
  '/v1/kernels/current/files/.%2e/.%2e/secret.h',
  '/v1/kernels/current/files/%2e%2e%2f%2e%2e%2fsecret.h',
  '/v1/kernels/current/files/..%2f..%2f..%2fetc%2fpasswd',
  '/v1/kernels/current/files/include%2f..%2f..%2fsecret.h',
  '/v1/kernels/current/files/%2fetc%2fpasswd',
  '/v1/kernels/current/files/%5c..%5c..%5csecret.h',
  '/v1/kernels/current/files/..\\..\\secret.h',
  '/v1/kernels/current/files/include\\..\\..\\secret.h',
  '/v1/kernels/current/files/include/linux/sched.h%00.txt',
  '/v1/kernels/current/files/%00/etc/passwd',
  '/v1/kernels/current/files/%c0%ae%c0%ae/%c0%ae%c0%ae/secret.h',
  '/v1/kernels/current/files/%c0%af..%c0%afsecret.h',
  '/v1/kernels/current/files/%e0%80%ae%e0%80%ae/secret.h',
  '/v1/kernels/current/files/%ff%fe/secret.h',
  '/v1/kernels/current/files/./include/linux/sched.h',
  '/v1/kernels/current/files/include/./linux/sched.h',
  '/v1/kernels/current/files//etc/passwd',
  '/v1/kernels/current/files/include//linux/sched.h',
  '/v1/kernels/current/files/include/dt-bindings/sched-link.h/../../../secret.h',
  '/v1/kernels/current/files/%252e%252e/%252e%252e/secret.h', // double-encoded: a literal name, not in the tree
  '/v1/kernels/current/files/secret.h',
  '/v1/kernels/current/files/manifest.json',
  '/v1/kernels/current/files/index.json',
  '/v1/kernels/current/files/pack.tar',
  '/v1/kernels/..%2f..%2f/files/secret.h',
  '/v1/kernels/%2e%2e/files/secret.h',
  '/v1/kernels/../../secret.h',
  '/v1/kernels/current/archive.tar.xz/../../secret.h',
  '/v1/kernels/current/files/' + 'a/'.repeat(2100) + 'x.h', // over the path cap
  '/v1/kernels/current/files/' + 'b'.repeat(300) + '.h', // over NAME_MAX
  '/v1/blobs/../../secret.h',
  '/v1/blobs/%2e%2e/files/secret.h',
  `/v1/blobs/DIGEST/files/../../secret.h`,
  `/v1/blobs/DIGEST/files/%2e%2e%2fsecret.h`,
  `/v1/blobs/DIGEST/files/..%5csecret.h`,
];

test('traversal attempts answer 400 or 404 and never reach outside the tree', async () => {
  for (const raw of TRAVERSALS) {
    const p = raw.replace('DIGEST', entry.manifest.digest);
    const res = await request(env.port, p);
    assert.ok(res.status === 400 || res.status === 404, `${p.slice(0, 120)} answered ${res.status}`);
    assert.ok(!res.body.toString('latin1').includes(SECRET), `${p} leaked the secret`);
    assert.ok(!res.body.toString('latin1').includes('root:'), `${p} leaked /etc/passwd`);
    assert.equal(res.headers['content-type'], 'application/json; charset=utf-8', p);
  }
});

test('raw bytes http.request would refuse: NUL, spaces, invalid UTF-8, absolute-form', async () => {
  const targets = [
    Buffer.from('/v1/kernels/current/files/include/linux/sched.h\0.txt'),
    Buffer.concat([Buffer.from('/v1/kernels/current/files/'), Buffer.from([0xc0, 0xae, 0xc0, 0xae]), Buffer.from('/secret.h')]),
    Buffer.concat([Buffer.from('/v1/kernels/current/files/'), Buffer.from([0xff, 0x2e, 0x2e]), Buffer.from('/secret.h')]),
    Buffer.from('/v1/kernels/current/files/..\\..\\secret.h'),
    Buffer.from('/v1/kernels/current/files/\t../secret.h'),
    Buffer.from('http://localhost/v1/kernels/current/files/../../secret.h'),
    Buffer.from('/v1/kernels/current/files/' + 'c/'.repeat(3000)),
  ];
  for (const t of targets) {
    const { status, text } = await rawStatus(env.port, t);
    assert.ok([400, 404].includes(status), `${JSON.stringify(t.toString('latin1').slice(0, 80))} answered ${status}`);
    assert.ok(!text.includes(SECRET));
  }
  // A request line over the server's header limit is refused before routing (431).
  const huge = await rawStatus(env.port, Buffer.from('/v1/kernels/current/files/' + 'd'.repeat(20_000)));
  assert.equal(huge.status, 431);
});

test('paths that are fine still work (the rules are not too strict)', async () => {
  assert.equal((await request(env.port, '/v1/kernels/current/files/include/linux/sched.h?download=1')).status, 200);
  assert.equal((await request(env.port, '/v1/kernels/current/files/include/linux/')).status, 200);
  assert.equal((await request(env.port, '/v1/kernels/current/files/include/lin%75x/sched.h')).status, 200);
  assert.equal((await request(env.port, `/v1/kernels/current/files/include/linux/odd%20%3Cb%3E%26%22name'.h`)).status, 200);
});

test('token: every route but /healthz needs it; compared exactly', async (t) => {
  const token = 'k3y-' + 'x'.repeat(40);
  const guarded = await startEnv({ work, cacheDir: env.cacheDir, token });
  t.after(() => guarded.close());
  const auth = { authorization: `Bearer ${token}` };
  assert.equal((await request(guarded.port, '/healthz')).status, 200);
  for (const p of ['/readyz', '/metrics', '/v1/kernels', '/v1/kernels/current', '/v1/kernels/current/files/include/linux/sched.h', '/v1/kernels/current/archive.tar.xz', `/v1/blobs/${entry.manifest.digest}/archive.tar.xz`, '/nope']) {
    const none = await request(guarded.port, p);
    assert.equal(none.status, 401, p);
    assert.equal(none.headers['www-authenticate'], 'Bearer realm="kheadersd"');
    assert.equal(json<{ error: { code: string } }>(none).error.code, 'E_UNAUTHORIZED');
    assert.equal((await request(guarded.port, p, { headers: { authorization: `Bearer ${token}x` } })).status, 401, p);
    assert.equal((await request(guarded.port, p, { headers: { authorization: `Bearer ${token.slice(0, -1)}` } })).status, 401, p);
    assert.equal((await request(guarded.port, p, { headers: { authorization: token } })).status, 401, p);
    const ok = await request(guarded.port, p, { headers: auth });
    assert.equal(ok.status, p === '/nope' ? 404 : 200, p);
  }
  // HEAD is guarded too.
  assert.equal((await request(guarded.port, '/v1/kernels/current/archive.tar.xz', { method: 'HEAD' })).status, 401);
  // Without a token configured, no header is needed.
  assert.equal((await request(env.port, '/v1/kernels')).status, 200);
});

test('readTokenFile: private file, one token', async () => {
  const f = path.join(work, 'token');
  await writeFile(f, 'abc123-0123456789abcdef\n', { mode: 0o600 });
  assert.equal(await readTokenFile(f), 'abc123-0123456789abcdef');
  await chmod(f, 0o644);
  await assert.rejects(readTokenFile(f), (err: unknown) => isKheadersError(err, 'E_CONFIG') && /chmod 600/.test(err.message));
  await writeFile(path.join(work, 'empty'), '\n', { mode: 0o600 });
  await assert.rejects(readTokenFile(path.join(work, 'empty')), (err: unknown) => isKheadersError(err, 'E_CONFIG'));
  await assert.rejects(readTokenFile(path.join(work, 'absent')), (err: unknown) => isKheadersError(err, 'E_CONFIG'));
});
