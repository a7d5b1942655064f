/**
 * `kheadersd doctor`: check, in plain words, everything a first `kheadersd serve` needs, and say
 * what to do about each problem. One line per check:
 *
 *   ok    what was found
 *   warn  what is missing or odd  — what to do (serve still works, with less)
 *   FAIL  what stops serve        — what to do
 *
 * Exit 0 when nothing FAILs, 5 (environment) otherwise. `--json` prints the same as one object.
 *
 * It only looks: no ingest, no modprobe, no mount, nothing written. It must never hang or crash,
 * whatever the machine: every check has a deadline and a check that throws becomes a `warn` line.
 * Anything that could block on a dead or hung FUSE mount (a stat of the mount point) runs in a
 * child process that is SIGKILLed at the deadline: a stat stuck in this process would leave a
 * libuv thread that never returns and keep doctor from exiting.
 */
import { execFile, spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { access, lstat, open, readFile, readdir, readlink, stat, statfs } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Config } from '../config.js';
import { EXIT, errnoOf, isKheadersError } from '../errors.js';
import type { Logger } from '../log.js';
import { BTF_PATH, LIVE_ARCHIVE_PATHS, type ModuleFileInfo } from '../source/locate.js';
import { findModuleFiles, readBootTime, readModuleFile, type FoundModule } from '../source/module-files.js';
import { moduleSearchDirs } from '../source/modules.js';
import { isAndroid } from '../platform.js';
import { CacheStore, cacheDirProblem, parseCurrentPointer } from '../store/cache.js';
import { readTokenFile } from '../token.js';
import { parseEntryId, type Manifest } from '../store/entry.js';
import { matchRunning, sha256OfFile } from '../store/kernel-match.js';
import { readLiveBuildId } from '../source/notes.js';
import { isElf } from '../source/elf.js';
import { isXz } from '../source/xz.js';
import { findXzBinary } from '../store/decompress.js';
import { isFuse, mountAt } from '../serve/fuse/mountpoint.js';
import { packageRoot } from './install.js';

export type CheckStatus = 'ok' | 'warn' | 'fail';

export interface CheckResult {
  /** Stable name for machines: kernel, privileges, archive, btf, xz, cache, cache-entries, current, http, token, fuse-device, fuse-backend, mount-point, link-modules, service. */
  id: string;
  status: CheckStatus;
  /** What was found, in words. */
  what: string;
  /** What to do about it (warn and fail; sometimes a hint on ok). */
  fix?: string;
}

export interface DoctorReport {
  ok: boolean;
  counts: Record<CheckStatus, number>;
  checks: CheckResult[];
}

/** Where doctor looks; every field has the real system's default. Tests point them at temp files. */
export interface DoctorEnvironment {
  release: string;
  livePaths: readonly string[];
  btfPath: string;
  /** /sys/kernel/notes: the running kernel's build id. */
  notesPath: string;
  /** /lib/modules (where --link-modules makes <release>/build) */
  modulesRoot: string;
  /** The directory standing for / when looking for kheaders.ko in the module directories. */
  moduleRoot: string;
  /** When the running kernel booted: a module file changed after it may not be this kernel's. */
  bootTime: Date;
  /** /sys/module/kheaders: present when the module is loaded. */
  kheadersModuleDir: string;
  devFuse: string;
  mountinfo: string;
  /** PATH to look for xz, modprobe, mount in. */
  path: string;
  uid: number;
  /** CapEff from /proc/self/status; null when unknown. */
  capEff: bigint | null;
  /** Where node_modules (fuse-native, lzma-native) resolve from. */
  packageRoot: string;
  /** Look at the systemd service (skipped when systemd is not PID 1). */
  systemd: boolean;
  /**
   * Deadline for one check. Generous: on a slow device (or a loaded one, or an emulated one) the
   * node children some checks start take seconds before they do anything, and a deadline that
   * is too short reports a healthy system as broken. Hangs are caught by narrower timers.
   */
  timeoutMs: number;
  /** The node the mount probe's stat child runs on (tests stand a slow or stuck one in). */
  probeNode: string;
}

export interface DoctorIO {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  log: Logger;
}

const CAP_SYS_MODULE = 16n;
const CAP_SYS_ADMIN = 21n;
/** Below this the next ingest (~30 MiB pack, the archive, the index) may not fit. */
const LOW_SPACE_BYTES = 128 * 1024 * 1024;

export async function cmdDoctor(cfg: Config, io: DoctorIO, opts: { json: boolean }): Promise<number> {
  const report = await runDoctor(cfg);
  if (opts.json) {
    io.stdout.write(JSON.stringify(report, null, 2) + '\n');
  } else {
    io.stdout.write(formatReport(report));
  }
  io.log.debug({ counts: report.counts }, 'doctor done');
  return report.ok ? EXIT.ok : EXIT.environment;
}

export function formatReport(report: DoctorReport): string {
  const label: Record<CheckStatus, string> = { ok: 'ok', warn: 'warn', fail: 'FAIL' };
  const lines = report.checks.map((c) => `${label[c.status].padEnd(4)}  ${c.what}${c.fix ? `  — ${c.fix}` : ''}`);
  const { ok, warn, fail } = report.counts;
  lines.push('');
  lines.push(`${ok} ok, ${warn} warn, ${fail} FAIL: ${fail > 0 ? 'fix the FAIL lines before `kheadersd serve`' : warn > 0 ? 'serve can run; the warn lines say what it will lack' : 'ready for `kheadersd serve`'}`);
  return lines.join('\n') + '\n';
}

