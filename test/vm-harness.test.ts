/**
 * The VM harness's own contract, without booting anything: the qemu command line each option
 * makes (per architecture, root, cache and port forward), the events it parses, the shell
 * scripts the VM runs (POSIX sh, shellcheck-clean: they run under the host's /bin/sh as PID 1),
 * and that nothing a VM test opens outlives it: dispose() and a failed start close all of a
 * VM's handles (with a stand-in qemu: a shell script), in this harness and in test/arm64's, and
 * a test file that leaks one exits.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { activeHandles } from './vm/exit-guard.js';
import { parseEvent, qemuArgs, REPO_ROOT, startVm, VM_SCRIPTS, X86_64, type VmArch, type VmSession } from './vm/vm.js';
import { startArm64Vm } from './arm64/qemu-arm64.js';
import { removeDir, run, tempDir, toolSkipReason } from './helpers/fuse-env.js';
import { tool } from './vm/support.js';

const where = { share: '/w/share', socket: '/w/ev.sock', httpPort: null };
const appendOf = (args: string[]): string[] => args[args.indexOf('-append') + 1]!.split(' ');
const pairs = (args: string[], flag: string): string[] => args.flatMap((a, i) => (a === flag ? [args[i + 1]!] : []));

test('x86_64 on the host root: 9p root read-only, init.sh as PID 1, modules and cache named for init', () => {
  const args = qemuArgs({ kernel: { arch: X86_64, image: '/k/bzImage', modulesDir: '/k/lib/modules/6.1.192' }, scenario: '', cache: { kind: 'disk', image: '/w/c.img' } }, where);
  assert.equal(args[args.indexOf('-kernel') + 1], '/k/bzImage');
  assert.equal(args[args.indexOf('-machine') + 1], 'q35');
  const append = appendOf(args);
  assert.ok(append.includes('console=ttyS0'));
  assert.ok(append.includes('root=hostroot') && append.includes('ro'));
  assert.ok(append.includes('rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose'), 'the read-only root is cached in the guest');
  assert.ok(append.includes(`init=${path.join(VM_SCRIPTS, 'init.sh')}`));
  assert.ok(append.includes('kh_modules=/k/lib/modules/6.1.192'));
  assert.ok(append.includes('kh_cache=disk'));
  assert.ok(pairs(args, '-fsdev').some((f) => f.startsWith('local,id=hostroot,path=/,readonly=on')));
  assert.ok(pairs(args, '-drive').some((d) => d.includes('file=/w/c.img') && d.includes('cache=writethrough')), 'the power-cut cache mode');
  assert.ok(!args.includes('-nic'), 'no network unless asked');
});

test('a host directory cache, and the HTTP forward to the guest\'s 7711', () => {
  const args = qemuArgs({ kernel: { arch: X86_64, image: '/k/bzImage' }, scenario: '', cache: { kind: 'host-dir', dir: '/c' } }, { ...where, httpPort: 40123 });
  assert.ok(pairs(args, '-fsdev').some((f) => f === 'local,id=khcache,path=/c,security_model=passthrough'));
  assert.ok(appendOf(args).includes('kh_cache=9p') && appendOf(args).includes('kh_net=1'));
  assert.deepEqual(pairs(args, '-nic'), ['user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:40123-:7711']);
});

test('another architecture boots an initramfs: its qemu, machine and console; no host root', () => {
  const arm64: VmArch = { name: 'arm64', qemu: 'qemu-system-aarch64', machine: 'virt', cpu: 'max', console: 'ttyAMA0', hostRoot: false };
  const args = qemuArgs({ kernel: { arch: arm64, image: '/k/Image.gz' }, scenario: '', root: { kind: 'initrd', initrd: '/k/initramfs.cpio.gz' } }, where);
  assert.equal(args[args.indexOf('-machine') + 1], 'virt');
  assert.equal(args[args.indexOf('-initrd') + 1], '/k/initramfs.cpio.gz');
  const append = appendOf(args);
  assert.ok(append.includes('console=ttyAMA0') && append.includes('rdinit=/init'));
  assert.ok(!append.some((a) => a.startsWith('root=')));
  assert.ok(!pairs(args, '-fsdev').some((f) => f.includes('id=hostroot')));
  assert.ok(pairs(args, '-fsdev').some((f) => f.includes('id=khshare')), 'the share and the events port are there for any arch');
  assert.ok(pairs(args, '-device').includes('virtserialport,chardev=khev,name=kh.events'));
});

test('events: "TAG TEXT", the daemon\'s JSON log lines parsed', () => {
  assert.deepEqual(parseEvent('kh-exit 0', 5), { tag: 'kh-exit', text: '0', atMs: 5 });
  assert.deepEqual(parseEvent('ready', 1), { tag: 'ready', text: '', atMs: 1 });
  const e = parseEvent('serve {"msg":"ingesting","progress":{"percent":42}}', 9);
  assert.equal(e.tag, 'serve');
  assert.deepEqual(e.json, { msg: 'ingesting', progress: { percent: 42 } });
  assert.equal(parseEvent('serve {not json', 0).json, undefined);
  assert.equal(parseEvent('serve [1,2]', 0).json, undefined, 'only objects');
});

test('init.sh and lib.sh are POSIX sh and shellcheck-clean', async (t) => {
  const skip = await toolSkipReason('shellcheck');
  if (skip) return t.skip(skip);
  await tool('shellcheck', ['-s', 'sh', path.join(VM_SCRIPTS, 'init.sh'), path.join(VM_SCRIPTS, 'lib.sh')]);
});

/** This process's handles now, once handles closed just before have finished closing. */
async function handlesSettled(): Promise<string[]> {
  await delay(100);
  return activeHandles();
}

