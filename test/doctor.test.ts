/**
 * `kheadersd doctor`: each check against a temp directory standing in for /sys, /lib/modules,
 * /dev and the cache, and the whole thing on this machine (no kheaders archive, BTF present),
 * where it must finish by itself, quickly, without a crash.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { chmod, chown, mkdir, mkdtemp, rm, utimes, writeFile } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import zlib from 'node:zlib';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { buildIdNotes } from './helpers/kernels.js';
import { resolveConfig, type Config, type ConfigKey } from '../src/config.js';
import { cmdDoctor, doctorTimeoutMs, formatReport, mountProbeBudget, runDoctor, statInChild, type CheckResult, type DoctorEnvironment, type DoctorReport } from '../src/commands/doctor.js';
import { createLogger } from '../src/log.js';
import { xz } from './helpers/archives.js';
import { buildKernelModule } from './helpers/elf-builder.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const LINE = /^(ok {2}|warn|FAIL) {2}\S/;
const ALL_CAPS = (1n << 41n) - 1n;
const BOOT = new Date('2025-01-01T00:00:00Z');

let dir: string;
let n = 0;

before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-doctor-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A fresh fake machine: an xz archive in "sysfs", BTF, /dev/fuse, a cache, all in a temp dir. */
async function machine(opts: { archive?: boolean; btf?: boolean } = {}): Promise<{ root: string; env: Partial<DoctorEnvironment> }> {
  const root = path.join(dir, `m${n++}`);
  await mkdir(path.join(root, 'sys'), { recursive: true });
  await mkdir(path.join(root, 'bin'));
  const live = path.join(root, 'sys', 'kheaders.tar.xz');
  if (opts.archive ?? true) await writeFile(live, Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 1, 2, 3]));
  const btf = path.join(root, 'sys', 'vmlinux');
  if (opts.btf ?? true) await writeFile(btf, Buffer.alloc(2048));
  await writeFile(path.join(root, 'mountinfo'), '');
  for (const tool of ['xz', 'mount', 'modprobe']) await writeFile(path.join(root, 'bin', tool), '#!/bin/sh\n', { mode: 0o755 });
  return {
    root,
    env: {
      release: '6.1.0-test',
      livePaths: [live, path.join(root, 'proc-kheaders.tar.xz')],
      btfPath: btf,
      modulesRoot: path.join(root, 'lib-modules'),
      moduleRoot: root,
      bootTime: BOOT,
      kheadersModuleDir: path.join(root, 'sys-module-kheaders'),
      devFuse: '/dev/null', // any character device we can read and write
      mountinfo: path.join(root, 'mountinfo'),
      path: path.join(root, 'bin'),
      uid: process.getuid?.() ?? 0,
      capEff: ALL_CAPS,
      packageRoot: ROOT,
      systemd: false,
      timeoutMs: 5000,
      probeNode: process.execPath,
    },
  };
}

function config(root: string, flags: Partial<Record<ConfigKey, unknown>> = {}): Config {
  return resolveConfig({ flags: { cacheDir: path.join(root, 'cache'), mount: path.join(root, 'mnt'), http: 'off', fuseBackend: 'kernel', ...flags }, env: {}, file: {}, fileName: 'test' });
}

function only(report: DoctorReport, id: string): CheckResult[] {
  return report.checks.filter((c) => c.id === id);
}

function one(report: DoctorReport, id: string): CheckResult {
  const found = only(report, id);
  assert.equal(found.length, 1, `${id}: ${JSON.stringify(report.checks)}`);
  return found[0]!;
}

