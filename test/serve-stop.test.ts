/**
 * `kheadersd serve` stopping on SIGTERM, as systemd's and Android init's stop ask it to: in every
 * state a stop can find it in, it must exit (status 0) soon, with the mount gone and nothing it
 * started left running. The states: an idle keep-alive HTTP connection, a client that stalls a
 * download, a file held open and a process whose cwd is on the mount, readers whose FUSE requests
 * are in flight, an ingest child decoding, a build inside the daemon (no ingest child could be
 * started), a stop during start-up, and a second SIGTERM (also while the start, already mounted,
 * waits on systemd).
 *
 * "Soon" is the stop's contract, not a benchmark: STOP_BOUND_MS is under the 10 s after which the
 * test helpers (and a service manager) send SIGKILL, and well above what the stop takes.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { watch } from 'node:fs';
import { chmod, copyFile, link, mkdir, readFile, readdir, unlink, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { REPO_ROOT, goodTree, makeTar, randomBytes, snapshot, tempDir, xzAsync } from './helpers/archives.js';
import { fuseDeviceSkipReason } from './helpers/fuse-env.js';
import { exitWithin, pollUntil, startServe, unmountIfLeft, type Daemon } from './helpers/serve-child.js';

const STOP_BOUND_MS = 8_000;
/** For a stop that waits out the daemon's own deadline (6 s) before it detaches the mount and exits. */
const STOP_DEADLINE_BOUND_MS = 15_000;
/** A file bigger than loopback's socket buffers, so a client that does not read stalls its response. */
const BIG_FILE = 'include/big.bin';
const BIG_BYTES = 24 * 1024 * 1024;

interface Served {
  d: Daemon;
  dir: string;
  mnt: string;
  cache: string;
  archive: string;
  url: URL;
  /** Makes the `xz` the daemon finds on PATH hang (until the test ends) instead of decoding. */
  hangXz(): Promise<void>;
  /** With `hangReady`: the pid of the `systemd-notify` hanging on READY=1, once the start runs it. */
  notifyPid(): Promise<number>;
}

interface ServeOptions {
  /** The archive holds BIG_FILE. */
  big?: boolean;
  /** xz hangs from the start: the first ingest never finishes. */
  hangFirst?: boolean;
  /** false: resolve at once, not once mounted. */
  waitMounted?: boolean;
  /** The start's READY=1 to systemd hangs (see notifyPid). */
  hangReady?: boolean;
  /** The node binary the daemon runs on. */
  node?: string;
}

let bigArchive: Promise<Buffer> | undefined;
const archiveOf = (release: string, big: boolean): Promise<Buffer> =>
  big
    ? (bigArchive ??= makeTar([...goodTree(release), { name: `./${BIG_FILE}`, content: randomBytes(BIG_BYTES, 7) }]).then((tar) => xzAsync(tar, 0)))
    : makeTar(goodTree(release)).then((tar) => xzAsync(tar, 0));

/**
 * A serve with a mount and HTTP, whose `xz` on PATH is a wrapper that decodes with the real one
 * until hangXz() is called. Resolves once it is mounted, or at once with `waitMounted: false`.
 */