export async function defaultEnvironment(): Promise<DoctorEnvironment> {
  const status = await readFile('/proc/self/status', 'utf8').catch(() => '');
  const cap = /^CapEff:\s*([0-9a-f]+)$/m.exec(status);
  return {
    release: os.release(),
    livePaths: LIVE_ARCHIVE_PATHS,
    btfPath: BTF_PATH,
    notesPath: '/sys/kernel/notes',
    modulesRoot: '/lib/modules',
    moduleRoot: '/',
    bootTime: await readBootTime(),
    kheadersModuleDir: '/sys/module/kheaders',
    devFuse: '/dev/fuse',
    mountinfo: '/proc/self/mountinfo',
    // modprobe and ldconfig live in sbin, which a user's PATH often lacks.
    path: [process.env.PATH ?? '', '/usr/local/sbin', '/usr/sbin', '/sbin', '/usr/bin', '/bin'].filter(Boolean).join(path.delimiter),
    uid: process.getuid?.() ?? 0,
    capEff: cap ? BigInt('0x' + cap[1]) : null,
    packageRoot: packageRoot(),
    systemd: await exists('/run/systemd/system'),
    timeoutMs: doctorTimeoutMs(process.env['KHEADERSD_DOCTOR_TIMEOUT']),
    probeNode: process.execPath,
  };
}

/**
 * One check's deadline: 15 s, or KHEADERSD_DOCTOR_TIMEOUT seconds (an emulated or very slow
 * device, where starting node alone takes seconds). A value that is not a positive number is
 * ignored rather than failing the very command meant to diagnose things.
 */
export function doctorTimeoutMs(value: string | undefined): number {
  const seconds = Number(value);
  return value !== undefined && Number.isFinite(seconds) && seconds > 0 ? Math.round(seconds * 1000) : 15_000;
}

/**
 * The mount probe's budgets for a check deadline: the stat itself gets a fifth of it (3 s of the
 * default 15 s), the child as a whole the deadline. A longer KHEADERSD_DOCTOR_TIMEOUT (a slow or
 * loaded device, an emulator, where a stat through a healthy mount can take seconds) lengthens
 * both, so a slow mount is not reported as a hung one.
 */
export function mountProbeBudget(timeoutMs: number): { hangMs: number; limitMs: number } {
  return { hangMs: Math.round(timeoutMs / 5), limitMs: timeoutMs };
}

export async function runDoctor(cfg: Config, overrides: Partial<DoctorEnvironment> = {}): Promise<DoctorReport> {
  const env: DoctorEnvironment = { ...(await defaultEnvironment()), ...overrides };
  const d = new Doctor(cfg, env);
  // Independent checks run at once; the list keeps a fixed order.
  const groups = await Promise.all([
    d.guard('kernel', () => d.kernel()),
    d.guard('privileges', () => d.privileges()),
    d.guard('archive', () => d.archive()),
    d.guard('btf', () => d.btf()),
    d.guard('xz', () => d.xz()),
    d.guard('cache', () => d.cache()),
    d.guard('cache-entries', () => d.cacheEntries()),
    d.guard('current', () => d.current()),
    d.guard('http', () => d.http()),
    d.guard('token', () => d.token()),
    d.guard('fuse-device', () => d.fuseDevice()),
    d.guard('fuse-backend', () => d.fuseBackend()),
    d.guard('mount-point', () => d.mountPoint()),
    d.guard('link-modules', () => d.linkModules()),
    d.guard('service', () => d.service()),
  ]);
  const checks = groups.flat();
  const counts: Record<CheckStatus, number> = { ok: 0, warn: 0, fail: 0 };
  for (const c of checks) counts[c.status]++;
  return { ok: counts.fail === 0, counts, checks };
}

type Found = CheckResult[];

class Doctor {
  /** Facts two checks share, computed once. */
  private btfFact: Promise<{ present: boolean; bytes: number }> | undefined;
  private currentFact: Promise<{ id: string; manifest: unknown } | null> | undefined;

  constructor(
    private readonly cfg: Config,
    private readonly env: DoctorEnvironment,
  ) {}

  /** Run one check with a deadline; an exception or a timeout becomes a warn line, never a crash. */
  async guard(id: string, fn: () => Promise<Found>): Promise<Found> {
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<Found>((resolve) => {
      timer = setTimeout(() => resolve([{ id, status: 'warn', what: `${id}: no answer within ${this.env.timeoutMs / 1000} s`, fix: 'check it by hand' }]), this.env.timeoutMs + 1000);
      timer.unref();
    });
    try {
      return await Promise.race([
        fn().catch((err: unknown): Found => [{ id, status: 'warn', what: `${id}: could not check (${err instanceof Error ? err.message : String(err)})` }]),
        deadline,
      ]);
    } finally {
      clearTimeout(timer);
    }
  }

  private hasCap(bit: bigint): boolean {
    if (this.env.uid === 0 && this.env.capEff === null) return true;
    return this.env.capEff !== null && ((this.env.capEff >> bit) & 1n) === 1n;
  }

  private which(name: string): Promise<string | undefined> {
    return whichIn(name, this.env.path);
  }

  async kernel(): Promise<Found> {
    return [{ id: 'kernel', status: 'ok', what: `kernel ${this.env.release} (${process.arch}${isAndroid() ? ', Android' : ''}), node ${process.version}` }];
  }

