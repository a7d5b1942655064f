/**
 * `kheadersd serve` stopped while its `mount` child hangs after mount(2) (a `mount` that never
 * exits: util-linux stuck on its utab lock, a wrapper that waits): however it is stopped, one
 * signal or two, HTTP or not, it must exit soon and leave no mount behind. Left behind, the mount
 * outlives the daemon as a directory that hangs its readers (the hung child still holds the
 * connection) and, once that child is gone, answers ENOTCONN.
 *
 * The `mount` on the daemon's PATH runs the real one, then hangs (the same process, holding the
 * connection as the real child would).
 */
import { chmod, mkdir, readFile, rename, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { goodArchive, tempDir } from './helpers/archives.js';
import { fuseDeviceSkipReason } from './helpers/fuse-env.js';
import { exitWithin, pollUntil, startServe, unmountIfLeft, type Daemon } from './helpers/serve-child.js';

/** Under the daemon's own stop deadline (6 s) and the `mount` child's timeout (15 s): the stop must not wait on the hung child. */
const EXIT_BOUND_MS = 5_000;
const REAL_MOUNT = ['/usr/bin/mount', '/bin/mount', '/usr/sbin/mount', '/sbin/mount'];

interface Hung {
  d: Daemon;
  mnt: string;
  cache: string;
}

/**
 * A serve whose `mount` child hangs; resolves once it does. `hang`: 'after' the real mount(2)
 * (the same process then sleeps, holding the connection as a real child would), 'before' it
 * (waiting on a file nobody writes), or at 'version' (`mount --version`, asked which `mount` this
 * is before the mount child is spawned, waits on a file nobody writes). `gate`: a file its
 * `mount --version` waits for, up to 15 s.
 */
async function hungMount(t: TestContext, http: boolean, release: string, hang: 'after' | 'before' | 'version' = 'after', gate?: string): Promise<Hung> {
  const dir = await tempDir(t, 'kheadersd-mounthang-');
  const [cache, mnt, bin, archive, pidFile] = ['cache', 'mnt', 'bin', 'kernel.tar.xz', 'mount.pid'].map((n) => path.join(dir, n)) as [string, string, string, string, string];
  await mkdir(mnt);
  await mkdir(bin);
  await writeFile(archive, await goodArchive(release));
  const real = `for m in ${REAL_MOUNT.map((m) => `'${m}'`).join(' ')}; do [ -x "$m" ] && break; done`;
  const waitFor = (file: string, tenths: number): string => `i=0; while [ ! -e '${file}' ] && [ $i -lt ${tenths * 2} ]; do sleep 0.05; i=$((i+1)); done`;
  const version =
    hang === 'version'
      ? `[ "$1" = --version ] && { echo $$ > '${pidFile}'; ${waitFor(path.join(dir, 'never'), 600)}; exec "$m" "$@"; }`
      : `[ "$1" = --version ] && { ${gate === undefined ? ':' : waitFor(gate, 150)}; exec "$m" "$@"; }`;
  const mountThenHang = hang === 'after' ? `"$m" "$@" || exit $?\necho $$ > '${pidFile}'\nexec sleep 60` : `echo $$ > '${pidFile}'\n${waitFor(path.join(dir, 'never'), 600)}\nexec "$m" "$@"`;
  await writeFile(path.join(bin, 'mount'), `#!/bin/sh\n${real}\n${version}\n${mountThenHang}\n`);
  await chmod(path.join(bin, 'mount'), 0o755);
  const d = startServe(t, ['--archive', archive, '--cache-dir', cache, '--mount', mnt, '--http', http ? '127.0.0.1:0' : 'off', '--btf', 'off', '--fuse-backend', 'kernel', '--log-level', 'info'], {
    PATH: `${bin}${path.delimiter}${process.env.PATH ?? ''}`,
  });
  t.after(() => unmountIfLeft(mnt));
  // Its sleep outlives a daemon that exits without killing it: killed when the test ends.
  t.after(async () => {
    try {
      process.kill(Number(await readFile(pidFile, 'utf8')), 'SIGKILL');
    } catch {
      // gone already, or it never hung
    }
  });
  if (gate === undefined) await pollUntil(async () => Number(await readFile(pidFile, 'utf8')) || undefined, 'the mount child to hang', 60_000);
  return { d, mnt, cache };
}

// Each test's `finally` stops the daemon and unmounts what a failure left: the t.after hooks stop
// at the first that fails, and the temp dir's removal (added first) fails on a live mount.

async function assertNoMount(mnt: string): Promise<void> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
  assert.ok(!mountinfo.includes(` ${mnt} `), `${mnt} is still mounted after the daemon exited`);
}