async function serve(t: TestContext, opts: ServeOptions = {}): Promise<Served> {
  const dir = await tempDir(t, 'kheadersd-stop-');
  const cache = path.join(dir, 'cache');
  const mnt = path.join(dir, 'mnt');
  const archive = path.join(dir, 'kernel.tar.xz');
  const bin = path.join(dir, 'bin');
  const hang = path.join(dir, 'hang-xz');
  await writeFile(archive, await archiveOf('6.90.0-stop', opts.big ?? false));
  await mkdir(bin);
  const realXz = (process.env.PATH ?? '').split(path.delimiter).map((d) => path.join(d, 'xz'));
  // exec: the sleep is the decoder itself, in the ingest's process group, as a hung xz would be.
  await writeFile(path.join(bin, 'xz'), `#!/bin/sh\n[ -e '${hang}' ] && exec sleep 600\nfor x in ${realXz.map((x) => `'${x}'`).join(' ')}; do [ -x "$x" ] && exec "$x" "$@"; done\nexit 127\n`);
  await chmod(path.join(bin, 'xz'), 0o755);
  const hangXz = (): Promise<void> => writeFile(hang, '');
  if (opts.hangFirst) await hangXz();
  // hangReady: the start is told it runs under systemd, and the `systemd-notify` it finds hangs on
  // READY=1 (a PID 1 that does not answer the barrier): the start stays in its last step, mounted.
  // Its sleep outlives a daemon that exits: killed when the test ends, and bounded if that hook never runs.
  const notifyPidFile = path.join(dir, 'notify.pid');
  let notifier: number | undefined; // remembered: the temp dir (and the pid file) goes first when the test ends
  if (opts.hangReady) {
    await writeFile(path.join(bin, 'systemd-notify'), `#!/bin/sh\ncase " $* " in *" READY=1 "*) echo $$ > '${notifyPidFile}'; exec sleep 30;; esac\nexit 0\n`);
    await chmod(path.join(bin, 'systemd-notify'), 0o755);
    t.after(() => {
      try {
        if (notifier !== undefined) process.kill(notifier, 'SIGKILL');
      } catch {
        // gone already
      }
    });
  }
  const notifyPid = async (): Promise<number> =>
    (notifier ??= await pollUntil(async () => Number(await readFile(notifyPidFile, 'utf8')) || undefined, 'the start to notify READY=1'));
  const d = startServe(t, ['--archive', archive, '--cache-dir', cache, '--mount', mnt, '--http', '127.0.0.1:0', '--btf', 'off', '--decoder', 'xz', '--log-level', 'info'], {
    PATH: `${bin}${path.delimiter}${process.env.PATH ?? ''}`,
    ...(opts.hangReady ? { NOTIFY_SOCKET: path.join(dir, 'notify.sock') } : {}),
  }, opts.node);
  t.after(() => unmountIfLeft(mnt));
  let url = new URL('http://127.0.0.1:0');
  if (opts.waitMounted !== false) {
    const listening = await d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen');
    await d.waitFor((l) => l.msg === 'mounted', 'the mount');
    url = new URL(String(listening.url));
  }
  return { d, dir, mnt, cache, archive, url, hangXz, notifyPid };
}

/**
 * Every test's frame: skipped (and counted) without a FUSE device; otherwise `body` runs against
 * a started serve(), which is stopped afterwards (killed if it must be) whatever the body did.
 */
async function withServe(t: TestContext, opts: ServeOptions, body: (s: Served) => Promise<void>): Promise<void> {
  const skip = await fuseDeviceSkipReason();
  if (skip) return t.skip(skip);
  const s = await serve(t, opts);
  try {
    await body(s);
  } finally {
    await s.d.stop();
  }
}

/**
 * Once the ingest child (`building` is the daemon's line that names it) decodes, SIGTERM: the
 * daemon exits 0 and unmounts, and the child's process group is gone with it. (With the xz
 * binary, xz is the daemon's own: test/serve-daemon-xz.test.ts shows a stop ends it too.)
 */
async function assertStopEndsIngestChild(s: Served, building: Record<string, unknown>): Promise<void> {
  const pgid = Number(building.ingestPid);
  // The child relays its progress once xz runs: the stop must find a decoder at work.
  await s.d.waitFor((l) => l.msg === 'ingesting' && l.ingestPid === pgid, 'the ingest child to decode');
  assert.equal(await terminate(s.d), 0);
  await assertUnmounted(s.mnt);
  assert.deepEqual(await processGroup(pgid), [], 'the ingest child or its xz outlived the daemon');
  assert.throws(() => process.kill(pgid, 0), /ESRCH/, 'the ingest child outlived the daemon');
}

/** SIGTERM, then the exit status, or 'still running' after `boundMs`. */
async function terminate(d: Daemon, boundMs = STOP_BOUND_MS): Promise<number | null | 'still running'> {
  d.child.kill('SIGTERM');
  return exitWithin(d, boundMs);
}

/** SIGTERM, and once the stop has begun, SIGTERM again: as terminate(). */
async function terminateTwice(d: Daemon): Promise<number | null | 'still running'> {
  d.child.kill('SIGTERM');
  await d.waitFor((l) => l.msg === 'stopping', 'the first stop to begin');
  return terminate(d);
}

