/**
 * A damaged cache, done for real: bytes flipped in pack.tar, files truncated, garbled or deleted,
 * a manifest cut short, a blob name that walks out of the entry, an entry of the old format.
 * Each is read the ways users read: `cat` and `export` (real processes), HTTP (a real `serve` on
 * loopback) and FUSE (a real mount, both backends). Every time: the wrong bytes are served
 * nowhere, the error names the entry and the file, the entry is moved to quarantine (with its
 * reason, kept bounded) and rebuilt from its own archive, and `serve` starts whatever is on disk.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, readFile, readdir, rm, stat, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { CacheStore } from '../src/store/cache.js';
import { dataLocation, INDEX_FILE, MANIFEST_FILE, PACK_FILE } from '../src/store/entry.js';
import { QUARANTINE_KEEP } from '../src/store/quarantine.js';
import { CLI, REPO_ROOT, goodTree, hasStackTrace, makeTar, runCli, runProcess, tempDir, textLike, xz, type RunResult, type SynthEntry } from './helpers/archives.js';
import { BtfBuilder } from './helpers/btf-builder.js';
import { fuseSkipReason } from './helpers/fuse-env.js';
import { withBlobName } from './helpers/index-patch.js';
import { pollUntil, repairedAndServed, startServe, type Daemon } from './helpers/serve-child.js';

const SCHED = 'include/linux/sched.h';
const SCHED_BYTES = textLike(20_000, 42); // what goodTree puts there

interface Cached {
  dir: string;
  cacheDir: string;
  archive: string;
  release: string;
  id: string;
  entryDir: string;
}

/** An archive of goodTree(release), ingested by the real CLI into `cacheDir`. */
async function cached(t: TestContext, release: string, cacheDir?: string, tree: SynthEntry[] = goodTree(release), btf?: string): Promise<Cached> {
  const dir = await tempDir(t, 'kheadersd-damage-');
  const cache = cacheDir ?? path.join(dir, 'cache');
  const archive = path.join(dir, `${release}.tar.xz`);
  await writeFile(archive, xz(await makeTar(tree)));
  const r = await runCli(['ingest', '--archive', archive, '--release', release, '--cache-dir', cache, '--btf', btf ?? 'off', '--keep', '20', '--json']);
  assert.equal(r.code, 0, r.stderr);
  const { release: rel, digest } = JSON.parse(r.stdout) as { release: string; digest: string };
  const id = `${rel}~${digest}`;
  return { dir, cacheDir: cache, archive, release, id, entryDir: path.join(cache, 'entries', id) };
}

/** Where a file's bytes are in the pack, read from the entry as a reader would. */
async function packOffset(c: Cached, file: string): Promise<number> {
  const store = await CacheStore.open(c.cacheDir);
  const entry = await store.load(c.id);
  const loc = dataLocation(entry, entry.index.resolve(file)!);
  await entry.reader.close();
  return loc.offset;
}

/** Flip one byte of a file on disk, as a failing disk would. */
async function flipByte(file: string, offset: number): Promise<void> {
  const buf = await readFile(file);
  buf[offset]! ^= 0x20;
  await writeFile(file, buf);
}

async function flipInSched(c: Cached): Promise<void> {
  await flipByte(path.join(c.entryDir, PACK_FILE), (await packOffset(c, SCHED)) + 1234);
}

function assertNamesTheDamage(r: RunResult, c: Cached, file: RegExp, what: string): void {
  assert.equal(r.code, 5, `${what}: exit 5 (environment); stderr: ${r.stderr}`);
  assert.match(r.stderr, new RegExp(`cache entry ${c.id.replace(/[.+]/g, '\\$&')} is damaged`), `${what}: names the entry`);
  assert.match(r.stderr, file, `${what}: names the file`);
  assert.equal(hasStackTrace(r.stderr), false, `${what}: no stack trace`);
}

async function reasonOf(cacheDir: string, quarantined: string): Promise<{ id: string; reason: string; file?: string }> {
  return JSON.parse(await readFile(path.join(cacheDir, 'quarantine', quarantined, 'reason.json'), 'utf8')) as { id: string; reason: string; file?: string };
}

async function quarantineNames(cacheDir: string): Promise<string[]> {
  return readdir(path.join(cacheDir, 'quarantine')).catch(() => [] as string[]);
}

