/**
 * Packaging: the systemd unit (systemd-analyze verify, install-systemd into a temp root), the
 * example configuration, sd_notify, every shell script under shellcheck, android/install.sh
 * against a stand-in adb, android/kheadersd-ctl.sh on this host with a stand-in node, the
 * Dockerfile's promises, and scripts/container-build.sh (the Dockerfile's steps, run for real).
 */
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { KEYS, readConfigFile, resolveConfig } from '../src/config.js';
import { cmdInstallSystemd, cmdUninstallSystemd, renderUnit, systemdQuote } from '../src/commands/install.js';
import { createLogger } from '../src/log.js';
import { notifyReady, notifyReloading, notifyStopping, sdNotify } from '../src/serve/sd-notify.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const UNIT = path.join(ROOT, 'systemd', 'kheadersd.service');
const DROPIN = path.join(ROOT, 'systemd', 'http-only.conf');
const silent = createLogger('silent');

function which(cmd: string): string | null {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : null;
}

interface Ran {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run a command asynchronously (tests below serve HTTP from this process while it runs). */
function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number; input?: string } = {}): Promise<Ran> {
  return new Promise((resolve) => {
    const child = execFile(
      cmd,
      args,
      { env: opts.env ?? process.env, cwd: opts.cwd, timeout: opts.timeoutMs ?? 60_000, killSignal: 'SIGKILL', maxBuffer: 32 * 1024 * 1024 },
      (err, stdout, stderr) => {
        const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : null) : 0;
        resolve({ code, stdout, stderr });
      },
    );
    if (opts.input !== undefined) child.stdin?.end(opts.input);
  });
}

function capture(): { stream: Writable; text: () => string } {
  const chunks: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer | string, _enc, cb) {
      chunks.push(chunk.toString());
      cb();
    },
  });
  return { stream, text: () => chunks.join('') };
}

async function tmpdir(prefix: string): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), `kheadersd-${prefix}-`));
}

/** Parse a unit file into key -> values (a key may repeat), ignoring comments. */
function unitKeys(text: string): Map<string, string[]> {
  const keys = new Map<string, string[]>();
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';') || line.startsWith('[')) continue;
    const eq = line.indexOf('=');
    if (eq < 0) continue;
    const k = line.slice(0, eq);
    keys.set(k, [...(keys.get(k) ?? []), line.slice(eq + 1)]);
  }
  return keys;
}

// ---- systemd ------------------------------------------------------------------------------------

const analyze = which('systemd-analyze');