async function assertUnmounted(mnt: string): Promise<void> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
  assert.ok(!mountinfo.includes(` ${mnt} `), `${mnt} is still mounted after the daemon exited`);
}

/** The processes of process group `pgid` still alive (the ingest child leads its own). */
async function processGroup(pgid: number): Promise<number[]> {
  const out: number[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const s = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
    const fields = s.slice(s.lastIndexOf(')') + 2).split(' ');
    if (fields[0] !== 'Z' && Number(fields[2]) === pgid) out.push(Number(pid));
  }
  return out;
}

/** The processes (zombies aside) whose environment holds `entry` exactly (a PATH only the test's children have). */
async function processesWithEnv(entry: string): Promise<number[]> {
  const out: number[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const env = await readFile(`/proc/${pid}/environ`, 'latin1').catch(() => '');
    const s = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
    if (env.split('\0').includes(entry) && s.slice(s.lastIndexOf(')') + 2, s.lastIndexOf(')') + 3) !== 'Z') out.push(Number(pid));
  }
  return out;
}

/** A raw HTTP/1.1 request on a connection of its own, left open; the response is read only if `read`. */
async function rawRequest(t: TestContext, url: URL, target: string, read: boolean): Promise<net.Socket> {
  const sock = net.connect(Number(url.port), url.hostname);
  t.after(() => void sock.destroy());
  sock.on('error', () => {});
  await once(sock, 'connect');
  if (!read) sock.pause();
  sock.write(`GET ${target} HTTP/1.1\r\nHost: ${url.host}\r\nConnection: keep-alive\r\n\r\n`);
  if (read) await once(sock, 'data');
  return sock;
}

/** A shell whose cwd is on the mount, reading a header over and over (a FUSE request nearly always in flight). */
function readerOnMount(t: TestContext, mnt: string): ChildProcess {
  const child = spawn('/bin/sh', ['-c', 'while :; do cat include/linux/sched.h include/generated/utsrelease.h >/dev/null 2>&1 || sleep 0.05; done'], {
    cwd: path.join(mnt, 'current'),
    stdio: 'ignore',
  });
  t.after(() => void child.kill('SIGKILL'));
  return child;
}

function closedWithin(sock: net.Socket): Promise<boolean> {
  if (sock.destroyed) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), 1_000);
    sock.once('close', () => {
      clearTimeout(timer);
      resolve(true);
    });
    sock.resume(); // read what was sent, so the peer's close is seen
  });
}

test('SIGTERM with an idle keep-alive HTTP connection: exits 0, unmounted', (t) =>
  withServe(t, {}, async (s) => {
    await rawRequest(t, s.url, '/healthz', true);
    assert.equal(await terminate(s.d), 0);
    await assertUnmounted(s.mnt);
  }));

test('SIGTERM while a client stalls a download: the response is cut after a bounded drain, exits 0, unmounted', (t) =>
  withServe(t, { big: true }, async (s) => {
    const stalled = await rawRequest(t, s.url, `/v1/kernels/current/files/${BIG_FILE}`, false);
    // Give the server time to fill the socket's buffers: from then on its write waits for the client.
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(await terminate(s.d), 0);
    await assertUnmounted(s.mnt);
    assert.ok(await closedWithin(stalled), 'the stalled connection is still open');
    assert.ok(s.d.logs.some((l) => typeof l.msg === 'string' && /did not finish in time/.test(l.msg)), 'the cut is logged');
  }));

test('SIGTERM with a file held open, a cwd on the mount and FUSE requests in flight: exits 0, unmounted (lazily)', (t) =>
  withServe(t, {}, async (s) => {
    const { open } = await import('node:fs/promises');
    const held = await open(path.join(s.mnt, 'current/include/linux/types.h'), 'r');
    t.after(() => held.close().catch(() => {}));
    const readers = [readerOnMount(t, s.mnt), readerOnMount(t, s.mnt)];
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(await terminate(s.d), 0);
    await assertUnmounted(s.mnt);
    for (const r of readers) r.kill('SIGKILL');
  }));

test('SIGTERM while the ingest child decodes (SIGHUP found a new kernel): exits 0, the child and its xz gone, unmounted', (t) =>
  withServe(t, {}, async (s) => {
    await s.hangXz();
    await writeFile(s.archive, await archiveOf('6.91.0-next', false));
    s.d.child.kill('SIGHUP');
    await assertStopEndsIngestChild(s, await s.d.waitFor((l) => l.msg === 'building the entry in a child process', 'the ingest child to start'));
  }));