// ---- cat and export --------------------------------------------------------------------------

test('a flipped byte in pack.tar: cat and export fail naming the entry and the file, serve nothing, and the entry is rebuilt', async (t) => {
  const c = await cached(t, '6.77.1-flip');
  await flipInSched(c);

  const cat = await runCli(['cat', c.release, SCHED, '--cache-dir', c.cacheDir]);
  assertNamesTheDamage(cat, c, /include\/linux\/sched\.h: pack\.tar bytes \d+-\d+, which hold it, do not match the digest recorded at ingest/, 'cat');
  assert.equal(cat.stdout, '', 'not one byte of the damaged chunk is printed');
  assert.match(cat.stderr, /moved to quarantine and rebuilt from its own archive: run the command again/);
  const [q] = await quarantineNames(c.cacheDir);
  assert.ok(q?.endsWith(c.id), `quarantined: ${q}`);
  const reason = await reasonOf(c.cacheDir, q!);
  assert.equal(reason.id, c.id);
  assert.equal(reason.file, SCHED);
  assert.match(reason.reason, /do not match the digest recorded at ingest/);
  // The quarantined copy is the damaged entry itself, moved whole.
  assert.ok((await stat(path.join(c.cacheDir, 'quarantine', q!, PACK_FILE))).isFile());

  const again = await runCli(['cat', c.release, SCHED, '--cache-dir', c.cacheDir]);
  assert.equal(again.code, 0, again.stderr);
  assert.equal(again.stdout, SCHED_BYTES.toString(), 'the rebuilt entry serves the archived bytes');

  // The rebuilt entry damaged in turn: export refuses it and leaves nothing behind.
  await flipInSched(c);
  const out = path.join(c.dir, 'exported');
  const exp = await runCli(['export', c.release, out, '--cache-dir', c.cacheDir]);
  // export reads every file: the first it reads from the damaged chunk is the one named.
  assertNamesTheDamage(exp, c, /: pack\.tar bytes \d+-\d+, which hold it, do not match the digest recorded at ingest/, 'export');
  assert.equal(await stat(out).then(() => true, () => false), false, 'no half-exported tree');
  assert.deepEqual((await readdir(c.dir)).filter((n) => n.includes('.kheadersd-')), [], 'no temp dir left');
  const exp2 = await runCli(['export', c.release, out, '--cache-dir', c.cacheDir]);
  assert.equal(exp2.code, 0, exp2.stderr);
  assert.ok((await readFile(path.join(out, SCHED))).equals(SCHED_BYTES));

  const ls = await runCli(['ls', '--cache-dir', c.cacheDir]);
  assert.equal(ls.code, 0, ls.stderr);
  assert.match(ls.stdout, /quarantined \(in .*, newest first\):/);
  assert.match(ls.stdout, new RegExp(`${c.id.replace(/[.+]/g, '\\$&')}: .*do not match the digest recorded at ingest \\(rebuilt since\\)`));
});

/** Each way a file of an entry can be broken on disk, and what the check that catches it says. */
const FAULTS: Array<{ name: string; damage: (c: Cached) => Promise<void>; says: RegExp }> = [
  { name: 'pack.tar truncated', damage: (c) => truncate(path.join(c.entryDir, PACK_FILE), 1000), says: /pack\.tar is 1000 bytes, not the \d+ it was written with/ },
  { name: 'index.bin truncated', damage: async (c) => truncate(path.join(c.entryDir, INDEX_FILE), (await stat(path.join(c.entryDir, INDEX_FILE))).size - 7), says: /index\.bin: .*(header describes|checksum)/ },
  {
    name: 'index.bin garbled',
    damage: async (c) => {
      const file = path.join(c.entryDir, INDEX_FILE);
      const buf = await readFile(file);
      buf.fill(0x7b, 200, 260); // '{' over records
      await writeFile(file, buf);
    },
    says: /index\.bin: its checksum does not match its content/,
  },
  { name: 'index.bin deleted', damage: (c) => rm(path.join(c.entryDir, INDEX_FILE)), says: /index\.bin is missing/ },
  { name: 'index.bin replaced by a directory', damage: async (c) => rm(path.join(c.entryDir, INDEX_FILE)).then(() => mkdir(path.join(c.entryDir, INDEX_FILE))), says: /index\.bin is not a regular file/ },
];

