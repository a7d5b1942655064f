/**
 * `kheadersd install-systemd` and `kheadersd uninstall-systemd`: put the shipped unit in place for
 * whoever installed kheadersd with `npm install -g` (or runs it from a checkout).
 *
 * The shipped unit says `ExecStart=/usr/local/bin/kheadersd serve`, which is right for Debian's
 * and nodejs.org's npm prefix but not for nvm, volta or a checkout, and `#!/usr/bin/env node`
 * finds no node at all when node is not on systemd's PATH. So the unit is rendered with the
 * absolute paths of the node running this command and of the CLI this package's "bin" names,
 * checked with `systemd-analyze verify` before anything is written, written atomically, and only
 * then enabled.
 * A command rather than a shell script because npm ships dist/ and systemd/, not scripts/.
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { access, chmod, copyFile, mkdir, mkdtemp, readFile, rename, rm, rmdir, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { readConfigFile, resolveConfig } from '../config.js';
import { EXIT, KheadersError, errnoOf } from '../errors.js';

export const UNIT_NAME = 'kheadersd.service';
export const DROPIN_NAME = 'http-only.conf';
const DEFAULT_UNIT_DIR = '/etc/systemd/system';
const DEFAULT_CONFIG_DIR = '/etc/kheadersd';
/** The line of the shipped unit that install-systemd rewrites. */
const TEMPLATE_EXEC_START = /^ExecStart=\/usr\/local\/bin\/kheadersd serve$/m;
/** A marker in every file we write, so uninstall removes only ours. */
const MARKER = '# Installed by kheadersd install-systemd';

interface OwnPackage {
  /** The directory of kheadersd's package.json. */
  root: string;
  /** The CLI its "bin" names, absolute. */
  cli: string;
}
let ownPackage: OwnPackage | undefined;

/**
 * kheadersd's own package: the nearest directory above this module whose package.json is
 * kheadersd's, found by walking up, since this code runs from tsc's output (dist/src/commands/)
 * in tests and from the bundle (dist/app/, flat) when installed; and the CLI that package.json's
 * "bin" names. Synchronous and read once: it reads two or three small files of the installation,
 * in the one-shot commands install-systemd and doctor, never in the daemon.
 */
function findOwnPackage(): OwnPackage {
  if (ownPackage) return ownPackage;
  const from = path.dirname(fileURLToPath(import.meta.url));
  for (let dir = from; ; dir = path.dirname(dir)) {
    let pkg: { name?: unknown; bin?: unknown } | undefined;
    try {
      pkg = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as typeof pkg;
    } catch {
      // none here (or not JSON): keep walking up
    }
    const bin = pkg?.bin !== null && typeof pkg?.bin === 'object' ? (pkg.bin as Record<string, unknown>)['kheadersd'] : undefined;
    if (pkg?.name === 'kheadersd' && typeof bin === 'string') return (ownPackage = { root: dir, cli: path.resolve(dir, bin) });
    if (path.dirname(dir) === dir) throw new KheadersError('E_INTERNAL', `no package.json of kheadersd (with a "bin") above ${from}: the installation is incomplete`);
  }
}

/** The package root: the directory of kheadersd's package.json, which holds systemd/ and node_modules/. */
export function packageRoot(): string {
  return findOwnPackage().root;
}

export interface InstallIO {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
}

export interface InstallSystemdOptions {
  /** Also install the http-only drop-in (no mount, full sandbox). */
  httpOnly?: boolean;
  /** `systemctl enable` (default true). */
  enable?: boolean;
  /** `systemctl restart` after installing (default true). */
  start?: boolean;
  /** Print what would be written; change nothing. */
  dryRun?: boolean;
  /** Where the unit goes (default /etc/systemd/system). Elsewhere, systemctl is not run. */
  unitDir?: string;
  /** Where config.json goes (default /etc/kheadersd). */
  configDir?: string;
  /** The command ExecStart runs, before `serve` (default: this node and the CLI this package's "bin" names). */
  command?: string[];
}

export interface UninstallSystemdOptions {
  unitDir?: string;
  dryRun?: boolean;
}

/**
 * Quote one word for an Exec*= line (systemd.service(5), "Command lines"): `%` starts a
 * specifier and `$` a variable, so both are doubled; a word with blanks or quotes is double-quoted
 * with C escapes.
 */