test('SIGTERM during start-up (the first ingest still decoding): exits 0 without serving, nothing left running or mounted', (t) =>
  withServe(t, { hangFirst: true, waitMounted: false }, async (s) => {
    await assertStopEndsIngestChild(s, await s.d.waitFor((l) => l.msg === 'building the entry in a child process', 'the ingest child to start'));
    assert.ok(!s.d.logs.some((l) => l.msg === 'HTTP listening' || l.msg === 'mounted'), 'it went on starting after the stop');
  }));

test('a second SIGTERM while the first stop drains: exits at once, and the mount is still taken down', (t) =>
  withServe(t, { big: true }, async (s) => {
    await rawRequest(t, s.url, `/v1/kernels/current/files/${BIG_FILE}`, false);
    await new Promise((r) => setTimeout(r, 500));
    const code = await terminateTwice(s.d);
    assert.notEqual(code, 'still running');
    await assertUnmounted(s.mnt);
  }));

test('a second SIGTERM while the start, mounted already, still notifies systemd: exits at once, and the mount is taken down', (t) =>
  withServe(t, { hangReady: true }, async (s) => {
    await s.notifyPid();
    const code = await terminateTwice(s.d);
    assert.equal(code, 1, 'a second signal exits 1 at once');
    await assertUnmounted(s.mnt);
  }));

test('one SIGTERM while the start, mounted already, hangs notifying systemd: past the stop deadline it exits, and the mount is taken down', (t) =>
  withServe(t, { hangReady: true }, async (s) => {
    await s.notifyPid();
    // The daemon's own deadline (6 s) comes first; this bound only keeps a hung daemon from hanging the test.
    assert.equal(await terminate(s.d, STOP_DEADLINE_BOUND_MS), 1, 'a stop past its deadline exits 1');
    assert.ok(s.d.logs.some((l) => typeof l.msg === 'string' && /the stop did not finish in/.test(l.msg)), 'the deadline is logged');
    await assertUnmounted(s.mnt);
  }));

test('SIGTERM while the daemon builds an entry itself (no ingest process could be started): the build stops at once, the cache as it was, exits 0, unmounted', async (t) => {
  // The daemon runs a node binary that the test then removes, as an upgrade would: it cannot
  // start the ingest process, and builds in its own process instead.
  const nodeDir = await tempDir(t, 'kheadersd-node-');
  const node = path.join(nodeDir, 'node');
  await link(process.execPath, node).catch(() => copyFile(process.execPath, node));
  await withServe(t, { node }, async (s) => {
    const testPath = `PATH=${path.join(s.dir, 'bin')}${path.delimiter}${process.env.PATH ?? ''}`;
    // After the daemon's stop: a failed run's hung xz.
    t.after(async () => {
      for (const pid of await processesWithEnv(testPath)) process.kill(pid, 'SIGKILL');
    });
    const entriesBefore = await snapshot(path.join(s.cache, 'entries'));
    await unlink(node);
    await s.hangXz();
    await writeFile(s.archive, await archiveOf('6.91.0-next', false));
    s.d.child.kill('SIGHUP');
    await s.d.waitFor((l) => typeof l.msg === 'string' && l.msg.startsWith('cannot start the ingest process'), 'the fallback to an in-process build');
    await s.d.waitFor((l) => l.msg === 'ingesting' && l.ingestPid === undefined, 'the daemon itself to decode');
    assert.equal(await terminate(s.d), 0);
    await assertUnmounted(s.mnt);
    assert.deepEqual(await processesWithEnv(testPath), [], 'the hung xz outlived the daemon');
    assert.deepEqual(await snapshot(path.join(s.cache, 'entries')), entriesBefore, 'the cache changed');
    assert.deepEqual(await readdir(path.join(s.cache, 'tmp')), [], 'the build left its staging behind');
    assert.ok(s.d.logs.some((l) => l.msg === 'ingest stopped: the daemon is stopping'), 'the stopped build is logged as such');
  });
});

