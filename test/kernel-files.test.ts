/**
 * The files an entry holds beside its archive — vmlinux.h and .config — go only into the entry of
 * the kernel they belong to: the checks (a configuration against autoconf.h, BTF against
 * asm-offsets.h and bounds.h, a vmlinux's release), ingest's decisions with them, and what says
 * whether an entry is the running kernel's. Real data: the 6.1 test kernel (its kheaders.ko,
 * its vmlinux inside bzImage, its config), the fixture archive (another 6.1 configuration), and
 * this machine's own BTF and configuration where it has them.
 */
import { test, type TestContext } from 'node:test';
import { createHash } from 'node:crypto';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readFile, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { gzipSync, gunzipSync } from 'node:zlib';
import { checkBtfAgainstHeaders } from '../src/btf/headers-check.js';
import { parseBtf } from '../src/btf/reader.js';
import { findEmbeddedArchive } from '../src/source/elf.js';
import { CacheStore } from '../src/store/cache.js';
import { CONFIG_PATH, dataLocation, type CacheEntry, type Manifest } from '../src/store/entry.js';
import { ingest, type IngestOptions } from '../src/store/ingest.js';
import { compareConfig, parseAutoconf, parseKconfig } from '../src/store/kconfig.js';
import { matchRunning, needsBtfDigest, readLiveKernel, type LiveKernel } from '../src/store/kernel-match.js';
import { createLogger } from '../src/log.js';
import { FIXTURE_ARCHIVE, fixtureMissing, tempDir } from './helpers/archives.js';
import { baseBtfOf, testKernel, vmlinuxOf, type TestKernel } from './helpers/kernels.js';

const silent = createLogger('silent');
const KERNEL = testKernel('x86_64-6.1.192');
const THIS_BTF = '/sys/kernel/btf/vmlinux';

function kernelOrSkip(t: TestContext): TestKernel | undefined {
  if (typeof KERNEL === 'string') {
    t.skip(KERNEL);
    return undefined;
  }
  if (os.release() === KERNEL.release) {
    t.skip(`this machine runs ${KERNEL.release} itself: its files would be the test kernel's`);
    return undefined;
  }
  return KERNEL;
}

/** The test kernel's kheaders.ko (the archive is embedded in it). */
function kheadersKo(k: TestKernel): string {
  const ko = k.modules.get('kheaders');
  assert.ok(ko, 'the test kernel has kheaders.ko');
  return ko;
}

/** A generated header of the test kernel's archive, read through the real ingest's capture. */
async function generatedFile(k: TestKernel, name: string, t: TestContext): Promise<string> {
  const dir = await tempDir(t);
  const { entry } = await ingest({ cacheDir: dir, archive: kheadersKo(k), btf: 'off', log: silent, liveConfig: path.join(dir, 'none'), bootDir: dir });
  return (await readEntryFile(entry, name)).toString('latin1');
}

async function readEntryFile(entry: CacheEntry, file: string): Promise<Buffer> {
  const node = entry.index.resolve(file);
  assert.ok(node && node.kind === 'file', `${file} is a file of ${entry.manifest.id}`);
  const loc = dataLocation(entry, node);
  const fh = await (await import('node:fs/promises')).open(loc.file, 'r');
  try {
    const buf = Buffer.alloc(node.size);
    await fh.read(buf, 0, node.size, loc.offset);
    return buf;
  } finally {
    await fh.close();
  }
}

// ---- the checks, pure ---------------------------------------------------------------------------