/** systemd-analyze verify on `unitText` (with an optional drop-in) in a temp search path. */
async function verifyUnit(unitText: string, dropinText?: string): Promise<Ran> {
  const dir = await tmpdir('verify');
  try {
    // verify checks that ExecStart's binary exists: point it at a stub.
    const stub = path.join(dir, 'kheadersd-stub');
    await writeFile(stub, '#!/bin/sh\nexit 0\n', { mode: 0o755 });
    await writeFile(path.join(dir, 'kheadersd.service'), unitText.replace(/^ExecStart=\/usr\/local\/bin\/kheadersd /m, `ExecStart=${stub} `));
    if (dropinText !== undefined) {
      await mkdir(path.join(dir, 'kheadersd.service.d'));
      await writeFile(path.join(dir, 'kheadersd.service.d', 'http-only.conf'), dropinText);
    }
    return await run(analyze!, ['verify', path.join(dir, 'kheadersd.service')], { env: { ...process.env, SYSTEMD_UNIT_PATH: `${dir}:` } });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

describe('systemd unit', () => {
  it('passes systemd-analyze verify with no complaint', { skip: analyze ? false : 'systemd-analyze is not installed (apt install systemd)' }, async () => {
    const r = await verifyUnit(await readFile(UNIT, 'utf8'));
    assert.equal(r.code, 0, r.stderr);
    assert.equal((r.stdout + r.stderr).trim(), '', 'verify printed warnings');
  });

  it('passes verify with the http-only drop-in', { skip: analyze ? false : 'systemd-analyze is not installed' }, async () => {
    const r = await verifyUnit(await readFile(UNIT, 'utf8'), await readFile(DROPIN, 'utf8'));
    assert.equal(r.code, 0, r.stderr);
    assert.equal((r.stdout + r.stderr).trim(), '');
  });

  it('verify would catch a mistake (the check is live)', { skip: analyze ? false : 'systemd-analyze is not installed' }, async () => {
    const r = await verifyUnit((await readFile(UNIT, 'utf8')).replace('[Service]', '[Service]\nProtectSytem=strict'), (await readFile(DROPIN, 'utf8')) + '\nBogusKey=1\n');
    assert.match(r.stdout + r.stderr, /ProtectSytem/);
    assert.match(r.stdout + r.stderr, /BogusKey/);
  });

  it('makes no private mount namespace, so the FUSE mount reaches the host', async () => {
    const keys = unitKeys(await readFile(UNIT, 'utf8'));
    // Each of these needs a mount namespace (systemd's exec_needs_mount_namespace()).
    for (const k of ['ProtectSystem', 'ProtectHome', 'PrivateTmp', 'PrivateDevices', 'ReadWritePaths', 'ReadOnlyPaths', 'InaccessiblePaths', 'BindPaths', 'TemporaryFileSystem', 'ProtectKernelTunables', 'ProtectKernelModules', 'ProtectKernelLogs', 'ProtectControlGroups', 'ProtectProc', 'ProcSubset', 'RootDirectory', 'DynamicUser', 'MountFlags']) {
      assert.equal(keys.has(k), false, `${k} would put the mount in a private namespace`);
    }
    assert.deepEqual(keys.get('PrivateMounts'), ['no']);
    assert.deepEqual(keys.get('Type'), ['notify']);
    assert.deepEqual(keys.get('NotifyAccess'), ['all']);
    assert.deepEqual(keys.get('CapabilityBoundingSet'), ['CAP_SYS_ADMIN CAP_SYS_MODULE']);
    assert.deepEqual(keys.get('NoNewPrivileges'), ['yes']);
    assert.deepEqual(keys.get('DeviceAllow'), ['/dev/fuse rw']);
    assert.deepEqual(keys.get('DevicePolicy'), ['closed']);
    assert.deepEqual(keys.get('CacheDirectory'), ['kheadersd']);
    assert.deepEqual(keys.get('Restart'), ['on-failure']);
    assert.deepEqual(keys.get('KillMode'), ['mixed']);
    assert.deepEqual(keys.get('ExecStart'), ['/usr/local/bin/kheadersd serve']);
    assert.match(keys.get('ExecReload')?.[0] ?? '', /kill -HUP \$MAINPID/);
    assert.deepEqual(keys.get('RestartPreventExitStatus'), ['2 3 4']);
    assert.equal(keys.has('RuntimeDirectory'), false, 'systemd would chown/remove the mount point, which fails on a dead FUSE mount');
  });

  it("sets V8's memory flags, the same as the Android service and the image, and node accepts them in NODE_OPTIONS", async () => {
    const env = unitKeys(await readFile(UNIT, 'utf8')).get('Environment') ?? [];
    const flags = /^"NODE_OPTIONS=([^"]+)"$/.exec(env.find((e) => e.includes('NODE_OPTIONS')) ?? '')?.[1];
    assert.ok(flags, `no Environment="NODE_OPTIONS=..." in the unit: ${env.join(', ')}`);
    const ctl = await readFile(path.join(ROOT, 'android', 'kheadersd-ctl.sh'), 'utf8');
    assert.ok(ctl.includes(`exec "$node" ${flags} "$APP/dist/app/cli.js" serve`), 'android/kheadersd-ctl.sh runs serve with other flags');
    const dockerfile = await readFile(path.join(ROOT, 'Dockerfile'), 'utf8');
    assert.ok(dockerfile.includes(`NODE_OPTIONS="${flags}"`), 'the Dockerfile sets other NODE_OPTIONS');
    // A flag node does not allow in NODE_OPTIONS makes every start fail (exit 9).
    const r = spawnSync(process.execPath, ['-e', '0'], { env: { ...process.env, NODE_OPTIONS: flags }, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
  });

  it("the unit's NODE_OPTIONS leave node its compiled code for its own modules (no V8 flag that voids the code cache)", async (t) => {
    // A V8 flag off its default (--max-semi-space-size=1 was one) makes node compile every builtin
    // a start loads from source: ~16% of a cached start. node's test-only binding says which way
    // each builtin was compiled.
    const env = unitKeys(await readFile(UNIT, 'utf8')).get('Environment') ?? [];
    const flags = /^"NODE_OPTIONS=([^"]+)"$/.exec(env.find((e) => e.includes('NODE_OPTIONS')) ?? '')?.[1] ?? '';
    const script = `
      let binding;
      try { binding = require('internal/test/binding').internalBinding('builtins'); } catch { process.stdout.write('no-binding'); process.exit(0); }
      for (const m of ['http', 'net', 'crypto', 'child_process', 'stream', 'zlib']) require(m);
      const usage = binding.getCacheUsage();
      process.stdout.write(JSON.stringify({ withCache: [...usage.compiledWithCache], withoutCache: [...usage.compiledWithoutCache] }));`;
    const r = spawnSync(process.execPath, ['--expose-internals', '--no-warnings', '-e', script], { env: { ...process.env, NODE_OPTIONS: flags }, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    if (r.stdout === 'no-binding') return t.skip(`node ${process.version} has no internal/test/binding to ask`);
    const usage = JSON.parse(r.stdout) as { withCache: string[]; withoutCache: string[] };
    assert.ok(usage.withCache.includes('_http_server'), `http was not compiled from node's code cache: ${r.stdout.slice(0, 300)}`);
    assert.deepEqual(usage.withoutCache, [], `NODE_OPTIONS=${flags} made node compile these builtins from source`);
    // The check can fail: the flag that used to be there does void the cache.
    const voided = spawnSync(process.execPath, ['--expose-internals', '--no-warnings', '-e', script], { env: { ...process.env, NODE_OPTIONS: `${flags} --max-semi-space-size=1` }, encoding: 'utf8' });
    assert.ok((JSON.parse(voided.stdout) as { withoutCache: string[] }).withoutCache.includes('_http_server'), voided.stdout.slice(0, 300));
  });

  it('the http-only drop-in turns the mount off and takes the sandbox', async () => {
    const keys = unitKeys(await readFile(DROPIN, 'utf8'));
    assert.deepEqual(keys.get('Environment'), ['KHEADERSD_MOUNT=off']);
    assert.deepEqual(keys.get('ProtectSystem'), ['strict']);
    assert.deepEqual(keys.get('CapabilityBoundingSet'), ['~CAP_SYS_ADMIN']);
    assert.equal(keys.has('ProtectKernelModules'), false, 'modprobe kheaders still has to work');
  });

  it('quotes ExecStart words the way systemd parses them', () => {
    assert.equal(systemdQuote('/usr/bin/node'), '/usr/bin/node');
    assert.equal(systemdQuote('/opt/my node/bin/node'), '"/opt/my node/bin/node"');
    assert.equal(systemdQuote('/a%b$c'), '/a%%b$$c');
    assert.equal(systemdQuote('/x"y'), '"/x\\"y"');
    const unit = renderUnit('[Service]\nExecStart=/usr/local/bin/kheadersd serve\n', ['/opt/n de/node', '/p/cli.js']);
    assert.match(unit, /^ExecStart="\/opt\/n de\/node" \/p\/cli\.js serve$/m);
    assert.match(unit, /^# Installed by kheadersd install-systemd/);
  });
});

describe('install-systemd', () => {
  let dir: string;
  before(async () => {
    dir = await tmpdir('install');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('renders, verifies and installs the unit and the default config; reinstall is idempotent; uninstall removes only its files', async () => {
    const unitDir = path.join(dir, 'units');
    const configDir = path.join(dir, 'etc');
    const out = capture();
    const err = capture();
    const io = { stdout: out.stream, stderr: err.stream };

    assert.equal(await cmdInstallSystemd(io, { unitDir, configDir }), 0, err.text());
    const unitText = await readFile(path.join(unitDir, 'kheadersd.service'), 'utf8');
    // The CLI package.json's "bin" names (the bundle), found from install.js in dist/src.
    const cli = path.join(ROOT, 'dist', 'app', 'cli.js');
    assert.ok(unitText.includes(`ExecStart=${systemdQuote(process.execPath)} ${systemdQuote(cli)} serve`), unitText.split('\n').find((l) => l.startsWith('ExecStart')));
    assert.equal((await stat(path.join(unitDir, 'kheadersd.service'))).mode & 0o777, 0o644);
    assert.deepEqual(JSON.parse(await readFile(path.join(configDir, 'config.json'), 'utf8')), JSON.parse(await readFile(path.join(ROOT, 'systemd', 'config.example.json'), 'utf8')));
    assert.match(out.text(), /not running systemctl/);
    if (analyze) assert.match(out.text(), /unit verified/);

    // The installed file itself (real node, real cli.js) verifies.
    if (analyze) {
      const r = await run(analyze, ['verify', path.join(unitDir, 'kheadersd.service')], { env: { ...process.env, SYSTEMD_UNIT_PATH: `${unitDir}:` } });
      assert.equal(r.code, 0, r.stderr);
      assert.equal((r.stdout + r.stderr).trim(), '');
    }

    // A user's edited config is kept; --http-only adds the drop-in; without it, it goes again.
    await writeFile(path.join(configDir, 'config.json'), '{"keep": 5}\n');
    assert.equal(await cmdInstallSystemd(io, { unitDir, configDir, httpOnly: true }), 0, err.text());
    assert.equal(await readFile(path.join(configDir, 'config.json'), 'utf8'), '{"keep": 5}\n');
    const dropin = path.join(unitDir, 'kheadersd.service.d', 'http-only.conf');
    assert.match(await readFile(dropin, 'utf8'), /KHEADERSD_MOUNT=off/);
    assert.equal(await cmdInstallSystemd(io, { unitDir, configDir }), 0, err.text());
    await assert.rejects(stat(dropin), { code: 'ENOENT' });

    assert.equal(await cmdUninstallSystemd(io, { unitDir }), 0, err.text());
    assert.deepEqual(await readdir(unitDir), []);
  });

  it('refuses to install over a broken configuration, and says which key', async () => {
    const unitDir = path.join(dir, 'units2');
    const configDir = path.join(dir, 'etc2');
    await mkdir(configDir, { recursive: true });
    await writeFile(path.join(configDir, 'config.json'), '{"http": "nowhere"}');
    const err = capture();
    const status = await cmdInstallSystemd({ stdout: capture().stream, stderr: err.stream }, { unitDir, configDir });
    assert.equal(status, 2);
    assert.match(err.text(), /FAIL {2}configuration: .*http/);
    await assert.rejects(stat(path.join(unitDir, 'kheadersd.service')), { code: 'ENOENT' });
  });

  it('--dry-run prints the unit and writes nothing; uninstall leaves a unit it did not write', async () => {
    const unitDir = path.join(dir, 'units3');
    const out = capture();
    assert.equal(await cmdInstallSystemd({ stdout: out.stream, stderr: capture().stream }, { unitDir, configDir: path.join(dir, 'etc3'), dryRun: true, httpOnly: true }), 0);
    assert.match(out.text(), /ExecStart=.*cli\.js serve/);
    assert.match(out.text(), /http-only\.conf/);
    await assert.rejects(stat(unitDir), { code: 'ENOENT' });

    await mkdir(unitDir);
    await writeFile(path.join(unitDir, 'kheadersd.service'), '[Service]\nExecStart=/bin/true\n');
    const err = capture();
    assert.equal(await cmdUninstallSystemd({ stdout: capture().stream, stderr: err.stream }, { unitDir }), 2);
    assert.match(err.text(), /not written by kheadersd install-systemd/);
    await stat(path.join(unitDir, 'kheadersd.service'));
  });
});

describe('configuration example', () => {
  it('parses, uses only known keys, and matches the defaults', async () => {
    const file = path.join(ROOT, 'systemd', 'config.example.json');
    const json = await readConfigFile(file, true);
    for (const key of Object.keys(json)) assert.ok(key in KEYS, key);
    const fromExample = resolveConfig({ flags: {}, env: {}, file: json, fileName: file });
    const defaults = resolveConfig({ flags: {}, env: {}, file: {}, fileName: 'none' });
    // The values, that is: where each came from (the file, or the default) differs by design.
    assert.deepEqual({ ...fromExample, origins: {} }, { ...defaults, origins: {} }, 'installing the example must change nothing');
    // The precedence the unit's comments promise: a variable beats the file.
    const overridden = resolveConfig({ flags: {}, env: { KHEADERSD_MOUNT: 'off' }, file: json, fileName: file });
    assert.equal(overridden.mount, null);
  });
});

// ---- sd_notify ----------------------------------------------------------------------------------

describe('sd-notify', () => {
  let dir: string;
  before(async () => {
    dir = await tmpdir('notify');
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('is a no-op without NOTIFY_SOCKET', async () => {
    assert.equal(await sdNotify({ READY: '1' }, silent, { socket: undefined, binary: '/nonexistent' }), false);
    const saved = process.env.NOTIFY_SOCKET;
    delete process.env.NOTIFY_SOCKET;
    try {
      await notifyReady(silent);
      await notifyStopping(silent);
    } finally {
      if (saved !== undefined) process.env.NOTIFY_SOCKET = saved;
    }
  });

  it('runs the sender with KEY=VALUE arguments and the socket in its environment', async () => {
    const record = path.join(dir, 'calls');
    const fake = path.join(dir, 'fake-systemd-notify');
    await writeFile(fake, `#!/bin/sh\nprintf '%s|%s\\n' "$NOTIFY_SOCKET" "$*" >> ${JSON.stringify(record)}\n`, { mode: 0o755 });
    const opts = { socket: '/run/fake/notify', binary: fake };
    await notifyReady(silent, 'serving 6.1.0', opts);
    await notifyStopping(silent, opts);
    await notifyReloading(silent, opts);
    const lines = (await readFile(record, 'utf8')).trim().split('\n');
    assert.equal(lines[0], '/run/fake/notify|READY=1 STATUS=serving 6.1.0');
    assert.match(lines[1]!, /^\/run\/fake\/notify\|STOPPING=1 STATUS=/);
    assert.match(lines[2]!, /^\/run\/fake\/notify\|RELOADING=1 MONOTONIC_USEC=\d+ STATUS=/);
    assert.equal(await sdNotify({ STATUS: 'two\nlines' }, silent, opts), false, 'a newline would inject a field');
    assert.equal((await readFile(record, 'utf8')).trim().split('\n').length, 3);
  });

  it('logs and resolves when the sender is missing or fails', async () => {
    const log = capture();
    const logger = createLogger('warn', log.stream);
    assert.equal(await sdNotify({ READY: '1' }, logger, { socket: '/x', binary: path.join(dir, 'missing') }), false);
    assert.match(log.text(), /is not installed/);
  });

  const python = which('python3');
  const realNotify = which('systemd-notify');
  it(
    'reaches a real notify socket through systemd-notify, with the barrier and (as root) the daemon\'s PID',
    { skip: !python || !realNotify ? 'needs python3 (a stand-in for PID 1\'s socket) and systemd-notify' : false },
    async () => {
      const socket = path.join(dir, 'notify.sock');
      const received = path.join(dir, 'received.jsonl');
      // A minimal receiver: SO_PASSCRED for the sender's PID; closes the BARRIER=1 fd, as PID 1 does.
      const receiver = `
import array, json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
s.settimeout(30)
print("listening", flush=True)
out = open(sys.argv[2], "a")
while True:
    try:
        msg, anc, flags, addr = s.recvmsg(4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(64))
    except socket.timeout:
        break
    pid = None
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
            pid = struct.unpack("iII", data[:12])[0]
        elif level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                os.close(fd)
    out.write(json.dumps({"pid": pid, "msg": msg.decode()}) + "\\n")
    out.flush()
`;
      const child = spawn(python!, ['-c', receiver, socket, received], { stdio: ['ignore', 'pipe', 'inherit'] });
      try {
        await once(child.stdout, 'data');
        const t0 = Date.now();
        assert.equal(await sdNotify({ READY: '1', STATUS: 'serving' }, silent, { socket }), true);
        assert.ok(Date.now() - t0 < 5000, 'the barrier was answered');
        const msgs = (await readFile(received, 'utf8'))
          .trim()
          .split('\n')
          .map((l) => JSON.parse(l) as { pid: number | null; msg: string });
        const ready = msgs.find((m) => m.msg.includes('READY=1'));
        assert.ok(ready, JSON.stringify(msgs));
        assert.match(ready.msg, /STATUS=serving/);
        assert.ok(!ready.msg.includes('MAINPID='), 'no --pid: it must not move the main PID');
        assert.ok(msgs.some((m) => m.msg.includes('BARRIER=1')), 'systemd-notify waits for a barrier');
        // With CAP_SYS_ADMIN, systemd-notify sends as its parent: this process, the main PID.
        if (process.getuid?.() === 0) assert.equal(ready.pid, process.pid);
      } finally {
        child.kill('SIGKILL');
      }
    },
  );
});

// ---- shell scripts ------------------------------------------------------------------------------

const shellcheck = which('shellcheck');
const OUR_SCRIPTS = ['android/install.sh', 'android/kheadersd-ctl.sh', 'scripts/container-build.sh'];

async function shellScripts(): Promise<string[]> {
  const found: string[] = [];
  const walk = async (rel: string): Promise<void> => {
    for (const e of await readdir(path.join(ROOT, rel), { withFileTypes: true })) {
      const p = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) {
        if (!['node_modules', 'dist', '.git'].includes(e.name)) await walk(p);
      } else if (e.isFile()) {
        const head = (await readFile(path.join(ROOT, p), 'utf8').catch(() => '')).slice(0, 64);
        if (/^#!\s*\S*\b(ba)?sh\b/.test(head) || /^#!\/usr\/bin\/env (ba)?sh\b/.test(head)) found.push(p);
      }
    }
  };
  await walk('');
  return found.sort();
}

describe('shell scripts', () => {
  it('shellcheck passes on the packaging scripts', { skip: shellcheck ? false : 'shellcheck is not installed (apt install shellcheck)' }, async () => {
    const r = await run(shellcheck!, OUR_SCRIPTS.map((s) => path.join(ROOT, s)));
    assert.equal(r.code, 0, r.stdout + r.stderr);
  });

  it('shellcheck passes on every other shell script in the tree', { skip: shellcheck ? false : 'shellcheck is not installed' }, async (t) => {
    const others = (await shellScripts()).filter((s) => !OUR_SCRIPTS.includes(s));
    if (others.length === 0) return t.skip('no shell scripts besides the packaging ones');
    const r = await run(shellcheck!, others.map((s) => path.join(ROOT, s)));
    assert.equal(r.code, 0, r.stdout + r.stderr);
  });
});

// ---- android/install.sh with a stand-in adb ------------------------------------------------------

const FAKE_ADB = `#!/usr/bin/env node
// A stand-in for adb: answers what android/install.sh asks, as FAKE_ADB_* variables say.
const fs = require('fs');
const env = process.env;
let args = process.argv.slice(2);
fs.appendFileSync(env.FAKE_ADB_LOG, JSON.stringify(args) + '\\n');
if (args[0] === '-s') args = args.slice(2);
const out = (s) => process.stdout.write(s);
const root = env.FAKE_ADB_ROOT || 'su'; // adbd | su | su0 | none
if (args[0] === 'devices') {
  out('List of devices attached\\n');
  for (const d of (env.FAKE_ADB_DEVICES ?? 'FAKE01 device').split(',').filter(Boolean)) out(d.replace(' ', '\\t') + '\\n');
  out('\\n');
  process.exit(0);
}
if (args[0] === 'push') {
  if (env.FAKE_ADB_PUSH_FAIL) { process.stderr.write('adb: error: failed to copy: No space left on device\\n'); process.exit(1); }
  out(args[1] + ': 42 files pushed, 0 skipped. 3.1 MB/s\\n');
  process.exit(0);
}
if (args[0] === 'forward') process.exit(env.FAKE_ADB_FORWARD_FAIL ? 1 : 0);
if (args[0] !== 'shell') { process.stderr.write('fake adb: unknown command ' + args[0] + '\\n'); process.exit(1); }
let cmd = args.slice(1).join(' ');
const marker = cmd.endsWith('; echo __KHEADERSD_RC=$?');
if (marker) cmd = cmd.slice(0, -'; echo __KHEADERSD_RC=$?'.length);
const finish = (text, rc) => { if (text) out(text + '\\n'); if (marker) out('__KHEADERSD_RC=' + rc + '\\n'); process.exit(0); };
let asRoot = root === 'adbd';
let m = /^su -c '(.*)'$/.exec(cmd);
if (m) { if (root !== 'su') finish('su: invalid option -- c', 1); asRoot = true; cmd = m[1]; }
m = /^su 0 sh -c '(.*)'$/.exec(cmd);
if (m) { if (root !== 'su0') finish('/system/bin/sh: su: inaccessible or not found', 127); asRoot = true; cmd = m[1]; }
if (cmd === 'getprop ro.product.cpu.abi') finish(env.FAKE_ADB_ABI || 'arm64-v8a', 0);
if (cmd === 'getprop ro.build.version.release') finish('14', 0);
if (cmd === 'id -u') finish(asRoot ? '0' : '2000', 0);
if (cmd.startsWith('test -x /data/data/com.termux/')) finish('', asRoot && env.FAKE_ADB_TERMUX ? 0 : 1);
if (cmd.endsWith(' --version')) finish('v22.9.0', 0);
if (cmd.startsWith('command -v xzcat')) finish('/system/bin/xzcat', 0);
if (cmd === 'test -d /data/adb/service.d') finish('', env.FAKE_ADB_SERVICED ? 0 : 1);
if (cmd.startsWith('rm -rf /data/local/tmp/')) finish('', 0);
if (cmd.startsWith('test -x /data/local/kheadersd/app/bin/kheadersd-ctl')) finish('', env.FAKE_ADB_INSTALLED ? 0 : 1);
if (/kheadersd-ctl install-boot /.test(cmd)) finish('kheadersd-ctl: boot: ' + cmd.split(' ').pop(), 0);
if (/kheadersd-ctl install /.test(cmd)) {
  if (!asRoot) finish('kheadersd-ctl: run as root', 1);
  if (env.FAKE_ADB_INSTALL_FAIL) finish('kheadersd-ctl: node (/x/node) does not run on this device: not found', 1);
  finish('kheadersd-ctl: installed in /data/local/kheadersd/app', 0);
}
if (/kheadersd-ctl restart$/.test(cmd)) finish('kheadersd-ctl: started (pid 4242)', 0);
if (/kheadersd-ctl status$/.test(cmd)) finish('kheadersd-ctl: not running', 0);
if (/kheadersd-ctl uninstall/.test(cmd)) finish('kheadersd-ctl: removed /data/local/kheadersd/app', 0);
finish('fake adb: unexpected command: ' + cmd, 99);
`;

describe('android/install.sh', () => {
  const script = path.join(ROOT, 'android', 'install.sh');
  let dir: string;
  let bin: string;
  let bundle: string;
  let log: string;

  before(async () => {
    dir = await tmpdir('android');
    bin = path.join(dir, 'bin');
    bundle = path.join(dir, 'bundle');
    log = path.join(dir, 'adb.log');
    await mkdir(bin);
    await writeFile(path.join(bin, 'adb'), FAKE_ADB, { mode: 0o755 });
    await mkdir(path.join(bundle, 'dist', 'app'), { recursive: true });
    await mkdir(path.join(bundle, 'bin'));
    await writeFile(path.join(bundle, 'dist', 'app', 'cli.js'), '// stand-in\n');
    await writeFile(path.join(bundle, 'bin', 'kheadersd-ctl'), '#!/system/bin/sh\n', { mode: 0o755 });
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const install = async (args: string[], fake: Record<string, string> = {}): Promise<Ran> => {
    await writeFile(log, '');
    return run('bash', [script, ...args], {
      env: { ...process.env, PATH: `${bin}:${process.env.PATH ?? ''}`, FAKE_ADB_LOG: log, KHEADERSD_INSTALL_WAIT: '2', ANDROID_SERIAL: '', ...fake },
      timeoutMs: 60_000,
    });
  };
  const adbCalls = async (): Promise<string[][]> =>
    (await readFile(log, 'utf8'))
      .trim()
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as string[]);

  it('refuses bad arguments with exit 2 and says which', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['--bogus'], /unknown argument: --bogus/],
      [['--boot', 'grub'], /--boot takes auto, rc, service\.d or none/],
      [['--port', '99999'], /--port takes a port number/],
      [['--port'], /--port needs a value/],
      [['--node', '/a', '--device-node', '/b'], /exclude each other/],
      [['--purge'], /--purge goes with --uninstall/],
      [['--device-node', "/data/x'; reboot"], /--device-node must be an absolute path/],
    ];
    for (const [args, message] of cases) {
      const r = await install(args);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, message);
    }
    const help = await install(['--help']);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /--device-node PATH/);
  });

  it('names the step and the fix when there is no device, several, or an unauthorized one', async () => {
    let r = await install(['--bundle', bundle], { FAKE_ADB_DEVICES: '' });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /step \d+ \(device\) failed: no device attached/);
    assert.match(r.stderr, /to fix: connect the device by USB/);

    r = await install(['--bundle', bundle], { FAKE_ADB_DEVICES: 'AAA device,BBB device' });
    assert.match(r.stderr, /step \d+ \(device\) failed: 2 devices attached \(AAA,BBB\)/);
    assert.match(r.stderr, /--serial/);

    r = await install(['--bundle', bundle, '--serial', 'BBB'], { FAKE_ADB_DEVICES: 'AAA device,BBB unauthorized' });
    assert.match(r.stderr, /device BBB is unauthorized/);

    r = await install(['--bundle', bundle, '--serial', 'CCC'], { FAKE_ADB_DEVICES: 'AAA device' });
    assert.match(r.stderr, /no device CCC/);
  });

  it('fails at "root" on an unrooted device, and at "node on the device" without Termux or --node', async () => {
    let r = await install(['--bundle', bundle], { FAKE_ADB_ROOT: 'none' });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /step \d+ \(root\) failed: no root on FAKE01/);
    assert.match(r.stderr, /Magisk/);

    r = await install(['--bundle', bundle]);
    assert.match(r.stderr, /step \d+ \(node on the device\) failed: no Node\.js for the device/);
    assert.match(r.stderr, /pkg install nodejs/);
  });

  it('refuses a --node that cannot run on Android: glibc, not ELF, other ABI', async () => {
    let r = await install(['--bundle', bundle, '--node', process.execPath]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /step 2 \(node binary\) failed: .* is a glibc build/);

    const text = path.join(dir, 'not-elf');
    await writeFile(text, '#!/bin/sh\n');
    r = await install(['--bundle', bundle, '--node', text]);
    assert.match(r.stderr, /is not an ELF executable/);

    // An ELF header for x86-64 (machine 0x3e) with no glibc interpreter, for an arm64 device.
    const elf = Buffer.alloc(64);
    Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]).copy(elf);
    elf.writeUInt16LE(0x3e, 18);
    await writeFile(path.join(dir, 'x86-node'), elf, { mode: 0o755 });
    r = await install(['--bundle', bundle, '--node', path.join(dir, 'x86-node')], { FAKE_ADB_TERMUX: '1' });
    assert.match(r.stderr, /built for ELF machine 3e00, the device is arm64-v8a/);
  });

  it('names the push step when adb push fails', async () => {
    const r = await install(['--bundle', bundle], { FAKE_ADB_TERMUX: '1', FAKE_ADB_PUSH_FAIL: '1' });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /step \d+ \(push\) failed: adb push to \/data\/local\/tmp\/kheadersd-bundle: adb: error: failed to copy: No space left on device/);
    assert.match(r.stderr, /df -h \/data/);
  });

  it('passes the device-side failure through at "install"', async () => {
    const r = await install(['--bundle', bundle], { FAKE_ADB_TERMUX: '1', FAKE_ADB_INSTALL_FAIL: '1' });
    assert.match(r.stderr, /step \d+ \(install\) failed: kheadersd-ctl: node \(\/x\/node\) does not run on this device/);
  });

  it('installs, hooks boot, starts, forwards and waits for /healthz', async () => {
    const server = http.createServer((req, res) => {
      res.statusCode = req.url === '/healthz' ? 200 : 404;
      res.end('ok');
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const port = (server.address() as net.AddressInfo).port;
    try {
      const r = await install(['--bundle', bundle, '--port', String(port)], { FAKE_ADB_TERMUX: '1', FAKE_ADB_SERVICED: '1' });
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.match(r.stdout, /kheadersd is installed on FAKE01 \(boot: service\.d\)/);
      assert.match(r.stdout, /kheadersd pull/);
      const calls = await adbCalls();
      const shell = calls.filter((c) => c.includes('shell')).map((c) => c[c.length - 1]!);
      assert.ok(calls.some((c) => c.includes('push') && c.at(-1) === '/data/local/tmp/kheadersd-bundle'));
      assert.ok(shell.some((s) => s.includes("su -c '/system/bin/sh /data/local/tmp/kheadersd-bundle/bin/kheadersd-ctl install /data/local/tmp/kheadersd-bundle /data/data/com.termux/files/usr/bin/node 7711'")), shell.join('\n'));
      assert.ok(shell.some((s) => s.includes('kheadersd-ctl install-boot service.d')));
      assert.ok(shell.some((s) => s.includes('kheadersd-ctl restart')));
      assert.ok(calls.some((c) => c.join(' ') === `-s FAKE01 forward tcp:${port} tcp:7711`), JSON.stringify(calls));
    } finally {
      server.close();
    }
  });

  it('names the health step when /healthz never answers', async () => {
    const port = await freePort();
    const r = await install(['--bundle', bundle, '--port', String(port), '--boot', 'none'], { FAKE_ADB_TERMUX: '1' });
    assert.equal(r.code, 1);
    assert.match(r.stderr, new RegExp(`step \\d+ \\(health\\) failed: http://127\\.0\\.0\\.1:${port}/healthz did not answer`));
    assert.match(r.stderr, /kheadersd-ctl: not running/);
  });

  it('--boot rc needs adbd as root', async () => {
    const r = await install(['--bundle', bundle, '--boot', 'rc', '--no-start'], { FAKE_ADB_TERMUX: '1' });
    assert.match(r.stderr, /step \d+ \(boot\) failed: --boot rc writes \/system\/etc\/init/);
    assert.match(r.stderr, /adb root && adb remount/);
    const ok = await install(['--bundle', bundle, '--boot', 'rc', '--no-start'], { FAKE_ADB_TERMUX: '1', FAKE_ADB_ROOT: 'adbd' });
    assert.equal(ok.code, 0, ok.stderr);
  });

  it('uninstalls (and says so when there is nothing to uninstall)', async () => {
    let r = await install(['--uninstall', '--purge'], { FAKE_ADB_INSTALLED: '1' });
    assert.equal(r.code, 0, r.stderr);
    const shell = (await adbCalls()).map((c) => c.join(' '));
    assert.ok(shell.some((s) => s.includes('kheadersd-ctl uninstall --purge')));
    assert.ok(shell.some((s) => s.includes('forward --remove tcp:7711')));
    r = await install(['--uninstall']);
    assert.match(r.stderr, /step \d+ \(uninstall\) failed: kheadersd is not installed/);
  });

  it('fails at "host tools" without adb', { skip: which('adb') ? 'a real adb is on PATH' : false }, async () => {
    const r = await run('bash', [script, '--bundle', bundle], { env: { ...process.env, FAKE_ADB_LOG: log } });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /step 1 \(host tools\) failed: adb is not installed/);
  });
});

