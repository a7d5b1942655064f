/**
 * `kheadersd pull` end to end against a running server: by --url, and by --adb through a
 * stand-in `adb` shell script (no device is attached here) that answers `devices`,
 * `forward tcp:0 tcp:7711` with the real port, and `forward --remove`.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { chmod, open, readFile, readlink, readdir, writeFile } from 'node:fs/promises';
import { once } from 'node:events';
import http from 'node:http';
import type { Socket } from 'node:net';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { after, before, test, type TestContext } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import { cmdPull, digestFromHeaders, parseAdbDevices, pull, shellQuote, type PullOptions } from '../src/commands/pull.js';
import type { CommandIO } from '../src/commands/store-commands.js';
import { isKheadersError } from '../src/errors.js';
import { CacheStore } from '../src/store/cache.js';
import { CONFIG_PATH, dataLocation, type CacheEntry } from '../src/store/entry.js';
import { ingest } from '../src/store/ingest.js';
import { BtfBuilder } from './helpers/btf-builder.js';
import {
  FIXTURE,
  SYNTH_RELEASE,
  fixtureSkipReason,
  ingestFixture,
  ingestSynth,
  makeTarXz,
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
  assert.equal(c.out(), `export BCC_KERNEL_SOURCE=${dir}\nexport BPFTRACE_KERNEL_SOURCE=${dir}\nexport KHEADERS_DIR=${dir}\n`);
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
  assert.match(c.out(), /^export BCC_KERNEL_SOURCE=.*\nexport BPFTRACE_KERNEL_SOURCE=.*\nexport KHEADERS_DIR=.*\n$/);
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

/**
 * A stand-in daemon on loopback, for what a real one never does. It names an entry of `digest`
 * at /v1/kernels/current (or `current` answers that) and lists no files beside the archive (or
 * `listing` answers that), so a pull goes on to the archive, which `archive` answers. Closed, its
 * connections too, when the test ends. Returns its URL.
 */