  async privileges(): Promise<Found> {
    const out: Found = [];
    const admin = this.hasCap(CAP_SYS_ADMIN);
    const module = this.hasCap(CAP_SYS_MODULE);
    if (this.env.uid === 0 && admin && module) {
      out.push({ id: 'privileges', status: 'ok', what: 'running as root with CAP_SYS_ADMIN and CAP_SYS_MODULE' });
    } else {
      const lacking = [...(admin ? [] : ['CAP_SYS_ADMIN (mount)']), ...(module ? [] : ['CAP_SYS_MODULE (modprobe)'])];
      out.push({
        id: 'privileges',
        status: 'warn',
        what: `running as uid ${this.env.uid}${lacking.length ? ` without ${lacking.join(', ')}` : ''}: the checks below are for this user`,
        fix: 'serve runs as root (the systemd unit does): run `sudo kheadersd doctor` to check what it will see',
      });
    }
    // A mount made in a private mount namespace is seen by this process alone.
    if (this.cfg.mount !== null) {
      const [self, init] = await Promise.all([readlink('/proc/self/ns/mnt').catch(() => null), readlink('/proc/1/ns/mnt').catch(() => null)]);
      if (self !== null && init !== null && self !== init) {
        out.push({
          id: 'privileges',
          status: 'warn',
          what: 'this process runs in its own mount namespace (a sandboxed service, unshare, or a container without shared propagation)',
          fix: 'a FUSE mount made here is invisible to the rest of the system: run serve in the host namespace (the shipped unit does), or --mount off and use HTTP',
        });
      }
    }
    return out;
  }

  private btfInfo(): Promise<{ present: boolean; bytes: number }> {
    this.btfFact ??= stat(this.env.btfPath).then(
      (st) => ({ present: true, bytes: st.size }),
      () => ({ present: false, bytes: 0 }),
    );
    return this.btfFact;
  }

  /**
   * The entry the `current` pointer names and its manifest as JSON (null when unreadable), read
   * once for the cache and current checks. Read leniently, without the store's checks: a
   * damaged entry is the cache-entries check's business, and this one still says what it names.
   */
  private currentFile(): Promise<{ id: string; manifest: unknown } | null> {
    this.currentFact ??= (async () => {
      const dir = this.cfg.cacheDir;
      const id = parseCurrentPointer(await readFile(path.join(dir, 'current'), 'utf8').catch(() => ''))?.id;
      if (id === undefined) return null;
      const text = await readFile(path.join(dir, 'entries', id, 'manifest.json'), 'utf8').catch(() => null);
      let manifest: unknown = null;
      try {
        manifest = text === null ? null : JSON.parse(text);
      } catch {
        // unreadable: the cache-entries check reports it
      }
      return { id, manifest };
    })();
    return this.currentFact;
  }

  private async cacheInfo(): Promise<CacheFacts> {
    const current = await this.currentFile();
    const m = (typeof current?.manifest === 'object' && current.manifest !== null ? current.manifest : {}) as { kind?: unknown; module?: unknown };
    return {
      currentRelease: current === null ? null : (parseEntryId(current.id)?.release ?? null),
      currentKind: typeof m.kind === 'string' ? m.kind : null,
      currentModule: isModuleFileInfo(m.module) ? m.module : null,
    };
  }

  /** Every entry checked as serve would load it; what is damaged, and what was quarantined and why. */
  async cacheEntries(): Promise<Found> {
    let store: CacheStore;
    try {
      store = await CacheStore.open(this.cfg.cacheDir);
    } catch {
      return []; // no cache yet, or one the cache check already refuses
    }
    const { entries, damaged } = await store.scan();
    const quarantined = await store.quarantined();
    const out: Found = [];
    for (const d of damaged) {
      out.push({ id: 'cache-entries', status: 'warn', what: `${d.error.message}: not served`, fix: 'a serve start or `kheadersd ingest` moves it to quarantine and rebuilds it' });
    }
    const live = new Set(entries.map((m) => m.id));
    for (const q of quarantined) {
      out.push({
        id: 'cache-entries',
        status: 'warn',
        what: `quarantined ${q.at}: ${q.id}: ${q.reason}${live.has(q.id) ? ' (rebuilt since)' : ' (not rebuilt)'}`,
        fix: `see ${path.join(store.dir, 'quarantine', q.name)}; entries damaged again and again point at the disk (dmesg, smartctl)`,
      });
    }
    if (out.length === 0) out.push({ id: 'cache-entries', status: 'ok', what: `${entries.length} cache entr${entries.length === 1 ? 'y' : 'ies'} intact, none quarantined` });
    return out;
  }

