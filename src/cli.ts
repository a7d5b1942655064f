#!/usr/bin/env node
/**
 * The command line: the commands as a table (their flags, the configuration's from the KEYS
 * table so they cannot drift), parsed by cli-args.ts; then the configuration is resolved, the
 * logger built, and the command's module loaded. Heavy modules (fastify, fuse-native, the BTF
 * emitter) are imported inside the command that needs them, so `kheadersd ingest` starts as fast
 * as node itself.
 */
import { loadCommand, saveCompiledCommands } from './command-loader.js';
import { parseCommandLine, type CommandSpec, type Flag, type FlagValues, type ProgramSpec } from './cli-args.js';
import { DEFAULT_CONFIG_FILE, KEYS, envName, flagName, readConfigFile, resolveConfig, type Config, type ConfigKey } from './config.js';
import { EXIT, KheadersError, errnoOf } from './errors.js';
import { createDeferredLogger, createHeldLogger, createLogger, LOG_LEVELS, releaseLogger, type Logger } from './log.js';
import { holdYoungGeneration, optimizeForSize } from './v8-flags.js';
import type { CommandIO } from './commands/store-commands.js';

const VERSION = '0.1.0';
/**
 * Set by a command whose process has nothing left to do once it returns (`ingest`): the entry
 * point then exits at once (process.exit) rather than letting node end the event loop and tear
 * its heap down piece by piece, which took ~45 ms after an ingest's last line (its 'exit' event
 * to the process gone; with process.exit ~22 ms less, interleaved). Everything it writes is
 * awaited before it returns, and stdout and stderr are synchronous on Linux (files, pipes, TTYs).
 */
let exitWhenDone = false;
/** The longest serve holds its start's log lines (a start blocked on the cache's lock, a slow modprobe): then they are written. */
const START_LINES_HELD_MS = 1_000;

/**
 * A one-shot command's module, loaded; then V8 is told to favour memory over speed for the work
 * that follows (optimizeForSize says why only then).
 */
async function oneShot<T>(loading: Promise<T>): Promise<T> {
  const loaded = await loading;
  optimizeForSize();
  return loaded;
}

/** What a command does with its flags and positional arguments. */
type Run = (flags: FlagValues, args: string[]) => Promise<void>;

/** A string flag's value (undefined when absent). */
const text = (v: string | boolean | undefined): string | undefined => (typeof v === 'string' ? v : undefined);

/** The configuration keys as flags; a boolean key has its `--no-X` too. */
function keyFlags(keys: readonly ConfigKey[]): Flag[] {
  return keys.flatMap((key): Flag[] => {
    const spec: { kind: string; help: string; values?: readonly string[] } = KEYS[key];
    const name = flagName(key);
    if (spec.kind === 'boolean') return [{ name, help: `${spec.help} [env ${envName(key)}=true|false]` }, { name: `no-${name}`, help: `turn --${name} off`, negates: name }];
    const value = { bytes: 'size', integer: 'n', dirs: 'dirs' }[spec.kind] ?? 'value';
    return [{ name, value, help: `${spec.help} [env ${envName(key)}]`, ...(spec.values ? { choices: spec.values } : {}) }];
  });
}

/**
 * The flags of a command that reads no configuration (runStandalone), as rows of its name, its
 * value's placeholder (null: a switch) and its help; then the one flag runStandalone reads itself,
 * --log-level.
 */
function standaloneFlags(rows: ReadonlyArray<readonly [name: string, value: string | null, help: string]>): Flag[] {
  const logLevel: Flag = { name: 'log-level', value: 'level', help: 'log level', choices: LOG_LEVELS };
  return [...rows.map(([name, value, help]): Flag => (value === null ? { name, help } : { name, value, help })), logLevel];
}