const STOPS: ReadonlyArray<{ name: string; signals: NodeJS.Signals[]; code: number }> = [
  { name: 'SIGTERM', signals: ['SIGTERM'], code: 0 },
  { name: 'SIGTERM then SIGINT', signals: ['SIGTERM', 'SIGINT'], code: 1 },
  { name: 'two SIGTERMs', signals: ['SIGTERM', 'SIGTERM'], code: 1 },
];

let n = 0;
for (const http of [true, false]) {
  for (const stop of STOPS) {
    const release = `6.97.${n++}-mounthang`;
    test(`${stop.name} while the mount child hangs after mounting (HTTP ${http ? 'on' : 'off'}): exits soon, no mount left`, async (t) => {
      const skip = await fuseDeviceSkipReason();
      if (skip) return t.skip(skip);
      const s = await hungMount(t, http, release);
      try {
        for (const [i, signal] of stop.signals.entries()) {
          if (i > 0) await s.d.waitFor((l) => l.msg === 'stopping', 'the first stop to begin');
          s.d.child.kill(signal);
        }
        const code = await exitWithin(s.d, EXIT_BOUND_MS);
        const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
        assert.notEqual(code, 'still running', `must exit; mounted: ${mountinfo.includes(` ${s.mnt} `)}; logs: ${JSON.stringify(s.d.logs.slice(-4))}`);
        await assertNoMount(s.mnt);
        assert.equal(code, stop.code);
        assert.equal(s.d.logs.some((l) => l.msg === 'serving'), false, 'a start stopped before it was done never said it was serving');
      } finally {
        await s.d.stop();
        await unmountIfLeft(s.mnt);
      }
    });
  }
}

test('the start fails (the cache unreadable after HTTP is up) while the mount child hangs: exits soon, no mount left', async (t) => {
  const skip = await fuseDeviceSkipReason();
  if (skip) return t.skip(skip);
  const go = path.join(await tempDir(t, 'kheadersd-mounthang-gate-'), 'go');
  const s = await hungMount(t, true, '6.97.20-mounthang', 'before', go);
  try {
    await s.d.waitFor((l) => l.msg === 'HTTP listening', 'HTTP to listen');
    // entries/ a symbolic link: the cache refuses to read it (E_CACHE_UNREADABLE) at publish().
    const entries = path.join(s.cache, 'entries');
    await rename(entries, `${entries}.real`);
    await symlink('entries.real', entries);
    await writeFile(go, '');
    const code = await exitWithin(s.d, EXIT_BOUND_MS);
    assert.notEqual(code, 'still running', `the failed start must not wait on its hung mount child; logs: ${JSON.stringify(s.d.logs.slice(-3))}`);
    assert.notEqual(code, 0);
    await assertNoMount(s.mnt);
  } finally {
    await s.d.stop();
    await unmountIfLeft(s.mnt);
  }
});

