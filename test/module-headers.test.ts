/**
 * Headers of the loaded modules, `<running entry>/btf/<module>.h`: made on request from split BTF
 * on a worker, cached per content key (bounded), following modules as they load, reload and
 * unload — through the store's ModuleHeaders, a real FUSE mount (kernel-protocol backend) and the
 * real HTTP server. The "kernel" is a directory laid out like /sys/kernel/btf (`vmlinux` and one
 * file per module) holding BTF built here, so none of this needs a kernel with module BTF.
 *
 * The mount is served by this very process: every access to it is asynchronous.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, open, readdir, readFile, rm, stat, writeFile, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { generateVmlinuxHeader } from '../src/btf/index.js';
import { createLogger } from '../src/log.js';
import { IndexFsModel } from '../src/serve/fuse/index-model.js';
import { mountKernel } from '../src/serve/fuse/kernel/index.js';
import { CacheStore } from '../src/store/cache.js';
import { ModuleHeaders } from '../src/store/module-btf.js';
import { tempDir } from './helpers/archives.js';
import { BtfBuilder } from './helpers/btf-builder.js';
import { ingestSynth, json, request, startEnv } from './helpers/http-env.js';

const log = createLogger(process.env.KHEADERSD_TEST_LOG === '1' ? 'debug' : 'silent');

interface Kernel {
  base: Buffer;
  /** A module's split BTF over `base`; `variant` changes one struct's size (a rebuilt module). */
  module(name: string, variant?: number): Buffer;
}

function kernel(): Kernel {
  const k = new BtfBuilder();
  const int = k.int('int', 4, { signed: true });
  k.int('long int', 8, { signed: true });
  const lh = k.nextId;
  k.struct('list_head', 16, [
    { name: 'next', type: lh + 1, bitOffset: 0 },
    { name: 'prev', type: lh + 1, bitOffset: 64 },
  ]);
  k.ptr(lh);
  const base = k.build();
  return {
    base,
    module(name, variant = 0) {
      const m = k.split();
      m.struct(`${name}_state`, 24 + 8 * variant, [
        { name: 'node', type: lh, bitOffset: 0 },
        { name: 'count', type: int, bitOffset: 128 },
      ]);
      return m.build();
    },
  };
}

interface Env {
  btfDir: string;
  headersDir: string;
  k: Kernel;
  load(name: string, variant?: number): Promise<void>;
  unload(name: string): Promise<void>;
  expected(name: string, variant?: number): string;
}

async function env(t: TestContext): Promise<Env> {
  const work = await tempDir(t, 'kheaders-modules-');
  const btfDir = path.join(work, 'sys-kernel-btf');
  await mkdir(btfDir);
  const k = kernel();
  await writeFile(path.join(btfDir, 'vmlinux'), k.base);
  return {
    btfDir,
    headersDir: path.join(work, 'cache', 'module-btf'),
    k,
    // A module load creates a new sysfs file: write a new file, never rewrite one in place.
    load: async (name, variant = 0) => {
      await rm(path.join(btfDir, name), { force: true });
      await writeFile(path.join(btfDir, name), k.module(name, variant));
    },
    unload: (name) => rm(path.join(btfDir, name)),
    expected: (name, variant = 0) => generateVmlinuxHeader(k.module(name, variant), { base: k.base }),
  };
}

async function headerFiles(dir: string): Promise<string[]> {
  return (await readdir(dir)).filter((n) => n.endsWith('.h')).sort();
}