const COMMON: ConfigKey[] = ['cacheDir', 'logLevel', 'lockTimeout'];
/** serve's own keys (doctor takes them too, to check what serve would do). */
const SERVE_KEYS: ConfigKey[] = ['mount', 'fuseBackend', 'linkModules', 'http', 'tokenFile', 'httpMaxConnectionsPerClient', 'httpHeadersTimeout', 'httpIdleTimeout'];
const INGEST_KEYS: ConfigKey[] = ['archive', 'release', 'moduleDirs', 'modprobe', 'unloadModule', 'keep', 'maxCacheBytes', 'maxTotalBytes', 'maxEntries', 'maxFileBytes', 'decoder', 'btf'];
const REF = { name: 'ref', help: 'current, a release, or a digest' };
const json = (help: string): Flag => ({ name: 'json', help });

/**
 * Run one command: load configuration, build the logger, map errors to an exit status. Logs go
 * to stdout, except for commands whose stdout carries data (`--json`, `cat`), where they go to
 * stderr so the data stays clean.
 */
async function run(opts: FlagValues, dataOnStdout: boolean, body: (cfg: Config, io: CommandIO) => Promise<void>, logger = createLogger): Promise<void> {
  const dataOut = dataOnStdout || opts.json === true;
  const logStream = dataOut ? process.stderr : process.stdout;
  let log: Logger = logger('info', logStream);
  try {
    const configFile = text(opts.config) ?? process.env.KHEADERSD_CONFIG ?? DEFAULT_CONFIG_FILE;
    const file = await readConfigFile(configFile, opts.config !== undefined || process.env.KHEADERSD_CONFIG !== undefined);
    const flags: Partial<Record<ConfigKey, unknown>> = {};
    for (const key of Object.keys(KEYS) as ConfigKey[]) if (opts[key] !== undefined) flags[key] = opts[key];
    const cfg = resolveConfig({ flags, env: process.env, file, fileName: configFile });
    log = logger(cfg.logLevel, logStream);
    await body(cfg, { stdout: process.stdout, stderr: process.stderr, log });
  } catch (err) {
    process.exitCode = report(err, log, logStream.isTTY === true);
  }
}

/**
 * Run a command that is not about this machine's cache (`pull` on a developer host, `btf`): it
 * reads no daemon configuration, so a config file or `KHEADERSD_*` variable meant for the daemon
 * (or a bad one) cannot stop it. Only `--log-level` sets its log level.
 */
async function runStandalone(opts: FlagValues, dataOnStdout: boolean, body: (io: CommandIO) => Promise<void>): Promise<void> {
  const logStream = dataOnStdout ? process.stderr : process.stdout;
  const level = LOG_LEVELS.find((l) => l === opts.logLevel) ?? 'info';
  const log = createLogger(level, logStream);
  try {
    await body({ stdout: process.stdout, stderr: process.stderr, log });
  } catch (err) {
    process.exitCode = report(err, log, logStream.isTTY === true);
  }
}

/**
 * Say what failed: one plain line on stderr, and the same as a structured log line for machines
 * (the journal, a log file) — but not when the log goes to a terminal, where a person would read
 * the message twice, once as JSON.
 */
function report(err: unknown, log: Logger, logOnTerminal: boolean): number {
  // The reader closed the pipe (`kheadersd cat … | head`): the normal end of a Unix filter.
  if (errnoOf(err) === 'EPIPE') return EXIT.ok;
  if (err instanceof KheadersError) {
    if (!logOnTerminal) log.error({ code: err.code, details: err.details }, err.message);
    process.stderr.write(`kheadersd: ${err.message}\n`);
    return err.exitCode;
  }
  log.error({ err }, 'internal error');
  process.stderr.write(`kheadersd: internal error: ${err instanceof Error ? err.message : String(err)}\n(this is a bug; the log above has the details)\n`);
  return EXIT.internal;
}