test('a .config is compared with autoconf.h option by option: y, m, numbers, strings, unset', () => {
  const config = parseKconfig('# c\nCONFIG_A=y\nCONFIG_B=m\nCONFIG_HZ=250\nCONFIG_S="x y"\n# CONFIG_N is not set\n');
  assert.deepEqual([...config], [
    ['CONFIG_A', '1'],
    ['CONFIG_B_MODULE', '1'],
    ['CONFIG_HZ', '250'],
    ['CONFIG_S', '"x y"'],
  ]);
  const same = parseAutoconf('#define CONFIG_A 1\n#define CONFIG_B_MODULE 1\n#define CONFIG_HZ 250\n#define CONFIG_S "x y"\n');
  assert.deepEqual(compareConfig(config, same), { checked: 4, mismatches: [] });
  const other = parseAutoconf('#define CONFIG_A 1\n#define CONFIG_B 1\n#define CONFIG_HZ 300\n#define CONFIG_S "x y"\n');
  assert.deepEqual(compareConfig(config, other).mismatches, [
    'CONFIG_B_MODULE is 1 in the configuration, unset in the headers',
    'CONFIG_HZ is 250 in the configuration, 300 in the headers',
    'CONFIG_B is 1 in the headers, unset in the configuration',
  ]);
});

test("the test kernel's config matches its own headers' autoconf.h, and not the fixture's", async (t) => {
  const k = kernelOrSkip(t);
  if (!k) return;
  const own = compareConfig(parseKconfig(k.config), parseAutoconf(await generatedFile(k, 'include/generated/autoconf.h', t)));
  assert.deepEqual(own.mismatches, []);
  assert.ok(own.checked > 1000, `${own.checked} options`);
  const missing = fixtureMissing();
  if (missing) return t.skip(missing);
  const dir = await tempDir(t);
  const { entry } = await ingest({ cacheDir: dir, archive: FIXTURE_ARCHIVE, btf: 'off', log: silent, liveConfig: path.join(dir, 'none'), bootDir: dir });
  const other = compareConfig(parseKconfig(k.config), parseAutoconf((await readEntryFile(entry, 'include/generated/autoconf.h')).toString('latin1')));
  assert.ok(other.mismatches.length > 0, 'another build of 6.1 has another configuration');
});

test("BTF against the headers' layout facts: the kernel's own match, another kernel's are caught", async (t) => {
  const k = kernelOrSkip(t);
  if (!k) return;
  const facts = { asmOffsets: await generatedFile(k, 'include/generated/asm-offsets.h', t), bounds: await generatedFile(k, 'include/generated/bounds.h', t) };
  const own = checkBtfAgainstHeaders(parseBtf(baseBtfOf(k)), facts);
  assert.deepEqual(own.mismatches, []);
  assert.ok(own.checked.length >= 20, own.checked.join('\n'));
  assert.ok(own.checked.some((c) => c.startsWith('offsetof(struct task_struct, thread.sp)')), 'task_struct is among the facts');
  assert.ok(own.checked.some((c) => c.startsWith('NR_PAGEFLAGS')), 'bounds.h is among the facts');
  t.diagnostic(`${own.checked.length} facts, e.g. ${own.checked.slice(0, 3).join(', ')}`);
  if (!existsSync(THIS_BTF)) return t.skip(`${THIS_BTF} is absent: no second kernel to compare`);
  const other = checkBtfAgainstHeaders(parseBtf(await readFile(THIS_BTF)), facts);
  assert.ok(other.mismatches.length > 0, `this machine's ${os.release()} BTF differs from 6.1's headers`);
  t.diagnostic(`${os.release()} BTF vs ${k.release} headers: ${other.mismatches.join('; ')}`);
});

test('whether an entry is the running kernel: build id, live source, release', () => {
  const live: LiveKernel = { release: '6.1.192', buildId: 'aa'.repeat(20), btfDigest: 'b'.repeat(64) };
  const base: Manifest = {
    formatVersion: 2,
    id: 'x',
    release: '6.1.192',
    digest: 'c'.repeat(64),
    kind: 'headers',
    buildId: null,
    source: 'elf:/tmp/kheaders.ko',
    ingestedAt: '',
    files: 0,
    dirs: 0,
    symlinks: 0,
    bytes: 0,
    packBytes: 0,
    archiveBytes: 0,
    btf: null,
  };
  assert.equal(matchRunning({ ...base, buildId: live.buildId }, live).match, 'yes');
  assert.equal(matchRunning({ ...base, buildId: 'dd'.repeat(20) }, live).match, 'no');
  assert.equal(matchRunning({ ...base, source: '/sys/kernel/kheaders.tar.xz' }, live).match, 'yes');
  assert.equal(matchRunning({ ...base, live: true }, live).match, 'yes');
  assert.match(matchRunning(base, live).why, /nothing recorded tells whether it is the same build/);
  assert.equal(matchRunning(base, live).match, 'unknown');
  assert.match(matchRunning({ ...base, release: '6.12.0' }, live).why, /it is 6\.12\.0; the running kernel is 6\.1\.192/);
  assert.equal(matchRunning({ ...base, kind: 'btf-only', digest: live.btfDigest! }, live).match, 'yes');
});

