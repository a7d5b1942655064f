/**
 * serve --link-modules, stopped the fast way: a second SIGTERM, or one stop past the daemon's
 * deadline (6 s), detaches the mount and exits 1 at once. The `<release>/build` links it made
 * point into that mount: they go too (and a directory it made for them), and nothing it found
 * there is touched. The start is held in its last step (a `systemd-notify` that hangs on READY=1,
 * after the links are made), where only the fast way can stop it.
 *
 * The daemon runs from test/helpers/serve-links.ts, which starts it as the CLI does but with a
 * temp directory in place of /lib/modules.
 */
import assert from 'node:assert/strict';
import { chmod, lstat, mkdir, readdir, readFile, readlink, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { ModuleLinks } from '../src/commands/serve.js';
import { createLogger } from '../src/log.js';
import { REPO_ROOT, goodTree, makeTar, tempDir, xz } from './helpers/archives.js';
import { fuseDeviceSkipReason } from './helpers/fuse-env.js';
import { exitWithin, pollUntil, startDaemonProcess, unmountIfLeft, type Daemon } from './helpers/serve-child.js';

const SERVE_LINKS = path.join(REPO_ROOT, 'dist/test/helpers/serve-links.js');
const RELEASE = '6.95.0-links';
/** The daemon's own deadline (6 s) comes first; this bound only keeps a hung daemon from hanging the test. */
const EXIT_BOUND_MS = 15_000;

interface Held {
  d: Daemon;
  mnt: string;
  modulesRoot: string;
}

/**
 * A serve with --link-modules under a temp modules root (`prepare` sets it up first), held on
 * READY=1 once it has mounted and linked.
 */
async function heldAfterLinking(t: TestContext, prepare: (modulesRoot: string) => Promise<void>): Promise<Held> {
  const dir = await tempDir(t, 'kheadersd-links-');
  const modulesRoot = path.join(dir, 'lib-modules');
  const mnt = path.join(dir, 'mnt');
  const archive = path.join(dir, 'kernel.tar.xz');
  const bin = path.join(dir, 'bin');
  await mkdir(modulesRoot);
  await prepare(modulesRoot);
  await writeFile(archive, xz(await makeTar(goodTree(RELEASE))));
  await mkdir(bin);
  const notifyPidFile = path.join(dir, 'notify.pid');
  await writeFile(path.join(bin, 'systemd-notify'), `#!/bin/sh\ncase " $* " in *" READY=1 "*) echo $$ > '${notifyPidFile}'; exec sleep 30;; esac\nexit 0\n`);
  await chmod(path.join(bin, 'systemd-notify'), 0o755);
  const flags = { archive, cacheDir: path.join(dir, 'cache'), mount: mnt, http: '127.0.0.1:0', btf: 'off', logLevel: 'info' };
  const d = startDaemonProcess(t, process.execPath, [SERVE_LINKS, modulesRoot, JSON.stringify(flags)], {
    PATH: `${bin}${path.delimiter}${process.env.PATH ?? ''}`,
    NOTIFY_SOCKET: path.join(dir, 'notify.sock'),
  });
  t.after(() => unmountIfLeft(mnt));
  // Its sleep outlives a daemon that exits: killed when the test ends (and bounded if that never runs).
  const notifier = await pollUntil(async () => Number(await readFile(notifyPidFile, 'utf8')) || undefined, 'the start to notify READY=1', 60_000);
  t.after(() => {
    try {
      process.kill(notifier, 'SIGKILL');
    } catch {
      // gone already
    }
  });
  return { d, mnt, modulesRoot };
}

async function assertUnmounted(mnt: string): Promise<void> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
  assert.ok(!mountinfo.includes(` ${mnt} `), `${mnt} is still mounted after the daemon exited`);
}

const exists = (p: string): Promise<boolean> => lstat(p).then(() => true, () => false);