async function freePort(): Promise<number> {
  const s = net.createServer();
  s.listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

// ---- android/kheadersd-ctl.sh on this host ------------------------------------------------------

describe('android/kheadersd-ctl.sh', () => {
  const isRoot = process.getuid?.() === 0;
  it('installs, starts (supervised), restarts after a crash, stops with SIGTERM, uninstalls', { skip: isRoot ? false : 'needs root (the script chowns to root)' }, async () => {
    const dir = await tmpdir('ctl');
    const base = path.join(dir, 'kheadersd-base');
    const env = { ...process.env, KHEADERSD_BASE: base, KHEADERSD_SH: '/bin/sh', KHEADERSD_SERVICE_D: path.join(dir, 'service.d'), KHEADERSD_RC_FILE: path.join(dir, 'kheadersd.rc') };
    const ctl = (...args: string[]): Promise<Ran> => run('sh', [path.join(base, 'app', 'bin', 'kheadersd-ctl'), ...args], { env, timeoutMs: 30_000 });
    try {
      const src = path.join(dir, 'bundle');
      await mkdir(path.join(src, 'dist', 'app'), { recursive: true });
      await mkdir(path.join(src, 'bin'));
      await mkdir(path.join(src, 'etc'));
      await writeFile(path.join(src, 'dist', 'app', 'cli.js'), '// stand-in\n');
      await writeFile(path.join(src, 'bin', 'kheadersd-ctl'), await readFile(path.join(ROOT, 'android', 'kheadersd-ctl.sh')));
      await writeFile(path.join(src, 'etc', 'kheadersd.rc'), await readFile(path.join(ROOT, 'android', 'kheadersd.rc')));
      // A stand-in node: says its version, "serves" until SIGTERM, then exits 0 like the daemon.
      const node = path.join(dir, 'node');
      await writeFile(node, '#!/bin/sh\n[ "$1" = --version ] && { echo v22.0.0-test; exit 0; }\ntrap \'echo "SIGTERM: unmounted"; exit 0\' TERM\necho "serving $*"\nwhile :; do sleep 0.1; done\n', { mode: 0o755 });
      await mkdir(path.join(dir, 'service.d'));

      const inst = await run('sh', [path.join(src, 'bin', 'kheadersd-ctl'), 'install', src, node, '7799'], { env });
      assert.equal(inst.code, 0, inst.stderr);
      assert.match(inst.stdout, /installed in .*app \(node .* v22\.0\.0-test\)/);
      const cfg = resolveConfig({ flags: {}, env: {}, file: await readConfigFile(path.join(base, 'config.json'), true), fileName: 'config.json' });
      assert.equal(cfg.mount, path.join(base, 'mnt'));
      assert.deepEqual(cfg.http, { host: '127.0.0.1', port: 7799 });
      assert.equal(cfg.fuseBackend, 'kernel');
      assert.equal((await stat(base)).mode & 0o777, 0o755);

      const boot = await ctl('install-boot', 'service.d');
      assert.equal(boot.code, 0, boot.stderr);
      assert.match(await readFile(path.join(dir, 'service.d', 'kheadersd.sh'), 'utf8'), /kheadersd-ctl start/);

      const started = await ctl('start');
      assert.equal(started.code, 0, started.stderr);
      const pid1 = Number(/pid (\d+)/.exec(started.stdout)?.[1]);
      assert.ok(pid1 > 0);
      assert.match((await ctl('start')).stdout, /already running/);

      process.kill(pid1, 'SIGKILL'); // a crash: the supervisor restarts it after 5 s
      let pid2 = 0;
      for (let i = 0; i < 40 && !(pid2 > 0 && pid2 !== pid1); i++) {
        await new Promise((r) => setTimeout(r, 250));
        pid2 = Number((/running \(pid (\d+)\)/.exec((await ctl('status')).stdout) ?? [])[1] ?? 0);
      }
      assert.ok(pid2 > 0 && pid2 !== pid1, 'restarted after the crash');

      const stopped = await ctl('stop');
      assert.equal(stopped.code, 0, stopped.stderr);
      assert.match(await readFile(path.join(base, 'kheadersd.log'), 'utf8'), /SIGTERM: unmounted/);
      await new Promise((r) => setTimeout(r, 6000)); // longer than the supervisor's restart delay
      assert.match((await ctl('status')).stdout, /not running/);

      const un = await ctl('uninstall', '--purge');
      assert.equal(un.code, 0, un.stderr);
      await assert.rejects(stat(base), { code: 'ENOENT' });
      await assert.rejects(stat(path.join(dir, 'service.d', 'kheadersd.sh')), { code: 'ENOENT' });
    } finally {
      // Never leave a supervisor restarting the stand-in behind a failed assertion.
      await ctl('stop').catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
    }
  });
});

// ---- the container --------------------------------------------------------------------------------

describe('what ships', () => {
  const bin = (): Promise<string> => readFile(path.join(ROOT, 'package.json'), 'utf8').then((t) => (JSON.parse(t) as { bin: { kheadersd: string } }).bin.kheadersd);

  it('every launcher runs the CLI that package.json\'s "bin" names (the bundle)', async () => {
    const cli = await bin();
    assert.equal(cli, 'dist/app/cli.js');
    for (const file of ['Dockerfile', 'scripts/container-build.sh', 'scripts/arm64-test.sh', 'android/install.sh', 'android/kheadersd-ctl.sh']) {
      const text = await readFile(path.join(ROOT, file), 'utf8');
      assert.ok(text.includes(cli), `${file} does not run ${cli}`);
      assert.doesNotMatch(text, /dist\/src/, `${file} still names tsc's unbundled output`);
    }
  });

  it('npm packs the bundle with every entry point, and not tsc\'s output', { timeout: 120_000 }, async () => {
    const r = await run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: ROOT, timeoutMs: 120_000 });
    assert.equal(r.code, 0, r.stderr);
    const files = (JSON.parse(r.stdout) as Array<{ files: Array<{ path: string }> }>)[0]!.files.map((f) => f.path);
    for (const f of [await bin(), 'dist/app/core.js', 'dist/app/commands.js', 'dist/app/package.json', 'dist/app/ingest-process-main.js', 'dist/app/io-worker.js', 'dist/app/vmlinux-worker.js', 'systemd/kheadersd.service']) assert.ok(files.includes(f), `the package lacks ${f}`);
    assert.deepEqual(files.filter((f) => f.startsWith('dist/') && !f.startsWith('dist/app/')), []);
  });
});