async function freePort(): Promise<number> {
  const s = net.createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

describe('doctor on this machine', () => {
  it('finishes quickly, in a process that exits by itself, with one well-formed line per check', { timeout: 60_000 }, async () => {
    const script = `
      import { resolveConfig } from ${JSON.stringify(path.join(ROOT, 'dist/src/config.js'))};
      import { cmdDoctor } from ${JSON.stringify(path.join(ROOT, 'dist/src/commands/doctor.js'))};
      import { createLogger } from ${JSON.stringify(path.join(ROOT, 'dist/src/log.js'))};
      const cfg = resolveConfig({ flags: {}, env: {}, file: {}, fileName: 'none' });
      process.exitCode = await cmdDoctor(cfg, { stdout: process.stdout, stderr: process.stderr, log: createLogger('silent') }, { json: process.argv[1] === 'json' });`;
    const started = Date.now();
    const runIt = (json: boolean): Promise<{ code: number | null; stdout: string; stderr: string }> =>
      new Promise((resolve) => {
        execFile(process.execPath, ['--input-type=module', '-e', script, ...(json ? ['json'] : [])], { timeout: 30_000, killSignal: 'SIGKILL' }, (err, stdout, stderr) => {
          resolve({ code: err ? ((err as { code?: number }).code ?? null) : 0, stdout, stderr });
        });
      });
    const text = await runIt(false);
    assert.ok(Date.now() - started < 25_000, 'doctor took too long (or did not exit)');
    assert.ok(text.code === 0 || text.code === 5, `exit ${text.code}: ${text.stderr}`);
    const lines = text.stdout.trimEnd().split('\n');
    const summary = lines.pop()!;
    assert.equal(lines.pop(), '');
    for (const l of lines) assert.match(l, LINE);
    assert.match(summary, /^\d+ ok, \d+ warn, \d+ FAIL: /);
    assert.equal(text.code === 0, !text.stdout.includes('\nFAIL  '));

    const json = await runIt(true);
    const report = JSON.parse(json.stdout) as DoctorReport;
    assert.equal(report.checks.length, lines.length);
    for (const id of ['kernel', 'archive', 'btf', 'xz', 'cache', 'http', 'fuse-device', 'mount-point']) assert.ok(report.checks.some((c) => c.id === id), id);
  });

  it('says what is missing on a kernel without CONFIG_IKHEADERS', async () => {
    const report = await runDoctor(resolveConfig({ flags: { cacheDir: path.join(dir, 'none'), http: 'off', mount: 'off' }, env: {}, file: {}, fileName: 'x' }));
    const archive = one(report, 'archive');
    if (archive.status !== 'ok') {
      assert.match(archive.what, /no header archive|not exposed/);
      assert.match(archive.fix ?? '', /CONFIG_IKHEADERS|modprobe/);
    }
  });
});

describe('doctor checks', () => {
  it('all clear: the archive, BTF, xz, cache, FUSE, mount point', async () => {
    const { root, env } = await machine();
    const report = await runDoctor(config(root), env);
    assert.equal(report.ok, true, formatReport(report));
    assert.equal(report.counts.fail, 0);
    assert.match(one(report, 'archive').what, /header archive: .*kheaders\.tar\.xz/);
    assert.equal(one(report, 'btf').status, 'ok');
    assert.match(one(report, 'xz').what, /xz decoder: .*\/bin\/xz/);
    assert.match(one(report, 'cache').what, /absent; the first ingest creates it/);
    assert.equal(one(report, 'fuse-device').status, 'ok');
    assert.match(one(report, 'fuse-backend').what, /kernel FUSE backend/);
    assert.match(one(report, 'mount-point').what, /absent; serve creates it/);
    const out = formatReport(report);
    for (const l of out.trimEnd().split('\n').slice(0, -2)) assert.match(l, LINE);
  });

  it('no archive: kheaders.ko read from an Android partition; one changed after the boot is flagged; another release is not used', async () => {
    const { root, env } = await machine({ archive: false });
    const dir = path.join(root, 'system_dlkm', 'lib', 'modules');
    await mkdir(dir, { recursive: true });
    const ko = path.join(dir, 'kheaders.ko');
    await writeFile(ko, buildKernelModule({ archive: xz(Buffer.from('headers')), vermagic: '6.1.0-test' }));
    const before = new Date(BOOT.getTime() - 3600_000);
    await utimes(ko, before, before);
    let report = await runDoctor(config(root), env);
    assert.deepEqual(only(report, 'archive').map((c) => c.status), ['ok']);
    assert.match(one(report, 'archive').what, /serve reads it out of \/system_dlkm\/lib\/modules\/kheaders\.ko \(vermagic 6\.1\.0-test\) without loading the module/);

    const after_ = new Date(BOOT.getTime() + 3600_000);
    await utimes(ko, after_, after_);
    report = await runDoctor(config(root), env);
    assert.deepEqual(only(report, 'archive').map((c) => c.status), ['ok', 'warn']);
    assert.match(only(report, 'archive')[1]!.what, /kheaders\.ko changed at 2025-01-01T01:00:00\.000Z, after this kernel booted \(2025-01-01T00:00:00\.000Z\)/);

    await writeFile(ko, buildKernelModule({ archive: xz(Buffer.from('headers')), vermagic: '6.1.0-other' }));
    report = await runDoctor(config(root), env);
    assert.equal(one(report, 'archive').status, 'warn');
    assert.match(one(report, 'archive').what, /not used: \/system_dlkm\/lib\/modules\/kheaders\.ko: its vermagic names 6\.1\.0-other, not the running 6\.1\.0-test/);
    assert.match(one(report, 'archive').fix ?? '', /kheaders\.ko built for 6\.1\.0-test/);
  });

  it('no archive: a module that cannot be read here is loaded (modprobe, insmod) unless loading is off or not allowed', async (t) => {
    if ((zlib as { zstdDecompress?: unknown }).zstdDecompress !== undefined) return t.skip('this Node decodes zstd itself: no module here is unreadable to root');
    const { root, env } = await machine({ archive: false });
    await mkdir(path.join(root, 'lib', 'modules', '6.1.0-test', 'kernel', 'kernel'), { recursive: true });
    await writeFile(path.join(root, 'lib', 'modules', '6.1.0-test', 'kernel', 'kernel', 'kheaders.ko.zst'), Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0]));
    let report = await runDoctor(config(root), env); // env.path has no zstd binary
    assert.equal(one(report, 'archive').status, 'ok');
    assert.match(one(report, 'archive').what, /cannot read \/lib\/modules\/6\.1\.0-test\/kernel\/kernel\/kheaders\.ko\.zst here, so it loads it/);

    report = await runDoctor(config(root, { modprobe: false }), env);
    assert.equal(one(report, 'archive').status, 'warn');
    assert.match(one(report, 'archive').what, /loading is off/);

    report = await runDoctor(config(root), { ...env, uid: 1000, capEff: 0n });
    assert.match(one(report, 'archive').what, /needs root/);
    assert.equal(one(report, 'privileges').status, 'warn');
  });

  it('no archive and no module: BTF only (warn), or nothing at all (FAIL, exit 5)', async () => {
    const bare = await machine({ archive: false });
    let report = await runDoctor(config(bare.root), bare.env);
    assert.equal(one(report, 'archive').status, 'warn');
    assert.match(one(report, 'archive').what, /vmlinux\.h made from BTF/);

    const nothing = await machine({ archive: false, btf: false });
    report = await runDoctor(config(nothing.root), nothing.env);
    assert.equal(one(report, 'archive').status, 'fail');
    assert.equal(report.ok, false);
    assert.equal(one(report, 'btf').status, 'warn');
    assert.match(formatReport(report), /\n\d+ ok, \d+ warn, 1 FAIL: fix the FAIL lines before `kheadersd serve`\n$/);
  });

  it('a configured archive is checked instead of the live one', async () => {
    const { root, env } = await machine({ archive: false });
    const elf = path.join(root, 'kheaders.ko');
    await writeFile(elf, Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1]));
    assert.match(one(await runDoctor(config(root, { archive: elf }), env), 'archive').what, /an ELF file/);
    const junk = path.join(root, 'junk');
    await writeFile(junk, 'hello');
    assert.equal(one(await runDoctor(config(root, { archive: junk }), env), 'archive').status, 'fail');
    assert.equal(one(await runDoctor(config(root, { archive: path.join(root, 'missing') }), env), 'archive').status, 'fail');
  });

  it('current: the running kernel\'s entry is ok; another release, or another build, is a warning that says so', async () => {
    const { root, env } = await machine();
    const notes = path.join(root, 'notes');
    // The running kernel's build id, as /sys/kernel/notes holds it.
    const id = Buffer.from('1959b21d7a4018f684478a3b95d70a8643ddac89', 'hex');
    await writeFile(notes, buildIdNotes(id.toString('hex')));
    const cache = path.join(root, 'cache');
    const entry = async (release: string, buildId: string | null, source: string): Promise<void> => {
      const eid = `${release}~${'a'.repeat(64)}`;
      await mkdir(path.join(cache, 'entries', eid), { recursive: true });
      await writeFile(path.join(cache, 'entries', eid, 'manifest.json'), JSON.stringify({ formatVersion: 1, id: eid, release, digest: 'a'.repeat(64), kind: 'headers', buildId, source }));
      await writeFile(path.join(cache, 'current'), `${eid}\n`);
    };
    const cfg = config(root);
    await entry('6.1.0-test', id.toString('hex'), '/sys/kernel/kheaders.tar.xz');
    assert.equal(one(await runDoctor(cfg, { ...env, notesPath: notes }), 'current').status, 'ok');
    await entry('6.12.0-other', null, 'file:/tmp/kheaders-6.12.tar.xz');
    const other = one(await runDoctor(cfg, { ...env, notesPath: notes }), 'current');
    assert.equal(other.status, 'warn');
    assert.match(other.what, /current: 6\.12\.0-other .* is NOT the running kernel: it is 6\.12\.0-other; the running kernel is 6\.1\.0-test/);
    assert.match(other.fix ?? '', /remove "archive"\/"release"/);
    await entry('6.1.0-test', 'bb'.repeat(20), 'elf:/tmp/kheaders.ko');
    assert.match(one(await runDoctor(cfg, { ...env, notesPath: notes }), 'current').what, /NOT the running kernel: it is build bbbbbbbbbbbb of 6\.1\.0-test/);
    await entry('6.1.0-test', null, 'elf:/tmp/kheaders.ko');
    assert.match(one(await runDoctor(cfg, { ...env, notesPath: notes }), 'current').what, /not known to be the running kernel/);
  });

  it('the cache: refused when others can write it or another user owns it; low space is a warning', async () => {
    const { root, env } = await machine();
    const cache = path.join(root, 'cache');
    await mkdir(cache, { mode: 0o755 });
    await chmod(cache, 0o777);
    let c = one(await runDoctor(config(root), env), 'cache');
    assert.equal(c.status, 'fail');
    assert.match(c.what, /writable by everyone/);
    assert.match(c.fix ?? '', /chmod 755/);

    await chmod(cache, 0o755);
    c = one(await runDoctor(config(root), env), 'cache');
    assert.equal(c.status, 'ok');
    assert.match(c.what, /no current entry yet/);

    if (process.getuid?.() === 0) {
      await chown(cache, 4321, 4321);
      c = one(await runDoctor(config(root), env), 'cache');
      assert.equal(c.status, 'fail');
      assert.match(c.what, /owned by uid 4321/);
    }

    await writeFile(path.join(root, 'not-a-dir'), '');
    assert.equal(one(await runDoctor(config(root, { cacheDir: path.join(root, 'not-a-dir') }), env), 'cache').status, 'fail');
  });

  it('the cache: a current entry read from a module file changed after this boot is flagged', async () => {
    const { root, env } = await machine();
    const id = '6.1.0-test~' + 'a'.repeat(64);
    await mkdir(path.join(root, 'cache', 'entries', id), { recursive: true, mode: 0o755 });
    await chmod(path.join(root, 'cache'), 0o755);
    await writeFile(path.join(root, 'cache', 'current'), id);
    const manifest = (mtime: Date): string =>
      JSON.stringify({ id, release: '6.1.0-test', kind: 'headers', obtained: 'module-file', module: { file: '/system_dlkm/lib/modules/kheaders.ko', mtime: mtime.toISOString(), bootTime: BOOT.toISOString() } });
    await writeFile(path.join(root, 'cache', 'entries', id, 'manifest.json'), manifest(new Date(BOOT.getTime() - 1000)));
    assert.deepEqual(only(await runDoctor(config(root), env), 'cache').map((c) => c.status), ['ok']);
    await writeFile(path.join(root, 'cache', 'entries', id, 'manifest.json'), manifest(new Date(BOOT.getTime() + 1000)));
    const checks = only(await runDoctor(config(root), env), 'cache');
    assert.deepEqual(checks.map((c) => c.status), ['ok', 'warn']);
    assert.match(checks[1]!.what, /the current entry was read from \/system_dlkm\/lib\/modules\/kheaders\.ko changed at .* after this kernel booted/);
    // After a reboot (a later boot time) the same module is older than the boot: no warning.
    assert.deepEqual(only(await runDoctor(config(root), { ...env, bootTime: new Date(BOOT.getTime() + 60_000) }), 'cache').map((c) => c.status), ['ok']);
  });

  it('HTTP: a free port, one taken by another program, one taken by a running kheadersd, and off', async () => {
    const { root, env } = await machine();
    const port = await freePort();
    assert.match(one(await runDoctor(config(root, { http: `127.0.0.1:${port}` }), env), 'http').what, /is free/);

    const tcp = net.createServer((s) => s.destroy()).listen(0, '127.0.0.1');
    await once(tcp, 'listening');
    const busy = (tcp.address() as net.AddressInfo).port;
    try {
      const c = one(await runDoctor(config(root, { http: `127.0.0.1:${busy}` }), env), 'http');
      assert.equal(c.status, 'fail');
      assert.match(c.what, /used by another program/);
    } finally {
      tcp.close();
    }

    const web = http.createServer((req, res) => {
      res.statusCode = req.url === '/healthz' ? 200 : 404;
      res.end();
    });
    web.listen(0, '127.0.0.1');
    await once(web, 'listening');
    const ours = (web.address() as net.AddressInfo).port;
    try {
      const c = one(await runDoctor(config(root, { http: `127.0.0.1:${ours}` }), env), 'http');
      assert.equal(c.status, 'ok');
      assert.match(c.what, /kheadersd is already running/);
    } finally {
      web.close();
    }

    assert.match(one(await runDoctor(config(root, { http: 'off' }), env), 'http').what, /off/);
    const wide = only(await runDoctor(config(root, { http: `0.0.0.0:${await freePort()}` }), env), 'http');
    assert.ok(wide.some((c) => c.status === 'warn' && /without a token/.test(c.what)), JSON.stringify(wide));
  });

  it('the token file: missing, short, readable by others, good', async () => {
    const { root, env } = await machine();
    const token = path.join(root, 'token');
    assert.equal(one(await runDoctor(config(root, { tokenFile: token }), env), 'token').status, 'fail');
    await writeFile(token, 'short\n', { mode: 0o600 });
    assert.match(one(await runDoctor(config(root, { tokenFile: token }), env), 'token').what, /fewer than 16/);
    await writeFile(token, 'a'.repeat(64));
    await chmod(token, 0o644);
    // serve refuses such a file (the one token rule), so doctor says FAIL, not warn.
    assert.equal(one(await runDoctor(config(root, { tokenFile: token }), env), 'token').status, 'fail');
    await chmod(token, 0o600);
    assert.equal(one(await runDoctor(config(root, { tokenFile: token }), env), 'token').status, 'ok');
    assert.equal(only(await runDoctor(config(root), env), 'token').length, 0, 'no token file, no line');
  });

  it('FUSE: no /dev/fuse fails; mount off needs none; a missing backend piece is named', async () => {
    const { root, env } = await machine();
    const noDev = await runDoctor(config(root), { ...env, devFuse: path.join(root, 'no-fuse') });
    assert.equal(one(noDev, 'fuse-device').status, 'fail');
    assert.match(one(noDev, 'fuse-device').fix ?? '', /modprobe fuse/);

    const off = await runDoctor(config(root, { mount: 'off' }), { ...env, devFuse: path.join(root, 'no-fuse') });
    assert.match(one(off, 'fuse-device').what, /not used/);
    assert.equal(only(off, 'mount-point').length, 0);
    assert.equal(only(off, 'fuse-backend').length, 0);

    const noMount = await runDoctor(config(root), { ...env, path: path.join(root, 'empty') });
    assert.equal(one(noMount, 'fuse-backend').status, 'fail');

    // fuse-native from a directory with no node_modules: it cannot load.
    const native = await runDoctor(config(root, { fuseBackend: 'native' }), { ...env, packageRoot: root });
    const line = one(native, 'fuse-backend');
    assert.equal(line.status, 'fail');
    assert.match(line.what, /fuse-native does not load/);
    const auto = only(await runDoctor(config(root, { fuseBackend: 'auto' }), { ...env, packageRoot: root }), 'fuse-backend');
    assert.deepEqual(
      auto.map((c) => c.status),
      ['ok', 'warn'],
      'auto: the kernel backend works, the native one is only a warning',
    );
  });

  it('the mount point: absent, empty, not empty, a file, another filesystem, a live FUSE mount', async () => {
    const { root, env } = await machine();
    const mnt = path.join(root, 'mnt');
    await mkdir(mnt);
    assert.match(one(await runDoctor(config(root), env), 'mount-point').what, /an empty directory/);
    await writeFile(path.join(mnt, 'stray'), '');
    const full = one(await runDoctor(config(root), env), 'mount-point');
    assert.equal(full.status, 'fail');
    assert.match(full.what, /not empty \(1 entries\)/);

    const file = path.join(root, 'a-file');
    await writeFile(file, '');
    assert.equal(one(await runDoctor(config(root, { mount: file }), env), 'mount-point').status, 'fail');

    const other = path.join(root, 'other');
    await mkdir(other);
    await writeFile(env.mountinfo!, `36 35 98:0 / ${other} rw,noatime master:1 - ext4 /dev/sda1 rw\n`);
    assert.match(one(await runDoctor(config(root, { mount: other }), env), 'mount-point').what, /ext4 filesystem/);

    // A FUSE mount per mountinfo: probed by a stat in a child process; here it answers.
    await writeFile(env.mountinfo!, `36 35 0:52 / ${other} ro,nosuid,nodev - fuse.kheaders kheadersd ro,user_id=0\n`);
    const live = one(await runDoctor(config(root, { mount: other }), env), 'mount-point');
    assert.equal(live.status, 'ok');
    assert.match(live.what, /mounted \(fuse\.kheaders kheadersd\) and answering/);
  });

  it('the mount probe waits for a slow stat as long as KHEADERSD_DOCTOR_TIMEOUT allows', async () => {
    const { root, env } = await machine();
    const mnt = path.join(root, 'slow-mount');
    await mkdir(mnt);
    await writeFile(env.mountinfo!, `36 35 0:52 / ${mnt} ro,nosuid,nodev - fuse.kheaders kheadersd ro,user_id=0\n`);
    // A stat that answers after 3.3 s, like one through a healthy mount on a loaded emulator.
    const slowStat = path.join(root, 'slow-stat-node');
    await writeFile(slowStat, "#!/bin/sh\nprintf R\nsleep 3.3\nprintf ' ok'\n", { mode: 0o755 });
    assert.equal(mountProbeBudget(doctorTimeoutMs(undefined)).hangMs, 3000, 'the default hang budget is unchanged');
    // KHEADERSD_DOCTOR_TIMEOUT=20 gives the stat 4 s: answering.
    const patient = one(await runDoctor(config(root, { mount: mnt }), { ...env, probeNode: slowStat, timeoutMs: doctorTimeoutMs('20') }), 'mount-point');
    assert.equal(patient.status, 'ok', patient.what);
    // A short deadline (5 s: 1 s for the stat) still calls it hung.
    const hasty = one(await runDoctor(config(root, { mount: mnt }), { ...env, probeNode: slowStat }), 'mount-point');
    assert.equal(hasty.status, 'warn');
    assert.match(hasty.what, /does not answer/);
  });

  it('xz: without the binary, lzma-native is a warning; asked for by name, a failure', async () => {
    const { root, env } = await machine();
    const empty = path.join(root, 'nothing');
    const warn = one(await runDoctor(config(root), { ...env, path: empty }), 'xz');
    assert.equal(warn.status, 'warn');
    assert.match(warn.fix ?? '', /xz-utils/);
    assert.equal(one(await runDoctor(config(root, { decoder: 'xz' }), { ...env, path: empty }), 'xz').status, 'fail');
  });

  it('the mount probe: a child slow to start is not a hung mount; a stat that does not return is', async () => {
    const { root } = await machine();
    // A node that takes 1.5 s to start, like node on a slow or emulated machine.
    const slowNode = path.join(root, 'slow-node');
    await writeFile(slowNode, `#!/bin/sh\nsleep 1.5\nexec ${JSON.stringify(process.execPath)} "$@"\n`, { mode: 0o755 });
    assert.equal(await statInChild(root, { hangMs: 500, limitMs: 10_000 }, slowNode), 'ok');
    assert.equal(await statInChild(path.join(root, 'absent'), { hangMs: 500, limitMs: 10_000 }, slowNode), 'ENOENT');
    // One that is ready and then never answers, like a stat on a mount whose daemon hangs.
    const stuck = path.join(root, 'stuck-node');
    await writeFile(stuck, '#!/bin/sh\nprintf R\nexec sleep 30\n', { mode: 0o755 });
    const t0 = performance.now();
    assert.equal(await statInChild(root, { hangMs: 500, limitMs: 10_000 }, stuck), 'ETIMEDOUT');
    assert.ok(performance.now() - t0 < 5000, 'given up after the hang budget, not the whole deadline');
  });

  it('--json prints the same report as one object', async () => {
    const out = new Collect();
    const status = await cmdDoctor(resolveConfig({ flags: { http: 'off', mount: 'off', cacheDir: path.join(dir, 'json-cache') }, env: {}, file: {}, fileName: 'x' }), { stdout: out, stderr: out, log: createLogger('silent') }, { json: true });
    const report = JSON.parse(out.text) as DoctorReport;
    assert.equal(status, report.ok ? 0 : 5);
    assert.equal(report.counts.ok + report.counts.warn + report.counts.fail, report.checks.length);
    for (const c of report.checks) assert.ok(['ok', 'warn', 'fail'].includes(c.status));
  });
});

class Collect extends Writable {
  text = '';
  override _write(chunk: Buffer | string, _enc: BufferEncoding, cb: () => void): void {
    this.text += chunk.toString();
    cb();
  }
}