for (const fault of FAULTS) {
  test(`${fault.name}: ls shows it damaged, cat fails naming it and repairs it`, async (t) => {
    const c = await cached(t, '6.77.2-fault');
    await fault.damage(c);
    const ls = await runCli(['ls', '--cache-dir', c.cacheDir]);
    assert.equal(ls.code, 0, ls.stderr);
    assert.match(ls.stdout, /damaged \(not served;/);
    assert.match(ls.stdout, fault.says, 'ls says what is wrong');
    const cat = await runCli(['cat', c.release, SCHED, '--cache-dir', c.cacheDir]);
    assertNamesTheDamage(cat, c, fault.says, `cat after ${fault.name}`);
    assert.equal(cat.stdout, '');
    assert.match(cat.stderr, /rebuilt from its own archive/);
    const again = await runCli(['cat', c.release, SCHED, '--cache-dir', c.cacheDir]);
    assert.equal(again.code, 0, again.stderr);
    assert.equal(again.stdout, SCHED_BYTES.toString());
  });
}

test('manifest.json truncated: ls shows it damaged, and ingesting the archive again works (no ENOTEMPTY), every time', async (t) => {
  const c = await cached(t, '6.77.3-manifest');
  const file = path.join(c.entryDir, MANIFEST_FILE);
  await writeFile(file, (await readFile(file)).subarray(0, 40));
  const ls = await runCli(['ls', '--cache-dir', c.cacheDir]);
  assert.match(ls.stdout, /manifest\.json is not valid JSON/, 'the entry does not vanish from ls');
  for (let i = 0; i < 2; i++) {
    const r = await runCli(['ingest', '--archive', c.archive, '--release', c.release, '--cache-dir', c.cacheDir, '--btf', 'off', '--json']);
    assert.equal(r.code, 0, `ingest ${i + 1}: ${r.stderr}`);
    assert.equal(hasStackTrace(r.stderr), false);
  }
  const cat = await runCli(['cat', c.release, SCHED, '--cache-dir', c.cacheDir]);
  assert.equal(cat.stdout, SCHED_BYTES.toString());
  const [q] = await quarantineNames(c.cacheDir);
  assert.match((await reasonOf(c.cacheDir, q!)).reason, /manifest\.json is not valid JSON/);
});

test('a socket in the place of manifest.json or index.bin is damage like any other: ls shows it, ingest rebuilds it, no internal error', async (t) => {
  for (const name of [MANIFEST_FILE, INDEX_FILE]) {
    const c = await cached(t, `6.77.4-socket${name === MANIFEST_FILE ? 'm' : 'i'}`);
    const file = path.join(c.entryDir, name);
    await rm(file);
    // A socket file outlives the process that bound it (open(2) on it fails with ENXIO). Bound
    // by its name in the entry's directory: the whole path is longer than a socket address takes.
    await promisify(execFile)(process.execPath, ['-e', 'require("node:net").createServer().listen(process.argv[1], () => process.exit(0))', name], { cwd: c.entryDir });
    assert.ok((await stat(file)).isSocket());
    const ls = await runCli(['ls', '--cache-dir', c.cacheDir]);
    assert.equal(ls.code, 0, `${name}: ${ls.stderr}`);
    assert.match(ls.stdout, new RegExp(`${name.replace('.', '\\.')} is not a regular file`), `${name}: ls shows the entry damaged`);
    const r = await runCli(['ingest', '--archive', c.archive, '--release', c.release, '--cache-dir', c.cacheDir, '--btf', 'off', '--json']);
    assert.equal(r.code, 0, `${name}: ingest: ${r.stderr}`);
    assert.equal(hasStackTrace(r.stderr), false);
    assert.equal((await runCli(['cat', c.release, SCHED, '--cache-dir', c.cacheDir])).stdout, SCHED_BYTES.toString());
  }
});

test('an index.bin whose header does not describe its size is refused on its header, not read whole first (a sparse 500 MiB one)', async (t) => {
  const c = await cached(t, '6.77.6-sparse');
  const index = path.join(c.entryDir, INDEX_FILE);
  const size = (await stat(index)).size;
  await truncate(index, 500 * 1024 * 1024); // sparse: costs no disk, but a read of it is 500 MiB of zeros
  // In a child, whose peak memory is its own: the read is synchronous, on the thread that answers the mount.
  const program = `
    const { CacheStore } = await import(${JSON.stringify(path.join(REPO_ROOT, 'dist/src/store/cache.js'))});
    const store = await CacheStore.open(process.argv[1]);
    const before = process.resourceUsage().maxRSS;
    const { damaged } = await store.scan();
    process.stdout.write(JSON.stringify({ messages: damaged.map((d) => d.error.message), grewKiB: process.resourceUsage().maxRSS - before }));`;
  const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', program, c.cacheDir], { encoding: 'utf8' });
  const got = JSON.parse(stdout) as { messages: string[]; grewKiB: number };
  assert.equal(got.messages.length, 1);
  assert.match(got.messages[0]!, new RegExp(`index\\.bin: it is ${500 * 1024 * 1024} bytes, but its header describes ${size}`));
  assert.ok(got.grewKiB < 100 * 1024, `reading it took ${Math.round(got.grewKiB / 1024)} MiB more`);
});

test('a FIFO in the place of index.bin is damage to cat (which reads the index in place), at once', async (t) => {
  const c = await cached(t, '6.77.7-fifo');
  const index = path.join(c.entryDir, INDEX_FILE);
  await rm(index);
  await promisify(execFile)('mkfifo', [index]);
  const r = await runCli(['cat', c.release, SCHED, '--cache-dir', c.cacheDir], { timeoutMs: 15_000 });
  assert.notEqual(r.signal, 'SIGTERM', 'cat hung on the FIFO');
  assertNamesTheDamage(r, c, /index\.bin/, 'cat');
});

// ---- serve starts whatever is on disk ----------------------------------------------------------

test('serve starts over a cache of damaged, outdated and dangling entries, serves them rebuilt, and keeps only the newest quarantined copies', async (t) => {
  const dir = await tempDir(t, 'kheadersd-damage-serve-');
  const cacheDir = path.join(dir, 'cache');
  const entries: Cached[] = [];
  // Every entry first (each ingest repairs what it finds), then the damage.
  while (entries.length < FAULTS.length) entries.push(await cached(t, `6.78.${entries.length}-serve`, cacheDir));
  const manifestCut = await cached(t, '6.78.10-serve', cacheDir);
  const old = await cached(t, '6.78.11-serve', cacheDir);
  const live = await cached(t, '6.78.12-live', cacheDir);
  for (let i = 0; i < FAULTS.length; i++) await FAULTS[i]!.damage(entries[i]!);
  // And a truncated manifest, an entry of format 1 (index.json), and a pointer to nothing.
  await writeFile(path.join(manifestCut.entryDir, MANIFEST_FILE), '{"formatVersion": 2, "id"');
  await downgradeToFormat1(old);
  await writeFile(path.join(cacheDir, 'current'), 'gone~' + 'f'.repeat(64) + '\n');

  const d = startServe(t, ['--archive', live.archive, '--release', live.release, '--cache-dir', cacheDir, '--keep', '20', '--mount', 'off', '--http', '127.0.0.1:0', '--btf', 'off', '--log-level', 'info']);
  const url = String((await d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen')).url);
  const ready = await fetch(`${url}/readyz`);
  assert.equal(ready.status, 200, await ready.text());
  // HTTP answers once `current` is checked; the other entries are checked just after, and the
  // damaged repaired then, in turn: served again once that repair has published them.
  await repairedAndServed(d);
  for (const c of [...entries, manifestCut, old, live]) {
    const res = await fetch(`${url}/v1/kernels/${c.release}/files/${SCHED}`);
    assert.equal(res.status, 200, `${c.release}: ${res.status}`);
    assert.ok(Buffer.from(await res.arrayBuffer()).equals(SCHED_BYTES), `${c.release} serves the archived bytes`);
  }
  const metrics = await (await fetch(`${url}/metrics`)).text();
  const damagedCount = FAULTS.length + 1; // + the cut manifest; the old format is rebuilt, not counted as damage
  assert.match(metrics, new RegExp(`^kheadersd_entries_quarantined_total ${damagedCount}$`, 'm'));
  assert.match(metrics, new RegExp(`^kheadersd_entries_rebuilt_total ${damagedCount + 1}$`, 'm'));
  assert.match(metrics, new RegExp(`^kheadersd_quarantine_entries ${QUARANTINE_KEEP}$`, 'm'));
  assert.equal((await quarantineNames(cacheDir)).length, QUARANTINE_KEEP, 'bounded: the newest few quarantined copies are kept');
  const doctor = await runCli(['doctor', '--json', '--cache-dir', cacheDir, '--mount', 'off', '--http', 'off']);
  const checks = (JSON.parse(doctor.stdout) as { checks: Array<{ id: string; status: string; what: string }> }).checks.filter((x) => x.id === 'cache-entries');
  assert.equal(checks.length, QUARANTINE_KEEP, JSON.stringify(checks));
  assert.ok(checks.every((x) => x.status === 'warn' && /quarantined .*\(rebuilt since\)/.test(x.what)), JSON.stringify(checks));
  d.child.kill('SIGTERM');
  assert.equal(await d.exited, 0);
  assert.equal(d.logs.some((l) => /internal error/.test(String(l.msg))), false);
});

test('no header archive now and the running kernel\'s cached entry damaged: serve rebuilds it from its own archive before HTTP answers, and serves it', async (t) => {
  // The module gone (or not loadable) on this boot: the entry cached on an earlier one is all
  // there is, and its own archive.tar.xz can rebuild it. Quarantined without that rebuild, the
  // running kernel's headers were lost and serve served nothing (current null, /readyz 503).
  const exposed = ['/sys/kernel/kheaders.tar.xz', '/proc/kheaders.tar.xz'];
  for (const live of exposed) if (await stat(live).then(() => true, () => false)) return t.skip(`${live} exists: this kernel has a live archive`);
  const c = await cached(t, os.release());
  await truncate(path.join(c.entryDir, INDEX_FILE), (await stat(path.join(c.entryDir, INDEX_FILE))).size - 7);
  const noModules = path.join(c.dir, 'no-modules');
  await mkdir(noModules);
  const d = startServe(t, ['--cache-dir', c.cacheDir, '--no-modprobe', '--module-dirs', noModules, '--btf', 'off', '--mount', 'off', '--http', '127.0.0.1:0', '--log-level', 'info']);
  const url = String((await d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen')).url);
  const ready = await fetch(`${url}/readyz`);
  assert.equal(ready.status, 200, `current is served as soon as HTTP answers: ${await ready.text()}; logs: ${JSON.stringify(d.logs.map((l) => l.msg))}`);
  const res = await fetch(`${url}/v1/kernels/current/files/${SCHED}`);
  assert.equal(res.status, 200);
  assert.ok(Buffer.from(await res.arrayBuffer()).equals(SCHED_BYTES), 'the archived bytes, rebuilt');
  assert.ok(d.logs.some((l) => l.msg === 'cache entry rebuilt from its own archive' && l.id === c.id), JSON.stringify(d.logs.map((l) => l.msg)));
  d.child.kill('SIGTERM');
  assert.equal(await d.exited, 0);
});

/** Rewrite an entry as format 1 wrote it (index.json; no index.bin), with a blob that walks out. */
async function downgradeToFormat1(c: Cached): Promise<void> {
  const store = await CacheStore.open(c.cacheDir);
  const entry = await store.load(c.id);
  const records = entry.index.nodes.map(({ path: p, kind, mode, mtime, size, offset, target }) => ({ path: p, kind, mode, mtime, size, ...(offset !== undefined ? { offset } : {}), ...(target !== undefined ? { target } : {}) }));
  records.push({ path: 'vmlinux.h', kind: 'file', mode: 0o644, mtime: 1, size: 10, blob: '../../../etc/hostname' } as (typeof records)[number]);
  await writeFile(path.join(c.entryDir, 'index.json'), JSON.stringify({ version: 1, records }));
  await rm(path.join(c.entryDir, INDEX_FILE));
  await writeFile(path.join(c.entryDir, MANIFEST_FILE), JSON.stringify({ ...entry.manifest, formatVersion: 1 }, null, 2));
  await entry.reader.close();
}

// ---- a blob named outside the entry --------------------------------------------------------------

test('a blob field set to ../../../etc/hostname is served by nothing: cat refuses it, serve rebuilds the entry', async (t) => {
  const hostname = (await readFile('/etc/hostname', 'utf8').catch(() => '')).trim();
  const dir = await tempDir(t, 'kheadersd-blob-');
  const btf = path.join(dir, 'vmlinux.btf');
  const b = new BtfBuilder();
  b.int('int', 4, { signed: true });
  await writeFile(btf, b.build());
  const tamper = async (c: Cached): Promise<void> => {
    const indexFile = path.join(c.entryDir, INDEX_FILE);
    await writeFile(indexFile, withBlobName(await readFile(indexFile), '../../../etc/hostname'));
  };

  const c = await cached(t, '6.77.4-blob', undefined, goodTree('6.77.4-blob'), btf);
  const good = await runCli(['cat', c.release, 'vmlinux.h', '--cache-dir', c.cacheDir]);
  assert.equal(good.code, 0, good.stderr);
  assert.match(good.stdout, /#ifndef __VMLINUX_H__/);
  await tamper(c);
  const cat = await runCli(['cat', c.release, 'vmlinux.h', '--cache-dir', c.cacheDir]);
  assertNamesTheDamage(cat, c, /blob 0 has the name "\.\.\/\.\.\/\.\.\/etc\/hostname", which the format does not allow/, 'cat');
  assert.equal(cat.stdout, '');

  // Through a daemon: quarantined at start and rebuilt, vmlinux.h made again from the same BTF.
  const s = await cached(t, '6.77.4-blob-serve', undefined, goodTree('6.77.4-blob-serve'), btf);
  await tamper(s);
  const d = startServe(t, ['--archive', s.archive, '--release', s.release, '--cache-dir', s.cacheDir, '--mount', 'off', '--http', '127.0.0.1:0', '--btf', btf, '--log-level', 'info']);
  const url = String((await d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen')).url);
  const res = await fetch(`${url}/v1/kernels/${s.release}/files/vmlinux.h`);
  const body = await res.text();
  if (hostname) assert.equal(body.includes(hostname) && !body.includes('__VMLINUX_H__'), false, 'never /etc/hostname');
  assert.equal(res.status, 200, body);
  assert.match(body, /#ifndef __VMLINUX_H__/, 'the rebuilt entry has its own vmlinux.h');
  const [q] = await quarantineNames(s.cacheDir);
  assert.match((await reasonOf(s.cacheDir, q!)).reason, /etc\/hostname", which the format does not allow/);
  d.child.kill('SIGTERM');
  assert.equal(await d.exited, 0);
});

// ---- serve: HTTP 500 and FUSE EIO, then repaired ---------------------------------------------------

async function fuseBackends(): Promise<Array<'kernel' | 'native'>> {
  const out: Array<'kernel' | 'native'> = ['kernel'];
  const native = await runProcess(process.execPath, ['-e', "require('fuse-native')"]).catch(() => undefined);
  if (native?.code === 0) out.push('native');
  return out;
}

const REBUILT = 'cache entry rebuilt from its own archive';
const rebuilds = (d: Daemon): number => d.logs.filter((l) => l.msg === REBUILT).length;

/** Wait until the daemon has rebuilt an entry once more than `before` times, and serves again after it. */
async function repaired(d: Daemon, before: number): Promise<void> {
  await pollUntil(
    async () => {
      const at = d.logs.flatMap((l, i) => (l.msg === REBUILT ? [i] : []))[before];
      return at !== undefined && d.logs.slice(at + 1).some((l) => l.msg === 'serving') ? true : undefined;
    },
    'the entry rebuilt and served again',
    120_000,
  );
}

for (const backend of await fuseBackends()) {
  test(`serve (${backend} FUSE backend): a flipped byte is EIO on the mount and 500 over HTTP, naming entry and file; each time the entry is rebuilt`, async (t) => {
    const skip = await fuseSkipReason();
    if (skip) return t.skip(skip);
    const c = await cached(t, `6.77.5-${backend}`);
    const mnt = path.join(c.dir, 'mnt');
    await flipInSched(c);
    const d = startServe(t, ['--archive', c.archive, '--release', c.release, '--cache-dir', c.cacheDir, '--mount', mnt, '--fuse-backend', backend, '--http', '127.0.0.1:0', '--btf', 'off', '--log-level', 'info']);
    const url = String((await d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen')).url);
    await d.waitFor((l) => l.msg === 'mounted', 'the mount');
    const onMount = path.join(mnt, 'current', SCHED);

    // FUSE first: the read fails with EIO; not one byte of the file is printed.
    let before = rebuilds(d);
    const viaFuse = await runProcess('cat', [onMount]);
    assert.notEqual(viaFuse.code, 0);
    assert.match(viaFuse.stderr, /Input\/output error/);
    assert.equal(viaFuse.stdout, '');
    const logged = await d.waitFor((l) => typeof l.msg === 'string' && l.msg.includes('the read failed; repairing the entry'), 'the damage report');
    assert.match(String(logged.msg), new RegExp(`cache entry ${c.id.replace(/[.+]/g, '\\$&')} is damaged: include/linux/sched\\.h`));
    await repaired(d, before);

    // The rebuilt entry, damaged before anything read it: HTTP answers 500 naming entry and file.
    const rebuiltDir = path.join(c.cacheDir, 'entries', c.id);
    await flipByte(path.join(rebuiltDir, PACK_FILE), (await packOffset(c, SCHED)) + 99);
    before = rebuilds(d);
    const res = await fetch(`${url}/v1/kernels/current/files/${SCHED}`);
    const body = (await res.json()) as { error: { code: string; message: string } };
    assert.equal(res.status, 500);
    assert.equal(body.error.code, 'E_ENTRY_DAMAGED');
    assert.match(body.error.message, new RegExp(`cache entry ${c.id.replace(/[.+]/g, '\\$&')} is damaged: include/linux/sched\\.h: pack\\.tar bytes \\d+-\\d+, which hold it, do not match`));
    await repaired(d, before);

    // Repaired: both serve the archived bytes again.
    const ok = await fetch(`${url}/v1/kernels/current/files/${SCHED}`);
    assert.equal(ok.status, 200, `${await ok.clone().text()}\n${JSON.stringify(d.logs.slice(-12).map((l) => l.msg))}`);
    assert.ok(Buffer.from(await ok.arrayBuffer()).equals(SCHED_BYTES));
    // The kernel forgets the replaced instance's names when the invalidation the daemon sends
    // (from its notifier thread) arrives, which under load can come after the repair is logged.
    // Until then a read may fail with EIO; it must never give other bytes.
    let fuseOk = await runProcess('cat', [onMount]);
    for (const until = Date.now() + 15_000; fuseOk.code !== 0 && Date.now() < until; fuseOk = await runProcess('cat', [onMount])) {
      assert.match(fuseOk.stderr, /Input\/output error/);
      assert.equal(fuseOk.stdout, '');
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.equal(fuseOk.code, 0, fuseOk.stderr);
    assert.equal(fuseOk.stdout, SCHED_BYTES.toString());
    const metrics = await (await fetch(`${url}/metrics`)).text();
    assert.match(metrics, /^kheadersd_entries_quarantined_total 2$/m);
    assert.match(metrics, /^kheadersd_entry_damage_reports_total 2$/m);
    assert.match(metrics, /^kheadersd_entries_rebuilt_total 2$/m);
    d.child.kill('SIGTERM');
    assert.equal(await d.exited, 0);
  });
}

// ---- cat's own output ----------------------------------------------------------------------------

test('cat exits non-zero when the output takes less than the whole file; a trailing slash on a file is an error', async (t) => {
  const c = await cached(t, '6.77.6-out');
  const full = await runProcess('sh', ['-c', `exec "$0" "$1" cat ${c.release} ${SCHED} --cache-dir "$2" > /dev/full`, process.execPath, CLI, c.cacheDir]);
  assert.equal(full.code, 5, full.stderr);
  assert.match(full.stderr, /could not write the whole file to the output \(ENOSPC\)/);
  assert.equal(hasStackTrace(full.stderr), false);
  const slash = await runCli(['cat', c.release, `${SCHED}/`, '--cache-dir', c.cacheDir]);
  assert.equal(slash.code, 6, slash.stderr); // not found: a file is not a directory
  assert.match(slash.stderr, /include\/linux\/sched\.h\/: not a directory/);
  assert.equal(slash.stdout, '');
  const viaLink = await runCli(['cat', c.release, 'include/dt-bindings/input/linux-event-codes.h/', '--cache-dir', c.cacheDir]);
  assert.equal(viaLink.code, 6, 'a symlink to a file, with a slash, is not a directory either');
});