  async archive(): Promise<Found> {
    if (this.cfg.archive !== undefined) {
      const file = this.cfg.archive;
      const head = await readHead(file, 8);
      if (typeof head === 'string') {
        return [{ id: 'archive', status: 'fail', what: `archive ${file} (from the configuration): cannot read it (${head})`, fix: 'fix the path in --archive / KHEADERSD_ARCHIVE / config.json "archive"' }];
      }
      const kind = isXz(head) ? 'an xz archive' : isElf(head) ? 'an ELF file (kheaders.ko/vmlinux)' : null;
      if (kind === null) return [{ id: 'archive', status: 'fail', what: `archive ${file} is neither xz nor ELF (starts ${head.toString('hex') || 'empty'})`, fix: 'pass a kheaders.tar.xz, kheaders.ko or vmlinux' }];
      return [{ id: 'archive', status: 'ok', what: `archive ${file}: ${kind} (configured instead of the running kernel's)` }];
    }

    for (const p of this.env.livePaths) {
      const head = await readHead(p, 6);
      if (typeof head === 'string') {
        if (head === 'ENOENT') continue;
        return [{ id: 'archive', status: 'fail', what: `header archive ${p} exists but cannot be read (${head})`, fix: 'run as root' }];
      }
      if (!isXz(head)) return [{ id: 'archive', status: 'fail', what: `header archive ${p} is not xz (starts ${head.toString('hex')})`, fix: 'this kernel exposes something unexpected there; pass --archive FILE' }];
      const size = await stat(p).then((s) => s.size, () => 0);
      return [{ id: 'archive', status: 'ok', what: `header archive: ${p}${size > 0 ? ` (${mib(size)})` : ''}` }];
    }

    // Not exposed now: is the module on disk, to be read (or, failing that, loaded)?
    const tried = this.env.livePaths.join(' or ');
    const dirs = moduleSearchDirs(this.cfg.moduleDirs, this.env.release);
    const search = await findModuleFiles(dirs, this.env.moduleRoot);
    const loadable: FoundModule[] = [];
    const rejected: string[] = [];
    for (const module of search.found) {
      const read = await readModuleFile(module, { release: this.env.release, maxBytes: this.cfg.maxTotalBytes, searchPath: this.env.path });
      if (read.outcome === 'archive') {
        const out: Found = [{ id: 'archive', status: 'ok', what: `header archive: not exposed (${tried}); serve reads it out of ${module.file} (vermagic ${this.env.release}) without loading the module` }];
        const late = this.moduleNewerThanBoot({ file: module.file, mtime: read.mtime.toISOString(), bootTime: this.env.bootTime.toISOString() });
        return late ? [...out, late] : out;
      }
      if (read.outcome === 'rejected') rejected.push(`${module.file}: ${read.reason}`);
      else loadable.push(module);
    }
    const notUsed = rejected.length > 0 ? `; not used: ${rejected.join('; ')}` : '';
    const loaded = await exists(this.env.kheadersModuleDir);
    if (loadable.length > 0 && !loaded) {
      const tools = (await Promise.all(['modprobe', 'insmod'].map((t) => this.which(t)))).filter((t) => t !== undefined);
      const blockers = [
        ...(this.cfg.modprobe ? [] : ['loading is off in the configuration (modprobe: false)']),
        ...(tools.length > 0 ? [] : ['there is no modprobe or insmod (install kmod)']),
        ...(this.hasCap(CAP_SYS_MODULE) ? [] : ['loading a module needs root']),
      ];
      const files = loadable.map((m) => m.file).join(', ');
      if (blockers.length === 0) {
        return [{ id: 'archive', status: 'ok', what: `header archive: not exposed yet; serve cannot read ${files} here, so it loads it (modprobe, insmod) and unloads it afterwards${notUsed}` }];
      }
      return [{ id: 'archive', status: 'warn', what: `header archive: not exposed (${tried}); ${files} cannot be read here and cannot be loaded: ${blockers.join(', ')}${notUsed}`, fix: 'run serve as root with modprobe on, or load it yourself: sudo modprobe kheaders (Android: insmod FILE)' }];
    }
    const [btf, cache] = await Promise.all([this.btfInfo(), this.cacheInfo().catch(() => null)]);
    const nowhere = `no kheaders module for it in ${dirs.join(', ')}`;
    const base = `no header archive for ${this.env.release} (no ${tried}; ${loaded ? 'the kheaders module is loaded but exposes none' : nowhere}${notUsed})`;
    const howToFix = `build the kernel with CONFIG_IKHEADERS=y (or =m and install kheaders.ko${rejected.length > 0 ? ` built for ${this.env.release}` : ''}; moduleDirs names other places), or set "archive" (--archive FILE --release R)`;
    if (cache !== null && cache.currentRelease === this.env.release && cache.currentKind === 'headers') {
      return [{ id: 'archive', status: 'warn', what: `${base}; the cache already holds this kernel's headers, which serve will use`, fix: howToFix + ' to refresh them' }];
    }
    if (btf.present) {
      return [{ id: 'archive', status: 'warn', what: `${base}; serve caches only a vmlinux.h made from BTF: enough for CO-RE, not for BCC or #include <linux/...>`, fix: howToFix }];
    }
    return [{ id: 'archive', status: 'fail', what: `${base}, and no BTF either: nothing to serve`, fix: howToFix }];
  }

  /**
   * A module file changed after this boot may have been installed for the next kernel build with
   * the same release: reading it (or loading it) would give that build's headers, not these.
   */
  private moduleNewerThanBoot(module: ModuleFileInfo): CheckResult | undefined {
    const mtime = Date.parse(module.mtime);
    if (!(mtime > this.env.bootTime.getTime())) return undefined;
    return {
      id: 'archive',
      status: 'warn',
      what: `${module.file} changed at ${module.mtime}, after this kernel booted (${this.env.bootTime.toISOString()}): it may be a module installed for the next build with the same release, whose headers do not match the running kernel`,
      fix: 'reboot into the kernel it was installed with (serve re-reads it at start), or check that it is the module this kernel was built with',
    };
  }

  async btf(): Promise<Found> {
    const btf = await this.btfInfo();
    if (btf.present) return [{ id: 'btf', status: 'ok', what: `BTF: ${this.env.btfPath} (${mib(btf.bytes)}): each entry gets a vmlinux.h for CO-RE` }];
    return [{ id: 'btf', status: 'warn', what: `no BTF (${this.env.btfPath}): no vmlinux.h in the entries`, fix: 'headers are still served; CO-RE programs need a kernel with CONFIG_DEBUG_INFO_BTF=y' }];
  }

