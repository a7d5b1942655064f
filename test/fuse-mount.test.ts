/**
 * The fuse-native backend (libfuse2 through fuse-native): the shared FUSE suite (the real
 * fixture through the mount, kernel swaps, the mount point's life; test/helpers/fuse-suite.ts),
 * then what only this backend has: E_FUSE when libfuse.so.2 is missing, and mountFuse's
 * dispatch between the backends. Skipped, with the reason, where /dev/fuse, libfuse.so.2, the
 * fixture or a tool is missing.
 *
 * Everything that touches the mount is asynchronous (fs.promises, child processes): this
 * process serves the mount on its JS thread, so a synchronous call on the mount deadlocks.
 */
import assert from 'node:assert/strict';
import { readdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { IndexFsModel } from '../src/serve/fuse/index-model.js';
import { mountFuse } from '../src/serve/fuse/index.js';
import { isMounted } from '../src/serve/fuse/mountpoint.js';
import { fuseSkipReason, quietLog, removeDir, run, tempDir, toolSkipReason } from './helpers/fuse-env.js';
import { fixtureMountSuite, mountInNamespace, mountLifeSuite, type FuseTestBackend } from './helpers/fuse-suite.js';

const skip = await fuseSkipReason();

const native: FuseTestBackend = {
  name: 'fuse-native',
  backend: 'native',
  skip,
  mountSource: 'kheaders',
  mount: (mountpoint, model) => mountFuse({ mountpoint, model, log: quietLog(), backend: 'native' }),
};

fixtureMountSuite(native, (c, suiteSkip) => {
  // fuse-native answers every open (libfuse has no zero-message open), so counting opens shows
  // that a toolchain really read its headers through the mount, even with the kernel's caches warm.
  test('clang and BCC open their headers through the mount (every open reaches fuse-native)', { skip: suiteSkip }, (t) => {
    const { clangCold, bcc } = c().requests;
    if (!clangCold || !bcc) return t.skip(`the shared ${clangCold ? 'BCC' : 'clang'} test did not measure (skipped or failed above)`);
    assert.ok((clangCold['open'] ?? 0) > 100, `the compile read its headers through the mount (${clangCold['open'] ?? 0} opens)`);
    assert.ok((bcc['open'] ?? 0) > 50, `BCC read its headers through the mount (${bcc['open'] ?? 0} opens)`);
  });
});
mountLifeSuite(native);

describe('fuse-native: what only this backend does', () => {
  let work: string | undefined;

  before(async () => {
    if (!skip) work = await tempDir('native');
  });
  after(async () => {
    if (work) await removeDir(work);
  });

  test('E_FUSE names the cause when libfuse.so.2 is missing (in a private mount namespace)', { skip }, async (t) => {
    const noUnshare = await toolSkipReason('unshare');
    if (noUnshare) return t.skip(noUnshare);
    const lib = (await run('sh', ['-c', "ldconfig -p | awk '/libfuse.so.2 /{print $NF; exit}'"])).stdout.trim();
    if (!lib) return t.skip('libfuse.so.2 is not in the ldconfig cache');
    const empty = path.join(work!, 'empty.so');
    await writeFile(empty, '');
    const noLib = await mountInNamespace(work!, 'native', `mount --bind ${JSON.stringify(empty)} ${JSON.stringify(lib)}`);
    assert.equal(noLib.code, 'E_FUSE', JSON.stringify(noLib));
    assert.match(noLib.message ?? '', /libfuse\.so\.2 is not installed/);
    assert.equal(noLib.details?.['unavailable'], true, 'the cause is marked: fuse-native cannot load here');
  });

  test('mountFuse dispatches: auto is the kernel backend as root (measured faster), native and kernel load their own', { skip }, async (t) => {
    const model = new IndexFsModel({ log: quietLog() });
    model.setEntries([], null);
    try {
      const auto = await mountFuse({ mountpoint: path.join(work!, 'auto'), model, log: quietLog(), backend: 'auto' });
      try {
        // The kernel backend mounts only as root; without root, auto falls back to fuse-native.
        assert.equal(auto.backend, process.getuid?.() === 0 ? 'kernel' : 'native');
      } finally {
        await auto.unmount();
      }
      const n = await mountFuse({ mountpoint: path.join(work!, 'n'), model, log: quietLog(), backend: 'native' });
      try {
        assert.equal(n.backend, 'native');
      } finally {
        await n.unmount();
      }
      const kernelBuilt = await stat(path.join(path.dirname(fileURLToPath(import.meta.url)), '../src/serve/fuse/kernel/index.js')).then(
        () => true,
        () => false,
      );
      if (!kernelBuilt) return t.skip('src/serve/fuse/kernel/ is not built');
      const k = await mountFuse({ mountpoint: path.join(work!, 'k'), model, log: quietLog(), backend: 'kernel' });
      try {
        assert.equal(k.backend, 'kernel');
        assert.deepEqual(await readdir(k.mountpoint), ['by-digest']);
      } finally {
        await k.unmount();
      }
      assert.equal(await isMounted(path.join(work!, 'k')), false);
    } finally {
      await model.close();
    }
  });
});
