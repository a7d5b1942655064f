/**
 * `kheadersd serve` whose start fails after HTTP is up and the mount is being made (the mount is
 * made while publish() checks the entries): it must exit, with the error's status, and leave no
 * mount and no listening HTTP behind. A start that reported its failure but kept answering
 * /readyz "ready" would never be restarted by its service manager.
 */
import { chmod, mkdir, rename, symlink, writeFile } from 'node:fs/promises';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { REPO_ROOT, goodArchive, tempDir } from './helpers/archives.js';
import { fuseDeviceSkipReason } from './helpers/fuse-env.js';
import { exitWithin, startDaemonProcess, startServe, unmountIfLeft } from './helpers/serve-child.js';

const EXIT_BOUND_MS = 10_000;

test('the cache turns unreadable after HTTP is up, while the mount is made: the start fails, the process exits, no mount and no HTTP left', async (t) => {
  const skip = await fuseDeviceSkipReason();
  if (skip) return t.skip(skip);
  const dir = await tempDir(t, 'kheadersd-startfail-');
  const [cache, mnt, bin, archive, go] = ['cache', 'mnt', 'bin', 'kernel.tar.xz', 'go'].map((n) => path.join(dir, n)) as [string, string, string, string, string];
  await mkdir(mnt);
  await mkdir(bin);
  await writeFile(archive, await goodArchive('6.91.0-startfail'));
  // The `mount` the kernel backend finds on PATH: asked its --version (before the mount child is
  // spawned), it waits until the test has broken the cache, so the start's publish() meets it.
  const realMount = ['/usr/bin/mount', '/bin/mount', '/usr/sbin/mount', '/sbin/mount'];
  await writeFile(
    path.join(bin, 'mount'),
    `#!/bin/sh\nif [ "$1" = --version ]; then i=0; while [ ! -e '${go}' ] && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done; fi\nfor m in ${realMount.map((m) => `'${m}'`).join(' ')}; do [ -x "$m" ] && exec "$m" "$@"; done\nexit 127\n`,
  );
  await chmod(path.join(bin, 'mount'), 0o755);
  const d = startServe(t, ['--archive', archive, '--cache-dir', cache, '--mount', mnt, '--http', '127.0.0.1:0', '--btf', 'off', '--fuse-backend', 'kernel', '--log-level', 'info'], {
    PATH: `${bin}${path.delimiter}${process.env.PATH ?? ''}`,
  });
  t.after(() => unmountIfLeft(mnt));
  try {
    const listening = await d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen');
    // entries/ a symbolic link: the cache refuses to read it (E_CACHE_UNREADABLE).
    const entries = path.join(cache, 'entries');
    await rename(entries, `${entries}.real`);
    await symlink('entries.real', entries);
    await writeFile(go, '');
    const code = await exitWithin(d, EXIT_BOUND_MS);
    const stillAnswers = await fetch(new URL('/readyz', String(listening.url))).then(
      (r) => r.status,
      () => null,
    );
    assert.notEqual(code, 'still running', `the failed start must exit; HTTP still answers: ${stillAnswers}; logs: ${JSON.stringify(d.logs.slice(-3))}`);
    assert.notEqual(code, 0);
    assert.ok(d.logs.some((l) => /symbolic link/.test(String(l.msg))), 'the failure is the unreadable cache');
    assert.equal(stillAnswers, null, 'nothing listens on the failed start\'s HTTP address');
    const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
    assert.ok(!mountinfo.includes(` ${mnt} `), 'no mount left');
  } finally {
    await d.stop();
  }
});

test('--link-modules cannot link once mounted (a file where <release>/ goes): the start fails, exits, and takes its mount down', async (t) => {
  const skip = await fuseDeviceSkipReason();
  if (skip) return t.skip(skip);
  const release = '6.92.0-startfail';
  const dir = await tempDir(t, 'kheadersd-startfail-');
  const [cache, mnt, modulesRoot, archive] = ['cache', 'mnt', 'lib-modules', 'kernel.tar.xz'].map((n) => path.join(dir, n)) as [string, string, string, string];
  await mkdir(mnt);
  await mkdir(modulesRoot);
  // <release>/build cannot be made: its directory is a file (lstat: ENOTDIR).
  await writeFile(path.join(modulesRoot, release), '');
  await writeFile(archive, await goodArchive(release));
  const flags = { archive, cacheDir: cache, mount: mnt, http: 'off', btf: 'off', logLevel: 'info', fuseBackend: 'kernel' };
  // serve-links.ts: serve's start as cli.ts runs it, its links under modulesRoot, not /lib/modules.
  const d = startDaemonProcess(t, process.execPath, [path.join(REPO_ROOT, 'dist/test/helpers/serve-links.js'), modulesRoot, JSON.stringify(flags)]);
  t.after(() => unmountIfLeft(mnt));
  try {
    await d.waitFor((l) => l.msg === 'FUSE mounted', 'the mount');
    const code = await exitWithin(d, EXIT_BOUND_MS);
    const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
    assert.notEqual(code, 'still running', `the failed start must exit; mounted: ${mountinfo.includes(` ${mnt} `)}; logs: ${JSON.stringify(d.logs.slice(-3))}`);
    assert.notEqual(code, 0);
    assert.ok(!mountinfo.includes(` ${mnt} `), 'no mount left (a dead ENOTCONN directory once the process is gone)');
  } finally {
    await d.stop();
  }
});