  /** Whether `current` is the running kernel's entry: serving another kernel's headers is the silent failure. */
  async current(): Promise<Found> {
    const current = await this.currentFile();
    if (current === null || typeof current.manifest !== 'object' || current.manifest === null) return []; // the cache check's business
    const manifest = current.manifest as Manifest;
    const [buildId, btfDigest] = await Promise.all([readLiveBuildId(this.env.notesPath), sha256OfFile(this.env.btfPath)]);
    const m = matchRunning(manifest, { release: this.env.release, buildId, btfDigest });
    const what = `current: ${manifest.release} (sha256 ${manifest.digest.slice(0, 12)}, from ${manifest.source})`;
    if (m.match === 'yes') return [{ id: 'current', status: 'ok', what: `${what}, the running kernel's own` }];
    const fix =
      'tools reading `current` on this machine get another kernel\'s headers and misread its structures: remove "archive"/"release" ' +
      '(--archive, KHEADERSD_ARCHIVE, config.json) and restart serve, or run `kheadersd ingest` on the kernel these headers are for';
    return [{ id: 'current', status: 'warn', what: `${what} is ${m.match === 'no' ? 'NOT' : 'not known to be'} the running kernel: ${m.why}`, fix }];
  }

  async xz(): Promise<Found> {
    // Found the way ingest finds it.
    const binary = await findXzBinary(this.env.path);
    if (binary) return [{ id: 'xz', status: 'ok', what: `xz decoder: ${binary.file}` }];
    if (this.cfg.decoder === 'xz') return [{ id: 'xz', status: 'fail', what: 'no xz or xzcat binary, and the configuration asks for it (decoder: xz)', fix: 'install xz-utils, or set decoder to auto' }];
    const lzma = await loadInChild('lzma-native', this.env.packageRoot, this.env.timeoutMs);
    if (lzma.ok) return [{ id: 'xz', status: 'warn', what: 'no xz binary: ingest decodes with lzma-native, about 2x slower', fix: 'install xz-utils (apt install xz-utils)' }];
    return [{ id: 'xz', status: 'fail', what: `no xz binary and lzma-native does not load (${lzma.message}): ingest cannot decode`, fix: 'install xz-utils (apt install xz-utils)' }];
  }

  async cache(): Promise<Found> {
    const dir = this.cfg.cacheDir;
    let st;
    try {
      st = await stat(dir);
    } catch (err) {
      if (errnoOf(err) !== 'ENOENT') return [{ id: 'cache', status: 'fail', what: `cache ${dir}: ${errnoOf(err) ?? String(err)}`, fix: 'choose another with --cache-dir' }];
      const parent = await nearestExisting(path.dirname(dir));
      const writable = await access(parent, constants.W_OK).then(
        () => true,
        () => false,
      );
      if (!writable) return [{ id: 'cache', status: 'fail', what: `cache ${dir} does not exist and ${parent} is not writable by uid ${this.env.uid}`, fix: 'run as root, or choose a cache you can create with --cache-dir' }];
      return [{ id: 'cache', status: 'ok', what: `cache ${dir}: absent; the first ingest creates it (0755, owned by uid ${this.env.uid})` }];
    }
    const out: Found = [];
    const mode = st.mode & 0o7777;
    // The very rule ingest and serve apply (they write, so the owner must be this user); one
    // that only readers accept (owned by root) is a warning: the root service is fine with it.
    const problem = cacheDirProblem(dir, st, this.env.uid, true);
    if (problem) {
      if (problem.kind === 'owner' && cacheDirProblem(dir, st, this.env.uid, false) === undefined) {
        out.push({
          id: 'cache',
          status: 'warn',
          what: `cache ${dir} is owned by uid ${st.uid}, not by you (uid ${this.env.uid}): ingest and serve as you would be refused`,
          fix: 'fine for the root service; run commands that write (ingest, gc, serve) with sudo',
        });
      } else {
        out.push({ id: 'cache', status: 'fail', what: problem.what, fix: problem.fix });
      }
    } else {
      const info = await this.cacheInfo();
      const entry = info.currentRelease === null ? 'no current entry yet' : `current entry: ${info.currentRelease}${info.currentKind ? ` (${info.currentKind})` : ''}`;
      out.push({ id: 'cache', status: 'ok', what: `cache ${dir}: owned by uid ${st.uid}, mode ${mode.toString(8)}; ${entry}` });
      const late = info.currentModule && info.currentRelease === this.env.release ? this.moduleNewerThanBoot(info.currentModule) : undefined;
      if (late) out.push({ ...late, id: 'cache', what: `the current entry was read from ${late.what}` });
    }
    const fs = await statfs(dir).catch(() => null);
    if (fs !== null) {
      const free = Number(fs.bavail) * Number(fs.bsize);
      if (free < LOW_SPACE_BYTES) out.push({ id: 'cache', status: 'warn', what: `only ${mib(free)} free under ${dir}: an entry takes about 35 MiB`, fix: 'free some space, or kheadersd gc --keep 1' });
    }
    return out;
  }