test('a mount child that hangs after mounting, until its timeout: the mount is taken down, and HTTP serves alone', async (t) => {
  const skip = await fuseDeviceSkipReason();
  if (skip) return t.skip(skip);
  const s = await hungMount(t, true, '6.97.21-mounthang');
  try {
    // The child's bound is 15 s (mount.ts).
    const given = await s.d.waitFor((l) => typeof l.msg === 'string' && l.msg.startsWith('no FUSE mount, serving HTTP only'), 'the mount to be given up', 30_000);
    await assertNoMount(s.mnt);
    assert.match(String(given.msg), /mount did not finish in 15 s/, 'said as it was: the child ran, and hung');
    s.d.child.kill('SIGTERM');
    assert.equal(await exitWithin(s.d, EXIT_BOUND_MS), 0);
  } finally {
    await s.d.stop();
    await unmountIfLeft(s.mnt);
  }
});

for (const http of [true, false]) {
  test(`SIGTERM while \`mount --version\` hangs (HTTP ${http ? 'on' : 'off'}): exits 0 at once, nothing mounted`, async (t) => {
    const skip = await fuseDeviceSkipReason();
    if (skip) return t.skip(skip);
    const s = await hungMount(t, http, `6.97.${http ? 22 : 23}-mounthang`, 'version');
    try {
      s.d.child.kill('SIGTERM');
      const code = await exitWithin(s.d, EXIT_BOUND_MS);
      assert.notEqual(code, 'still running', `must not wait on \`mount --version\`; logs: ${JSON.stringify(s.d.logs.slice(-3))}`);
      assert.equal(code, 0, 'a stop during the start is a clean stop');
      await assertNoMount(s.mnt);
    } finally {
      await s.d.stop();
      await unmountIfLeft(s.mnt);
    }
  });
}

for (const stop of STOPS) {
  test(`${stop.name} with a \`umount\` on PATH that hangs: exits soon, the mount detached all the same`, async (t) => {
    const skip = await fuseDeviceSkipReason();
    if (skip) return t.skip(skip);
    const dir = await tempDir(t, 'kheadersd-umounthang-');
    const [cache, mnt, bin, archive, pidFile] = ['cache', 'mnt', 'bin', 'kernel.tar.xz', 'umount.pids'].map((n) => path.join(dir, n)) as [string, string, string, string, string];
    await mkdir(mnt);
    await mkdir(bin);
    await writeFile(archive, await goodArchive(`6.97.${30 + STOPS.indexOf(stop)}-umounthang`));
    await writeFile(path.join(bin, 'umount'), `#!/bin/sh\necho $$ >> '${pidFile}'\nexec sleep 60\n`);
    await chmod(path.join(bin, 'umount'), 0o755);
    const d = startServe(t, ['--archive', archive, '--cache-dir', cache, '--mount', mnt, '--http', 'off', '--btf', 'off', '--fuse-backend', 'kernel', '--log-level', 'info'], {
      PATH: `${bin}${path.delimiter}${process.env.PATH ?? ''}`,
    });
    t.after(() => unmountIfLeft(mnt));
    // Its sleeps outlive a daemon that does not kill them: killed when the test ends.
    t.after(async () => {
      for (const pid of (await readFile(pidFile, 'utf8').catch(() => '')).split('\n').filter(Boolean)) {
        try {
          process.kill(Number(pid), 'SIGKILL');
        } catch {
          // gone already
        }
      }
    });
    try {
      await d.waitFor((l) => l.msg === 'serving', 'the start to end');
      for (const [i, signal] of stop.signals.entries()) {
        if (i > 0) await d.waitFor((l) => l.msg === 'stopping', 'the first stop to begin');
        d.child.kill(signal);
      }
      const code = await exitWithin(d, EXIT_BOUND_MS);
      assert.notEqual(code, 'still running', `must not wait on a hung umount; logs: ${JSON.stringify(d.logs.slice(-3))}`);
      await assertNoMount(mnt);
      assert.equal(code, stop.code);
    } finally {
      await d.stop();
      await unmountIfLeft(mnt);
    }
  });
}