describe('Dockerfile', () => {
  it('builds on node:22-bookworm-slim in two stages, runs as non-root, exposes 7711 with a healthcheck', async () => {
    const text = (await readFile(path.join(ROOT, 'Dockerfile'), 'utf8')).replace(/\\\n\s*/g, ' ');
    assert.match(text, /^ARG NODE_IMAGE=node:22-bookworm-slim$/m);
    assert.match(text, /^FROM \$\{NODE_IMAGE\} AS build$/m);
    assert.match(text, /^FROM \$\{NODE_IMAGE\} AS runtime$/m);
    assert.match(text, /apt-get install -y --no-install-recommends libfuse2 fuse xz-utils/);
    assert.match(text, /^USER node$/m);
    assert.match(text, /^EXPOSE 7711$/m);
    assert.match(text, /^HEALTHCHECK .*CMD \["node", "-e", ".*fetch\(.*\/healthz/m);
    assert.match(text, /KHEADERSD_MOUNT=off/);
    assert.match(text, /KHEADERSD_HTTP=0\.0\.0\.0:7711/);
    assert.match(text, /bind-propagation=rshared/);
    assert.match(text, /--device \/dev\/fuse --cap-add SYS_ADMIN/);
    assert.match(await readFile(path.join(ROOT, '.dockerignore'), 'utf8'), /^node_modules$/m);
  });

  it('and scripts/container-build.sh run the same npm steps', async () => {
    // Commands, not messages: a step starts a RUN line or follows `&&`.
    const npmSteps = (text: string): string[] => [...text.matchAll(/(?:^RUN |&& )(npm (?:ci|run build)[^)&|;\n"]*)/gm)].map((m) => m[1]!.trim());
    const docker = npmSteps((await readFile(path.join(ROOT, 'Dockerfile'), 'utf8')).split('\n').filter((l) => l.startsWith('RUN')).join('\n'));
    const script = npmSteps((await readFile(path.join(ROOT, 'scripts', 'container-build.sh'), 'utf8')).split('\n').filter((l) => !l.trim().startsWith('#')).join('\n'));
    assert.deepEqual(docker, ['npm ci --ignore-scripts --no-audit --no-fund', 'npm run build', 'npm ci --omit=dev --ignore-scripts --no-audit --no-fund']);
    assert.deepEqual(script, docker);
  });
});

describe('scripts/container-build.sh', () => {
  it('builds like the image in a clean directory, serves, passes the healthcheck, stops cleanly', { timeout: 600_000 }, async (t) => {
    const r = await run('bash', [path.join(ROOT, 'scripts', 'container-build.sh')], { timeoutMs: 590_000 });
    if (r.code === 77) {
      t.skip(`the CLI has no serve command yet: ${r.stderr.trim()}`);
      return;
    }
    assert.equal(r.code, 0, `${r.stdout.slice(-3000)}\n${r.stderr.slice(-3000)}`);
    assert.match(r.stdout, /container-build: ok/);
  });
});