export function systemdQuote(word: string): string {
  const escaped = word.replace(/%/g, '%%').replace(/\$/g, '$$$$');
  if (/^[A-Za-z0-9_@%+=:,./$-]+$/.test(escaped)) return escaped;
  return '"' + escaped.replace(/\\/g, '\\\\').replace(/"/g, '\\"') + '"';
}

/** The shipped unit with ExecStart pointing at `command` and a header saying where it came from. */
export function renderUnit(template: string, command: readonly string[]): string {
  if (!TEMPLATE_EXEC_START.test(template)) {
    throw new KheadersError('E_INTERNAL', 'the shipped unit has no `ExecStart=/usr/local/bin/kheadersd serve` line to rewrite');
  }
  const execStart = 'ExecStart=' + [...command, 'serve'].map(systemdQuote).join(' ');
  const header = `${MARKER} from ${path.join(packageRoot(), 'systemd', UNIT_NAME)}; re-run it after moving node or kheadersd.\n`;
  return header + template.replace(TEMPLATE_EXEC_START, () => execStart);
}

/** Paths ProtectHome=yes hides; a node or package under them needs ProtectHome=read-only. */
function underHome(p: string): boolean {
  return /^\/(home|root|run\/user)(\/|$)/.test(p);
}

export function renderDropin(template: string, command: readonly string[]): string {
  let text = `${MARKER}\n` + template;
  const hidden = command.filter(underHome);
  if (hidden.length > 0) {
    text +=
      `\n# ${hidden.join(' and ')} ${hidden.length > 1 ? 'are' : 'is'} under a home directory, which ProtectHome=yes would hide\n` +
      '# from the service: read-only is the strictest setting that still lets it start.\nProtectHome=read-only\n';
  }
  return text;
}

interface Run {
  ok: boolean;
  output: string;
  missing: boolean;
}

function run(cmd: string, args: string[], timeoutMs: number, env?: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, killSignal: 'SIGKILL', ...(env ? { env } : {}) }, (err, stdout, stderr) => {
      resolve({
        ok: !err,
        output: `${stdout}${stderr}`.trim() || (err ? err.message : ''),
        missing: (err as NodeJS.ErrnoException | null)?.code === 'ENOENT',
      });
    });
  });
}

async function exists(p: string): Promise<boolean> {
  return access(p).then(
    () => true,
    () => false,
  );
}

/** Write a file by rename, so a crash never leaves half a unit for systemd to load. */
async function writeAtomic(file: string, text: string, mode: number): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true, mode: 0o755 });
  const tmp = `${file}.tmp-${process.pid}`;
  await writeFile(tmp, text, { mode });
  await chmod(tmp, mode); // writeFile's mode is masked by the umask
  await rename(tmp, file);
}

/** True when PID 1 is systemd (sd_booted(3): /run/systemd/system exists). */
export async function systemdRunning(): Promise<boolean> {
  return exists('/run/systemd/system');
}

class Steps {
  constructor(private readonly io: InstallIO) {}
  ok(what: string): void {
    this.io.stdout.write(`ok    ${what}\n`);
  }
  warn(what: string): void {
    this.io.stdout.write(`warn  ${what}\n`);
  }
  fail(what: string, fix: string, status: number = EXIT.environment): number {
    this.io.stderr.write(`FAIL  ${what}\n      ${fix}\n`);
    return status;
  }
}