test("the running kernel's BTF is hashed only when an entry needs its digest to be judged", async (t) => {
  const dir = await tempDir(t);
  const btfPath = path.join(dir, 'vmlinux.btf');
  const btf = Buffer.from('not really BTF, but bytes with a digest');
  await writeFile(btfPath, btf);
  const notesPath = path.join(dir, 'no-notes'); // no build id: a vmlinux.h-only entry is judged by its BTF
  const release = os.release();
  const manifest = (kind: Manifest['kind'], digest: string): Manifest => ({
    formatVersion: 2, id: 'x', release, digest, kind, buildId: null, source: 'btf:/x', ingestedAt: '', files: 0, dirs: 0, symlinks: 0, bytes: 0, packBytes: 0, archiveBytes: 0, btf: null,
  });
  const digest = createHash('sha256').update(btf).digest('hex');
  const btfOnly = manifest('btf-only', digest);
  assert.equal(needsBtfDigest(btfOnly, { release, buildId: null }), true);
  assert.equal(needsBtfDigest(btfOnly, { release: `${release}-other`, buildId: null }), false);
  assert.equal(needsBtfDigest(manifest('headers', digest), { release, buildId: null }), false);
  // Asked about a vmlinux.h-only entry of this release: the digest is read, and it matches.
  const forBtfOnly = await readLiveKernel({ btfPath, notesPath }, [btfOnly]);
  assert.equal(forBtfOnly.btfDigest, digest);
  assert.equal(matchRunning(btfOnly, forBtfOnly).match, 'yes');
  // Only headers entries: nothing needs the digest, so the file (there, readable) is not read.
  const forHeaders = await readLiveKernel({ btfPath, notesPath }, [manifest('headers', digest)]);
  assert.equal(forHeaders.btfDigest, null);
  // No list: as before, always read.
  assert.equal((await readLiveKernel({ btfPath, notesPath })).btfDigest, digest);
});

// ---- ingest -------------------------------------------------------------------------------------

interface Env {
  cacheDir: string;
  work: string;
  /** Options that keep the machine's own files out unless a test puts them in. */
  base: IngestOptions;
}

async function env(t: TestContext): Promise<Env> {
  const work = await tempDir(t);
  const cacheDir = path.join(work, 'cache');
  await mkdir(path.join(work, 'boot'));
  return {
    cacheDir,
    work,
    base: { cacheDir, log: silent, liveBtf: path.join(work, 'no-live-btf'), liveConfig: path.join(work, 'no-proc-config.gz'), bootDir: path.join(work, 'boot'), notesPath: path.join(work, 'no-notes') },
  };
}