const COMMANDS: ReadonlyArray<CommandSpec<Run>> = [
  {
    name: 'ingest',
    description: "cache the kernel's header archive (the running kernel's, or --archive FILE)",
    flags: [...keyFlags([...INGEST_KEYS, ...COMMON]), json('print the result as JSON')],
    run: (o) =>
      run(
        o,
        false,
        async (cfg, io) => {
          exitWhenDone = true;
          const { cmdIngest } = await oneShot(loadCommand('store', cfg.cacheDir, io.log));
          await cmdIngest(cfg, io, o.json === true);
        },
        // pino loads while xz decodes (ingest warms it), not before xz starts.
        createDeferredLogger,
      ),
  },
  {
    name: 'ls',
    description: 'list cached entries',
    flags: [...keyFlags(COMMON), json('print JSON')],
    run: (o) =>
      run(o, false, async (cfg, io) => {
        const { cmdLs } = await oneShot(loadCommand('store', cfg.cacheDir, io.log));
        await cmdLs(cfg, io, o.json === true);
      }),
  },
  {
    name: 'cat',
    description: 'print a file from the cache (symlinks followed)',
    args: [REF, { name: 'path', help: 'e.g. include/linux/sched.h' }],
    flags: keyFlags(COMMON),
    run: (o, [ref, file]) =>
      run(o, true, async (cfg, io) => {
        const { cmdCat } = await oneShot(loadCommand('store', cfg.cacheDir, io.log));
        await cmdCat(cfg, io, ref!, file!);
      }),
  },
  {
    name: 'export',
    description: 'write an entry out as a plain directory (for BCC_KERNEL_SOURCE without FUSE)',
    args: [REF, { name: 'dir', help: 'a new or empty directory' }],
    flags: keyFlags(COMMON),
    run: (o, [ref, dir]) =>
      run(o, false, async (cfg, io) => {
        const { cmdExport } = await oneShot(loadCommand('store', cfg.cacheDir, io.log));
        await cmdExport(cfg, io, ref!, dir!);
      }),
  },
  {
    name: 'gc',
    description: 'evict old entries (beyond --keep and --max-cache-bytes; never the current one)',
    flags: [...keyFlags(['keep', 'maxCacheBytes', ...COMMON]), json('print JSON')],
    run: (o) =>
      run(o, false, async (cfg, io) => {
        const { cmdGc } = await oneShot(loadCommand('store', cfg.cacheDir, io.log));
        await cmdGc(cfg, io, o.json === true);
      }),
  },
  {
    name: 'serve',
    description: "ingest the running kernel's headers, then serve them over a FUSE mount and HTTP until stopped",
    flags: keyFlags([...INGEST_KEYS, ...SERVE_KEYS, ...COMMON]),
    run: (o) =>
      run(
        o,
        false,
        async (cfg, io) => {
          const { StopRequest, startDaemon, installSignalHandlers } = await loadCommand('serve', cfg.cacheDir, io.log);
          const stopRequest = new StopRequest();
          // The start's lines are held until it is ready, fails, is stopped or waits on a build
          // (ingest-process.ts warms the logger then, unless the daemon runs xz itself), and for
          // at most START_LINES_HELD_MS: pino loads then.
          const release = (): void => releaseLogger(io.log);
          stopRequest.signal.addEventListener('abort', release, { once: true });
          const latest = setTimeout(release, START_LINES_HELD_MS);
          const starting = startDaemon(cfg, io, stopRequest);
          installSignalHandlers(starting, io, stopRequest);
          await starting;
          // Ready; a moment later, not in the way of the first requests: the code this start
          // compiled is kept for the next one (a start that compiled it: V8's createCachedData
          // took ~6 ms of this thread, which a first boot's first request waited out), before
          // any V8 flag changes (V8 refuses code made under other flags); pino loads (a request
          // that comes then waits for it); and V8's young generation is held (only now: the
          // start's builtins are loaded, with node's code cache). Loading node:v8 for that took
          // ~3 ms, which a first request waited out when it was done at ready. A stop before
          // then waits for the save (finishBeforeExit).
          clearTimeout(latest);
          stopRequest.finishBeforeExit(
            new Promise<void>((resolve) =>
              setTimeout(() => {
                const saved = saveCompiledCommands(io.log);
                release();
                holdYoungGeneration();
                void saved.then(resolve);
              }, 100),
            ),
          );
        },
        createHeldLogger,
      ),
  },
  {
    name: 'pull',
    description: "on a developer host: fetch a device's current entry (headers, vmlinux.h, .config) over HTTP (or adb) into a directory, and print the variables to use it",
    flags: standaloneFlags([
      ['url', 'url', 'the daemon to pull from (default http://127.0.0.1:7711)'],
      ['adb', null, 'reach the device through a temporary `adb forward` (removed afterwards)'],
      ['serial', 'serial', "adb's -s: which device, when several are attached"],
      ['out', 'dir', 'where trees go: DIR/<release>-<digest12>/ (default <host cache>/trees)'],
      ['release', 'release', "pull this release instead of the device's current one"],
      ['cache-dir', 'dir', 'the host-side cache (default $XDG_CACHE_HOME/kheadersd or ~/.cache/kheadersd)'],
      ['token-file', 'file', 'the bearer token, when the daemon requires one (mode 600, one line of 16 or more characters)'],
    ]),
    run: (o) =>
      runStandalone(o, true, async (io) => {
        const { cmdPull, defaultHostCacheDir } = await oneShot(loadCommand('pull', undefined));
        const [url, serial, out, release, tokenFile] = [text(o.url), text(o.serial), text(o.out), text(o.release), text(o.tokenFile)];
        await cmdPull(
          {
            ...(url !== undefined ? { url } : {}),
            ...(o.adb === true ? { adb: true } : {}),
            ...(serial !== undefined ? { serial } : {}),
            ...(out !== undefined ? { out } : {}),
            ...(release !== undefined ? { release } : {}),
            ...(tokenFile !== undefined ? { tokenFile } : {}),
            cacheDir: text(o.cacheDir) ?? defaultHostCacheDir(),
          },
          io,
        );
      }),
  },
  {
    name: 'btf',
    description: "write vmlinux.h (for libbpf CO-RE programs) generated from the kernel's BTF, or a loaded module's header",
    flags: standaloneFlags([
      ['btf', 'file', 'the BTF to read: raw, or the .BTF section of a vmlinux or .ko (default /sys/kernel/btf/vmlinux)'],
      ['module', 'name', "a loaded module's header: its BTF (/sys/kernel/btf/NAME) over the kernel's"],
      ['base', 'file', "the base BTF of split BTF given with --btf (a module's: the kernel's BTF or vmlinux)"],
      ['out', 'file', 'write here (atomically) instead of stdout'],
    ]),
    run: (o) => {
      const [btf, module, base, out] = [text(o.btf), text(o.module), text(o.base), text(o.out)];
      return runStandalone(o, out === undefined, async () => {
        const { runBtfCommand } = await oneShot(loadCommand('btf', undefined));
        await runBtfCommand(
          {
            ...(btf !== undefined ? { btf } : {}),
            ...(module !== undefined ? { module } : {}),
            ...(base !== undefined ? { base } : {}),
            ...(out !== undefined ? { out } : {}),
          },
          process.stdout,
        );
      });
    },
  },
  {
    name: 'doctor',
    description: 'check everything a first `serve` needs, and say what to do about each problem',
    flags: [...keyFlags([...INGEST_KEYS, ...SERVE_KEYS, ...COMMON]), json('print the checks as JSON')],
    run: (o) =>
      run(o, false, async (cfg, io) => {
        const { cmdDoctor } = await oneShot(loadCommand('doctor', cfg.cacheDir, io.log));
        process.exitCode = await cmdDoctor(cfg, io, { json: o.json === true });
      }),
  },
  {
    name: 'install-systemd',
    description: 'install, enable and start the systemd unit (as root): /etc/systemd/system/kheadersd.service',
    flags: [
      { name: 'http-only', help: 'no FUSE mount: HTTP only, in the full systemd sandbox' },
      { name: 'no-enable', help: 'do not enable it at boot' },
      { name: 'no-start', help: 'do not (re)start it now' },
      { name: 'dry-run', help: 'print what would be written; change nothing' },
      { name: 'unit-dir', value: 'dir', help: 'write the unit there instead (systemctl is not run then)' },
      { name: 'config-dir', value: 'dir', help: 'where config.json goes', default: '/etc/kheadersd' },
    ],
    run: async (o) => {
      const { cmdInstallSystemd } = await oneShot(loadCommand('install', undefined));
      const unitDir = text(o.unitDir);
      process.exitCode = await cmdInstallSystemd(
        { stdout: process.stdout, stderr: process.stderr },
        { httpOnly: o.httpOnly === true, enable: o.noEnable !== true, start: o.noStart !== true, dryRun: o.dryRun === true, configDir: text(o.configDir)!, ...(unitDir !== undefined ? { unitDir } : {}) },
      );
    },
  },
  {
    name: 'uninstall-systemd',
    description: 'stop, disable and remove the systemd unit (as root); keeps the configuration and the cache',
    flags: [
      { name: 'dry-run', help: 'print what would be removed; change nothing' },
      { name: 'unit-dir', value: 'dir', help: 'the directory install-systemd --unit-dir wrote to' },
    ],
    run: async (o) => {
      const { cmdUninstallSystemd } = await oneShot(loadCommand('install', undefined));
      const unitDir = text(o.unitDir);
      process.exitCode = await cmdUninstallSystemd({ stdout: process.stdout, stderr: process.stderr }, { dryRun: o.dryRun === true, ...(unitDir !== undefined ? { unitDir } : {}) });
    },
  },
];