export async function cmdInstallSystemd(io: InstallIO, opts: InstallSystemdOptions = {}): Promise<number> {
  const steps = new Steps(io);
  const root = packageRoot();
  const unitDir = path.resolve(opts.unitDir ?? DEFAULT_UNIT_DIR);
  const configDir = path.resolve(opts.configDir ?? DEFAULT_CONFIG_DIR);
  const systemWide = unitDir === DEFAULT_UNIT_DIR;
  const command = opts.command ?? [process.execPath, findOwnPackage().cli];

  if (process.platform !== 'linux') return steps.fail(`systemd units are for Linux; this is ${process.platform}`, 'On Android use android/install.sh.', EXIT.usage);
  if (!opts.dryRun && systemWide && process.getuid?.() !== 0) {
    return steps.fail('installing into /etc/systemd/system needs root', `Run: sudo ${command.map((w) => JSON.stringify(w)).join(' ')} install-systemd`, EXIT.usage);
  }
  if (!path.isAbsolute(command[0] ?? '')) return steps.fail(`ExecStart must start with an absolute path, not ${command[0]}`, 'Pass an absolute path.', EXIT.usage);

  // 1. Render.
  let unit: string;
  let dropin: string | undefined;
  try {
    unit = renderUnit(await readFile(path.join(root, 'systemd', UNIT_NAME), 'utf8'), command);
    if (opts.httpOnly) dropin = renderDropin(await readFile(path.join(root, 'systemd', DROPIN_NAME), 'utf8'), command);
  } catch (err) {
    return steps.fail(`cannot read the shipped unit in ${path.join(root, 'systemd')}: ${errnoOf(err) ?? (err as Error).message}`, 'Reinstall kheadersd (the package must include systemd/).', EXIT.internal);
  }
  if (opts.dryRun) {
    io.stdout.write(`# ${path.join(unitDir, UNIT_NAME)}\n${unit}`);
    if (dropin) io.stdout.write(`\n# ${path.join(unitDir, UNIT_NAME + '.d', DROPIN_NAME)}\n${dropin}`);
    return EXIT.ok;
  }

  // 2. Verify before touching anything. systemd-analyze checks every key and that ExecStart exists.
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-unit-'));
  try {
    await writeFile(path.join(scratch, UNIT_NAME), unit);
    if (dropin) {
      await mkdir(path.join(scratch, UNIT_NAME + '.d'));
      await writeFile(path.join(scratch, UNIT_NAME + '.d', DROPIN_NAME), dropin);
    }
    // The trailing ':' keeps the default search path, where sysinit.target and friends live.
    const verify = await run('systemd-analyze', ['verify', path.join(scratch, UNIT_NAME)], 60_000, { ...process.env, SYSTEMD_UNIT_PATH: `${scratch}:` });
    if (verify.missing) steps.warn('systemd-analyze is not installed: the unit was not verified');
    else if (!verify.ok || verify.output !== '') {
      return steps.fail(`systemd-analyze verify rejects the unit:\n${verify.output.replace(/^/gm, '      ')}`, 'Nothing was installed. Report this as a bug, with the output above.', EXIT.internal);
    } else steps.ok(`unit verified (systemd-analyze verify); ExecStart runs ${command.join(' ')} serve`);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }

  // 3. Configuration: install the example if there is none; check an existing one now, since a bad
  // one stops the service at start.
  const configFile = path.join(configDir, 'config.json');
  try {
    if (await exists(configFile)) {
      const file = await readConfigFile(configFile, true);
      resolveConfig({ flags: {}, env: {}, file, fileName: configFile });
      steps.ok(`kept your configuration ${configFile} (it parses)`);
    } else {
      // Every user's kheadersd reads the configuration: the umask must not close its directory.
      if ((await mkdir(configDir, { recursive: true, mode: 0o755 })) !== undefined) await chmod(configDir, 0o755);
      await copyFile(path.join(root, 'systemd', 'config.example.json'), `${configFile}.tmp-${process.pid}`);
      await chmod(`${configFile}.tmp-${process.pid}`, 0o644);
      await rename(`${configFile}.tmp-${process.pid}`, configFile);
      steps.ok(`wrote the default configuration ${configFile} (edit it, then: systemctl restart kheadersd)`);
    }
  } catch (err) {
    if (err instanceof KheadersError) return steps.fail(`configuration: ${err.message}`, `Fix ${configFile} (keys: see ${path.join(root, 'systemd', 'config.example.json')}); nothing was installed.`, EXIT.usage);
    return steps.fail(`cannot write ${configFile}: ${errnoOf(err) ?? (err as Error).message}`, 'Run as root, or pass --config-dir.');
  }

  // 4. Write the unit and the drop-in (or remove a drop-in we installed before).
  const unitFile = path.join(unitDir, UNIT_NAME);
  const dropinDir = path.join(unitDir, UNIT_NAME + '.d');
  const dropinFile = path.join(dropinDir, DROPIN_NAME);
  try {
    await writeAtomic(unitFile, unit, 0o644);
    steps.ok(`wrote ${unitFile}`);
    if (dropin) {
      await writeAtomic(dropinFile, dropin, 0o644);
      steps.ok(`wrote ${dropinFile} (HTTP only, no FUSE mount, full sandbox)`);
    } else if ((await readFile(dropinFile, 'utf8').catch(() => '')).startsWith(MARKER)) {
      await rm(dropinFile);
      await rmdir(dropinDir).catch(() => {}); // only if empty: other drop-ins are the user's
      steps.ok(`removed ${dropinFile} (installed earlier with --http-only)`);
    }
  } catch (err) {
    return steps.fail(`cannot write ${unitFile}: ${errnoOf(err) ?? (err as Error).message}`, 'Run as root, or pass --unit-dir.');
  }

  // 5. Hand it to systemd.
  const enable = opts.enable ?? true;
  const start = opts.start ?? true;
  const manual = ['systemctl daemon-reload', ...(enable ? [`systemctl enable ${UNIT_NAME}`] : []), ...(start ? [`systemctl restart ${UNIT_NAME}`] : [])];
  if (!systemWide || !(await systemdRunning())) {
    steps.warn(`${systemWide ? 'systemd is not running here' : `${unitDir} is not the system unit directory`}: not running systemctl. To finish: ${manual.join('; ')}`);
    io.stdout.write(usage(opts.httpOnly === true));
    return EXIT.ok;
  }
  for (const args of [['daemon-reload'], ...(enable ? [['enable', UNIT_NAME]] : []), ...(start ? [['restart', UNIT_NAME]] : [])]) {
    // restart waits for READY=1 (Type=notify), so it fails when the daemon fails to start.
    const r = await run('systemctl', args, 180_000);
    if (!r.ok) {
      return steps.fail(
        `systemctl ${args.join(' ')} failed${r.output ? `: ${r.output.split('\n')[0]}` : ''}`,
        `See why: journalctl -u kheadersd -e --no-pager; systemctl status kheadersd; kheadersd doctor`,
      );
    }
    steps.ok(`systemctl ${args.join(' ')}`);
  }
  io.stdout.write(usage(opts.httpOnly === true));
  return EXIT.ok;
}