test('a second SIGTERM while the start, linked and mounted, waits on systemd: the link and the directory it made are removed, the mount taken down', async (t) => {
  const skip = await fuseDeviceSkipReason();
  if (skip) return t.skip(skip);
  const s = await heldAfterLinking(t, async () => {});
  try {
    const link = path.join(s.modulesRoot, RELEASE, 'build');
    assert.equal(await readlink(link), path.join(s.mnt, RELEASE), 'the start linked the release into the mount');
    s.d.child.kill('SIGTERM');
    await s.d.waitFor((l) => l.msg === 'stopping', 'the first stop to begin');
    s.d.child.kill('SIGTERM');
    assert.equal(await exitWithin(s.d, EXIT_BOUND_MS), 1, 'a second signal exits 1 at once');
    assert.deepEqual(await readdir(s.modulesRoot), [], `left behind: ${(await readdir(s.modulesRoot)).join(', ')}`);
    await assertUnmounted(s.mnt);
  } finally {
    await s.d.stop();
  }
});

test('one SIGTERM past the stop deadline: the link it made is removed; the release directory it found, and what is in it, stay', async (t) => {
  const skip = await fuseDeviceSkipReason();
  if (skip) return t.skip(skip);
  const s = await heldAfterLinking(t, async (root) => {
    await mkdir(path.join(root, RELEASE));
    await writeFile(path.join(root, RELEASE, 'modules.dep'), 'kernel/kheaders.ko:\n');
  });
  try {
    assert.equal(await readlink(path.join(s.modulesRoot, RELEASE, 'build')), path.join(s.mnt, RELEASE), 'the start linked the release into the mount');
    s.d.child.kill('SIGTERM');
    assert.equal(await exitWithin(s.d, EXIT_BOUND_MS), 1, 'a stop past its deadline exits 1');
    assert.ok(s.d.logs.some((l) => typeof l.msg === 'string' && /the stop did not finish in/.test(l.msg)), 'the deadline is logged');
    assert.deepEqual(await readdir(path.join(s.modulesRoot, RELEASE)), ['modules.dep'], 'the link is left, or what was there is gone');
    await assertUnmounted(s.mnt);
  } finally {
    await s.d.stop();
  }
});

test('a second SIGTERM with a build link it found (and left alone): that link stays as it was', async (t) => {
  const skip = await fuseDeviceSkipReason();
  if (skip) return t.skip(skip);
  const theirs = '/usr/src/linux-headers-6.95.0-links';
  const s = await heldAfterLinking(t, async (root) => {
    await mkdir(path.join(root, RELEASE));
    await symlink(theirs, path.join(root, RELEASE, 'build'));
  });
  try {
    await s.d.waitFor((l) => typeof l.msg === 'string' && / exists; left alone$/.test(l.msg), 'the start to leave the link alone');
    s.d.child.kill('SIGTERM');
    await s.d.waitFor((l) => l.msg === 'stopping', 'the first stop to begin');
    s.d.child.kill('SIGTERM');
    assert.equal(await exitWithin(s.d, EXIT_BOUND_MS), 1, 'a second signal exits 1 at once');
    assert.equal(await readlink(path.join(s.modulesRoot, RELEASE, 'build')), theirs, 'the link it found was changed or removed');
    assert.ok(await exists(path.join(s.modulesRoot, RELEASE)));
    await assertUnmounted(s.mnt);
  } finally {
    await s.d.stop();
  }
});

test('two publishes linking at once (the start\'s and a repair\'s) make the one link, and neither fails', async (t) => {
  const dir = await tempDir(t, 'kheadersd-links-');
  const modulesRoot = path.join(dir, 'lib-modules');
  const links = new ModuleLinks(createLogger('silent'), modulesRoot);
  const target = path.join(dir, 'mnt', RELEASE);
  // Both checked for the link before either made it: the second symlink() failed with EEXIST.
  await Promise.all([links.point(RELEASE, target), links.point(RELEASE, target)]);
  assert.equal(await readlink(path.join(modulesRoot, RELEASE, 'build')), target);
  await links.removeAll();
  assert.deepEqual(await readdir(modulesRoot), [], 'what it made is gone, once');
});