test('module headers: made on request, cached by content, following loads, reloads and unloads', async (t) => {
  const e = await env(t);
  await e.load('alpha');
  await e.load('beta');
  const mh = await ModuleHeaders.open({ dir: e.headersDir, btfDir: e.btfDir, staleMs: 0, log });
  t.after(() => mh.close());
  const changes: string[][] = [];
  mh.onChange((c) => changes.push([...c]));

  assert.deepEqual((await mh.modules()).map((m) => m.name), ['alpha', 'beta']);
  assert.deepEqual(await headerFiles(e.headersDir), [], 'nothing is made before it is asked for');
  const [a1, a2] = await Promise.all([mh.header('alpha'), mh.header('alpha')]);
  assert.ok(a1 && a2);
  assert.equal(a1.key, a2.key, 'two requests at once share one generation');
  assert.equal((await readFile(a1.file)).toString('latin1'), e.expected('alpha'));
  assert.equal(a1.size, Buffer.byteLength(e.expected('alpha')));
  assert.equal((await mh.read(a1, 0, a1.size)).toString('latin1'), e.expected('alpha'));
  assert.deepEqual(await headerFiles(e.headersDir), [`${a1.key}.h`]);
  const made = (await stat(a1.file)).mtimeMs;

  // Reloaded unchanged: a new instance, the same content key, nothing made again.
  await e.load('alpha');
  const again = await mh.header('alpha');
  assert.ok(again);
  assert.notEqual(again.identity, a1.identity);
  assert.equal(again.key, a1.key);
  assert.equal((await stat(again.file)).mtimeMs, made);
  assert.deepEqual(changes.pop(), ['alpha']);

  // Rebuilt: another header.
  await e.load('alpha', 1);
  const rebuilt = await mh.header('alpha');
  assert.ok(rebuilt);
  assert.notEqual(rebuilt.key, a1.key);
  assert.equal((await readFile(rebuilt.file)).toString('latin1'), e.expected('alpha', 1));
  // Asking for the old instance by identity: it is gone.
  assert.equal(await mh.header('alpha', a1.identity), undefined);

  // Unloaded: no header, and the listing says so.
  await e.unload('beta');
  assert.equal(await mh.header('beta'), undefined);
  assert.deepEqual((await mh.modules()).map((m) => m.name), ['alpha']);
  assert.ok(changes.some((c) => c.includes('beta')));
  assert.equal(await mh.header('no-such'), undefined);
  assert.equal(await mh.header('../vmlinux'), undefined, 'only module names');

  // A daemon restart finds the headers made before: nothing is made again.
  const reopened = await ModuleHeaders.open({ dir: e.headersDir, btfDir: e.btfDir, staleMs: 0, log });
  t.after(() => reopened.close());
  const after = await reopened.header('alpha');
  assert.equal(after?.key, rebuilt.key);
  assert.equal(after?.mtimeMs, rebuilt.mtimeMs);
});

test('module headers: at most maxHeaders kept, least recently used evicted', async (t) => {
  const e = await env(t);
  for (const m of ['m1', 'm2', 'm3']) await e.load(m);
  const mh = await ModuleHeaders.open({ dir: e.headersDir, btfDir: e.btfDir, staleMs: 0, maxHeaders: 2, log });
  t.after(() => mh.close());
  const h1 = await mh.header('m1');
  const h2 = await mh.header('m2');
  assert.ok(h1 && h2);
  await mh.header('m1'); // m2 is now the least recently used
  const h3 = await mh.header('m3');
  assert.ok(h3);
  assert.deepEqual(await headerFiles(e.headersDir), [`${h1.key}.h`, `${h3.key}.h`].sort());
  // An evicted header is made again on request.
  const h2again = await mh.header('m2');
  assert.equal((await readFile(h2again!.file)).toString('latin1'), e.expected('m2'));
  assert.equal((await headerFiles(e.headersDir)).length, 2);
});

test('module headers: no kernel BTF, or a directory without modules, lists nothing', async (t) => {
  const work = await tempDir(t);
  const mh = await ModuleHeaders.open({ dir: path.join(work, 'h'), btfDir: path.join(work, 'absent'), staleMs: 0, log });
  t.after(() => mh.close());
  assert.deepEqual(await mh.modules(), []);
  assert.equal(await mh.header('anything'), undefined);
});

// ---- HTTP ---------------------------------------------------------------------------------------

test('HTTP: /v1/kernels/current/files/btf/ lists the loaded modules; <module>.h is the header', async (t) => {
  const e = await env(t);
  await e.load('alpha');
  const work = await tempDir(t);
  const cacheDir = path.join(work, 'cache');
  const running = await ingestSynth(cacheDir, work, '6.6.0-running', 'a', true);
  const other = await ingestSynth(cacheDir, work, '6.6.0-other', 'b', false);
  const mh = await ModuleHeaders.open({ dir: path.join(cacheDir, 'module-btf'), btfDir: e.btfDir, staleMs: 0, log });
  t.after(() => mh.close());
  const srv = await startEnv({ work, cacheDir, modules: mh, runningId: running.manifest.id });
  t.after(() => srv.close());

  const listing = await request(srv.port, '/v1/kernels/current/files/btf/');
  assert.equal(listing.status, 200);
  assert.deepEqual(json<{ entries: Array<{ name: string }> }>(listing).entries.map((x) => x.name), ['alpha.h']);

  const file = await request(srv.port, '/v1/kernels/current/files/btf/alpha.h');
  assert.equal(file.status, 200, file.body.toString());
  assert.equal(file.body.toString('latin1'), e.expected('alpha'));
  assert.match(String(file.headers['content-type']), /^text\/x-c/);
  const etag = String(file.headers.etag);
  assert.equal((await request(srv.port, '/v1/kernels/current/files/btf/alpha.h', { headers: { 'if-none-match': etag } })).status, 304);
  const range = await request(srv.port, '/v1/kernels/6.6.0-running/files/btf/alpha.h', { headers: { range: 'bytes=0-6' } });
  assert.equal(range.status, 206);
  assert.equal(range.body.toString(), '#ifndef');

  // A module loaded now is there at once; one unloaded is gone, and the 404 says what is loaded.
  await e.load('gamma');
  assert.equal((await request(srv.port, '/v1/kernels/current/files/btf/gamma.h')).body.toString('latin1'), e.expected('gamma'));
  await e.unload('alpha');
  const gone = await request(srv.port, '/v1/kernels/current/files/btf/alpha.h');
  assert.equal(gone.status, 404);
  assert.match(gone.body.toString(), /loaded with BTF: gamma/);

  // /v1/kernels says whether each entry is the running kernel's, with the reason when it is not.
  srv.state.live = { release: '6.6.0-running', buildId: null, btfDigest: null };
  const kernels = json<Array<{ release: string; runningKernel?: string; runningKernelNote?: string }>>(await request(srv.port, '/v1/kernels'));
  assert.deepEqual(kernels.map((k) => [k.release, k.runningKernel]).sort(), [['6.6.0-other', 'no'], ['6.6.0-running', 'unknown']]);
  const cur = json<{ runningKernel?: string; runningKernelNote?: string }>(await request(srv.port, '/v1/kernels/current'));
  assert.equal(cur.runningKernel, 'unknown');
  assert.match(cur.runningKernelNote ?? '', /nothing recorded tells whether it is the same build/);

  // Only the running kernel's entry has them.
  assert.equal((await request(srv.port, `/v1/kernels/${other.manifest.release}/files/btf/gamma.h`)).status, 404);
  assert.equal((await request(srv.port, `/v1/blobs/${running.manifest.digest}/files/btf/gamma.h`)).status, 404);
});