  async http(): Promise<Found> {
    const listen = this.cfg.http;
    if (listen === null) return [{ id: 'http', status: 'ok', what: 'HTTP: off (http: off)' }];
    const where = `${listen.host.includes(':') ? `[${listen.host}]` : listen.host}:${listen.port}`;
    const out: Found = [];
    const result = await tryListen(listen.host, listen.port);
    if (result === null) {
      out.push({ id: 'http', status: 'ok', what: `HTTP: ${where} is free` });
    } else if (result === 'EADDRINUSE') {
      const answer = await probeHealthz(where, this.env.timeoutMs);
      if (answer !== null) out.push({ id: 'http', status: 'ok', what: `HTTP: ${where} is taken by a server answering /healthz (${answer}): kheadersd is already running` });
      else out.push({ id: 'http', status: 'fail', what: `HTTP: ${where} is used by another program`, fix: 'stop it, or choose another port: --http 127.0.0.1:PORT' });
    } else if (result === 'EACCES') {
      out.push({ id: 'http', status: 'fail', what: `HTTP: no permission to listen on ${where}`, fix: 'ports below 1024 need root or CAP_NET_BIND_SERVICE: pick a higher one' });
    } else if (result === 'EADDRNOTAVAIL') {
      out.push({ id: 'http', status: 'fail', what: `HTTP: ${listen.host} is not an address of this machine`, fix: 'use 127.0.0.1, 0.0.0.0 or one of this machine\'s addresses' });
    } else {
      out.push({ id: 'http', status: 'fail', what: `HTTP: cannot listen on ${where} (${result})`, fix: 'choose another --http HOST:PORT' });
    }
    if (!isLoopback(listen.host) && this.cfg.tokenFile === undefined) {
      out.push({ id: 'http', status: 'warn', what: `HTTP listens on ${listen.host}, beyond this machine, without a token`, fix: 'anyone who can reach the port reads the headers; set tokenFile, or listen on 127.0.0.1 (adb forward and ssh -L reach that too)' });
    }
    return out;
  }

  /** The token file, by the very rule serve and pull apply (readTokenFile): what serve would refuse is a FAIL. */
  async token(): Promise<Found> {
    const file = this.cfg.tokenFile;
    if (file === undefined) return [];
    try {
      const token = await readTokenFile(file);
      return [{ id: 'token', status: 'ok', what: `token file ${file}: ${token.length} characters, private` }];
    } catch (err) {
      if (!isKheadersError(err, 'E_CONFIG')) throw err;
      const { problem, fix } = err.details;
      return [{ id: 'token', status: 'fail', what: typeof problem === 'string' ? problem : err.message, ...(typeof fix === 'string' ? { fix } : {}) }];
    }
  }

  async fuseDevice(): Promise<Found> {
    if (this.cfg.mount === null) return [{ id: 'fuse-device', status: 'ok', what: 'FUSE: not used (mount: off); headers over HTTP, pull and export only' }];
    const dev = this.env.devFuse;
    let st;
    try {
      st = await stat(dev);
    } catch (err) {
      return [{ id: 'fuse-device', status: 'fail', what: `no ${dev} (${errnoOf(err) ?? String(err)})`, fix: 'sudo modprobe fuse; in a container: --device /dev/fuse; or mount: off for HTTP only' }];
    }
    if (!st.isCharacterDevice()) return [{ id: 'fuse-device', status: 'fail', what: `${dev} is not a character device`, fix: 'remove it and load the fuse module (modprobe fuse)' }];
    const rw = await access(dev, constants.R_OK | constants.W_OK).then(
      () => true,
      () => false,
    );
    if (!rw) return [{ id: 'fuse-device', status: 'fail', what: `${dev}: no read/write permission for uid ${this.env.uid}`, fix: 'run serve as root' }];
    return [{ id: 'fuse-device', status: 'ok', what: `FUSE device ${dev}: present, read/write` }];
  }

  async fuseBackend(): Promise<Found> {
    if (this.cfg.mount === null) return [];
    const backend = this.cfg.fuseBackend;
    const out: Found = [];
    const mountBin = await this.which('mount');
    const kernelOk = mountBin !== undefined;
    if (backend === 'kernel' || backend === 'auto') {
      out.push(
        kernelOk
          ? { id: 'fuse-backend', status: 'ok', what: `kernel FUSE backend (TypeScript, no libfuse): needs only ${mountBin}` }
          : { id: 'fuse-backend', status: backend === 'kernel' ? 'fail' : 'warn', what: 'kernel FUSE backend: no mount binary on PATH', fix: 'install util-linux (mount)' },
      );
    }
    if (backend === 'native' || backend === 'auto') {
      const [lib, load] = await Promise.all([ldconfigHas('libfuse.so.2', this.env.path, this.env.timeoutMs), loadInChild('fuse-native', this.env.packageRoot, this.env.timeoutMs)]);
      const libText = lib === true ? 'libfuse.so.2 found' : lib === false ? 'no libfuse.so.2 in the ldconfig cache' : 'ldconfig not available';
      if (load.ok) {
        out.push({ id: 'fuse-backend', status: 'ok', what: `native FUSE backend: fuse-native loads (${libText})` });
      } else {
        const fix =
          lib === false
            ? 'install libfuse2 and fuse (apt install libfuse2 fuse)'
            : process.arch !== 'x64'
              ? `fuse-native ships no prebuild for ${process.arch}: use --fuse-backend kernel`
              : 'reinstall kheadersd (npm ci), or use --fuse-backend kernel';
        out.push({
          id: 'fuse-backend',
          status: backend === 'native' || !kernelOk ? 'fail' : 'warn',
          what: `native FUSE backend: fuse-native does not load (${load.message}; ${libText})`,
          fix: backend === 'auto' ? `${fix}; the kernel backend needs neither` : fix,
        });
      }
    }
    return out;
  }

