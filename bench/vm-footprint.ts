/**
 * Footprint inside the real-kernel VM (issue #15): the figures of bench/footprint.ts (idle memory,
 * start-up, first boot, ingest), measured where the daemon meets what a device gives it: a real
 * kernel (../shared/kernels/x86_64-6.1.192, CONFIG_IKHEADERS=m) booted under qemu TCG, finding
 * its archive itself (no --archive), each beside a reference measured in the same rounds.
 *
 * TCG runs the guest some ten times slower than this machine, and not evenly (process starts and
 * page faults cost more than straight computation), so the absolute times say little: read the
 * ratios, and the memory, which TCG does not change.
 *
 * The VM boots once (cache on a fresh tmpfs); bench/vm-footprint-guest.ts runs inside it, times
 * everything there with one node process and writes each round's figures to the share's out/;
 * the medians and ratios are computed here. A warm-up round (discarded) first reads node, xz and
 * the daemon's code over the 9p root into the guest's page cache, as the host bench's warm-up does.
 *
 * Reproduce: npm run build && node dist/bench/vm-footprint.js
 *            [--runs N] [--warmup N] [--settle S] [--no-write]     (or npm run bench -- vm-footprint)
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { KERNELS_DIR, kernelsSkipReason, loadKernel, X86_KERNELS } from '../test/vm/kernels.js';
import { KHEADERSD_CLI, qemuSkipReason, REPO_ROOT, startVm, X86_64, type VmEvent } from '../test/vm/vm.js';
import type { GuestMem, GuestResults, GuestRound } from './vm-footprint-guest.js';
import { machineLine, median, writeSection } from './report.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const GUEST = path.join(HERE, 'vm-footprint-guest.js');
const UNIT = path.join(REPO_ROOT, 'systemd/kheadersd.service');

const args = process.argv.slice(2);
const opt = (name: string): number | undefined => {
  const i = args.indexOf(name);
  if (i < 0) return undefined;
  const v = Number(args[i + 1]);
  if (!Number.isFinite(v) || v < 0) throw new Error(`${name} needs a number, not ${args[i + 1]}`);
  return v;
};
const RUNS = Math.max(1, opt('--runs') ?? 3);
const WARMUP = opt('--warmup') ?? 1;
const SETTLE_MS = Math.max(1, opt('--settle') ?? 5) * 1000;
const WRITE = !args.includes('--no-write');

const SCENARIO = String.raw`
"$KH_NODE" "$KH_GUEST" --cli "$KH_CLI" --runs "$RUNS" --warmup "$WARMUP" --settle-ms "$SETTLE_MS" --node-options "$SHIPPED_NODE_OPTIONS" --out "$KH_OUT/results.json"
`;

const mib = (kib: number): string => `${(kib / 1024).toFixed(1)} MiB`;
const ms = (v: number): string => `${v.toFixed(0)} ms`;
const x = (a: number, b: number): string => `${(a / b).toFixed(2)}×`;
const verdict = (ok: boolean): string => (ok ? 'met' : '**not met**');
const list = (vs: readonly number[], digits = 0): string => vs.map((v) => v.toFixed(digits)).join(' / ');

/** Why this cannot run here: thrown, except for the one case the VM tests skip too (no kernels at all). */
async function preflight(): Promise<string | undefined> {
  if (!existsSync(KERNELS_DIR)) return (await kernelsSkipReason([X86_KERNELS.a])) ?? `${KERNELS_DIR} is missing`;
  const missingKernel = await kernelsSkipReason([X86_KERNELS.a]);
  if (missingKernel !== undefined) throw new Error(`bench vm-footprint: ${missingKernel}: ${KERNELS_DIR} is there, but not the kernel it boots`);
  const noQemu = await qemuSkipReason(X86_64);
  if (noQemu !== undefined) throw new Error(`bench vm-footprint: ${noQemu}`);
  for (const [what, file] of [['the shipped CLI', KHEADERSD_CLI], ['the in-VM driver', GUEST]] as const) {
    if (!existsSync(file)) throw new Error(`bench vm-footprint: ${what} ${file} is missing: run npm run build first`);
  }
  // The VM's /tmp is its own tmpfs: what it runs from this machine's / must live elsewhere.
  for (const file of [process.execPath, KHEADERSD_CLI]) {
    if (file.startsWith('/tmp/')) throw new Error(`bench vm-footprint: ${file} is under /tmp, which the VM hides behind its own /tmp`);
  }
  return undefined;
}