export const PROGRAM: ProgramSpec<Run> = {
  name: 'kheadersd',
  version: VERSION,
  description: "Serve the running kernel's own headers (CONFIG_IKHEADERS) to BPF toolchains: one crash-safe cache, a FUSE mount and HTTP.",
  globalFlags: [{ name: 'config', value: 'file', help: `configuration file (default ${DEFAULT_CONFIG_FILE} if present) [env KHEADERSD_CONFIG]` }],
  commands: COMMANDS,
  footer:
    `Exit status: 0 ok, ${EXIT.usage} usage or configuration error, ${EXIT.archiveNotFound} no archive found, ${EXIT.badArchive} bad archive or BTF,\n` +
    `${EXIT.environment} environment (cache locked, unsafe or full, no FUSE), ${EXIT.notFound} not found (no such entry, file or module), ${EXIT.internal} internal error,\n` +
    '130 / 143 ingest stopped by SIGINT / SIGTERM (nothing cached).',
};

/** Parse the words, then run the command, print help or the version, or refuse with exit status 2. */
export async function main(argv: readonly string[]): Promise<void> {
  const parsed = parseCommandLine(PROGRAM, argv);
  switch (parsed.kind) {
    case 'run':
      return parsed.command.run(parsed.flags, parsed.args);
    case 'help':
    case 'version':
      process.stdout.write(parsed.text);
      return;
    case 'usage':
      process.stderr.write(parsed.text);
      process.exitCode = EXIT.usage;
  }
}

// Run only as the entry point (tests import the table without side effects).
const invokedAs = process.argv[1] ?? '';
if (/(?:^|[/\\])(?:cli\.js|kheadersd)$/.test(invokedAs)) {
  main(process.argv.slice(2)).then(
    () => {
      if (exitWhenDone) process.exit(); // with process.exitCode, as set
    },
    (err: unknown) => {
      process.stderr.write(`kheadersd: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exitCode = EXIT.internal;
    },
  );
}
