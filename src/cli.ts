#!/usr/bin/env node
/**
 * The command line: parses flags, resolves the configuration, and hands each command to its
 * module. Heavy modules (fastify, fuse-native, the BTF emitter) are imported inside the action
 * that needs them, so `kheadersd ingest` starts as fast as node itself.
 */
import { createRequire } from 'node:module';
import type * as CommanderModule from 'commander';
import type { Command } from 'commander';
import { DEFAULT_CONFIG_FILE, KEYS, envName, flagName, readConfigFile, resolveConfig, type Config, type ConfigKey } from './config.js';
import { EXIT, KheadersError, errnoOf } from './errors.js';
import { createDeferredLogger, createLogger, type Logger } from './log.js';
import { holdYoungGeneration, optimizeForSize } from './v8-flags.js';
import type { CommandIO } from './commands/store-commands.js';

// require(), not `import`: importing a CommonJS package from ESM makes node lex its source (and
// every file it re-exports) for named exports, a cost paid at every start for nothing.
const { Command: CommandClass, Option } = createRequire(import.meta.url)('commander') as typeof CommanderModule;

const VERSION = '0.1.0';

/**
 * A one-shot command's module, loaded; then V8 is told to favour memory over speed for the work
 * that follows (optimizeForSize says why only then).
 */
async function oneShot<T>(loading: Promise<T>): Promise<T> {
  const loaded = await loading;
  optimizeForSize();
  return loaded;
}

interface GlobalOptions {
  config?: string;
  json?: boolean;
}

function addKeys(cmd: Command, keys: readonly ConfigKey[]): Command {
  for (const key of keys) {
    const spec = KEYS[key];
    const flag = flagName(key);
    if (spec.kind === 'boolean') {
      cmd.addOption(new Option(`--${flag}`, `${spec.help} [env ${envName(key)}=true|false]`));
      cmd.addOption(new Option(`--no-${flag}`, `turn --${flag} off`));
    } else {
      const opt = new Option(`--${flag} <${spec.kind === 'bytes' ? 'size' : spec.kind === 'integer' ? 'n' : spec.kind === 'dirs' ? 'dirs' : 'value'}>`, `${spec.help} [env ${envName(key)}]`);
      cmd.addOption('values' in spec ? opt.choices(spec.values) : opt);
    }
  }
  return cmd;
}

const COMMON: ConfigKey[] = ['cacheDir', 'logLevel', 'lockTimeout'];
/** serve's own keys (doctor takes them too, to check what serve would do). */
const SERVE_KEYS: ConfigKey[] = ['mount', 'fuseBackend', 'linkModules', 'http', 'tokenFile', 'httpMaxConnectionsPerClient', 'httpHeadersTimeout', 'httpIdleTimeout'];
const INGEST_KEYS: ConfigKey[] = ['archive', 'release', 'moduleDirs', 'modprobe', 'unloadModule', 'keep', 'maxCacheBytes', 'maxTotalBytes', 'maxEntries', 'maxFileBytes', 'decoder', 'btf'];

/**
 * Run one command: load configuration, build the logger, map errors to an exit status. Logs go
 * to stdout, except for commands whose stdout carries data (`--json`, `cat`), where they go to
 * stderr so the data stays clean.
 */
