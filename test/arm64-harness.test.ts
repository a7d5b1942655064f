/**
 * The arm64 VM harness (test/arm64/qemu-arm64.ts) holds to test/vm's bounds without booting
 * anything (a stand-in qemu: a shell script): dispose() of a VM whose qemu will not finish dying
 * returns within its bound and leaves nothing of the VM open, a pending waitFor ends with it, and
 * a failed start leaves nothing listening. Before, its dispose() waited for qemu's 'close' for
 * good, and a failed start left the events server holding the test process.
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import { startArm64Vm } from './arm64/qemu-arm64.js';
import { removeDir, tempDir } from './helpers/fuse-env.js';
import { activeHandles } from './vm/exit-guard.js';

/** This process's handles now, once handles closed just before have finished closing. */
async function handlesSettled(): Promise<string[]> {
  await delay(100);
  return activeHandles();
}

test('arm64: dispose() of a VM whose qemu will not finish dying is bounded, and nothing of the VM is left open', { timeout: 60_000 }, async (t) => {
  const work = await tempDir('arm64-dispose');
  t.after(() => removeDir(work));
  // A "qemu" whose stdout outlives it, as a qemu stuck in the kernel keeps its pipes after
  // SIGKILL: its 'close' never comes (a child it leaves behind holds the pipe).
  const fake = path.join(work, 'qemu');
  await writeFile(fake, `#!/bin/sh\nsleep 600 &\necho $! >"${work}/holder.pid"\necho $$ >"${work}/qemu.pid"\nexec sleep 600\n`, { mode: 0o755 });
  const pidOf = async (name: string): Promise<number> => {
    for (let i = 0; i < 100; i++) {
      const text = await readFile(path.join(work, name), 'utf8').catch(() => '');
      if (text.endsWith('\n')) return Number(text);
      await delay(50);
    }
    throw new Error(`the stand-in qemu never wrote ${name}`);
  };
  const before = await handlesSettled();
  const vm = await startArm64Vm({ qemu: fake, kernel: '/nonexistent', initrd: '/nonexistent', scenario: 'true', forwardHttp: true });
  const holder = await pidOf('holder.pid');
  t.after(() => process.kill(holder, 'SIGKILL'));
  const qemu = await pidOf('qemu.pid');
  const waiting = assert.rejects(vm.waitFor(() => false, 'an event that never comes', 600_000), /the VM ended before an event that never comes/, 'a pending waitFor ends with the VM');
  const t0 = performance.now();
  await vm.dispose();
  assert.ok(performance.now() - t0 < 20_000, `dispose() took ${Math.round(performance.now() - t0)} ms`);
  await waiting;
  assert.throws(() => process.kill(qemu, 0), { code: 'ESRCH' }, 'qemu was killed');
  assert.deepEqual(await handlesSettled(), before, "the events server, qemu's pipes and its process handle are all closed");
});

test('arm64: a VM that fails to start leaves nothing listening', async () => {
  const before = await handlesSettled();
  // spawn refuses a file name with a NUL byte at once: a failure after the events server listens.
  await assert.rejects(startArm64Vm({ qemu: 'qemu\0', kernel: '/nonexistent', initrd: '/nonexistent', scenario: 'true', forwardHttp: true }));
  assert.deepEqual(await handlesSettled(), before);
});
