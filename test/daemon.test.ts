/**
 * `kheadersd serve` end to end, as a user runs it: a real child process, a real FUSE mount, a
 * real HTTP listener on loopback. A kernel swap is an archive file replaced on disk plus SIGHUP;
 * SIGTERM must unmount and exit 0. Every access to the mount is async (the daemon is another
 * process, but a hung mount must fail the test, not hang it).
 */
import { open, readFile, readlink, rename, rm, stat, symlink, writeFile, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { goodArchive, tempDir } from './helpers/archives.js';
import { fuseDeviceSkipReason } from './helpers/fuse-env.js';
import { pollUntil, startServe, unmountIfLeft, type Daemon } from './helpers/serve-child.js';

/**
 * serve on a new cache of one generated archive, with a FUSE mount (serve's default backend as
 * root is the kernel one: /dev/fuse and root, no libfuse) and HTTP; undefined when the test was
 * skipped for want of FUSE. The archive names its release in include/generated/utsrelease.h, as
 * the kernel's does.
 */
async function serveMounted(t: TestContext, release: string, salt: string): Promise<{ cache: string; mnt: string; archive: string; d: Daemon } | undefined> {
  const skip = await fuseDeviceSkipReason();
  if (skip) {
    t.skip(skip);
    return undefined;
  }
  const dir = await tempDir(t, 'kheadersd-daemon-');
  const cache = path.join(dir, 'cache');
  const mnt = path.join(dir, 'mnt');
  const archive = path.join(dir, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive(release, salt));
  return { cache, mnt, archive, d: startServe(t, ['--archive', archive, '--cache-dir', cache, '--mount', mnt, '--http', '127.0.0.1:0', '--btf', 'off', '--log-level', 'info']) };
}

test('serve: mount + HTTP, SIGHUP follows a kernel swap, open files keep reading, SIGTERM unmounts', async (t) => {
  const served = await serveMounted(t, '6.90.0-old', 'old');
  if (!served) return;
  const { mnt, archive, d } = served;
  let held: FileHandle | undefined;
  // A failed assertion must end the file now, not at the runner's timeout: the file held open
  // on the mount, the daemon and the mount itself all go before the temp dir is removed.
  try {
    const listening = await d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen');
    await d.waitFor((l) => l.msg === 'mounted', 'the mount');
    const url = String(listening.url);

    const ready = await fetch(`${url}/readyz`);
    assert.equal(ready.status, 200);
    assert.equal(await readlink(path.join(mnt, 'current')), '6.90.0-old');
    const uts = path.join(mnt, 'current/include/generated/utsrelease.h');
    assert.match(await readFile(uts, 'utf8'), /6\.90\.0-old/);
    const viaHttp = await fetch(`${url}/v1/kernels/current/files/include/generated/utsrelease.h`);
    assert.equal(viaHttp.status, 200);
    assert.match(await viaHttp.text(), /6\.90\.0-old/);
    // An --archive of another release is served as current, and the log and the API say so plainly.
    const warned = await d.waitFor((l) => typeof l.msg === 'string' && l.msg.startsWith('current is 6.90.0-old from file:'), 'the not-the-running-kernel warning');
    assert.match(String(warned.msg), /NOT the running kernel: it is 6\.90\.0-old; the running kernel is /);
    // Said once per start, not again when the mount comes up.
    assert.equal(d.logs.filter((l) => typeof l.msg === 'string' && l.msg.startsWith('current is 6.90.0-old from file:')).length, 1);
    assert.equal(d.logs.filter((l) => l.msg === 'serving').length, 1);
    const summary = (await (await fetch(`${url}/v1/kernels/current`)).json()) as { runningKernel?: string; runningKernelNote?: string };
    assert.equal(summary.runningKernel, 'no');
    assert.match(summary.runningKernelNote ?? '', /the running kernel is /);

    // Hold a file open on the old tree across the swap.
    held = await open(uts, 'r');

    // The kernel swaps: a new archive appears at the same path; SIGHUP tells the daemon.
    await writeFile(archive + '.new', await goodArchive('6.91.0-new', 'new'));
    await rename(archive + '.new', archive);
    d.child.kill('SIGHUP');
    await pollUntil(async () => ((await readlink(path.join(mnt, 'current'))) === '6.91.0-new' ? true : undefined), 'current to flip');
    assert.match(await readFile(path.join(mnt, 'current/include/generated/utsrelease.h'), 'utf8'), /6\.91\.0-new/);
    const kernels = (await (await fetch(`${url}/v1/kernels/current`)).json()) as { release: string };
    assert.equal(kernels.release, '6.91.0-new');
    // Both releases stay reachable by name; the old fd still reads the old bytes.
    assert.match(await readFile(path.join(mnt, '6.90.0-old/include/generated/utsrelease.h'), 'utf8'), /6\.90\.0-old/);
    const buf = Buffer.alloc(200);
    const { bytesRead } = await held.read(buf, 0, buf.length, 0);
    assert.match(buf.subarray(0, bytesRead).toString(), /6\.90\.0-old/);
    await held.close();

    // SIGTERM: clean stop, exit 0, nothing left mounted.
    d.child.kill('SIGTERM');
    assert.equal(await d.exited, 0);
    const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
    assert.ok(!mountinfo.includes(` ${mnt} `), 'the mount is gone after SIGTERM');
    await stat(mnt); // the mount point is a plain directory again (no ENOTCONN)
  } finally {
    await held?.close().catch(() => {});
    await d.stop();
    await unmountIfLeft(mnt);
  }
});

test("serve: a symlink in the place of the cache's small files never leads its synchronous reads into its own mount", async (t) => {
  const served = await serveMounted(t, '6.93.0-links', 'links');
  if (!served) return;
  const { cache, mnt, d } = served;
  try {
    const url = String((await d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen')).url);
    await d.waitFor((l) => l.msg === 'mounted', 'the mount');
    const { digest } = (await (await fetch(`${url}/v1/kernels/current`)).json()) as { digest: string };
    // current and sources.json are read with synchronous calls, on the thread that answers the
    // mount: each points in turn at a file of the mount nobody has read yet (its READ would
    // need this daemon's own answer), and a SIGHUP makes the daemon read it. Followed, the
    // daemon hangs for good (a SIGTERM does not end it); refused, it is no pointer, no memory.
    for (const [name, target] of [
      ['sources.json', 'include/linux/types.h'],
      ['current', 'include/linux/sched.h'],
    ] as const) {
      await rm(path.join(cache, name), { force: true });
      await symlink(path.join(mnt, 'by-digest', digest, target), path.join(cache, name));
      const served = d.logs.filter((l) => l.msg === 'serving').length;
      d.child.kill('SIGHUP');
      await d.waitFor(() => d.logs.filter((l) => l.msg === 'serving').length > served, `the refresh with ${name} a link into the mount to end (hung on its own mount?)`, 15_000);
      assert.equal((await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(5_000) })).status, 200);
    }
    // entries/ itself a link to a directory of the mount nobody has listed: the listing would
    // wait for this daemon. Refused (E_CACHE_UNSAFE, said), what was published is still served,
    // and once entries/ is a directory again the next SIGHUP serves it: a refresh that failed to
    // publish does not end every later one.
    const entries = path.join(cache, 'entries');
    await rename(entries, `${entries}.real`);
    await symlink(path.join(mnt, 'by-digest', digest, 'include', 'linux'), entries);
    const failed = d.logs.length;
    d.child.kill('SIGHUP');
    await d.waitFor(() => d.logs.slice(failed).some((l) => l.code === 'E_CACHE_UNSAFE' && typeof l.msg === 'string' && l.msg.startsWith('cannot publish the cache')), 'the refresh with entries/ a link into the mount to fail (hung on its own mount?)', 15_000);
    assert.equal((await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(5_000) })).status, 200);
    await rm(entries);
    await rename(`${entries}.real`, entries);
    const served = d.logs.filter((l) => l.msg === 'serving').length;
    d.child.kill('SIGHUP');
    await d.waitFor(() => d.logs.filter((l) => l.msg === 'serving').length > served, 'a SIGHUP after the failed one to serve again', 15_000);
    d.child.kill('SIGTERM');
    assert.equal(await d.exited, 0);
  } finally {
    await d.stop();
    await unmountIfLeft(mnt);
  }
});