async function run(cmd: Command, dataOnStdout: boolean, body: (cfg: Config, io: CommandIO) => Promise<void>, logger = createLogger): Promise<void> {
  const opts = cmd.optsWithGlobals<GlobalOptions & Partial<Record<ConfigKey, unknown>>>();
  const dataOut = dataOnStdout || opts.json === true;
  const logStream = dataOut ? process.stderr : process.stdout;
  let log: Logger = logger('info', logStream);
  try {
    const configFile = opts.config ?? process.env.KHEADERSD_CONFIG ?? DEFAULT_CONFIG_FILE;
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

export function buildProgram(): Command {
  const program = new CommandClass('kheadersd')
    .description("Serve the running kernel's own headers (CONFIG_IKHEADERS) to BPF toolchains: one crash-safe cache, a FUSE mount and HTTP.")
    .version(VERSION)
    .option('--config <file>', `configuration file (default ${DEFAULT_CONFIG_FILE} if present) [env KHEADERSD_CONFIG]`)
    .showHelpAfterError()
    .addHelpText(
      'after',
      `\nExit status: 0 ok, ${EXIT.usage} usage or configuration error, ${EXIT.archiveNotFound} no archive found, ${EXIT.badArchive} bad archive or BTF,\n${EXIT.environment} environment (cache locked, unsafe or full, no FUSE), ${EXIT.notFound} not found (no such entry, file or module), ${EXIT.internal} internal error.`,
    );
  program.exitOverride((err) => {
    process.exit(err.exitCode === 0 ? 0 : EXIT.usage);
  });

  const ingestCmd = addKeys(program.command('ingest').description("cache the kernel's header archive (the running kernel's, or --archive FILE)"), [...INGEST_KEYS, ...COMMON])
    .option('--json', 'print the result as JSON')
    .action(async (_o, cmd: Command) =>
      run(
        cmd,
        false,
        async (cfg, io) => {
          const { cmdIngest } = await oneShot(import('./commands/store-commands.js'));
          await cmdIngest(cfg, io, cmd.opts().json === true);
        },
        // pino loads while xz decodes (ingest warms it), not before xz starts.
        createDeferredLogger,
      ),
    );
  void ingestCmd;

  addKeys(program.command('ls').description('list cached entries'), COMMON)
    .option('--json', 'print JSON')
    .action(async (_o, cmd: Command) =>
      run(cmd, false, async (cfg, io) => {
        const { cmdLs } = await oneShot(import('./commands/store-commands.js'));
        await cmdLs(cfg, io, cmd.opts().json === true);
      }),
    );

  addKeys(program.command('cat').description('print a file from the cache (symlinks followed)').argument('<ref>', 'current, a release, or a digest').argument('<path>', 'e.g. include/linux/sched.h'), COMMON).action(
    async (ref: string, file: string, _o, cmd: Command) =>
      run(cmd, true, async (cfg, io) => {
        const { cmdCat } = await oneShot(import('./commands/store-commands.js'));
        await cmdCat(cfg, io, ref, file);
      }),
  );

  addKeys(program.command('export').description('write an entry out as a plain directory (for BCC_KERNEL_SOURCE without FUSE)').argument('<ref>', 'current, a release, or a digest').argument('<dir>', 'a new or empty directory'), COMMON).action(
    async (ref: string, dir: string, _o, cmd: Command) =>
      run(cmd, false, async (cfg, io) => {
        const { cmdExport } = await oneShot(import('./commands/store-commands.js'));
        await cmdExport(cfg, io, ref, dir);
      }),
  );

  addKeys(program.command('gc').description('evict old entries (beyond --keep and --max-cache-bytes; never the current one)'), ['keep', 'maxCacheBytes', ...COMMON])
    .option('--json', 'print JSON')
    .action(async (_o, cmd: Command) =>
      run(cmd, false, async (cfg, io) => {
        const { cmdGc } = await oneShot(import('./commands/store-commands.js'));
        await cmdGc(cfg, io, cmd.opts().json === true);
      }),
    );

  addKeys(
    program.command('serve').description('ingest the running kernel\'s headers, then serve them over a FUSE mount and HTTP until stopped'),
    [...INGEST_KEYS, ...SERVE_KEYS, ...COMMON],
  ).action(async (_o, cmd: Command) =>
    run(cmd, false, async (cfg, io) => {
      const { startDaemon, installSignalHandlers } = await import('./commands/serve.js');
      const starting = startDaemon(cfg, io);
      installSignalHandlers(starting, io);
      await starting;
      holdYoungGeneration(); // only now: the start's builtins are loaded, with node's code cache
    }),
  );

  program
    .command('pull')
    .description("on a developer host: fetch a device's current entry (headers, vmlinux.h, .config) over HTTP (or adb) into a directory, and print the variables to use it")
    .option('--url <url>', 'the daemon to pull from (default http://127.0.0.1:7711)')
    .option('--adb', 'reach the device through a temporary `adb forward` (removed afterwards)')
    .option('--serial <serial>', "adb's -s: which device, when several are attached")
    .option('--out <dir>', 'where trees go: DIR/<release>-<digest12>/ (default <host cache>/trees)')
    .option('--release <release>', "pull this release instead of the device's current one")
    .option('--cache-dir <dir>', 'the host-side cache (default $XDG_CACHE_HOME/kheadersd or ~/.cache/kheadersd)')
    .option('--token-file <file>', 'the bearer token, when the daemon requires one (mode 600, one line of 16 or more characters)')
    .addOption(new Option('--log-level <level>', 'log level').choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']))
    .action(async (o: { url?: string; adb?: boolean; serial?: string; out?: string; release?: string; cacheDir?: string; tokenFile?: string }, cmd: Command) =>
      run(cmd, true, async (_cfg, io) => {
        const { cmdPull, defaultHostCacheDir } = await oneShot(import('./commands/pull.js'));
        await cmdPull(
          {
            ...(o.url !== undefined ? { url: o.url } : {}),
            ...(o.adb ? { adb: true } : {}),
            ...(o.serial !== undefined ? { serial: o.serial } : {}),
            ...(o.out !== undefined ? { out: o.out } : {}),
            ...(o.release !== undefined ? { release: o.release } : {}),
            ...(o.tokenFile !== undefined ? { tokenFile: o.tokenFile } : {}),
            cacheDir: o.cacheDir ?? defaultHostCacheDir(),
          },
          io,
        );
      }),
    );

  program
    .command('btf')
    .description("write vmlinux.h (for libbpf CO-RE programs) generated from the kernel's BTF, or a loaded module's header")
    .option('--btf <file>', 'the BTF to read: raw, or the .BTF section of a vmlinux or .ko (default /sys/kernel/btf/vmlinux)')
    .option('--module <name>', "a loaded module's header: its BTF (/sys/kernel/btf/NAME) over the kernel's")
    .option('--base <file>', 'the base BTF of split BTF given with --btf (a module\'s: the kernel\'s BTF or vmlinux)')
    .option('--out <file>', 'write here (atomically) instead of stdout')
    .action(async (o: { btf?: string; module?: string; base?: string; out?: string }, cmd: Command) =>
      run(cmd, o.out === undefined, async () => {
        const { runBtfCommand } = await oneShot(import('./btf/command.js'));
        await runBtfCommand(
          {
            ...(o.btf !== undefined ? { btf: o.btf } : {}),
            ...(o.module !== undefined ? { module: o.module } : {}),
            ...(o.base !== undefined ? { base: o.base } : {}),
            ...(o.out !== undefined ? { out: o.out } : {}),
          },
          process.stdout,
        );
      }),
    );

  addKeys(
    program.command('doctor').description('check everything a first `serve` needs, and say what to do about each problem'),
    [...INGEST_KEYS, ...SERVE_KEYS, ...COMMON],
  )
    .option('--json', 'print the checks as JSON')
    .action(async (_o, cmd: Command) =>
      run(cmd, false, async (cfg, io) => {
        const { cmdDoctor } = await oneShot(import('./commands/doctor.js'));
        process.exitCode = await cmdDoctor(cfg, io, { json: cmd.opts().json === true });
      }),
    );

  program
    .command('install-systemd')
    .description('install, enable and start the systemd unit (as root): /etc/systemd/system/kheadersd.service')
    .option('--http-only', 'no FUSE mount: HTTP only, in the full systemd sandbox')
    .option('--no-enable', 'do not enable it at boot')
    .option('--no-start', 'do not (re)start it now')
    .option('--dry-run', 'print what would be written; change nothing')
    .option('--unit-dir <dir>', 'write the unit there instead (systemctl is not run then)')
    .option('--config-dir <dir>', 'where config.json goes', '/etc/kheadersd')
    .action(async (o: { httpOnly?: boolean; enable: boolean; start: boolean; dryRun?: boolean; unitDir?: string; configDir: string }) => {
      const { cmdInstallSystemd } = await oneShot(import('./commands/install.js'));
      process.exitCode = await cmdInstallSystemd(
        { stdout: process.stdout, stderr: process.stderr },
        { httpOnly: o.httpOnly === true, enable: o.enable, start: o.start, dryRun: o.dryRun === true, configDir: o.configDir, ...(o.unitDir !== undefined ? { unitDir: o.unitDir } : {}) },
      );
    });

  program
    .command('uninstall-systemd')
    .description('stop, disable and remove the systemd unit (as root); keeps the configuration and the cache')
    .option('--dry-run', 'print what would be removed; change nothing')
    .option('--unit-dir <dir>', 'the directory install-systemd --unit-dir wrote to')
    .action(async (o: { dryRun?: boolean; unitDir?: string }) => {
      const { cmdUninstallSystemd } = await oneShot(import('./commands/install.js'));
      process.exitCode = await cmdUninstallSystemd({ stdout: process.stdout, stderr: process.stderr }, { dryRun: o.dryRun === true, ...(o.unitDir !== undefined ? { unitDir: o.unitDir } : {}) });
    });

  return program;
}

// Run only as the entry point (tests import buildProgram without side effects).
const invokedAs = process.argv[1] ?? '';
if (/(?:^|[/\\])(?:cli\.js|kheadersd)$/.test(invokedAs)) {
  buildProgram()
    .parseAsync(process.argv)
    .catch((err: unknown) => {
      process.stderr.write(`kheadersd: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exitCode = EXIT.internal;
    });
}