test('SIGTERM while the start waits for the cache lock another process holds: exits 0 at once, the other process\'s lock untouched', async (t) => {
  const dir = await tempDir(t, 'kheadersd-stop-locked-');
  const cache = path.join(dir, 'cache');
  const archive = path.join(dir, 'kheaders.tar.xz');
  await writeFile(archive, await xzAsync(await makeTar(goodTree('6.92.0-locked'))));
  await mkdir(cache, { mode: 0o755 });
  const lockPath = path.join(cache, 'lock');
  const holder = spawn(process.execPath, [path.join(REPO_ROOT, 'dist/test/helpers/lock-holder.js'), lockPath], { stdio: ['pipe', 'pipe', 'inherit'] });
  t.after(() => {
    if (holder.exitCode === null && holder.signalCode === null) holder.kill('SIGKILL');
  });
  assert.equal(String((await once(holder.stdout, 'data'))[0]), 'held\n');
  // Not what keeps this process alive: it exits when its stdin closes with this process.
  holder.stdout.destroy();
  holder.unref();
  (holder.stdin as unknown as { unref(): void }).unref();
  const held = await readFile(lockPath, 'utf8');
  // A lock timeout far past any stop bound: only the stop can end the wait.
  // Each try for the lock makes a scratch file `lock.<pid>.<random>` beside it: seen, the daemon waits on the lock.
  const watcher = watch(cache);
  t.after(() => watcher.close());
  const d = startServe(t, ['--archive', archive, '--release', '6.92.0-locked', '--cache-dir', cache, '--lock-timeout', '120', '--mount', 'off', '--http', '127.0.0.1:0', '--btf', 'off', '--log-level', 'info']);
  try {
    await new Promise<void>((resolve) => watcher.on('change', (_type, name) => String(name).startsWith(`lock.${d.child.pid}.`) && resolve()));
    watcher.close();
    await new Promise((r) => setTimeout(r, 200)); // a few tries
    assert.equal(d.child.exitCode, null, 'the start ended on its own');
    const t0 = performance.now();
    d.child.kill('SIGTERM');
    assert.equal(await exitWithin(d, STOP_BOUND_MS), 0, `the stop while waiting for the lock: ${JSON.stringify(d.logs.slice(-4))}`);
    const ms = performance.now() - t0;
    assert.ok(ms < 2_000, `the stop took ${Math.round(ms)} ms`);
    assert.equal(await readFile(lockPath, 'utf8'), held, 'the holder\'s lock is untouched');
    assert.ok(!d.logs.some((l) => l.msg === 'HTTP listening'), 'it went on starting after the stop');
    assert.deepEqual((await readdir(cache)).filter((n) => n.startsWith('lock')), ['lock'], 'no lock file of the daemon is left');
  } finally {
    await d.stop();
  }
});

test('a clean stop lets the work given to finishBeforeExit finish before the process exits (the compiled code kept at ready)', async (t) => {
  const work = await tempDir(t, 'kheadersd-stop-finish-');
  const out = path.join(work, 'kept');
  // installSignalHandlers as serve uses it, with a started daemon whose stop is immediate and one
  // piece of work that takes 300 ms, as a code-cache save that syncs on a slow disk.
  const program = `
    const { writeFileSync } = await import('node:fs');
    const { StopRequest, installSignalHandlers } = await import(${JSON.stringify(path.join(REPO_ROOT, 'dist/src/commands/serve.js'))});
    const quiet = () => {};
    const io = { stdout: process.stdout, stderr: process.stderr, log: { info: quiet, warn: quiet, error: quiet, debug: quiet } };
    const stopRequest = new StopRequest();
    installSignalHandlers(Promise.resolve({ stop: () => Promise.resolve() }), io, stopRequest);
    stopRequest.finishBeforeExit(new Promise((resolve) => setTimeout(() => resolve(writeFileSync(process.argv[1], 'kept')), 300)));
    process.stdout.write('ready\\n');`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', program, out], { stdio: ['ignore', 'pipe', 'inherit'] });
  await once(child.stdout, 'data');
  child.kill('SIGTERM');
  const [code] = (await once(child, 'exit')) as [number | null];
  assert.equal(code, 0);
  assert.equal(await readFile(out, 'utf8'), 'kept', 'the process exited before the work was done');
});