test('serve: with no archive anywhere and BTF off, it says what is missing and exits 3', async (t) => {
  const dir = await tempDir(t, 'kheadersd-daemon-');
  const d = startServe(t, ['--cache-dir', path.join(dir, 'cache'), '--mount', 'off', '--http', '127.0.0.1:0', '--no-modprobe', '--btf', 'off']);
  const code = await d.exited;
  assert.equal(code, 3);
  const stderr: string[] = [];
  d.child.stderr.on('data', (s: string) => stderr.push(s));
  assert.ok(d.logs.some((l) => l.code === 'E_ARCHIVE_NOT_FOUND' && /CONFIG_IKHEADERS/.test(String(l.msg))));
});

test('serve: a mount that cannot be made leaves HTTP serving', async (t) => {
  const dir = await tempDir(t, 'kheadersd-daemon-');
  const archive = path.join(dir, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive('6.92.0-x', 'x'));
  const notADir = path.join(dir, 'file');
  await writeFile(notADir, 'not a directory');
  const d = startServe(t, ['--archive', archive, '--cache-dir', path.join(dir, 'cache'), '--mount', path.join(notADir, 'mnt'), '--http', '127.0.0.1:0', '--btf', 'off']);
  const listening = await d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen');
  await d.waitFor((l) => typeof l.msg === 'string' && l.msg.startsWith('no FUSE mount, serving HTTP only'), 'the mount failure to be logged');
  const res = await fetch(`${String(listening.url)}/v1/kernels/current`);
  assert.equal(res.status, 200);
  d.child.kill('SIGTERM');
  assert.equal(await d.exited, 0);
});