/** The two harnesses, started with `qemu` as their qemu binary: test/vm's, and test/arm64's (its own, for the initramfs it boots). */
const HARNESSES: ReadonlyArray<[string, (qemu: string) => Promise<{ waitFor: VmSession['waitFor']; dispose(): Promise<void> }>]> = [
  ['vm.ts', (qemu) => startVm({ kernel: { arch: { ...X86_64, qemu }, image: '/nonexistent' }, scenario: 'true', forwardHttp: true })],
  ['arm64/qemu-arm64.ts', (qemu) => startArm64Vm({ qemu, kernel: '/nonexistent', initrd: '/nonexistent', scenario: 'true', forwardHttp: true })],
];

for (const [harness, start] of HARNESSES) {
  test(`${harness}: dispose() of a VM whose qemu will not finish dying: bounded, and nothing of the VM is left open`, { timeout: 60_000 }, async (t) => {
    const work = await tempDir('vm-dispose');
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
    const vm = await start(fake);
    const holder = await pidOf('holder.pid');
    t.after(() => process.kill(holder, 'SIGKILL'));
    const qemu = await pidOf('qemu.pid');
    const waiting = assert.rejects(vm.waitFor(() => false, 'an event that never comes', 600_000), /the VM ended before an event that never comes/, 'a pending waitFor ends with the VM');
    const t0 = performance.now();
    await vm.dispose();
    assert.ok(performance.now() - t0 < 20_000, `dispose() took ${Math.round(performance.now() - t0)} ms`);
    await waiting;
    assert.throws(() => process.kill(qemu, 0), { code: 'ESRCH' }, 'qemu was killed');
    assert.deepEqual(await handlesSettled(), before, 'the events server, qemu\'s pipes and its process handle are all closed');
  });

  test(`${harness}: a VM that fails to start leaves nothing listening`, async () => {
    const before = await handlesSettled();
    // spawn refuses a file name with a NUL byte at once: a failure after the events server listens.
    await assert.rejects(start('qemu\0'));
    assert.deepEqual(await handlesSettled(), before);
  });
}

test('exitWhenDone: a test file that leaks a server exits once its grace is over, names what held it, and fails; a clean one exits at once', async () => {
  const child = path.join(REPO_ROOT, 'dist/test/helpers/exit-guard-child.js');
  const env = (mode: string, graceMs: number): NodeJS.ProcessEnv => {
    // Not as a child of this runner (NODE_TEST_CONTEXT): as a file that a runner, or a person, runs.
    const e: NodeJS.ProcessEnv = { ...process.env, KH_GUARD_MODE: mode, KH_GUARD_GRACE_MS: String(graceMs) };
    delete e['NODE_TEST_CONTEXT'];
    return e;
  };
  const leak = await run(process.execPath, [child], { env: env('leak', 1000), timeoutMs: 30_000 });
  assert.equal(leak.signal, null, 'it exited by itself');
  assert.equal(leak.code, 1);
  assert.match(leak.stderr, /still running 1 s after its tests ended/);
  assert.match(leak.stderr, /a listening server \(127\.0\.0\.1:\d+\)/, 'what held it is named');
  const t0 = performance.now();
  const clean = await run(process.execPath, [child], { env: env('clean', 20_000), timeoutMs: 30_000 });
  assert.equal(clean.code, 0, clean.stderr);
  assert.ok(performance.now() - t0 < 15_000, 'the guard itself never holds a process that has drained');
  // Under the runner, as `npm test` runs files: a file whose tests passed but that leaks fails,
  // and the runner ends.
  const runner = await run(process.execPath, ['--test', child], { env: env('leak-passing', 1000), timeoutMs: 30_000 });
  assert.equal(runner.signal, null);
  assert.equal(runner.code, 1, runner.stdout);
  assert.match(runner.stdout, /^# pass 1$/m, 'its test passed');
});
