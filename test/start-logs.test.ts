/**
 * What a `kheadersd serve` start says, said once and only when true: "serving" once the start has
 * succeeded (never by a start that then fails), and a damaged entry's "not serving" once per
 * start, --link-modules or not.
 */
import assert from 'node:assert/strict';
import { chmod, mkdir, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { INDEX_FILE } from '../src/store/entry.js';
import { REPO_ROOT, goodArchive, runCli, tempDir } from './helpers/archives.js';
import { fuseDeviceSkipReason } from './helpers/fuse-env.js';
import { exitWithin, startDaemonProcess, startServe, unmountIfLeft } from './helpers/serve-child.js';

const EXIT_BOUND_MS = 10_000;

/** Another entry in `cache`, its index cut short: damaged, and repaired while the start goes on. Its id. */
async function damagedEntry(dir: string, cache: string, release: string): Promise<string> {
  const other = path.join(dir, `${release}.tar.xz`);
  await writeFile(other, await goodArchive(release));
  const ingested = await runCli(['ingest', '--archive', other, '--release', release, '--cache-dir', cache, '--btf', 'off', '--json']);
  assert.equal(ingested.code, 0, ingested.stderr);
  const { digest } = JSON.parse(ingested.stdout) as { digest: string };
  const id = `${release}~${digest}`;
  await truncate(path.join(cache, 'entries', id, INDEX_FILE), 100);
  return id;
}

test('a start whose mount fails, with no HTTP (a damaged entry repaired meanwhile): it fails and exits, and never said "serving"', async (t) => {
  const skip = await fuseDeviceSkipReason();
  if (skip) return t.skip(skip);
  const dir = await tempDir(t, 'kheadersd-startlog-');
  const [cache, mnt, bin, archive] = ['cache', 'mnt', 'bin', 'kernel.tar.xz'].map((n) => path.join(dir, n)) as [string, string, string, string];
  await mkdir(mnt);
  await mkdir(bin);
  await writeFile(archive, await goodArchive('6.96.0-startlog'));
  await damagedEntry(dir, cache, '6.96.3-damaged');
  // The `mount` on PATH refuses, as util-linux does when mount(2) fails: after a second, by which
  // time the repair the start sent the damaged entry to has published what it rebuilt.
  await writeFile(path.join(bin, 'mount'), '#!/bin/sh\n[ "$1" = --version ] && { echo "mount from util-linux 2.39"; exit 0; }\nsleep 1\necho "mount: permission denied" >&2\nexit 32\n');
  await chmod(path.join(bin, 'mount'), 0o755);
  const d = startServe(t, ['--archive', archive, '--cache-dir', cache, '--mount', mnt, '--http', 'off', '--btf', 'off', '--fuse-backend', 'kernel', '--log-level', 'info'], {
    PATH: `${bin}${path.delimiter}${process.env.PATH ?? ''}`,
  });
  t.after(() => unmountIfLeft(mnt));
  try {
    const code = await exitWithin(d, EXIT_BOUND_MS);
    assert.notEqual(code, 'still running');
    assert.notEqual(code, 0);
    assert.ok(d.logs.some((l) => /exited with 32/.test(String(l.msg))), `the failure is the mount's: ${JSON.stringify(d.logs.map((l) => l.msg))}`);
    assert.ok(d.logs.some((l) => /^cache repaired/.test(String(l.msg))), 'the repair ran while the mount was made');
    assert.deepEqual(d.logs.filter((l) => l.msg === 'serving'), [], 'a failed start never said it was serving');
  } finally {
    await d.stop();
    await unmountIfLeft(mnt);
  }
});

test('--link-modules start over a damaged entry: "not serving" said once, the link made', async (t) => {
  const skip = await fuseDeviceSkipReason();
  if (skip) return t.skip(skip);
  const dir = await tempDir(t, 'kheadersd-startlog-');
  const [cache, mnt, modulesRoot, archive] = ['cache', 'mnt', 'lib-modules', 'kernel.tar.xz'].map((n) => path.join(dir, n)) as [string, string, string, string];
  await mkdir(mnt);
  await mkdir(modulesRoot);
  await writeFile(archive, await goodArchive('6.96.1-startlog'));
  const damagedId = await damagedEntry(dir, cache, '6.96.2-damaged');
  const flags = { archive, cacheDir: cache, mount: mnt, http: 'off', btf: 'off', logLevel: 'info', fuseBackend: 'kernel' };
  // serve-links.ts: serve's start as cli.ts runs it, its links under modulesRoot, not /lib/modules.
  const d = startDaemonProcess(t, process.execPath, [path.join(REPO_ROOT, 'dist/test/helpers/serve-links.js'), modulesRoot, JSON.stringify(flags)]);
  t.after(() => unmountIfLeft(mnt));
  try {
    await d.waitFor((l) => l.msg === '--link-modules: linked', 'the link into the mount');
    await d.waitFor((l) => l.msg === 'serving', 'the start to end');
    // Whatever a second look at the entries would have said, it would have said by now (it came before the link).
    const notServing = d.logs.filter((l) => l.id === damagedId && typeof l.msg === 'string' && l.msg.startsWith('not serving'));
    assert.equal(notServing.length, 1, JSON.stringify(d.logs.map((l) => l.msg)));
    d.child.kill('SIGTERM');
    assert.equal(await exitWithin(d, EXIT_BOUND_MS), 0);
  } finally {
    await d.stop();
    await unmountIfLeft(mnt);
  }
});