function memRows(label: string, serveMem: readonly GuestMem[], nodeMem: readonly GuestMem[]): { pd: number; rss: number; hwm: number; pdNode: number; rssNode: number; label: string } {
  return {
    label,
    pd: median(serveMem.map((m) => m.privateDirtyKiB)),
    rss: median(serveMem.map((m) => m.rssKiB)),
    hwm: median(serveMem.map((m) => m.hwmKiB)),
    pdNode: median(nodeMem.map((m) => m.privateDirtyKiB)),
    rssNode: median(nodeMem.map((m) => m.rssKiB)),
  };
}

/** How the daemon obtained the archive, from the cache's sources.json (source-memo). */
function obtainedOf(sources: unknown): string {
  const records = (sources as { sources?: unknown } | null)?.sources;
  if (!Array.isArray(records)) return 'not recorded';
  const seen = records.map((r) => {
    const o = r as { obtained?: unknown; source?: unknown };
    return `${String(o.obtained)} (${String(o.source)})`;
  });
  return [...new Set(seen)].join('; ') || 'not recorded';
}

function report(res: GuestResults, run: { bootMs: number | null; durationMs: number; cpuMs: number }, shipped: string): string {
  const rounds: GuestRound[] = res.rounds.filter((r) => !r.warmup);
  if (rounds.length === 0) throw new Error('bench vm-footprint: the VM reported no measured round');
  const nodeW = median(rounds.map((r) => r.nodeMs));
  const xzW = median(rounds.map((r) => r.xzMs));
  const first = median(rounds.map((r) => r.first.readyMs));
  const cached = median(rounds.map((r) => r.cached.readyMs));
  const ingest = median(rounds.map((r) => r.ingestMs));
  const cachedMounted = rounds.map((r) => r.cached.mountedMs).filter((v): v is number => v !== undefined);
  const cachedRatios = rounds.map((r) => r.cached.readyMs / r.nodeMs);
  const firstRatios = rounds.map((r) => r.first.readyMs / (r.nodeMs + r.xzMs));
  const ingestRatios = rounds.map((r) => r.ingestMs / r.xzMs);
  const ingestNoBtf = median(rounds.map((r) => r.ingestNoBtfMs));
  const noBtfRatios = rounds.map((r) => r.ingestNoBtfMs / r.xzMs);
  const nodeMem = rounds.map((r) => r.nodeIdle);
  const warm = memRows('cached', rounds.map((r) => r.cached.idle), nodeMem);
  const fresh = memRows('first', rounds.map((r) => r.first.idle), nodeMem);
  const firstGoal = nodeW + 1.3 * xzW;
  const firstOutcomes = [...new Set(rounds.map((r) => r.first.outcome))].join('; ');
  const cachedOutcomes = [...new Set(rounds.map((r) => r.cached.outcome))].join('; ');
  const unloaded = rounds.every((r) => !r.first.moduleLoadedAfter && !r.cached.moduleLoadedAfter);
  const mounted = rounds.every((r) => r.first.mountedMs !== undefined && r.cached.mountedMs !== undefined);
  const phaseNames = [...new Set(rounds.flatMap((r) => Object.keys(r.first.phasesMs ?? {})))];
  const phases = phaseNames.map((p) => `${p} ${ms(median(rounds.map((r) => r.first.phasesMs?.[p]).filter((v): v is number => v !== undefined)))}`).join(', ');
  const boot = run.bootMs === null ? 'n/a' : `${(run.bootMs / 1000).toFixed(1)} s`;

  return [
    '## Footprint inside the real-kernel VM (qemu TCG): ratios to node itself, as on a device',
    '',
    `Kernel ${res.release} (../shared/kernels/${X86_KERNELS.a}, CONFIG_IKHEADERS=m, not loaded at the start) booted once under qemu TCG (${res.cpus} vCPUs, ${mib(res.memTotalKiB)}), this machine's / as its root over 9p, the cache on tmpfs; node ${res.node}. The daemon finds the archive itself, as on a device: ${obtainedOf(res.sources)}. \`serve\` runs as the systemd unit does (no flags, \`NODE_OPTIONS=${shipped}\`, FUSE mount at /run/kheaders${mounted ? '' : ' — **not mounted in every round**'}, HTTP 127.0.0.1:7711); each round: \`node -e 0\`, \`xz -dc /sys/kernel/kheaders.tar.xz\` (module loaded for it, unloaded after), first boot (empty cache, module unloaded), cached start, \`ingest\` into an empty cache dir (then again with \`--btf off\`), with an idle \`node -e 'setInterval(()=>{},1e6)'\` alive throughout. ${rounds.length} rounds after ${res.rounds.length - rounds.length} warm-up; medians. Host: ${machineLine()}; load average at the end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}. TCG makes the guest ~10× slower and unevenly so: **read the ratios and the memory, not the absolute times.** Unlike bench/footprint's, the archive here is the running kernel's, so a first boot and \`ingest\` also make vmlinux.h from its BTF (on a worker thread, beside xz and the indexing, on 2 vCPUs), as a device does.`,
    '',
    '| figure (in the VM) | kheadersd | reference (same rounds) | ratio | goal (as bench/footprint) |',
    '| --- | ---: | ---: | ---: | --- |',
    `| idle \`serve\` (cached start), Private_Dirty ${res.settleMs / 1000} s after ready | ${mib(warm.pd)} | idle node: ${mib(warm.pdNode)} | ${x(warm.pd, warm.pdNode)} | ≤ 20 MiB: ${verdict(warm.pd <= 20 * 1024)} |`,
    `| idle \`serve\` (cached start), RSS (VmHWM: peak) | ${mib(warm.rss)} (${mib(warm.hwm)}) | idle node: ${mib(warm.rssNode)} | ${x(warm.rss, warm.rssNode)} | ≤ 64 MiB: ${verdict(warm.rss <= 64 * 1024)} |`,
    `| idle \`serve\` after its own first ingest: Private_Dirty, RSS (VmHWM) | ${mib(fresh.pd)}, ${mib(fresh.rss)} (${mib(fresh.hwm)}) | the cached start's idle: ${mib(warm.pd)}, ${mib(warm.rss)} | ${x(fresh.pd, warm.pd)}, ${x(fresh.rss, warm.rss)} | ≤ 20 MiB, ≤ 64 MiB: ${verdict(fresh.pd <= 20 * 1024 && fresh.rss <= 64 * 1024)} |`,
    `| \`serve\` start → /readyz 200, entry cached: wall | ${ms(cached)} | \`node -e 0\`: ${ms(nodeW)} | ${x(cached, nodeW)} of the medians; ${median(cachedRatios).toFixed(2)}× the median of the rounds' own ratios (per round: ${list(cachedRatios, 2)}), which the goal is judged on | ≤ 2.5×: ${verdict(median(cachedRatios) <= 2.5)} |`,
    ...(cachedMounted.length > 0 ? [`| the same starts, spawn → "mounted" logged | ${ms(median(cachedMounted))} | \`node -e 0\`: ${ms(nodeW)} | ${x(median(cachedMounted), nodeW)} | |`] : []),
    `| \`serve\` start → /readyz 200, first boot (empty cache): wall | ${ms(first)} | \`node -e 0\` + \`xz -dc\`: ${ms(nodeW + xzW)} | ${x(first, nodeW + xzW)} (per round: ${list(firstRatios, 2)}) | ≤ node + 1.3 × xz = ${ms(firstGoal)} (${x(first, firstGoal)} of it): ${verdict(first <= firstGoal)} |`,
    `| \`kheadersd ingest\` into an empty cache dir, whole process: wall | ${ms(ingest)} | \`xz -dc\`: ${ms(xzW)} | ${x(ingest, xzW)} (per round: ${list(ingestRatios, 2)}) | ≤ 1.5×: ${verdict(ingest <= 1.5 * xzW)} |`,
    `| the same with \`--btf off\` (no vmlinux.h, like bench/footprint's ingest, whose archive is not the running kernel's) | ${ms(ingestNoBtf)} | \`xz -dc\`: ${ms(xzW)} | ${x(ingestNoBtf, xzW)} (per round: ${list(noBtfRatios, 2)}) | |`,
    '',
    `Runs (ms): cached start ${list(rounds.map((r) => r.cached.readyMs))}; first boot ${list(rounds.map((r) => r.first.readyMs))}; ingest ${list(rounds.map((r) => r.ingestMs))} (\`--btf off\` ${list(rounds.map((r) => r.ingestNoBtfMs))}); \`node -e 0\` ${list(rounds.map((r) => r.nodeMs))}; \`xz -dc\` ${list(rounds.map((r) => r.xzMs))}. Idle Private_Dirty (MiB): cached ${list(rounds.map((r) => r.cached.idle.privateDirtyKiB / 1024), 1)}; after first boot ${list(rounds.map((r) => r.first.idle.privateDirtyKiB / 1024), 1)}; node ${list(nodeMem.map((m) => m.privateDirtyKiB / 1024), 1)}.`,
    '',
    `What the daemon did: first boots said "${firstOutcomes}", cached starts "${cachedOutcomes}"; the kheaders module was ${unloaded ? 'not loaded after any daemon run (it read the archive without loading it, or unloaded what it loaded)' : '**still loaded after some daemon run**'}. ${phases === '' ? 'The first boots logged no build phases.' : `The first boots' build, as the daemon logged it (ms since the build began, medians): ${phases}.`} The xz reference decodes ${mib(res.archiveBytes / 1024)} from /sys/kernel/kheaders.tar.xz. The run: VM boot to the scenario ${boot}, whole run ${(run.durationMs / 1000).toFixed(0)} s wall, qemu ${(run.cpuMs / 1000).toFixed(0)} s CPU.`,
    '',
    `How: one node process in the VM spawns each command and times it with performance.now() (monotonic): whole commands spawn → exit; \`serve\` spawn → the first 200 from /readyz, polled over loopback every ${res.pollMs} ms once /proc/net/tcp shows the port listening (looked at every ${res.pollMs} ms before: under TCG a refused connect every ${res.pollMs} ms would take CPU from a first boot's ingest; no process start per poll). Memory from /proc/PID/smaps_rollup (Private_Dirty, Rss) and /proc/PID/status (VmHWM), ${res.settleMs / 1000} s after ready with the mount up; the idle node's at the end of its round. The guest's environment is init's (no NODE_EXTRA_CA_CERTS).`,
    '',
    'Reproduce: `npm run build && node dist/bench/vm-footprint.js` (`--runs N`, `--warmup N`, `--settle S`, `--no-write`), or `npm run bench -- vm-footprint`.',
  ].join('\n');
}

