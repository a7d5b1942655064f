/**
 * Power cuts during ingest, on a real kernel: the cache is an ext4 disk image on virtio-blk, and
 * qemu is SIGKILLed at a different moment of `kheadersd serve`'s first ingest each time (picked
 * from the progress the daemon logs, which the guest forwards to the host as it happens, or at
 * a timed offset after the archive was located), on two disks side by side (see SERIES). After
 * each cut the host replays the journal on a copy of the image, as the next mount would, and
 * checks: e2fsck -fn finds nothing, `ls` lists only whole entries (pack, archive and index
 * intact), an entry the daemon said it committed is there, and so is every entry whole before the
 * cut; what was half-built is left in tmp/ (reported). Each next boot starts where the last cut
 * left its disk and sweeps tmp/. At the end a boot of another build (A rebuilt) ingests afresh on
 * each disk and serves every entry correctly over HTTP; no leftovers remain, and the image,
 * cleanly unmounted, is clean.
 *
 * Why cache=writethrough models a power cut: see diskArgs in test/vm/vm.ts.
 */
import { mkdir, readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { exitWhenDone } from './vm/exit-guard.js';
import { loadKernel, X86_KERNELS, type TestKernel } from './vm/kernels.js';
import { context, elapsed, hostCli, referenceTree, sha256, tool, vmSkipReason, VM_TEST_TIMEOUT_MS } from './vm/support.js';
import { fsck, makeExt4Image, startVm, type VmEvent } from './vm/vm.js';
import { removeDir, tempDir } from './helpers/fuse-env.js';

/** Serve as shipped until the host cuts the power (or, on the last boot, says it is done). */
const SCENARIO = String.raw`
if [ -n "$CONFIG_JSON" ]; then mkdir -p /etc/kheadersd && printf '%s\n' "$CONFIG_JSON" >/etc/kheadersd/config.json; fi
ls -A /var/cache/kheadersd/tmp >"$KH_OUT/tmp-at-boot" 2>/dev/null
kh_start serve serve
kh_wait_log serve '"msg":"mounted"' 600 || exit 11
kh_emit ready
kh_wait_host host-done || exit 12
kh_stop serve >"$KH_OUT/serve.status" || exit 13
`;

interface Cut {
  kernel: 'a' | 'b';
  /** The moment, in words (for the report). */
  moment: string;
  when: (e: VmEvent) => boolean;
  delayMs?: number;
}

const daemon = (msg: string) => (e: VmEvent) => e.tag === 'serve' && e.json?.['msg'] === msg;
/** The daemon has the archive in memory: it reads it out of kheaders.ko on disk (modprobe is not needed). */
const archiveRead = daemon('read the header archive out of the kheaders module file (not loaded)');
const percent = (e: VmEvent): number => Number((e.json?.['progress'] as { percent?: number } | undefined)?.percent ?? -1);
const progressAtLeast = (p: number) => (e: VmEvent) => daemon('ingesting')(e) && percent(e) >= p;

/**
 * Ten cuts on two disks, each disk its own series of boots; the two series run side by side (two
 * qemus: the test runner runs one file at a time, which leaves the machine's second core idle).
 * Disk 1: kernel A's first ingest, cut from before the cache lock through xz's decoding, with
 * whatever each cut left behind for the next boot to sweep. Disk 2: A cut the moment its entry is
 * committed (renamed, fsynced) but before `current` moves, so A is whole on that disk; then B's
 * ingest cut at timed offsets, which fall wherever this machine's speed puts them, and at progress
 * points, all with a whole entry already on the disk (a cached archive is not decoded again, so
 * every cut still falls in an ingest that decodes).
 */
const SERIES: ReadonlyArray<{ disk: string; cuts: readonly Cut[] }> = [
  {
    disk: 'A decoded from nothing, cut before it commits',
    cuts: [
      { kernel: 'a', moment: 'archive read (out of kheaders.ko), before the cache lock', when: archiveRead },
      { kernel: 'a', moment: 'first progress report (decoding started)', when: progressAtLeast(0) },
      { kernel: 'a', moment: 'decoding, >= 25%', when: progressAtLeast(25) },
      { kernel: 'a', moment: 'decoding, >= 50%', when: progressAtLeast(50) },
      { kernel: 'a', moment: 'decoding, >= 75%', when: progressAtLeast(75) },
    ],
  },
  {
    disk: 'A committed, then B cut with A whole on the disk',
    cuts: [
      { kernel: 'a', moment: 'entry committed (renamed, fsynced), before `current` moves', when: daemon('ingested') },
      { kernel: 'b', moment: '300 ms after the archive was read, A whole on disk', when: archiveRead, delayMs: 300 },
      { kernel: 'b', moment: '1500 ms after the archive was read', when: archiveRead, delayMs: 1500 },
      { kernel: 'b', moment: 'decoding, >= 40%', when: progressAtLeast(40) },
      { kernel: 'b', moment: 'decoding, >= 90% (or its last report, once committed)', when: progressAtLeast(90) },
    ],
  },
];

/**
 * One vCPU per VM: the two series' qemus together then use the machine's two cores, and neither
 * waits for the other's second vCPU.
 */
const CPUS_PER_VM = 1;

interface Listed {
  release: string;
  digest: string;
}

exitWhenDone(test('real kernel: power cuts at ten moments of an ingest never leave a partial entry; fsck clean; a fresh ingest works', { timeout: VM_TEST_TIMEOUT_MS, concurrency: SERIES.length }, async (t) => {
  const skip = await vmSkipReason(Object.values(X86_KERNELS));
  if (skip) return t.skip(skip);
  const started = performance.now();
  const work = await tempDir('vm-power');
  t.after(() => removeDir(work));
  const kernels: Record<'a' | 'b' | 'rebuilt', TestKernel> = { a: await loadKernel(X86_KERNELS.a), b: await loadKernel(X86_KERNELS.b), rebuilt: await loadKernel(X86_KERNELS.rebuilt) };
  // What a whole entry holds: the archive itself, and its decompressed tar as the pack.
  const refs = await Promise.all(
    (['a', 'b', 'rebuilt'] as const).map(async (k) => {
      const ref = await referenceTree(kernels[k], work);
      const packSha256 = (await tool('sh', ['-c', 'xz -dc "$1" | sha256sum', 'sh', ref.archive])).split(' ')[0]!;
      return [kernels[k].archiveSha256, { ...ref, packSha256 }] as const;
    }),
  );
  const wholeEntries = new Map(refs);

  /** The disk as the next boot will find it (journal replayed on a copy): fsck, then what is listed. */
  const inspect = async (image: string, label: string, replay: boolean): Promise<{ listed: Listed[]; tmp: string[] }> => {
    const copy = path.join(work, `inspect-${label}.img`);
    const files = path.join(work, `inspect-${label}`);
    try {
      await tool('cp', ['--sparse=always', image, copy]);
      if (replay) await tool('e2fsck', ['-E', 'journal_only', '-y', copy], { okStatus: [0, 1] });
      const check = await fsck(copy);
      assert.equal(check.status, 0, `${label}: e2fsck -fn after the journal replay is not clean:\n${check.output}`);
      await mkdir(files);
      await tool('debugfs', ['-R', `rdump /entries /tmp ${files}`, copy]);
      await tool('debugfs', ['-R', `dump /current ${path.join(files, 'current')}`, copy]).catch(() => '');
      const listed = JSON.parse(await hostCli(['ls', '--json', '--cache-dir', files])) as Listed[];
      for (const e of listed) {
        const whole = wholeEntries.get(e.digest);
        assert.ok(whole, `${label}: ls lists an entry of an unknown archive ${e.digest}`);
        const dir = path.join(files, 'entries', `${e.release}~${e.digest}`);
        assert.equal(sha256(await readFile(path.join(dir, 'archive.tar.xz'))), e.digest, `${label}: ${e.release} is listed with a damaged archive`);
        assert.equal(sha256(await readFile(path.join(dir, 'pack.tar'))), whole.packSha256, `${label}: ${e.release} is listed with a partial or damaged pack`);
        const uts = await hostCli(['cat', '--cache-dir', files, e.digest, 'include/generated/utsrelease.h']);
        assert.ok(uts.includes(`"${e.release}"`), `${label}: ${e.release}'s index does not lead to its utsrelease.h (${uts})`);
      }
      return { listed, tmp: await readdir(path.join(files, 'tmp')).catch(() => []) };
    } finally {
      await removeDir(files);
      await removeDir(copy);
    }
  };

  const report: string[] = [];
  const cutNumbers = SERIES.flatMap((s, d) => s.cuts.map((_, c) => ({ d, c }))).map(({ d, c }, n) => [`${d}:${c}`, n + 1] as const);
  const numberOf = new Map(cutNumbers);

  /** One disk: its cuts in order, each boot starting where the last cut left the disk, then a clean boot. */
  const series = async (st: TestContext, disk: number): Promise<void> => {
    const image = path.join(work, `disk-${disk + 1}.img`);
    await makeExt4Image(image, 192);
    // What a cut left listed must survive every later cut: a whole entry is never lost.
    let whole: Listed[] = [];
    for (const [c, cut] of SERIES[disk]!.cuts.entries()) {
      const n = numberOf.get(`${disk}:${c}`)!;
      await st.test(`cut ${n}: ${cut.moment}`, async (ct) => {
        const t0 = performance.now();
        const vm = await startVm({ kernel: kernels[cut.kernel], cache: { kind: 'disk', image }, scenario: SCENARIO, env: { CONFIG_JSON: '' }, cpus: CPUS_PER_VM, timeoutMs: 600_000 });
        // Killed when this cut's test ends, passed or failed, not when the whole file's does.
        ct.after(() => vm.dispose());
        const trigger = await vm.waitFor((e) => cut.when(e) || e.tag === 'ready' || e.tag === 'kh-exit', `the moment "${cut.moment}"`, 600_000);
        if (cut.delayMs !== undefined) await new Promise((r) => setTimeout(r, cut.delayMs));
        const result = await vm.kill();
        const daemonEvents = result.events.filter((e) => e.tag === 'serve' && e.json !== undefined);
        const last = daemonEvents.at(-1);
        const lastProgress = daemonEvents.filter(daemon('ingesting')).at(-1);
        const lastMsg = last?.json?.['msg'];
        const at = `${typeof lastMsg === 'string' ? lastMsg : 'nothing logged'}${lastProgress ? `, last progress ${percent(lastProgress)}%` : ''}`;
        assert.ok(trigger.tag !== 'kh-exit', `the scenario ended before the cut${context(result)}`);
        assert.ok(trigger.tag !== 'ready' || cut.when(trigger), `the ingest finished before "${cut.moment}" came: the cut fell after it${context(result)}`);
        const state = await inspect(image, `cut-${n}`, true);
        report.push(`cut ${n} (disk ${disk + 1}, ${cut.kernel}) at "${cut.moment}": last log "${at}"; listed [${state.listed.map((e) => e.release).join(', ')}]; tmp leftovers [${state.tmp.join(', ')}]; ${elapsed(t0)}, qemu CPU ${(result.cpuMs / 1000).toFixed(1)} s`);
        // What the daemon said it committed before the cut is on the disk: an fsynced rename survives.
        const committed = daemonEvents.some(daemon('ingested'));
        if (committed) assert.ok(state.listed.some((e) => e.digest === kernels[cut.kernel].archiveSha256), `${cut.kernel} was committed before cut ${n} but is not listed`);
        for (const before of whole) assert.ok(state.listed.some((e) => e.digest === before.digest), `${before.release} (${before.digest.slice(0, 12)}), whole before cut ${n}, is no longer listed`);
        whole = state.listed;
        // Whatever an earlier cut left in tmp/ was swept by this boot's ingest (when it got that far).
        const swept = daemonEvents.filter(daemon('removed leftovers of an interrupted ingest'));
        for (const s of swept) for (const name of s.json?.['swept'] as string[]) assert.doesNotMatch(name, /~/, `the sweep removed ${name}, which looks like an entry`);
      });
    }
    if (disk === 1) assert.ok(whole.some((e) => e.digest === kernels.a.archiveSha256), 'A, committed at the first cut of disk 2, is whole on it');

    await st.test(`disk ${disk + 1} after the cuts: A rebuilt ingests afresh, every entry is served whole, leftovers are gone, fsck clean`, async (ct) => {
      const t0 = performance.now();
      const fresh = kernels.rebuilt;
      const vm = await startVm({ kernel: fresh, cache: { kind: 'disk', image }, scenario: SCENARIO, env: { CONFIG_JSON: JSON.stringify({ http: '0.0.0.0:7711' }) }, forwardHttp: true, cpus: CPUS_PER_VM, timeoutMs: 600_000 });
      ct.after(() => vm.dispose());
      try {
        await vm.waitFor((e) => e.tag === 'ready', 'the daemon to serve', 600_000);
        const base = `http://127.0.0.1:${vm.httpPort}`;
        // Each request bounded: a daemon that stops answering fails this boot, it does not hang it.
        const get = (p: string): Promise<Response> => fetch(`${base}${p}`, { signal: AbortSignal.timeout(120_000) });
        const list = (await (await get('/v1/kernels')).json()) as Array<Listed & { current: boolean }>;
        const served = new Set(list.map((e) => e.digest));
        assert.deepEqual(served, new Set([...whole.map((e) => e.digest), fresh.archiveSha256]), `what was whole after the last cut and the fresh entry are served, nothing else: ${JSON.stringify(list)}`);
        assert.equal(list.find((e) => e.current)?.digest, fresh.archiveSha256);
        for (const e of list) {
          const archive = Buffer.from(await (await get(`/v1/blobs/${e.digest}/archive.tar.xz`)).arrayBuffer());
          assert.equal(sha256(archive), e.digest, `the archive of ${e.release} served whole`);
          const ref = wholeEntries.get(e.digest)!;
          for (const file of ['include/generated/utsrelease.h', 'include/linux/sched.h', 'arch/x86/include/asm/ptrace.h']) {
            const served = Buffer.from(await (await get(`/v1/blobs/${e.digest}/files/${file}`)).arrayBuffer());
            assert.ok(served.equals(await readFile(path.join(ref.dir, file))), `${e.release}: ${file} served as archived`);
          }
        }
      } finally {
        vm.send('host-done');
      }
      const result = await vm.result;
      assert.equal(result.status, 0, `the last boot of disk ${disk + 1} failed${context(result)}`);
      assert.equal(result.poweredOff, true);
      const log = result.events.filter((e) => e.tag === 'serve' && e.json !== undefined);
      assert.ok(log.some((e) => e.json?.['msg'] === 'kernel headers ingested' && e.json['reused'] === false), 'the rebuilt kernel\'s archive was decoded afresh');
      const state = await inspect(image, `final-${disk + 1}`, false);
      assert.deepEqual(state.tmp, [], 'no leftovers after a start');
      const check = await fsck(image);
      assert.equal(check.status, 0, `e2fsck -fn of the cleanly unmounted image:\n${check.output}`);
      report.push(`disk ${disk + 1} final (rebuilt): listed [${state.listed.map((e) => e.release).join(', ')}]; ${elapsed(t0)}, qemu CPU ${(result.cpuMs / 1000).toFixed(1)} s`);
    });
  };

  await Promise.all(SERIES.map((s, d) => t.test(`disk ${d + 1}: ${s.disk}`, (st) => series(st, d))));
  for (const line of report.sort((x, y) => x.localeCompare(y, 'en', { numeric: true }))) t.diagnostic(line);
  t.diagnostic(`power-cut test took ${elapsed(started)}`);
}));