async function standIn(t: TestContext, digest: Buffer, answer: { current?: http.RequestListener; listing?: http.RequestListener; archive?: http.RequestListener }): Promise<string> {
  const json = (body: unknown): http.RequestListener => (_req, res) => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(body));
  };
  const current = answer.current ?? json({ release: SYNTH_RELEASE, digest: digest.toString('hex'), kind: 'headers' });
  const listing = answer.listing ?? json({ entries: [] });
  const server = http.createServer((req, res) => {
    if (req.url === '/v1/kernels/current') return current(req, res);
    if (req.url?.endsWith('/files/')) return listing(req, res);
    if (answer.archive) return answer.archive(req, res);
    res.statusCode = 404;
    res.end();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  return `http://127.0.0.1:${(server.address() as { port: number }).port}`;
}

test('pull refuses an archive whose bytes or Digest header do not match', async (t) => {
  const archive = await readFile(path.join(entry.dir, 'archive.tar.xz'));
  const real = createHash('sha256').update(archive).digest();
  let mode: 'bad-bytes' | 'bad-header' | 'no-header' = 'bad-bytes';
  // A lying server: announces the real digest, then misbehaves in one way per mode.
  const u = await standIn(t, real, {
    archive: (_req, res) => {
      const body = mode === 'bad-bytes' ? Buffer.concat([archive.subarray(0, -1), Buffer.from([archive.at(-1)! ^ 1])]) : archive;
      if (mode !== 'no-header') res.setHeader('repr-digest', `sha-256=:${(mode === 'bad-header' ? createHash('sha256').update('x').digest() : real).toString('base64')}:`);
      res.setHeader('content-length', body.length);
      res.end(body);
    },
  });
  const refusal = { 'bad-bytes': /has sha256 .* as announced: refusing it/, 'bad-header': /is not the digest the entry names/, 'no-header': /without a Repr-Digest or Digest header/ };
  for (const m of ['bad-bytes', 'bad-header', 'no-header'] as const) {
    mode = m;
    const d = dirs();
    await assert.rejects(pull({ url: u, ...d }, io()), (err: unknown) => isKheadersError(err, 'E_HTTP') && refusal[m].test(err.message), m);
    assert.deepEqual(await readdir(d.out!), [], `${m}: nothing may be left in DIR`);
  }
});

test('a download refused on its headers, or stalled, drops its connection: pull ends and leaves nothing open', async (t) => {
  const digest = createHash('sha256').update('the archive').digest();
  type Mode = 'no-header' | 'bad-header' | 'too-large' | 'stalled';
  let mode: Mode = 'no-header';
  let archiveSocket: Socket | undefined;
  // A daemon that answers the archive's headers, sends a few bytes and then nothing more, with
  // the connection left open: only the client can end it.
  const url = await standIn(t, digest, {
    archive: (req, res) => {
      archiveSocket = req.socket;
      const stated = mode === 'bad-header' ? createHash('sha256').update('x').digest() : digest;
      if (mode !== 'no-header') res.setHeader('repr-digest', `sha-256=:${stated.toString('base64')}:`);
      res.setHeader('content-length', mode === 'too-large' ? 2 * 1024 ** 3 : 4096);
      res.write(Buffer.alloc(16));
    },
  });
  const expected: Record<Mode, RegExp> = {
    'no-header': /without a Repr-Digest or Digest header/,
    'bad-header': /is not the digest the entry names/,
    'too-large': /over the limit/,
    stalled: /stalled for 0\.5 s/,
  };
  for (const m of Object.keys(expected) as Mode[]) {
    mode = m;
    archiveSocket = undefined;
    const d = dirs();
    await assert.rejects(pull({ url, ...d, timeoutMs: 500 }, io()), (err: unknown) => err instanceof Error && expected[m].test(err.message), m);
    assert.deepEqual(await readdir(d.out!), [], `${m}: nothing may be left in DIR`);
    // The connection the archive came on is closed by pull, not left to the server or a GC.
    const socket = archiveSocket as Socket | undefined;
    assert.ok(socket, `${m}: the archive was asked for`);
    if (!socket.destroyed) {
      const closed = await Promise.race([once(socket, 'close').then(() => true), delay(2000).then(() => false)]);
      assert.ok(closed, `${m}: pull failed but left the archive's connection open`);
    }
  }
});

test('an answer whose body stalls (the entry, the listing) is said to have stalled, not to be a wrong answer', async (t) => {
  const digest = createHash('sha256').update('the archive').digest();
  // Its headers and the start of a JSON body, then nothing, the connection left open.
  const stall: http.RequestListener = (_req, res) => {
    res.setHeader('content-type', 'application/json');
    res.setHeader('content-length', 4096);
    res.write('{"release": ');
  };
  const cases: Array<[string, { current?: http.RequestListener; listing?: http.RequestListener }, RegExp]> = [
    ['the entry', { current: stall }, /stalled: its answer for current did not arrive in full within 0\.5 s/],
    ['the listing', { listing: stall }, /stalled: the entry's listing did not arrive in full within 0\.5 s/],
  ];
  for (const [what, answer, expected] of cases) {
    const url = await standIn(t, digest, answer);
    await assert.rejects(pull({ url, ...dirs(), timeoutMs: 500 }, io()), (err: unknown) => {
      assert.ok(isKheadersError(err, 'E_HTTP'), what);
      assert.match(err.message, expected, what);
      return true;
    });
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

// ---- the whole entry: tree, vmlinux.h, .config -----------------------------------------------------

/** Every file, directory and link under `dir`, with its bytes or target. */
async function walkTree(dir: string, rel = ''): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const e of await readdir(path.join(dir, rel), { withFileTypes: true })) {
    const p = rel === '' ? e.name : `${rel}/${e.name}`;
    if (e.isSymbolicLink()) out.set(p, `-> ${await readlink(path.join(dir, p))}`);
    else if (e.isDirectory()) {
      out.set(p, 'dir');
      for (const [k, v] of await walkTree(dir, p)) out.set(k, v);
    } else out.set(p, createHash('sha256').update(await readFile(path.join(dir, p))).digest('hex'));
  }
  return out;
}

/** The same map for a cache entry, read through its index: what the device serves. */
async function entryTree(e: CacheEntry): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const node of e.index.nodes) {
    if (node.id === 0) continue;
    if (node.kind === 'dir') out.set(node.path, 'dir');
    else if (node.kind === 'symlink') out.set(node.path, `-> ${node.target!}`);
    else {
      const loc = dataLocation(e, node);
      const fh = await open(loc.file, 'r');
      const buf = Buffer.alloc(node.size);
      await fh.read(buf, 0, node.size, loc.offset);
      await fh.close();
      out.set(node.path, createHash('sha256').update(buf).digest('hex'));
    }
  }
  return out;
}

/** A device entry with vmlinux.h (from BTF given by hand) and .config (checked against its autoconf.h). */
async function fullEntry(cacheDir: string, release: string): Promise<CacheEntry> {
  const tree = [
    ...synthTree(release, 'full'),
    { name: './include/generated/autoconf.h', content: '#define CONFIG_HZ 250\n#define CONFIG_BPF_SYSCALL 1\n#define CONFIG_KHEADERS_MODULE 1\n' },
  ];
  const archive = await makeTarXz(tree, path.join(work, `full-${release}.tar.xz`));
  const boot = path.join(work, `boot-${release}`);
  await runOk('mkdir', ['-p', boot]);
  await writeFile(path.join(boot, `config-${release}`), '#\n# Linux/x86 Kernel Configuration\n#\nCONFIG_HZ=250\nCONFIG_BPF_SYSCALL=y\nCONFIG_KHEADERS=m\n');
  const b = new BtfBuilder();
  b.struct('task_struct', 4, [{ name: 'pid', type: b.int('int', 4, { signed: true }), bitOffset: 0 }]);
  const btf = path.join(work, `full-${release}.btf`);
  await writeFile(btf, b.build());
  const { entry: e } = await ingest({ cacheDir, archive, release, setCurrent: true, keep: 100, btf, bootDir: boot, liveBtf: path.join(work, 'none'), liveConfig: path.join(work, 'none'), log: quietLog() });
  assert.ok(e.index.get('vmlinux.h') && e.index.get(CONFIG_PATH), `the device entry has vmlinux.h and .config: ${JSON.stringify(e.manifest.notes)}`);
  return e;
}

test('pull brings the whole entry (tree, vmlinux.h, .config), file for file, and prints how to use it', async (t) => {
  const dev = path.join(work, 'full-device');
  const full = await fullEntry(dev, '6.7.0-full');
  const server = await startEnv({ work, cacheDir: dev });
  t.after(() => server.close());
  const d = dirs();
  const c = io();
  await cmdPull({ url: `http://127.0.0.1:${server.port}`, ...d }, c);
  const dir = path.join(d.out!, `6.7.0-full-${full.manifest.digest.slice(0, 12)}`);
  assert.deepEqual(await walkTree(dir), await entryTree(full), 'the pulled tree is the entry, file for file');
  assert.equal(
    c.out(),
    [
      `export BCC_KERNEL_SOURCE=${dir}`,
      `export BPFTRACE_KERNEL_SOURCE=${dir}`,
      `export KHEADERS_DIR=${dir}`,
      `export KHEADERS_VMLINUX_H=${dir}/vmlinux.h`,
      `export KHEADERS_BPF_CFLAGS='-target bpf -D__TARGET_ARCH_x86 -I${dir}'`,
      `export KHEADERS_CONFIG=${dir}/.config`,
      '',
    ].join('\n'),
  );
  assert.match(c.err(), /: headers, \.config, vmlinux\.h\n/);
  assert.match(c.err(), /clang -O2 -g \$KHEADERS_BPF_CFLAGS -c prog\.bpf\.c/);

  // A tree pulled by an older kheadersd (no vmlinux.h, no .config) is completed, not reused.
  const d2 = dirs();
  const stale = path.join(d2.out!, path.basename(dir));
  await runOk('mkdir', ['-p', d2.out!]);
  await runOk('cp', ['-a', dir, stale]);
  await runOk('rm', ['-f', path.join(stale, 'vmlinux.h'), path.join(stale, '.config')]);
  const again = await pull({ url: `http://127.0.0.1:${server.port}`, ...d2 }, io());
  assert.equal(again.reused, false);
  assert.deepEqual(await walkTree(stale), await entryTree(full));
  assert.deepEqual((await readdir(d2.out!)).sort(), [path.basename(dir)], 'no staging directory left');
  // Complete now: reused.
  assert.equal((await pull({ url: `http://127.0.0.1:${server.port}`, ...d2 }, io())).reused, true);
});

test('pull of an entry with vmlinux.h only (no header archive on the device)', async (t) => {
  const dev = path.join(work, 'btf-only-device');
  const b = new BtfBuilder();
  b.struct('task_struct', 4, [{ name: 'pid', type: b.int('int', 4, { signed: true }), bitOffset: 0 }]);
  const btf = path.join(work, 'btf-only.btf');
  await writeFile(btf, b.build());
  const { entry: e } = await ingest({ cacheDir: dev, livePaths: [path.join(work, 'no-archive')], modprobe: false, btf, release: '6.8.0-gki', liveBtf: path.join(work, 'none'), liveConfig: path.join(work, 'none'), log: quietLog() });
  assert.equal(e.manifest.kind, 'btf-only');
  const server = await startEnv({ work, cacheDir: dev });
  t.after(() => server.close());
  const c = io();
  await cmdPull({ url: `http://127.0.0.1:${server.port}`, ...dirs() }, c);
  const dir = /^export KHEADERS_DIR=(.*)$/m.exec(c.out())?.[1];
  assert.ok(dir, c.out());
  assert.deepEqual(await walkTree(dir), await entryTree(e));
  assert.doesNotMatch(c.out(), /BCC_KERNEL_SOURCE/, 'no headers: no BCC variable');
  assert.match(c.out(), /KHEADERS_BPF_CFLAGS='-target bpf -I/);
});

test('pull refuses a vmlinux.h whose bytes do not match the digest the entry lists', async (t) => {
  const dev = path.join(work, 'liar-device');
  const full = await fullEntry(dev, '6.7.1-liar');
  const server = await startEnv({ work, cacheDir: dev });
  t.after(() => server.close());
  // A proxy that passes everything through but flips a byte of vmlinux.h.
  const proxy = http.createServer((req, res) => {
    void fetch(`http://127.0.0.1:${server.port}${req.url ?? '/'}`, { headers: { 'accept-encoding': 'identity', accept: req.headers.accept ?? '*/*' } }).then(async (r) => {
      let body = Buffer.from(await r.arrayBuffer());
      if (req.url?.endsWith('/files/vmlinux.h')) body = Buffer.concat([body.subarray(0, -1), Buffer.from([body.at(-1)! ^ 1])]);
      res.writeHead(r.status, Object.fromEntries([...r.headers].filter(([k]) => k !== 'content-length' && k !== 'transfer-encoding')));
      res.end(body);
    });
  });
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  t.after(() => proxy.close());
  const d = dirs();
  await assert.rejects(pull({ url: `http://127.0.0.1:${(proxy.address() as { port: number }).port}`, ...d }, io()), (err: unknown) => isKheadersError(err, 'E_HTTP') && /vmlinux\.h .* has sha256/.test(err.message));
  assert.deepEqual(await readdir(d.out!), [], 'nothing left in DIR');
  void full;
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
