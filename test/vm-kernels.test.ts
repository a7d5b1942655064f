/**
 * The daemon on real kernels, booted under qemu: discovery as shipped (no archive until a real
 * `modprobe kheaders`), `pull` from the host through a forwarded port, and kernel swaps across
 * reboots with one persistent cache: A → A rebuilt (same release, new archive) → B → A.
 *
 * One cache directory on the host, shared read-write into every boot as /var/cache/kheadersd.
 * Each boot runs `kheadersd serve` the way the systemd unit does (no flags; settings, when any,
 * in /etc/kheadersd/config.json) and records, from inside: lsmod before and after, what a reader
 * of /run/kheaders/current saw from boot until the end (a sampler), the entries (`ls --json`
 * before the daemon and where `ls` is the point, else the daemon's /v1/kernels, which is the
 * same summary without a node start), and more; the host polls /v1/kernels/current through the
 * forwarded port meanwhile. The checks are here.
 */
import { spawnSync } from 'node:child_process';
import { chmod, mkdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import assert from 'node:assert/strict';
import { parseBuildId } from '../src/source/notes.js';
import { loadKernel, X86_KERNELS, type TestKernel } from './vm/kernels.js';
import { context, elapsed, hostCli, readLog, readOut, referenceTree, sha256, treeDifferences, vmSkipReason, VM_TEST_TIMEOUT_MS } from './vm/support.js';
import { exitWhenDone } from './vm/exit-guard.js';
import { startVm, type VmResult } from './vm/vm.js';
import { removeDir, tempDir } from './helpers/fuse-env.js';

/** One boot's script: env flags choose the extras (see bootKernel). */
const SCENARIO = String.raw`
set -u
lsmod >"$KH_OUT/lsmod-before"
cat /var/cache/kheadersd/current >"$KH_OUT/pointer-at-boot" 2>/dev/null || :
if [ -n "$PRELOAD" ]; then modprobe kheaders && lsmod >"$KH_OUT/lsmod-before" || exit 10; fi
if [ -n "$CONFIG_JSON" ]; then mkdir -p /etc/kheadersd && printf '%s\n' "$CONFIG_JSON" >/etc/kheadersd/config.json; fi
if [ -n "$LS_BEFORE" ]; then kh ls --json >"$KH_OUT/ls-before.json" 2>"$KH_OUT/ls-before.err"; fi
kh_sampler_start
kh_start serve serve
kh_wait_log serve '"msg":"mounted"' 600 || exit 11
kh_emit ready
lsmod >"$KH_OUT/lsmod-serving"
cp /sys/kernel/notes "$KH_OUT/notes"
kh_digest_inodes
# The entries as the daemon serves them. Each CLI call is a node start, seconds under TCG: the
# CLI's ls (the same summaries, plus whether this boot reused the current one) runs where the
# test asks what only it says; otherwise the daemon's own /v1/kernels, read with curl.
if [ -n "$LS_CLI" ]; then
  kh ls --json >"$KH_OUT/ls.json" || exit 12
  kh ls >"$KH_OUT/ls.txt" || exit 13
else
  curl -sSf http://127.0.0.1:7711/v1/kernels >"$KH_OUT/ls.json" || exit 12
fi
if [ -n "$DOCTOR" ]; then KHEADERSD_DOCTOR_TIMEOUT=180 kh doctor --json >"$KH_OUT/doctor.json"; echo $? >"$KH_OUT/doctor.status"; fi
if [ -n "$BTF" ]; then cp /sys/kernel/btf/vmlinux "$KH_OUT/btf" && cp /run/kheaders/current/vmlinux.h "$KH_OUT/vmlinux.h" || exit 14; fi
if [ -n "$MODULE_BTF" ]; then
  # A module loaded while the daemon serves: its header appears under btf/, made from its split BTF.
  modprobe "$MODULE_BTF" || exit 21
  cp "/sys/kernel/btf/$MODULE_BTF" "$KH_OUT/module.btf" || exit 22
  cat "/run/kheaders/current/btf/$MODULE_BTF.h" >"$KH_OUT/module-served.h" || exit 23
  kh btf --module "$MODULE_BTF" --out "$KH_OUT/module-cli.h" || exit 24
  zcat /proc/config.gz >"$KH_OUT/config-kernel" || exit 25
  cat /run/kheaders/current/.config >"$KH_OUT/config-served" || exit 26
  modprobe -r "$MODULE_BTF" || :
fi
if [ -n "$WAIT_HOST" ]; then kh_wait_host "$WAIT_HOST" || exit 15; fi
kh_sampler_stop
kh_stop serve >"$KH_OUT/serve.status" || exit 16
lsmod >"$KH_OUT/lsmod-after"
if [ -n "$THEN_MISSING" ]; then
  # The same kernel with its kheaders module gone: no archive to be had at all.
  modprobe -r kheaders || exit 17
  rm -rf "/lib/modules/$(uname -r)"
  kh_start missing serve
  kh_wait_log missing '"msg":"mounted"' 600 || exit 18
  curl -sSf http://127.0.0.1:7711/v1/kernels >"$KH_OUT/ls-missing.json" || exit 19
  readlink /run/kheaders/current >"$KH_OUT/current-missing"
  kh_stop missing >/dev/null || exit 20
fi
`;

interface BootPlan {
  kernel: TestKernel;
  /** modprobe kheaders before the daemon starts. */
  preload?: boolean;
  config?: Record<string, unknown>;
  lsBefore?: boolean;
  /** The entries from the CLI's `ls` (text and --json) rather than the daemon's /v1/kernels. */
  lsCli?: boolean;
  doctor?: boolean;
  btf?: boolean;
  /** Load this module while the daemon serves and read its header from the mount. */
  moduleBtf?: string;
  /** Forward HTTP and poll /v1/kernels/current from the host while the VM runs. */
  http?: boolean;
  /** Host work to do while the daemon serves (the VM waits for it). */
  whileServing?: (port: number) => Promise<void>;
  /** After the daemon stopped: unload kheaders, delete the modules, serve again. */
  thenMissing?: boolean;
}

interface Boot extends VmResult {
  /** Digests /v1/kernels/current answered with, as seen from the host, in order (deduplicated runs). */
  httpDigests: string[];
  entries: Summary[];
}

interface Summary {
  release: string;
  digest: string;
  buildId: string | null;
  source: string;
  current: boolean;
  reused?: boolean;
  vmlinuxH: boolean;
  ingestedAt: string;
}

const hasModule = (lsmod: string): boolean => /^kheaders\s/m.test(lsmod);

/**
 * What /v1/kernels/current answers through the forwarded port, polled from the host while the
 * VM runs: each digest appended to `into` when it differs from the last. Runs until `stop`
 * aborts, which the caller does on every path (a poller left running after a failed boot kept
 * this file's process alive, with no VM left, until the run's budget ran out).
 */
async function pollCurrentDigests(port: number, stop: AbortSignal, into: string[]): Promise<void> {
  while (!stop.aborted) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/v1/kernels/current`, { signal: AbortSignal.any([stop, AbortSignal.timeout(2000)]) });
      const body = (await res.json()) as { digest?: string };
      if (res.ok && body.digest !== undefined && into.at(-1) !== body.digest) into.push(body.digest);
    } catch {
      // not listening yet, the VM is gone, or we were told to stop
    }
    await delay(150, undefined, { signal: stop }).catch(() => undefined);
  }
}

exitWhenDone(test('real kernels: discovery as shipped, pull through a forwarded port, swaps across reboots with one cache', { timeout: VM_TEST_TIMEOUT_MS }, async (t) => {
  const skip = await vmSkipReason(Object.values(X86_KERNELS), { root: true });
  if (skip) return t.skip(skip);
  const started = performance.now();
  const work = await tempDir('vm-kernels');
  t.after(() => removeDir(work));
  const cache = path.join(work, 'cache');
  await mkdir(cache, { mode: 0o755 });
  await chmod(cache, 0o755);
  const [a, rebuilt, b] = await Promise.all([loadKernel(X86_KERNELS.a), loadKernel(X86_KERNELS.rebuilt), loadKernel(X86_KERNELS.b)]);
  assert.equal(a.release, rebuilt.release, 'the rebuilt kernel keeps the release');
  assert.notEqual(a.archiveSha256, rebuilt.archiveSha256, 'the rebuilt kernel has another archive');
  const idOf = (k: TestKernel): string => `${k.release}~${k.archiveSha256}`;

  /** One boot, run to its end; its VM is disposed of when the step `st` ends, whether it passed or failed. */
  const boot = async (st: TestContext, plan: BootPlan): Promise<Boot> => {
    const vm = await startVm({
      kernel: plan.kernel,
      cache: { kind: 'host-dir', dir: cache },
      forwardHttp: plan.http === true || plan.whileServing !== undefined,
      timeoutMs: 600_000,
      env: {
        PRELOAD: plan.preload ? '1' : '',
        CONFIG_JSON: plan.config ? JSON.stringify(plan.config) : '',
        LS_BEFORE: plan.lsBefore ? '1' : '',
        LS_CLI: plan.lsCli ? '1' : '',
        DOCTOR: plan.doctor ? '1' : '',
        BTF: plan.btf ? '1' : '',
        MODULE_BTF: plan.moduleBtf ?? '',
        WAIT_HOST: plan.whileServing ? 'host-done' : '',
        THEN_MISSING: plan.thenMissing ? '1' : '',
      },
      scenario: SCENARIO,
      ...(process.env['KHEADERSD_VM_CONSOLE'] ? { consoleTo: process.stderr } : {}),
    });
    st.after(() => vm.dispose());
    const httpDigests: string[] = [];
    const stopPolling = new AbortController();
    const poller = vm.httpPort !== null ? pollCurrentDigests(vm.httpPort, stopPolling.signal, httpDigests) : Promise.resolve();
    let result: VmResult;
    try {
      if (plan.whileServing) {
        try {
          await vm.waitFor((e) => e.tag === 'ready', 'the daemon to serve', 600_000);
          await plan.whileServing(vm.httpPort!);
        } finally {
          vm.send('host-done');
        }
      }
      result = await vm.result;
    } finally {
      stopPolling.abort();
      await poller;
    }
    assert.equal(result.status, 0, `the scenario failed (status ${result.status})${context(result)}`);
    const entries = JSON.parse(await readOut(result, 'ls.json')) as Summary[];
    const ready = result.events.find((e) => e.tag === 'ready')?.atMs;
    t.diagnostic(`${plan.kernel.name}: scenario started at ${result.bootMs} ms, daemon serving at ${ready} ms, powered off at ${result.durationMs} ms; qemu used ${(result.cpuMs / 1000).toFixed(1)} s of CPU`);
    return { ...result, httpDigests, entries };
  };

  /** What every boot must show: the running kernel's entry is current, and nothing else ever was. */
  const checkCurrent = async (r: Boot, k: TestKernel): Promise<void> => {
    const current = r.entries.filter((e) => e.current);
    assert.equal(current.length, 1, `one current entry: ${JSON.stringify(r.entries)}`);
    assert.equal(current[0]!.release, k.release);
    assert.equal(current[0]!.digest, k.archiveSha256, 'the current entry is the running kernel\'s archive');
    assert.equal(current[0]!.buildId, k.buildId, 'its build id is the running kernel\'s');
    assert.equal(parseBuildId(await readFile(path.join(r.outDir, 'notes'))), k.buildId, '/sys/kernel/notes names the kernel booted');
    // The sampler: from boot to the end, current was absent or this kernel's entry, never another.
    const inodes = new Map(
      (await readOut(r, 'digest-inodes'))
        .trim()
        .split('\n')
        .map((l) => l.split(' ').reverse() as [string, string]),
    );
    const samples = (await readOut(r, 'samples')).trim().split('\n');
    const seen = samples.map((line) => line.split(' ')).filter(([, link]) => link !== '-');
    assert.ok(seen.length > 0, `the sampler saw the mount: ${samples.join(' | ')}`);
    for (const [, link, ino] of seen) {
      assert.equal(link, k.release, `current pointed at ${link} while ${k.release} ran (samples: ${samples.join(' | ')})`);
      if (ino !== '-') assert.equal(inodes.get(ino!), k.archiveSha256, `current served the entry of inode ${ino} (${inodes.get(ino!) ?? 'unknown'}) while ${k.name} ran`);
    }
    for (const d of r.httpDigests) assert.equal(d, k.archiveSha256, `/v1/kernels/current answered ${d} while ${k.name} ran (all: ${r.httpDigests.join(', ')})`);
    // A CLI reader right after boot, before the daemon ran: no entry of another kernel is current.
    if ((await readOut(r, 'ls-before.json').catch(() => null)) !== null) {
      const before = JSON.parse(await readOut(r, 'ls-before.json')) as Summary[];
      // Before anything read this boot's archive, `current` is a cached entry of this very kernel
      // (resolve.ts: its release and its build id). The rebuilt kernel is the same vmlinux (same
      // build id) with only kheaders.ko rebuilt, so the first build's entry qualifies until the
      // daemon has read the archive; an entry of another build id never does.
      for (const e of before.filter((x) => x.current)) {
        assert.ok(
          e.digest === k.archiveSha256 || (e.release === k.release && e.buildId === k.buildId),
          `right after boot, before the daemon ran, \`ls\` called ${e.release} (${e.digest.slice(0, 12)}, build id ${e.buildId}) current while ${k.name} ran`,
        );
      }
    }
  };

  let failed: string | null = null;
  const step = async (name: string, fn: (st: TestContext) => Promise<void>): Promise<void> => {
    await t.test(name, async (st) => {
      if (failed !== null) return st.skip(`an earlier boot failed (${failed}): the cache is not in the state this boot needs`);
      const t0 = performance.now();
      try {
        await fn(st);
      } catch (err) {
        failed = name;
        throw err;
      } finally {
        st.diagnostic(`took ${elapsed(t0)}`);
      }
    });
  };

  await step('boot 1, kernel A, as shipped: the archive read out of kheaders.ko, never loaded; build id, digest, vmlinux.h and a module\'s header from BTF, .config; doctor all ok', async (st) => {
    const r = await boot(st, { kernel: a, doctor: true, btf: true, moduleBtf: 'xt_mark' });
    await checkCurrent(r, a);
    assert.ok(!hasModule(await readOut(r, 'lsmod-before')), 'kheaders is not loaded at boot');
    assert.ok(!hasModule(await readOut(r, 'lsmod-serving')), 'kheaders was never loaded');
    const log = await readLog(r, 'serve');
    assert.ok(!log.some((l) => l['msg'] === 'ran modprobe kheaders'), 'no modprobe: the module file on disk was enough');
    assert.ok(log.some((l) => l['msg'] === 'read the header archive out of the kheaders module file (not loaded)'), 'the archive was read out of the module file');
    assert.ok(log.some((l) => l['msg'] === 'kernel headers ingested' && l['reused'] === false), 'the archive was decoded');
    assert.deepEqual(r.entries.map((e) => e.digest), [a.archiveSha256]);
    const [entry] = r.entries;
    assert.equal(entry!.source, `module:/lib/modules/${a.release}/kernel/kernel/kheaders.ko`);
    const obtained = JSON.parse(await readFile(path.join(cache, 'entries', idOf(a), 'manifest.json'), 'utf8')) as { obtained?: string };
    assert.equal(obtained.obtained, 'module-file', 'the manifest says how the archive was obtained');
    // A loaded module's header, made by the daemon from its split BTF over the kernel's: bpftool's text.
    const served = await readOut(r, 'module-served.h');
    assert.equal(served, await readOut(r, 'module-cli.h'), '`kheadersd btf --module` and the mount give the same header');
    const bpftool = spawnSync('bpftool', ['-B', path.join(r.outDir, 'btf'), 'btf', 'dump', 'file', path.join(r.outDir, 'module.btf'), 'format', 'c'], { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
    if (bpftool.status === 0) {
      // The one deliberate difference from bpftool v7.1: mode() attributes (see btf-emitter.test.ts).
      assert.equal(served.replace(/ __attribute__\(\(mode\((byte|word)\)\)\)/g, ''), bpftool.stdout, 'the served module header is bpftool\'s');
    } else t.diagnostic(`bpftool did not run (${bpftool.error?.message ?? bpftool.stderr}): module header compared with the CLI's only`);
    assert.match(served, /struct xt_mark_mtinfo1 \{/, 'the module\'s own types are in its header');
    assert.equal(await readOut(r, 'config-served'), await readOut(r, 'config-kernel'), '.config is the running kernel\'s /proc/config.gz');
    // vmlinux.h: generated from this kernel's BTF (the same bytes `kheadersd btf` makes of it on the host).
    assert.equal(entry!.vmlinuxH, true);
    const manifest = JSON.parse(await readFile(path.join(cache, 'entries', idOf(a), 'manifest.json'), 'utf8')) as { btf: { digest: string } | null };
    const btf = await readFile(path.join(r.outDir, 'btf'));
    assert.equal(manifest.btf?.digest, sha256(btf), 'the entry\'s vmlinux.h names the running kernel\'s BTF');
    const hostVmlinuxH = path.join(work, 'vmlinux-a.h');
    await hostCli(['btf', '--btf', path.join(r.outDir, 'btf'), '--out', hostVmlinuxH]);
    assert.ok((await readFile(path.join(r.outDir, 'vmlinux.h'))).equals(await readFile(hostVmlinuxH)), 'the mount serves vmlinux.h of this BTF');
    const doctor = JSON.parse(await readOut(r, 'doctor.json')) as { ok: boolean; checks: Array<{ id: string; status: string; what: string }> };
    const notOk = doctor.checks.filter((c) => c.status !== 'ok');
    assert.deepEqual(notOk, [], `doctor, with the daemon serving, is all ok:\n${doctor.checks.map((c) => `${c.status} ${c.what}`).join('\n')}`);
    assert.equal((await readOut(r, 'serve.status')).trim(), '0', 'SIGTERM stops the daemon with status 0');
    assert.ok(!hasModule(await readOut(r, 'lsmod-after')));
  });

  await step('boot 2, A rebuilt (same release, new archive), no module files to read: a real modprobe, ingest, unload; current never the old build', async (st) => {
    // moduleDirs naming nowhere: the daemon cannot read kheaders.ko, so it loads it as before.
    const r = await boot(st, { kernel: rebuilt, lsBefore: true, http: true, config: { http: '0.0.0.0:7711', moduleDirs: ['/nowhere/{release}'] } });
    await checkCurrent(r, rebuilt);
    const modprobeLog = await readLog(r, 'serve');
    assert.ok(modprobeLog.some((l) => l['msg'] === 'ran modprobe kheaders' && (l['result'] as { ok?: boolean } | undefined)?.ok === true), 'a real modprobe kheaders ran');
    assert.ok(!hasModule(await readOut(r, 'lsmod-before')), 'kheaders is not loaded at boot');
    assert.ok(!hasModule(await readOut(r, 'lsmod-serving')), 'the daemon unloaded the kheaders module it loaded');
    assert.match(r.entries.find((e) => e.current)!.source, /^\/sys\/kernel\/kheaders\.tar\.xz \(after modprobe kheaders\)$/);
    assert.ok(r.httpDigests.length > 0, 'the host reached /v1/kernels/current through the forwarded port');
    const log = await readLog(r, 'serve');
    assert.ok(log.some((l) => l['msg'] === 'kernel headers ingested' && l['reused'] === false), 'the new build was decoded, not taken for the old one');
    assert.deepEqual(new Set(r.entries.map((e) => e.digest)), new Set([a.archiveSha256, rebuilt.archiveSha256]));
  });

  await step('boot 3, kernel B: its own entry; `kheadersd pull` on the host through the forwarded port equals tar -xJf', async (st) => {
    const reference = await referenceTree(b, work);
    const pulled = path.join(work, 'pulled');
    let pullOutput = '';
    const r = await boot(st, {
      kernel: b,
      lsBefore: true,
      http: true,
      config: { http: '0.0.0.0:7711' },
      whileServing: async (port) => {
        const t0 = performance.now();
        pullOutput = await hostCli(['pull', '--url', `http://127.0.0.1:${port}`, '--out', pulled, '--cache-dir', path.join(work, 'host-cache')]);
        t.diagnostic(`pull through the forward took ${elapsed(t0)}`);
      },
    });
    await checkCurrent(r, b);
    const dir = path.join(pulled, `${b.release}-${b.archiveSha256.slice(0, 12)}`);
    assert.match(pullOutput, new RegExp(`export BCC_KERNEL_SOURCE='?${dir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}'?`));
    // The whole entry: the archive's tree, and beside it vmlinux.h and .config as the daemon made them.
    const differences = (await treeDifferences(reference.dir, dir)).filter((d) => !/^(vmlinux\.h|\.config): only in /.test(d));
    assert.deepEqual(differences, [], 'the pulled tree is byte-identical to tar -xJf of the kernel\'s archive');
    const entryDir = path.join(cache, 'entries', idOf(b));
    assert.ok((await readFile(path.join(dir, 'vmlinux.h'))).equals(await readFile(path.join(entryDir, 'vmlinux.h'))), 'the pulled vmlinux.h is the entry\'s');
    assert.ok((await readFile(path.join(dir, '.config'))).equals(await readFile(path.join(entryDir, 'config'))), 'the pulled .config is the entry\'s');
    assert.deepEqual(new Set(r.entries.map((e) => e.digest)), new Set([a.archiveSha256, rebuilt.archiveSha256, b.archiveSha256]), 'the other kernels\' entries stay');
  });

  await step('boot 4, A again with kheaders loaded before the daemon: reused without decoding, module left loaded, --keep 2 evicts; then the module missing', async (st) => {
    const r = await boot(st, { kernel: a, preload: true, lsBefore: true, lsCli: true, config: { keep: 2 }, thenMissing: true });
    await checkCurrent(r, a);
    assert.ok(hasModule(await readOut(r, 'lsmod-before')), 'kheaders was loaded before the daemon');
    assert.ok(hasModule(await readOut(r, 'lsmod-serving')), 'the daemon left a module it did not load');
    assert.ok(hasModule(await readOut(r, 'lsmod-after')));
    const log = await readLog(r, 'serve');
    assert.ok(!log.some((l) => l['msg'] === 'ran modprobe kheaders'), 'no modprobe: the archive was already exposed');
    assert.ok(log.some((l) => l['msg'] === 'kernel unchanged' && l['reused'] === true), 'the log says the cached entry was reused');
    assert.ok(!log.some((l) => l['msg'] === 'ingesting' || l['msg'] === 'ingested'), 'nothing was decoded');
    const current = r.entries.find((e) => e.current)!;
    assert.equal(current.reused, true, '`ls --json` says the current entry was reused');
    assert.match(await readOut(r, 'ls.txt'), /reused/, '`ls` says so');
    // --keep 2: the current entry and the most recent other one stay; the rebuilt one is evicted.
    assert.deepEqual(new Set(r.entries.map((e) => e.digest)), new Set([a.archiveSha256, b.archiveSha256]));
    assert.ok(log.some((l) => l['msg'] === 'evicted old entries'), 'the eviction is logged');
    // The digest is recorded under what identifies the archive in sysfs on a real kernel: the
    // kernel's and the loaded module's build ids. (The module files this harness copies in at each
    // boot are too fresh to be recorded: a file is trusted only 2 s after its last change.)
    const memo = JSON.parse(await readFile(path.join(cache, 'sources.json'), 'utf8')) as { sources: Array<{ key: string; digest: string }> };
    const recorded = memo.sources.map((s): Record<string, unknown> => ({ ...(JSON.parse(s.key) as Record<string, unknown>), digest: s.digest }));
    const kernelBuildId = parseBuildId(await readFile(path.join(r.outDir, 'notes')));
    const live = recorded.find((k) => k['kind'] === 'live');
    assert.ok(live, `a record for the archive in sysfs: ${JSON.stringify(recorded)}`);
    assert.equal(live['path'], '/sys/kernel/kheaders.tar.xz');
    assert.equal(live['kernel'], kernelBuildId, 'keyed by the running kernel\'s build id');
    assert.match(String(live['module']), /^[0-9a-f]{40}$/, 'and by the loaded kheaders module\'s own build id');
    assert.equal(live['digest'], a.archiveSha256);
    // The same kernel without its module: no archive, modprobe fails; its cached headers are served.
    const missing = await readLog(r, 'missing');
    assert.ok(missing.some((l) => l['msg'] === 'ran modprobe kheaders' && (l['result'] as { ok?: boolean } | undefined)?.ok === false), 'modprobe kheaders failed: the module is gone');
    assert.ok(missing.some((l) => l['msg'] === 'kernel unchanged' && l['reused'] === true), 'the cached entry of this kernel was reused');
    const afterMissing = JSON.parse(await readOut(r, 'ls-missing.json')) as Summary[];
    const cur = afterMissing.find((e) => e.current);
    assert.equal(cur?.digest, a.archiveSha256, `with no archive, current is this kernel's cached headers: ${JSON.stringify(afterMissing)}`);
    assert.equal((await readOut(r, 'current-missing')).trim(), a.release);
  });

  t.diagnostic(`the four boots took ${elapsed(started)}`);
}));
