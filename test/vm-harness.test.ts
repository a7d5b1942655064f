/**
 * The VM harness's own contract, without booting anything: the qemu command line each option
 * makes (per architecture, root, cache and port forward), the events it parses, the shell
 * scripts the VM runs (POSIX sh, shellcheck-clean: they run under the host's /bin/sh as PID 1),
 * and that a VM test file that leaks a handle exits anyway (exit-guard.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { parseEvent, qemuArgs, REPO_ROOT, VM_SCRIPTS, X86_64, type VmArch } from './vm/vm.js';
import { run, toolSkipReason } from './helpers/fuse-env.js';
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