  async mountPoint(): Promise<Found> {
    const dir = this.cfg.mount;
    if (dir === null) return [];
    const abs = path.resolve(dir);
    // What serve sees there, by serve's own reading of mountinfo.
    const here = await mountAt(abs, this.env.mountinfo).catch(() => undefined);
    const fuse = here !== undefined && isFuse(here);
    if (here !== undefined && !fuse) {
      return [{ id: 'mount-point', status: 'fail', what: `mount point ${abs} already has a ${here.fsType} filesystem (${here.source}) mounted`, fix: 'choose another --mount, or unmount it' }];
    }
    if (fuse) {
      // Only a FUSE mount can block a stat forever: probe it in a child we can kill.
      const probe = await statInChild(abs, mountProbeBudget(this.env.timeoutMs), this.env.probeNode);
      if (probe === 'ok') return [{ id: 'mount-point', status: 'ok', what: `mount point ${abs}: mounted (${here.fsType} ${here.source}) and answering: kheadersd is serving it` }];
      if (probe === 'ENOTCONN' || probe === 'ECONNABORTED') {
        return [{ id: 'mount-point', status: 'warn', what: `mount point ${abs}: a dead FUSE mount (${probe}) left by a daemon that crashed or was killed`, fix: `serve clears it at start; or now: sudo umount -l ${abs}` }];
      }
      if (probe === 'ETIMEDOUT') return [{ id: 'mount-point', status: 'warn', what: `mount point ${abs}: a FUSE mount that does not answer (hung daemon?)`, fix: `sudo umount -l ${abs}, then restart kheadersd` }];
      return [{ id: 'mount-point', status: 'warn', what: `mount point ${abs}: a FUSE mount that fails (${probe})`, fix: `sudo umount -l ${abs}` }];
    }
    let st;
    try {
      st = await lstat(abs);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return [{ id: 'mount-point', status: 'ok', what: `mount point ${abs}: absent; serve creates it` }];
      return [{ id: 'mount-point', status: 'fail', what: `mount point ${abs}: ${errnoOf(err) ?? String(err)}`, fix: 'choose another --mount' }];
    }
    if (!st.isDirectory()) return [{ id: 'mount-point', status: 'fail', what: `mount point ${abs} exists and is not a directory`, fix: 'remove it, or choose another --mount' }];
    const names = await readdir(abs).catch(() => null);
    if (names === null) return [{ id: 'mount-point', status: 'warn', what: `mount point ${abs}: cannot list it`, fix: 'run as root' }];
    if (names.length > 0) return [{ id: 'mount-point', status: 'fail', what: `mount point ${abs} is not empty (${names.length} entries): FUSE would hide them, and serve refuses`, fix: 'empty it, or choose another --mount' }];
    return [{ id: 'mount-point', status: 'ok', what: `mount point ${abs}: an empty directory, not mounted` }];
  }

  async linkModules(): Promise<Found> {
    if (!this.cfg.linkModules || this.cfg.mount === null) return [];
    const link = path.join(this.env.modulesRoot, this.env.release, 'build');
    const target = await readlink(link).catch((err: unknown) => (errnoOf(err) === 'ENOENT' ? null : 'not a link'));
    if (target === null) return [{ id: 'link-modules', status: 'ok', what: `link-modules: ${link} is free; serve points it at ${path.join(path.resolve(this.cfg.mount), this.env.release)}` }];
    if (target.startsWith(path.resolve(this.cfg.mount))) return [{ id: 'link-modules', status: 'ok', what: `link-modules: ${link} -> ${target} (made by kheadersd)` }];
    return [{ id: 'link-modules', status: 'warn', what: `link-modules: ${link} already exists (${target}); serve leaves it alone`, fix: 'tools that use it get those headers, not kheadersd\'s; remove it if it is stale' }];
  }

  async service(): Promise<Found> {
    if (!this.env.systemd) return [];
    const r = await runChild('systemctl', ['show', '--property=LoadState,ActiveState,SubState', 'kheadersd.service'], this.env.timeoutMs);
    if (!r.ok) return [];
    const prop = (k: string): string => new RegExp(`^${k}=(.*)$`, 'm').exec(r.stdout)?.[1] ?? '';
    const load = prop('LoadState');
    const active = prop('ActiveState');
    if (load === 'not-found') return [{ id: 'service', status: 'ok', what: 'systemd service: not installed', fix: 'optional: sudo kheadersd install-systemd starts it at boot' }];
    if (active === 'active') return [{ id: 'service', status: 'ok', what: `systemd service kheadersd: active (${prop('SubState')})` }];
    if (active === 'failed') return [{ id: 'service', status: 'warn', what: 'systemd service kheadersd: failed', fix: 'see why: journalctl -u kheadersd -e --no-pager' }];
    return [{ id: 'service', status: 'ok', what: `systemd service kheadersd: ${active || 'unknown'}${load && load !== 'loaded' ? ` (${load})` : ''}` }];
  }
}

// ---- helpers -------------------------------------------------------------------------------

function mib(bytes: number): string {
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}

async function exists(p: string): Promise<boolean> {
  return access(p).then(
    () => true,
    () => false,
  );
}