async function main(): Promise<void> {
  const skip = await preflight();
  if (skip !== undefined) {
    console.log(`bench vm-footprint: skipped: ${skip}`);
    return;
  }
  const kernel = await loadKernel(X86_KERNELS.a);
  const shipped = /^Environment="NODE_OPTIONS=([^"]+)"$/m.exec(await readFile(UNIT, 'utf8'))?.[1];
  if (shipped === undefined) throw new Error(`bench vm-footprint: no Environment="NODE_OPTIONS=…" in ${UNIT}`);
  const t0 = performance.now();
  const log = (e: VmEvent): void => {
    if (e.tag === 'vmfoot' || e.tag.startsWith('kh-')) console.log(`[${(e.atMs / 1000).toFixed(1)} s] ${e.tag} ${e.text}`);
  };
  console.log(`booting ${kernel.name} under qemu TCG: ${WARMUP} warm-up + ${RUNS} rounds`);
  const vm = await startVm({
    kernel,
    scenario: SCENARIO,
    cache: { kind: 'tmpfs' },
    env: { KH_GUEST: GUEST, RUNS: String(RUNS), WARMUP: String(WARMUP), SETTLE_MS: String(SETTLE_MS), SHIPPED_NODE_OPTIONS: shipped },
    onEvent: log,
    // A round takes about a minute under TCG on a loaded 2-core machine; a hang ends sooner inside (the guest's own timeouts).
    timeoutMs: (5 + 3 * (RUNS + WARMUP)) * 60_000,
  });
  try {
    const result = await vm.result;
    const tail = `\n--- console (end) ---\n${result.console.slice(-4000)}`;
    if (result.bootMs === null) throw new Error(`bench vm-footprint: the VM never booted to its scenario (${result.timedOut ? 'timed out' : `qemu ended`})${tail}`);
    if (result.timedOut) throw new Error(`bench vm-footprint: the VM timed out after ${(result.durationMs / 1000).toFixed(0)} s${tail}`);
    if (result.status !== 0) {
      const why = result.events.filter((e) => e.tag === 'vmfoot' || e.tag === 'kh-init-failed').map((e) => e.text).join('\n');
      throw new Error(`bench vm-footprint: the scenario in the VM exited ${result.status}\n${why}${tail}`);
    }
    const res = JSON.parse(await readFile(path.join(result.outDir, 'results.json'), 'utf8')) as GuestResults;
    const md = report(res, result, shipped);
    console.log(md);
    console.log(`\n(the whole bench took ${((performance.now() - t0) / 1000).toFixed(0)} s)`);
    if (WRITE) await writeSection('vm-footprint', md);
  } finally {
    await vm.dispose();
  }
}

await main();
