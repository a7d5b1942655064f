/**
 * A cache volume with no room left must not stop `serve` from starting: what it holds is served.
 * Real processes on a real tmpfs whose inodes run out (a phone's /data fills up too); the bytes
 * served are checked against the archive's own.
 */
import assert from 'node:assert/strict';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { freePort } from '../bench/probe.js';
import { goodArchive, SYNTH_RELEASE } from './helpers/archives.js';
import { startServe } from './helpers/serve-child.js';
import { mountTmpfs } from './helpers/tmpfs.js';

/** Make empty files under `dir` until the volume refuses one (ENOSPC): no inode is left. */
async function useEveryInode(dir: string): Promise<number> {
  await mkdir(dir);
  for (let i = 0; ; i++) {
    try {
      await writeFile(path.join(dir, String(i)), '');
    } catch (err) {
      assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC');
      return i;
    }
  }
}

test('a cached start on a cache volume with no inode left serves the cached entry, and says why it could not check it', { timeout: 120_000 }, async (t) => {
  const vol = await mountTmpfs(t, '64m', 'nr_inodes=400');
  if ('skip' in vol) return t.skip(vol.skip);
  const archive = path.join(vol.dir, 'kheaders.tar.xz');
  await writeFile(archive, await goodArchive());
  const cache = path.join(vol.dir, 'cache');
  const args = (port: number): string[] => ['--archive', archive, '--release', SYNTH_RELEASE, '--cache-dir', cache, '--mount', 'off', '--btf', 'off', '--http', `127.0.0.1:${port}`, '--log-level', 'info'];

  // A first boot makes the entry (and `current`).
  const first = startServe(t, args(await freePort()));
  try {
    await first.waitFor((l) => l.msg === 'serving', 'the first boot serving');
  } finally {
    await first.stop();
  }
  // The module headers' directory is made again at the next start, where no inode is left for it.
  await rm(path.join(cache, 'module-btf'), { recursive: true, force: true });
  assert.ok((await useEveryInode(path.join(vol.dir, 'fill'))) > 0);

  const port = await freePort();
  const d = startServe(t, args(port));
  try {
    await d.waitFor((l) => l.msg === 'serving', 'serving on a full volume');
    const res = await fetch(`http://127.0.0.1:${port}/v1/kernels/current/files/include/generated/utsrelease.h`);
    assert.equal(res.status, 200);
    assert.match(await res.text(), new RegExp(SYNTH_RELEASE.replace(/\./g, '\\.')));
    assert.ok(d.logs.some((l) => l.code === 'E_NO_SPACE' && /serving the cached entry/.test(String(l.msg))), `the start says the cache is full: ${JSON.stringify(d.logs.map((l) => l.msg))}`);
    assert.ok(d.logs.some((l) => l.errno === 'ENOSPC' && /module headers cannot be kept/.test(String(l.msg))), 'the module headers say why none are kept');
  } finally {
    await d.stop();
  }
});