/** The first `n` bytes, or the errno when the file cannot be read. */
async function readHead(file: string, n: number): Promise<Buffer | string> {
  try {
    const fh = await open(file, 'r');
    try {
      const buf = Buffer.alloc(n);
      const { bytesRead } = await fh.read(buf, 0, n, 0);
      return buf.subarray(0, bytesRead);
    } finally {
      await fh.close();
    }
  } catch (err) {
    return errnoOf(err) ?? String(err);
  }
}

async function whichIn(name: string, searchPath: string): Promise<string | undefined> {
  for (const dir of searchPath.split(path.delimiter)) {
    if (!dir) continue;
    const file = path.join(dir, name);
    try {
      await access(file, constants.X_OK);
      if ((await stat(file)).isFile()) return file;
    } catch {
      // not here
    }
  }
  return undefined;
}

async function nearestExisting(dir: string): Promise<string> {
  let d = dir;
  while (!(await exists(d)) && path.dirname(d) !== d) d = path.dirname(d);
  return d;
}

interface CacheFacts {
  currentRelease: string | null;
  currentKind: string | null;
  /** The module file the current entry was read from or loaded from, if any. */
  currentModule: ModuleFileInfo | null;
}

function isModuleFileInfo(v: unknown): v is ModuleFileInfo {
  if (typeof v !== 'object' || v === null) return false;
  const m = v as Record<string, unknown>;
  return typeof m.file === 'string' && typeof m.mtime === 'string' && typeof m.bootTime === 'string';
}

interface ChildResult {
  ok: boolean;
  stdout: string;
  message: string;
}

function runChild(file: string, args: string[], timeoutMs: number, cwd?: string): Promise<ChildResult> {
  return new Promise((resolve) => {
    execFile(file, args, { timeout: timeoutMs, killSignal: 'SIGKILL', ...(cwd ? { cwd } : {}) }, (err, stdout, stderr) => {
      const message = err ? ((err as NodeJS.ErrnoException).code === 'ENOENT' ? `${file} not found` : err.killed ? `no answer within ${timeoutMs / 1000} s` : stderr.trim().split('\n').pop() || err.message) : '';
      resolve({ ok: !err, stdout, message });
    });
  });
}

/** Load a native package in a child node: a crash or a missing .so cannot take doctor down. */
async function loadInChild(pkg: string, cwd: string, timeoutMs: number): Promise<{ ok: boolean; message: string }> {
  const script = `try { require(${JSON.stringify(pkg)}); } catch (e) { process.stderr.write(String(e && e.message || e).split('\\n')[0]); process.exit(1); }`;
  const r = await runChild(process.execPath, ['-e', script], timeoutMs, cwd);
  return { ok: r.ok, message: r.message };
}

/** true/false: whether the dynamic linker's cache lists `lib`; null: no ldconfig to ask. */
async function ldconfigHas(lib: string, searchPath: string, timeoutMs: number): Promise<boolean | null> {
  const ldconfig = await whichIn('ldconfig', searchPath);
  if (!ldconfig) return null;
  const r = await runChild(ldconfig, ['-p'], timeoutMs);
  if (!r.ok) return null;
  return r.stdout.split('\n').some((l) => l.trim().startsWith(lib + ' '));
}

/**
 * stat() in a child process: 'ok', an errno, or 'ETIMEDOUT' when it hangs (the child is killed).
 * The hang budget starts when the child is ready to stat, not when it is spawned: starting node
 * can take seconds on a slow machine, which says nothing about the mount.
 */
export function statInChild(p: string, budget: { hangMs: number; limitMs: number }, node: string = process.execPath): Promise<string> {
  const script = `process.stdout.write('R'); require('fs').stat(${JSON.stringify(p)}, (e) => process.stdout.write(e ? ' ' + e.code : ' ok'))`;
  return new Promise((resolve) => {
    const child = spawn(node, ['-e', script], { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    let hangTimer: NodeJS.Timeout | undefined;
    const giveUp = (): void => {
      child.kill('SIGKILL');
      finish('ETIMEDOUT');
    };
    const limitTimer = setTimeout(giveUp, budget.limitMs);
    let done = false;
    const finish = (result: string): void => {
      if (done) return;
      done = true;
      clearTimeout(limitTimer);
      clearTimeout(hangTimer);
      resolve(result);
    };
    child.stdout.setEncoding('utf8').on('data', (s: string) => {
      if (out === '' && s.startsWith('R')) hangTimer = setTimeout(giveUp, budget.hangMs);
      out += s;
    });
    child.on('error', () => finish('EIO'));
    child.on('close', () => finish(/^R (\S+)$/.exec(out)?.[1] ?? 'EIO'));
  });
}

/** null when HOST:PORT could be listened on (and was closed again), else the errno. */
function tryListen(host: string, port: number): Promise<string | null> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.unref();
    server.once('error', (err) => resolve(errnoOf(err) ?? 'EIO'));
    server.listen({ host, port, exclusive: true }, () => server.close(() => resolve(null)));
  });
}

/** The status line of GET /healthz, or null when nothing HTTP answers there. */
async function probeHealthz(where: string, timeoutMs: number): Promise<string | null> {
  const host = where.startsWith('0.0.0.0:') ? where.replace('0.0.0.0', '127.0.0.1') : where.startsWith('[::]:') ? where.replace('[::]', '[::1]') : where;
  try {
    const res = await fetch(`http://${host}/healthz`, { signal: AbortSignal.timeout(timeoutMs) });
    await res.body?.cancel();
    // Any 2xx: kheadersd answers /healthz while alive; another server would say 404.
    return res.ok ? `HTTP ${res.status}` : null;
  } catch {
    return null;
  }
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}