// ---- FUSE ---------------------------------------------------------------------------------------

const canMount = process.getuid?.() === 0 && existsSync('/dev/fuse');

test('FUSE: <release>/btf/<module>.h on the mount, as modules load, reload and unload', { skip: canMount ? false : 'needs root and /dev/fuse' }, async (t) => {
  const e = await env(t);
  await e.load('alpha');
  const work = await tempDir(t);
  const cacheDir = path.join(work, 'cache');
  const running = await ingestSynth(cacheDir, work, '6.6.0-running', 'a', true);
  await ingestSynth(cacheDir, work, '6.6.0-other', 'b', false);
  const store = await CacheStore.open(cacheDir);
  const entries = await Promise.all((await store.list()).map((m) => store.load(m.id)));
  const mh = await ModuleHeaders.open({ dir: path.join(cacheDir, 'module-btf'), btfDir: e.btfDir, staleMs: 0, log });
  const model = new IndexFsModel({ log, modules: mh });
  model.setEntries(entries, running.manifest.id, running.manifest.id);
  const mnt = path.join(work, 'mnt');
  const m = await mountKernel({ mountpoint: mnt, model, log });
  // Cleaned up here, not in after hooks: the mount must go before its temp directory does.
  let fh: FileHandle | undefined;
  try {
    const btf = path.join(mnt, 'current', 'btf');

    assert.ok((await readdir(path.join(mnt, '6.6.0-running'))).includes('btf'));
    assert.equal((await readdir(path.join(mnt, '6.6.0-other'))).includes('btf'), false, 'only the running kernel has them');
    assert.deepEqual(await readdir(btf), ['alpha.h']);
    assert.equal(await readFile(path.join(btf, 'alpha.h'), 'latin1'), e.expected('alpha'));
    const st = await stat(path.join(btf, 'alpha.h'));
    assert.equal(st.size, Buffer.byteLength(e.expected('alpha')));
    assert.equal(st.mode & 0o777, 0o444);

    // Not loaded: ENOENT, but not cached — loading it makes it appear at once.
    await assert.rejects(readFile(path.join(btf, 'gamma.h')), { code: 'ENOENT' });
    await e.load('gamma');
    assert.equal(await readFile(path.join(btf, 'gamma.h'), 'latin1'), e.expected('gamma'));

    // A file opened before its module is rebuilt and reloaded keeps its bytes; a new open reads the new header.
    fh = await open(path.join(btf, 'alpha.h'), 'r');
    await e.load('alpha', 2);
    // Names under btf/ are cached for a second at most.
    await new Promise((r) => setTimeout(r, 1100));
    assert.equal(await readFile(path.join(btf, 'alpha.h'), 'latin1'), e.expected('alpha', 2));
    assert.equal((await fh.readFile()).toString('latin1'), e.expected('alpha'));

    await e.unload('gamma');
    await new Promise((r) => setTimeout(r, 1100));
    await assert.rejects(stat(path.join(btf, 'gamma.h')), { code: 'ENOENT' });
    assert.deepEqual(await readdir(btf), ['alpha.h']);
  } finally {
    await fh?.close();
    await m.unmount();
    await model.close();
    await mh.close();
  }
});