function usage(httpOnly: boolean): string {
  return [
    '',
    'Next:',
    '  systemctl status kheadersd            is it running? (journalctl -u kheadersd for the log)',
    '  kheadersd doctor                      what a first run needs, checked',
    httpOnly ? '  curl -s http://127.0.0.1:7711/readyz  HTTP only (--http-only): no mount' : '  ls /run/kheaders/current/             the running kernel\'s headers',
    '  systemctl reload kheadersd            re-check the kernel (after a kernel or module update)',
    '',
  ].join('\n');
}

export async function cmdUninstallSystemd(io: InstallIO, opts: UninstallSystemdOptions = {}): Promise<number> {
  const steps = new Steps(io);
  const unitDir = path.resolve(opts.unitDir ?? DEFAULT_UNIT_DIR);
  const systemWide = unitDir === DEFAULT_UNIT_DIR;
  const unitFile = path.join(unitDir, UNIT_NAME);
  const dropinDir = path.join(unitDir, UNIT_NAME + '.d');
  const dropinFile = path.join(dropinDir, DROPIN_NAME);
  const ours = async (f: string): Promise<boolean> => (await readFile(f, 'utf8').catch(() => '')).startsWith(MARKER);

  if (opts.dryRun) {
    io.stdout.write(`would run: systemctl disable --now ${UNIT_NAME}\nwould remove: ${unitFile}${(await exists(dropinFile)) ? `, ${dropinFile}` : ''}\n`);
    return EXIT.ok;
  }
  if (systemWide && process.getuid?.() !== 0) return steps.fail('removing the unit from /etc/systemd/system needs root', 'Run: sudo kheadersd uninstall-systemd', EXIT.usage);
  if ((await exists(unitFile)) && !(await ours(unitFile))) {
    return steps.fail(`${unitFile} was not written by kheadersd install-systemd; left alone`, `Remove it yourself if it is kheadersd's: systemctl disable --now ${UNIT_NAME}; rm ${unitFile}`, EXIT.usage);
  }
  const viaSystemctl = systemWide && (await systemdRunning());
  if (viaSystemctl) {
    // Stopping unmounts /run/kheaders (SIGTERM); disable removes the multi-user.target link.
    const r = await run('systemctl', ['disable', '--now', UNIT_NAME], 60_000);
    if (r.ok) steps.ok(`systemctl disable --now ${UNIT_NAME}`);
    else steps.warn(`systemctl disable --now ${UNIT_NAME}: ${r.output.split('\n')[0]}`);
  }
  for (const f of [dropinFile, unitFile]) {
    if (await ours(f)) {
      await rm(f);
      steps.ok(`removed ${f}`);
    }
  }
  await rmdir(dropinDir).catch(() => {});
  if (viaSystemctl) {
    const r = await run('systemctl', ['daemon-reload'], 60_000);
    if (r.ok) steps.ok('systemctl daemon-reload');
  } else if (systemWide) steps.warn('systemd is not running here: run `systemctl daemon-reload` where it is');
  io.stdout.write(
    [
      '',
      'Left in place (yours to remove):',
      '  /etc/kheadersd/          the configuration:  sudo rm -r /etc/kheadersd',
      '  /var/cache/kheadersd/    the cache:          sudo rm -r /var/cache/kheadersd',
      '  the package itself:      sudo npm uninstall -g kheadersd',
      '',
    ].join('\n'),
  );
  return EXIT.ok;
}