test("ingest: the kernel's own vmlinux and /boot config go in, checked, and say so in the manifest", async (t) => {
  const k = kernelOrSkip(t);
  if (!k) return;
  const e = await env(t);
  const vmlinux = path.join(e.work, 'vmlinux');
  await writeFile(vmlinux, vmlinuxOf(k));
  await writeFile(path.join(e.work, 'boot', `config-${k.release}`), k.config);
  const { entry } = await ingest({ ...e.base, archive: kheadersKo(k), btf: vmlinux });
  const m = entry.manifest;
  assert.equal(m.release, k.release);
  assert.ok(m.btf, `vmlinux.h kept: ${JSON.stringify(m.notes)}`);
  assert.equal(m.btf.source, vmlinux);
  assert.ok(entry.index.get('vmlinux.h'), 'vmlinux.h is in the tree');
  assert.deepEqual(m.config && { source: m.config.source, bytes: m.config.bytes }, { source: path.join(e.work, 'boot', `config-${k.release}`), bytes: Buffer.byteLength(k.config) });
  assert.equal((await readEntryFile(entry, CONFIG_PATH)).toString(), k.config, '.config is the config, byte for byte');
  assert.equal(entry.index.get(CONFIG_PATH)?.sha256, m.config?.sha256);
  assert.ok(m.notes?.some((n) => /matches these headers in \d+ layout facts/.test(n)), JSON.stringify(m.notes));
  // The manifest on disk says the same.
  const store = await CacheStore.open(e.cacheDir);
  assert.deepEqual((await store.list())[0]?.notes, m.notes);
});

test("ingest: the running kernel's BTF given with --btf does not go into another release's entry", async (t) => {
  const k = kernelOrSkip(t);
  if (!k) return;
  const e = await env(t);
  // "The running kernel" of this test: its BTF file is both the live one and the one given.
  const liveBtf = path.join(e.work, 'live-vmlinux.btf');
  await writeFile(liveBtf, existsSync(THIS_BTF) ? await readFile(THIS_BTF) : baseBtfOf(k));
  const { entry } = await ingest({ ...e.base, liveBtf, archive: kheadersKo(k), btf: liveBtf });
  assert.equal(entry.manifest.btf, null);
  assert.equal(entry.index.get('vmlinux.h'), undefined);
  assert.ok(entry.manifest.notes?.some((n) => n.includes("is the running kernel's BTF") && n.includes(`not ${k.release}'s`)), JSON.stringify(entry.manifest.notes));
});

test("ingest: another kernel's BTF or config is left out, with the reason", async (t) => {
  const k = kernelOrSkip(t);
  if (!k) return;
  if (!existsSync(THIS_BTF) || !existsSync('/proc/config.gz')) return t.skip('this machine has no BTF or /proc/config.gz to play "another kernel"');
  const e = await env(t);
  // This machine's BTF as a plain file (not known as the live one) and its config under /boot.
  const otherBtf = path.join(e.work, 'other.btf');
  await writeFile(otherBtf, await readFile(THIS_BTF));
  await writeFile(path.join(e.work, 'boot', `config-${k.release}`), gunzipSync(await readFile('/proc/config.gz')));
  const { entry } = await ingest({ ...e.base, archive: kheadersKo(k), btf: otherBtf });
  assert.equal(entry.manifest.btf, null);
  assert.equal(entry.manifest.config, null);
  assert.equal(entry.index.get(CONFIG_PATH), undefined);
  const notes = entry.manifest.notes ?? [];
  assert.ok(notes.some((n) => /does not match these headers \(.*task_struct/.test(n)), JSON.stringify(notes));
  assert.ok(notes.some((n) => /is another kernel's configuration \(/.test(n)), JSON.stringify(notes));
});

test("ingest: the running kernel's own archive gets /proc/config.gz, gunzipped, checked", async (t) => {
  const k = kernelOrSkip(t);
  if (!k) return;
  const e = await env(t);
  // Play the running kernel: its archive at the live path, its config at the /proc path.
  const liveArchive = path.join(e.work, 'kheaders.tar.xz');
  await writeFile(liveArchive, findEmbeddedArchive(await readFile(kheadersKo(k))).data);
  const procConfig = path.join(e.work, 'config.gz');
  await writeFile(procConfig, gzipSync(k.config));
  const { entry } = await ingest({ ...e.base, livePaths: [liveArchive], liveConfig: procConfig, btf: 'off', modprobe: false });
  assert.equal(entry.manifest.live, true);
  assert.equal(entry.manifest.config?.source, procConfig);
  assert.equal((await readEntryFile(entry, CONFIG_PATH)).toString(), k.config);
});
