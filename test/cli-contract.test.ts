/**
 * The command line's contract, as users and scripts meet it, pinned on the real CLI (a child
 * process each time) so that whichever argument parser is underneath, it keeps:
 *
 *   - every command's flags: those declared from the KEYS table (string, boolean with --no-X,
 *     integer, bytes, enum, dirs) and each command's own; each is accepted where it is declared
 *     and its value reaches what the command does;
 *   - usage errors: exit 2, nothing on stdout, a message on stderr naming the culprit;
 *   - --help (top level, per command, -h, `help <command>`) listing every flag with its
 *     description, and --version;
 *   - the forms: --flag=value and --flag value, `--`, repeated flags (the last wins), options
 *     before, between and after positionals, --config before or after the command name.
 *
 * How a flag's value is shown to reach the configuration without root-only side effects: each
 * command runs with every one of its flags set, while every matching KHEADERSD_* variable holds
 * a value the configuration refuses. A flag outranks its variable, so the variable is only read
 * (and refused, naming itself) when the flag did not reach its key. Where a command shows a value
 * (doctor --json, ingest --json, gc --json, the paths install-systemd writes), the test reads it
 * there too. Precedence among flag, variable and file is test/cli.test.ts's business.
 *
 * Help is checked for content only (flags, descriptions, choices, variables), never its layout.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { KEYS, envName, flagName, type ConfigKey } from '../src/config.js';
import { ingest } from '../src/store/ingest.js';
import { REPO_ROOT, goodTree, hasStackTrace, runCli, writeTarXz, type RunResult, type SynthEntry } from './helpers/archives.js';
import { BtfBuilder } from './helpers/btf-builder.js';
import { quietLog, startEnv, type HttpEnv } from './helpers/http-env.js';

// ---- the contract: which command takes which flags --------------------------------------------

const COMMON: ConfigKey[] = ['cacheDir', 'logLevel', 'lockTimeout'];
const INGEST_KEYS: ConfigKey[] = ['archive', 'release', 'moduleDirs', 'modprobe', 'unloadModule', 'keep', 'maxCacheBytes', 'maxTotalBytes', 'maxEntries', 'maxFileBytes', 'decoder', 'btf'];
const SERVE_KEYS: ConfigKey[] = ['mount', 'fuseBackend', 'linkModules', 'http', 'tokenFile', 'httpMaxConnectionsPerClient', 'httpHeadersTimeout', 'httpIdleTimeout'];

interface CommandSpec {
  /** Words that must appear in its description (help text is compared with blanks collapsed). */
  describes: string;
  /** Configuration keys it takes as flags. */
  keys: ConfigKey[];
  /** Its own flags, each with words of its description. */
  own: Record<string, string>;
  /** Its positional arguments' names. */
  args: string[];
}

const COMMANDS: Record<string, CommandSpec> = {
  ingest: { describes: "cache the kernel's header archive", keys: [...INGEST_KEYS, ...COMMON], own: { '--json': 'print the result as JSON' }, args: [] },
  ls: { describes: 'list cached entries', keys: COMMON, own: { '--json': 'print JSON' }, args: [] },
  cat: { describes: 'print a file from the cache', keys: COMMON, own: {}, args: ['ref', 'path'] },
  export: { describes: 'write an entry out as a plain directory', keys: COMMON, own: {}, args: ['ref', 'dir'] },
  gc: { describes: 'evict old entries', keys: ['keep', 'maxCacheBytes', ...COMMON], own: { '--json': 'print JSON' }, args: [] },
  serve: { describes: 'serve them over a FUSE mount and HTTP', keys: [...INGEST_KEYS, ...SERVE_KEYS, ...COMMON], own: {}, args: [] },
  pull: {
    describes: "fetch a device's current entry",
    keys: [],
    own: {
      '--url': 'the daemon to pull from',
      '--adb': 'temporary `adb forward`',
      '--serial': 'which device',
      '--out': 'where trees go',
      '--release': "instead of the device's current one",
      '--cache-dir': 'the host-side cache',
      '--token-file': 'the bearer token',
      '--log-level': 'log level',
    },
    args: [],
  },
  btf: {
    describes: 'write vmlinux.h',
    keys: [],
    own: { '--btf': 'the BTF to read', '--module': "a loaded module's header", '--base': 'the base BTF of split BTF', '--out': 'write here', '--log-level': 'log level' },
    args: [],
  },
  doctor: { describes: 'check everything a first `serve` needs', keys: [...INGEST_KEYS, ...SERVE_KEYS, ...COMMON], own: { '--json': 'print the checks as JSON' }, args: [] },
  'install-systemd': {
    describes: 'install, enable and start the systemd unit',
    keys: [],
    own: {
      '--http-only': 'HTTP only',
      '--no-enable': 'do not enable it at boot',
      '--no-start': 'do not (re)start it now',
      '--dry-run': 'print what would be written',
      '--unit-dir': 'write the unit there instead',
      '--config-dir': 'where config.json goes',
    },
    args: [],
  },
  'uninstall-systemd': { describes: 'stop, disable and remove the systemd unit', keys: [], own: { '--dry-run': 'print what would be removed', '--unit-dir': 'the directory install-systemd --unit-dir wrote to' }, args: [] },
};

/** The flags a configuration key is spelled as: booleans also as --no-X. */
function flagsOf(key: ConfigKey): string[] {
  return KEYS[key].kind === 'boolean' ? [`--${flagName(key)}`, `--no-${flagName(key)}`] : [`--${flagName(key)}`];
}

function allFlags(spec: CommandSpec): string[] {
  return [...spec.keys.flatMap(flagsOf), ...Object.keys(spec.own)];
}

// ---- running the CLI ----------------------------------------------------------------------------

let work: string;
/** An empty configuration file, so a /etc/kheadersd/config.json on the machine changes nothing. */
let emptyConfig: string;
/** A cache holding RELEASE, whose tree has a file named -dash.h at its root. */
let cache: string;
const RELEASE = '6.99.7-contract';
const DASH_FILE = '-dash.h';
const DASH_CONTENT = '#define DASHED 1\n';
const TYPES_H = '/* SPDX-License-Identifier: GPL-2.0 */\ntypedef unsigned int u32;\n';

function kh(args: readonly string[], env: Record<string, string> = {}): Promise<RunResult> {
  return runCli(args, { env: { KHEADERSD_CONFIG: emptyConfig, ...env } });
}

/** Runs `fn` over `items`, `limit` at a time (each is a node process: the machine has 2 cores). */
async function each<T, R>(items: readonly T[], fn: (item: T) => Promise<R>, limit = 4): Promise<R[]> {
  const out: R[] = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

/** Help text with every run of blanks (the wrapping) made one space. */
const flat = (text: string): string => text.replace(/\s+/g, ' ');

/** `flag` as a whole word: --json is not found in --no-json or --json-x. */
function hasFlag(text: string, flag: string): boolean {
  return new RegExp(`(?<![\\w-])${flag.replace(/[-]/g, '\\-')}(?![\\w-])`).test(text);
}

function usageError(r: RunResult, label: string, ...culprits: Array<string | RegExp>): void {
  assert.equal(r.code, 2, `${label}: exit 2 expected, got ${r.code}; stderr: ${r.stderr}`);
  assert.equal(r.stdout, '', `${label}: nothing on stdout`);
  for (const c of culprits) {
    if (typeof c === 'string') assert.ok(r.stderr.includes(c), `${label}: stderr names ${c}: ${r.stderr}`);
    else assert.match(r.stderr, c, label);
  }
  assert.equal(hasStackTrace(r.stderr), false, `${label}: no stack trace`);
}

async function archive(name: string, entries: SynthEntry[]): Promise<string> {
  return writeTarXz(entries, path.join(work, name));
}

before(async () => {
  work = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-cli-contract-'));
  emptyConfig = path.join(work, 'empty-config.json');
  await writeFile(emptyConfig, '{}\n');
  cache = path.join(work, 'cache');
  const tree = [...goodTree(RELEASE), { name: `./${DASH_FILE}`, content: DASH_CONTENT }];
  await ingest({ cacheDir: cache, archive: await archive('contract.tar.xz', tree), setCurrent: false, btf: 'off', log: quietLog() });
});

after(async () => {
  await rm(work, { recursive: true, force: true });
});

// ---- the table ----------------------------------------------------------------------------------

test('the contract names every configuration key: serve and doctor take them all', () => {
  const all = Object.keys(KEYS).sort();
  // A key added to KEYS must be added here too, with the commands that take it.
  assert.deepEqual([...COMMANDS.serve!.keys].sort(), all);
  assert.deepEqual([...COMMANDS.doctor!.keys].sort(), all);
  assert.deepEqual([...new Set([...INGEST_KEYS, ...SERVE_KEYS, ...COMMON])].sort(), all);
});

// ---- help and version ---------------------------------------------------------------------------

test('--help, -h and `help <command>`: exit 0 on stdout, every flag listed with its description', async () => {
  const names = Object.keys(COMMANDS);
  const runs: Array<[string, string[]]> = [
    ['top --help', ['--help']],
    ['top -h', ['-h']],
    ['help', ['help']],
    ...names.map((n): [string, string[]] => [`${n} --help`, [n, '--help']]),
    ['ingest -h', ['ingest', '-h']],
    ['help ingest', ['help', 'ingest']],
    ['help pull', ['help', 'pull']],
  ];
  const results = new Map((await each(runs, async ([label, args]) => [label, await kh(args)] as const)).map(([l, r]) => [l, r]));
  for (const [label, r] of results) {
    assert.equal(r.code, 0, `${label}: ${r.stderr}`);
    assert.notEqual(r.stdout, '', `${label}: help goes to stdout`);
  }

  // Top level: every command with its description, and the global options.
  for (const label of ['top --help', 'top -h', 'help']) {
    const text = flat(results.get(label)!.stdout);
    for (const [name, spec] of Object.entries(COMMANDS)) {
      assert.ok(new RegExp(`(?<![\\w-])${name}(?![\\w-])`).test(text), `${label} lists ${name}`);
      assert.ok(text.includes(spec.describes), `${label} describes ${name}: "${spec.describes}"`);
    }
    for (const flag of ['--config', '--version', '--help']) assert.ok(hasFlag(text, flag), `${label} lists ${flag}`);
    assert.ok(text.includes('KHEADERSD_CONFIG'), `${label} names KHEADERSD_CONFIG`);
    assert.match(text, /Exit status: 0 ok, 2 usage or configuration error/, `${label} lists the exit statuses`);
  }

  // Each command: its description, positionals, every flag; for a configuration key, its help
  // from KEYS, its variable, and an enum's choices.
  const check = (label: string, spec: CommandSpec): void => {
    const text = flat(results.get(label)!.stdout);
    assert.ok(text.includes(spec.describes), `${label}: describes the command`);
    for (const a of spec.args) assert.ok(new RegExp(`\\b${a}\\b`).test(text), `${label}: names the argument ${a}`);
    for (const flag of allFlags(spec)) assert.ok(hasFlag(text, flag), `${label}: lists ${flag}`);
    for (const key of spec.keys) {
      const k = KEYS[key];
      const words = flat(k.help).split(' ').slice(0, 5).join(' ');
      assert.ok(text.includes(words), `${label}: --${flagName(key)} described ("${words}")`);
      assert.ok(text.includes(envName(key)), `${label}: --${flagName(key)} names ${envName(key)}`);
      if ('values' in k) for (const v of k.values) assert.ok(new RegExp(`(?<![\\w-])${v}(?![\\w-])`).test(text), `${label}: --${flagName(key)} lists the choice ${v}`);
    }
    for (const [flag, words] of Object.entries(spec.own)) assert.ok(text.includes(words), `${label}: ${flag} described ("${words}")`);
  };
  for (const name of names) check(`${name} --help`, COMMANDS[name]!);
  check('ingest -h', COMMANDS.ingest!);
  check('help ingest', COMMANDS.ingest!);
  check('help pull', COMMANDS.pull!);
  // Defaults a user cannot see elsewhere.
  assert.ok(flat(results.get('install-systemd --help')!.stdout).includes('/etc/kheadersd'), 'install-systemd --help names the default --config-dir');
  assert.ok(flat(results.get('pull --help')!.stdout).includes('http://127.0.0.1:7711'), 'pull --help names the default --url');
});

test('--version prints the package version and exits 0', async () => {
  const { version } = JSON.parse(await readFile(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string };
  const r = await kh(['--version']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), version);
});

// ---- usage errors -------------------------------------------------------------------------------

test('usage errors: exit 2, nothing on stdout, a message on stderr naming the culprit', async () => {
  const absent = path.join(work, 'absent-cache');
  const cases: Array<[string[], ...Array<string | RegExp>]> = [
    // Unknown options, before and after the command name.
    [['ls', '--bogus'], '--bogus'],
    [['--bogus', 'ls'], '--bogus'],
    [['cat', 'current', 'x.h', '--bogus-flag=1'], '--bogus-flag'],
    // Unknown command; no command at all (the usage, listing the commands, on stderr).
    [['frobnicate'], 'frobnicate'],
    [[], 'ingest', 'serve', 'doctor'],
    // Missing required arguments.
    [['cat'], /\bref\b/],
    [['cat', 'current'], /\bpath\b/],
    [['export', 'current'], /\bdir\b/],
    // Too many arguments.
    [['ls', 'extra'], /argument/i],
    [['cat', 'current', 'a.h', 'b.h'], /argument/i],
    // An option missing its value: last on the line, or followed by nothing else.
    [['ls', '--cache-dir'], '--cache-dir'],
    [['ingest', '--cache-dir', absent, '--decoder'], '--decoder'],
    [['gc', '--keep'], '--keep'],
    [['--config'], '--config'],
    [['pull', '--url'], '--url'],
    [['btf', '--out'], '--out'],
    [['install-systemd', '--config-dir'], '--config-dir'],
    // A value outside an enum's choices, in both forms.
    [['ingest', '--decoder', 'foo'], '--decoder', 'foo'],
    [['ingest', '--decoder=foo'], '--decoder', 'foo'],
    [['ls', '--log-level', 'chatty'], '--log-level', 'chatty'],
    [['doctor', '--fuse-backend', 'fuse3'], '--fuse-backend', 'fuse3'],
    [['pull', '--log-level', 'chatty'], '--log-level', 'chatty'],
    [['btf', '--log-level', 'chatty'], '--log-level', 'chatty'],
    // An option the command does not declare (though another command does).
    [['ls', '--archive', 'x'], '--archive'],
    [['ls', '--no-modprobe'], '--no-modprobe'],
    [['cat', 'current', 'x.h', '--keep', '3'], '--keep'],
    [['gc', '--decoder', 'xz'], '--decoder'],
    [['export', 'current', 'd', '--json'], '--json'],
    [['serve', '--json'], '--json'],
    [['pull', '--decoder', 'xz'], '--decoder'],
    [['btf', '--cache-dir', absent], '--cache-dir'],
    [['install-systemd', '--cache-dir', absent], '--cache-dir'],
    [['uninstall-systemd', '--no-start'], '--no-start'],
    // A boolean flag given a value.
    [['ls', '--json=true'], '--json'],
  ];
  const results = await each(cases, ([args]) => kh(args));
  cases.forEach(([args, ...culprits], i) => usageError(results[i]!, `kheadersd ${args.join(' ')}`, ...culprits));
});

test('a flag value the configuration refuses: exit 2 naming the flag, for each kind of value', async () => {
  // (--keep, --max-file-bytes, --release, --http and KHEADERSD_LOG_LEVEL are in cli.test.ts.)
  const c = path.join(work, 'never-created');
  const cases: Array<[string[], RegExp]> = [
    [['ls', '--cache-dir', ''], /--cache-dir: "" is not a non-empty string/],
    [['ls', '--cache-dir='], /--cache-dir: "" is not a non-empty string/],
    [['ls', '--cache-dir', c, '--lock-timeout', 'soon'], /--lock-timeout: "soon" is not a whole number/],
    [['doctor', '--cache-dir', c, '--max-total-bytes', '12 parsecs'], /--max-total-bytes: "12 parsecs" is not a size/],
    [['doctor', '--cache-dir', c, '--module-dirs', 'relative/dir'], /--module-dirs: "relative\/dir" is not a list of absolute directories/],
    [['serve', '--cache-dir', c, '--http-idle-timeout', '0'], /--http-idle-timeout: httpIdleTimeout must be at least 1/],
  ];
  const results = await each(cases, ([args]) => kh(args));
  cases.forEach(([args, pattern], i) => {
    const r = results[i]!;
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, pattern);
    assert.equal(hasStackTrace(r.stderr), false);
  });
  assert.equal(existsSync(c), false, 'nothing was created');
});

// ---- forms --------------------------------------------------------------------------------------

test('forms: --flag=value, repeated flags, `--`, options around positionals, --config before or after the command', async () => {
  const absent = path.join(work, 'absent');
  const config = path.join(work, 'cache-config.json');
  await writeFile(config, JSON.stringify({ cacheDir: cache }));
  const lsJson = (r: RunResult, label: string): void => {
    assert.equal(r.code, 0, `${label}: ${r.stderr}`);
    assert.deepEqual((JSON.parse(r.stdout) as Array<{ release: string }>).map((e) => e.release), [RELEASE], label);
  };
  const cat = (r: RunResult, label: string, content = TYPES_H): void => {
    assert.equal(r.code, 0, `${label}: ${r.stderr}`);
    assert.equal(r.stdout, content, label);
  };
  const runs: Array<[string, string[], (r: RunResult, label: string) => void]> = [
    ['--flag value', ['ls', '--json', '--cache-dir', cache], lsJson],
    ['--flag=value', ['ls', '--json', `--cache-dir=${cache}`], lsJson],
    ['--json first', ['ls', '--cache-dir', cache, '--json'], lsJson],
    // Repeated: the last one wins (a script's defaults, then the caller's override).
    ['repeated, last wins', ['ls', '--json', '--cache-dir', absent, '--cache-dir', cache], lsJson],
    ['repeated, mixed forms', ['ls', '--json', `--cache-dir=${absent}`, '--cache-dir', cache], lsJson],
    ['repeated boolean', ['ls', '--json', '--json', '--cache-dir', cache], lsJson],
    // Options after, before and between the positionals.
    ['options after', ['cat', RELEASE, 'include/linux/types.h', '--cache-dir', cache], cat],
    ['options before', ['cat', '--cache-dir', cache, RELEASE, 'include/linux/types.h'], cat],
    ['options between', ['cat', RELEASE, '--cache-dir', cache, 'include/linux/types.h'], cat],
    ['--flag=value between', ['cat', RELEASE, `--cache-dir=${cache}`, 'include/linux/types.h'], cat],
    // `--` ends the options: what follows is positional even when it starts with a dash.
    ['-- before a dashed path', ['cat', '--cache-dir', cache, RELEASE, '--', DASH_FILE], (r, l) => cat(r, l, DASH_CONTENT)],
    ['-- before both positionals', ['cat', '--cache-dir', cache, '--', RELEASE, DASH_FILE], (r, l) => cat(r, l, DASH_CONTENT)],
    ['a dashed path without --', ['cat', '--cache-dir', cache, RELEASE, DASH_FILE], (r, l) => usageError(r, l, DASH_FILE)],
    ['an option after -- is an argument', ['ls', '--cache-dir', cache, '--', '--json'], (r, l) => usageError(r, l, /argument/i)],
    // The global --config, before or after the command name, in both forms.
    ['--config before the command', ['--config', config, 'ls', '--json'], lsJson],
    ['--config= before the command', [`--config=${config}`, 'ls', '--json'], lsJson],
    ['--config after the command', ['ls', '--json', '--config', config], lsJson],
    ['--config before cat', ['--config', config, 'cat', RELEASE, 'include/linux/types.h'], cat],
  ];
  const results = await each(runs, ([, args]) => kh(args));
  runs.forEach(([label, , check], i) => check(results[i]!, label));
  assert.equal(existsSync(absent), false);
});

// ---- every flag reaches the configuration -------------------------------------------------------

/** A value each key's flag is given: valid, and different from its variable's. */
function flagValues(w: string): Record<Exclude<ConfigKey, 'modprobe' | 'unloadModule' | 'linkModules'>, string> {
  return {
    cacheDir: path.join(w, 'flag-cache'),
    archive: path.join(w, 'flag-archive.tar.xz'),
    release: '6.99.7-flag',
    moduleDirs: `${path.join(w, 'flag-mods')}:default`,
    keep: '2',
    maxCacheBytes: '512M',
    maxTotalBytes: '1G',
    maxEntries: '1000',
    maxFileBytes: '1M',
    btf: 'off',
    decoder: 'xz',
    lockTimeout: '5',
    logLevel: 'warn',
    mount: path.join(w, 'flag-mnt'),
    fuseBackend: 'kernel',
    http: '127.0.0.1:47911',
    tokenFile: path.join(w, 'flag-token'),
    httpMaxConnectionsPerClient: '64',
    httpHeadersTimeout: '7',
    httpIdleTimeout: '40',
  };
}

/**
 * A value for each key's variable that is refused when read (for a string: a path that must not be
 * used), so a run that succeeds shows every flag reached its own key.
 */
function envValues(w: string): Record<ConfigKey, string> {
  return {
    cacheDir: path.join(w, 'env-cache-not-used'),
    archive: path.join(w, 'env-archive-not-used.tar.xz'),
    release: 'not/a/release',
    modprobe: 'maybe',
    unloadModule: 'maybe',
    linkModules: 'maybe',
    moduleDirs: 'relative/dir',
    keep: 'lots',
    maxCacheBytes: '12 parsecs',
    maxTotalBytes: '12 parsecs',
    maxEntries: 'lots',
    maxFileBytes: '12 parsecs',
    btf: path.join(w, 'env-btf-not-used'),
    decoder: 'gzip',
    lockTimeout: 'lots',
    logLevel: 'chatty',
    mount: path.join(w, 'env-mnt-not-used'),
    fuseBackend: 'fuse3',
    http: 'nonsense',
    tokenFile: path.join(w, 'env-token-not-used'),
    httpMaxConnectionsPerClient: 'lots',
    httpHeadersTimeout: 'lots',
    httpIdleTimeout: 'lots',
  };
}

/** Every flag of `keys`, booleans as --X (on) or --no-X (off); `values` overrides. */
function keyFlags(keys: readonly ConfigKey[], w: string, booleans: 'on' | 'off', values: Partial<Record<ConfigKey, string>> = {}): string[] {
  const v: Partial<Record<ConfigKey, string>> = { ...flagValues(w), ...values };
  return keys.flatMap((key) => (KEYS[key].kind === 'boolean' ? [booleans === 'on' ? `--${flagName(key)}` : `--no-${flagName(key)}`] : [`--${flagName(key)}`, v[key]!]));
}

function refusedEnv(keys: readonly ConfigKey[], w: string): Record<string, string> {
  const v = envValues(w);
  return Object.fromEntries(keys.map((key) => [envName(key), v[key]]));
}

/** The variables must not have been read: none names itself in a message, none of their paths exists. */
function envUnused(r: RunResult, keys: readonly ConfigKey[], w: string): void {
  // A value is refused as `<origin>: "<value>" is not ...`, the origin being the variable's name.
  for (const key of keys) assert.ok(!(r.stderr + r.stdout).includes(`${envName(key)}:`), `${envName(key)} was read: the flag --${flagName(key)} did not reach its key\n${r.stderr}`);
  for (const p of ['env-cache-not-used', 'env-mnt-not-used']) assert.equal(existsSync(path.join(w, p)), false, `${p} was used`);
}

async function workDir(name: string): Promise<string> {
  const w = path.join(work, name);
  await mkdir(w);
  return w;
}

test('ingest: every flag reaches the configuration (a full ingest with all of them set)', async () => {
  const w = await workDir('ingest-all');
  const keys = COMMANDS.ingest!.keys;
  // The archive names another release: --release overrides it.
  await archive(path.relative(work, flagValues(w).archive), goodTree('6.99.7-tree'));
  await mkdir(path.join(w, 'flag-mods'));
  // With --archive given, --modprobe and --unload-module are set but never acted on.
  const r = await kh(['ingest', '--json', ...keyFlags(keys, w, 'on')], refusedEnv(keys, w));
  assert.equal(r.code, 0, r.stderr);
  envUnused(r, keys, w);
  const result = JSON.parse(r.stdout) as { release: string; source: string; current: boolean };
  assert.equal(result.release, '6.99.7-flag', '--release overrides the archive\'s');
  assert.equal(result.source, `file:${flagValues(w).archive}`, '--archive is what was read');
  assert.deepEqual(await readdir(path.join(w, 'flag-cache', 'entries')).then((e) => e.length), 1, '--cache-dir holds the entry');

  // The same with the booleans off.
  const w2 = await workDir('ingest-all-off');
  await archive(path.relative(work, flagValues(w2).archive), goodTree('6.99.7-tree'));
  await mkdir(path.join(w2, 'flag-mods'));
  const off = await kh(['ingest', '--json', ...keyFlags(keys, w2, 'off')], refusedEnv(keys, w2));
  assert.equal(off.code, 0, off.stderr);
  envUnused(off, keys, w2);
});

test('ingest: --no-modprobe and --module-dirs reach the search for the archive; the last of --modprobe/--no-modprobe wins', async (t) => {
  if (existsSync('/sys/kernel/kheaders.tar.xz') || existsSync('/proc/kheaders.tar.xz')) return t.skip('this kernel exposes its archive, so no module is searched for');
  const w = await workDir('ingest-search');
  const mods = path.join(w, 'mods');
  // Never `--modprobe` last here: it would try to load kheaders into this machine's kernel.
  const runs = [
    ['ingest', '--no-modprobe', '--btf', 'off', '--module-dirs', mods, '--cache-dir', path.join(w, 'c1'), '--log-level', 'silent'],
    ['ingest', '--modprobe', '--no-modprobe', '--btf', 'off', '--module-dirs', mods, '--cache-dir', path.join(w, 'c2'), '--log-level', 'silent'],
  ];
  for (const r of await each(runs, (args) => kh(args))) {
    assert.equal(r.code, 3, r.stderr);
    assert.ok(r.stderr.includes(`${mods} (absent)`), `--module-dirs is where it looked: ${r.stderr}`);
    assert.match(r.stderr, /not tried: --no-modprobe/);
  }
});

test('ls, cat, export, gc: every flag reaches the configuration', async () => {
  const w = await workDir('store-commands');
  const gcCache = path.join(w, 'gc-cache');
  for (const n of [1, 2, 3]) {
    await ingest({ cacheDir: gcCache, archive: await archive(`gc-${n}.tar.xz`, goodTree(`6.99.${n}-gc`)), setCurrent: false, btf: 'off', log: quietLog() });
  }
  const out = path.join(w, 'exported');
  const common = (c: string): string[] => keyFlags(COMMON, w, 'on', { cacheDir: c });
  const env = refusedEnv(COMMON, w);
  const [ls, cat, exp] = await each(
    [
      ['ls', '--json', ...common(cache)],
      ['cat', RELEASE, 'include/linux/types.h', ...common(cache)],
      ['export', RELEASE, out, ...common(cache)],
    ],
    (args) => kh(args, env),
  );
  assert.equal(ls!.code, 0, ls!.stderr);
  assert.deepEqual((JSON.parse(ls!.stdout) as Array<{ release: string }>).map((e) => e.release), [RELEASE]);
  assert.equal(cat!.code, 0, cat!.stderr);
  assert.equal(cat!.stdout, TYPES_H);
  assert.equal(exp!.code, 0, exp!.stderr);
  assert.equal(await readFile(path.join(out, 'include/linux/types.h'), 'utf8'), TYPES_H);
  for (const r of [ls!, cat!, exp!]) envUnused(r, COMMON, w);

  // gc: --keep 2 of three entries evicts one; then --max-cache-bytes 1 evicts the rest.
  const gcKeys: ConfigKey[] = ['keep', 'maxCacheBytes', ...COMMON];
  const gc1 = await kh(['gc', '--json', ...keyFlags(gcKeys, w, 'on', { cacheDir: gcCache, keep: '2', maxCacheBytes: '1G' })], refusedEnv(gcKeys, w));
  assert.equal(gc1.code, 0, gc1.stderr);
  envUnused(gc1, gcKeys, w);
  assert.equal((JSON.parse(gc1.stdout) as { evicted: string[] }).evicted.length, 1, '--keep 2');
  const gc2 = await kh(['gc', '--json', '--keep', '5', '--max-cache-bytes', '1', '--cache-dir', gcCache]);
  assert.equal(gc2.code, 0, gc2.stderr);
  assert.equal((JSON.parse(gc2.stdout) as { evicted: string[] }).evicted.length, 2, '--max-cache-bytes 1');
});

test('serve: every flag is accepted and reaches the configuration (stopped by a refused value before it starts)', async () => {
  const w = await workDir('serve-all');
  const keys = COMMANDS.serve!.keys;
  // --http-idle-timeout 0 passes parsing and is refused after every other key was read, so
  // nothing starts; a flag that did not reach its key would have had its variable refused first.
  const env = refusedEnv(keys.filter((k) => k !== 'httpIdleTimeout'), w);
  for (const booleans of ['on', 'off'] as const) {
    const r = await kh(['serve', ...keyFlags(keys, w, booleans, { httpIdleTimeout: '0' })], env);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /--http-idle-timeout: httpIdleTimeout must be at least 1/, booleans);
    envUnused(r, keys.filter((k) => k !== 'httpIdleTimeout'), w);
  }
  assert.equal(existsSync(flagValues(w).cacheDir), false, 'serve did not start');
});

interface DoctorCheck {
  id: string;
  status: string;
  what: string;
}

test('doctor: every flag reaches the configuration, as doctor --json shows', async (t) => {
  const keys = COMMANDS.doctor!.keys;
  const run = async (name: string, booleans: 'on' | 'off', linkOrder: string[], values: Partial<Record<ConfigKey, string>>, skip: ConfigKey[]): Promise<{ w: string; checks: DoctorCheck[] }> => {
    const w = await workDir(name);
    const v = flagValues(w);
    await writeFile(v.archive, await readFile(path.join(work, 'contract.tar.xz')));
    await writeFile(v.tokenFile, 'k'.repeat(32) + '\n', { mode: 0o600 });
    await chmod(v.tokenFile, 0o600);
    const used = keys.filter((k) => !skip.includes(k));
    const r = await kh(['doctor', '--json', ...keyFlags(used, w, booleans, values), ...linkOrder], refusedEnv(keys.filter((k) => !skip.includes(k) || k === 'linkModules'), w));
    assert.ok(r.code === 0 || r.code === 5, `doctor exits 0 or 5 (checks failed), not ${r.code}: ${r.stderr}`);
    envUnused(r, keys, w);
    return { w, checks: (JSON.parse(r.stdout) as { checks: DoctorCheck[] }).checks };
  };
  const what = (checks: DoctorCheck[], id: string): string => checks.filter((c) => c.id === id).map((c) => c.what).join(' | ');

  // On, with --archive; --link-modules given last after --no-link-modules: the last wins.
  const a = await run('doctor-on', 'on', ['--no-link-modules', '--link-modules'], {}, ['linkModules']);
  const va = flagValues(a.w);
  assert.ok(what(a.checks, 'cache').includes(va.cacheDir), `--cache-dir: ${what(a.checks, 'cache')}`);
  assert.ok(what(a.checks, 'archive').includes(va.archive), `--archive: ${what(a.checks, 'archive')}`);
  assert.ok(what(a.checks, 'http').includes(va.http), `--http: ${what(a.checks, 'http')}`);
  assert.ok(what(a.checks, 'token').includes(va.tokenFile), `--token-file: ${what(a.checks, 'token')}`);
  assert.ok(what(a.checks, 'mount-point').includes(va.mount), `--mount: ${what(a.checks, 'mount-point')}`);
  assert.match(what(a.checks, 'fuse-backend'), /kernel FUSE backend/, '--fuse-backend kernel');
  assert.doesNotMatch(what(a.checks, 'fuse-backend'), /native FUSE backend/, '--fuse-backend kernel: the native one is not checked');
  assert.notEqual(what(a.checks, 'link-modules'), '', '--link-modules (last) is on');

  // Off, without --archive, --mount off, --http off; --no-link-modules last: off.
  const b = await run('doctor-off', 'off', ['--link-modules', '--no-link-modules'], { mount: 'off', http: 'off' }, ['linkModules', 'archive']);
  assert.match(what(b.checks, 'fuse-device'), /mount: off/, '--mount off');
  assert.match(what(b.checks, 'http'), /HTTP: off/, '--http off');
  assert.equal(what(b.checks, 'link-modules'), '', '--no-link-modules (last) is off');
  await t.test('--module-dirs is where doctor looks for kheaders.ko', (t2) => {
    if (existsSync('/sys/kernel/kheaders.tar.xz') || existsSync('/proc/kheaders.tar.xz')) return t2.skip('this kernel exposes its archive, so no module is searched for');
    assert.ok(what(b.checks, 'archive').includes(path.join(b.w, 'flag-mods')), what(b.checks, 'archive'));
  });
});

// ---- commands with their own flags --------------------------------------------------------------

test('pull: every flag reaches the pull', async (t) => {
  const w = await workDir('pull');
  const device = path.join(w, 'device-cache');
  await ingest({ cacheDir: device, archive: await archive('pull-old.tar.xz', goodTree('6.99.5-old')), setCurrent: false, btf: 'off', log: quietLog() });
  await ingest({ cacheDir: device, archive: await archive('pull-current.tar.xz', goodTree('6.99.6-current')), setCurrent: true, btf: 'off', log: quietLog() });
  const token = 't'.repeat(24);
  const tokenFile = path.join(w, 'token');
  await writeFile(tokenFile, token + '\n', { mode: 0o600 });
  await chmod(tokenFile, 0o600);
  const server: HttpEnv = await startEnv({ work: w, cacheDir: device, token });
  t.after(() => server.close());
  const url = `http://127.0.0.1:${server.port}`;
  const exportsDir = (r: RunResult): string => {
    assert.equal(r.code, 0, r.stderr);
    const m = /^export KHEADERS_DIR=(.+)$/m.exec(r.stdout);
    assert.ok(m, `prints the exports: ${r.stdout}`);
    return m[1]!;
  };

  const out = path.join(w, 'out');
  const [withAll, defaults, noToken, adbAndUrl, serialAlone, badRelease, silent, loud] = await each(
    [
      ['pull', '--url', url, '--token-file', tokenFile, '--release', '6.99.5-old', '--out', out, '--cache-dir', path.join(w, 'host-1'), '--log-level', 'warn'],
      ['pull', `--url=${url}`, `--token-file=${tokenFile}`, '--cache-dir', path.join(w, 'host-2')],
      ['pull', '--url', url, '--cache-dir', path.join(w, 'host-3')],
      ['pull', '--adb', '--url', url],
      ['pull', '--serial', 'emulator-5554', '--url', url],
      ['pull', '--url', url, '--release', '../x', '--token-file', tokenFile],
      ['pull', '--url', 'http://127.0.0.1:1', '--log-level', 'silent', '--cache-dir', path.join(w, 'host-4')],
      ['pull', '--url', 'http://127.0.0.1:1', '--cache-dir', path.join(w, 'host-5')],
    ],
    (args) => kh(args),
  );
  // --url, --token-file, --release, --out.
  const dir = exportsDir(withAll!);
  assert.equal(path.dirname(dir), out, '--out');
  assert.match(path.basename(dir), /^6\.99\.5-old-[0-9a-f]{12}$/, '--release');
  // Without --out and --release: the device's current entry under --cache-dir/trees.
  const dir2 = exportsDir(defaults!);
  assert.equal(path.dirname(dir2), path.join(w, 'host-2', 'trees'), '--cache-dir');
  assert.match(path.basename(dir2), /^6\.99\.6-current-/);
  // Without --token-file the daemon refuses: the token above came from the file.
  assert.notEqual(noToken!.code, 0);
  assert.match(noToken!.stderr, /requires a token/);
  // --adb and --serial reach the pull: each is refused with the other flag it conflicts with.
  assert.equal(adbAndUrl!.code, 2, adbAndUrl!.stderr);
  assert.match(adbAndUrl!.stderr, /--url and --adb are exclusive/);
  assert.equal(serialAlone!.code, 2, serialAlone!.stderr);
  assert.match(serialAlone!.stderr, /--serial only makes sense with --adb/);
  assert.equal(badRelease!.code, 2, badRelease!.stderr);
  assert.match(badRelease!.stderr, /--release.*"\.\.\/x".* not a valid kernel release/);
  // --log-level silent: the failure is one plain line, with no structured log line.
  for (const r of [silent!, loud!]) {
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /cannot reach kheadersd at http:\/\/127\.0\.0\.1:1/, '--url');
  }
  assert.doesNotMatch(silent!.stderr, /"level"/, '--log-level silent');
  assert.match(loud!.stderr, /"level":50/, 'without it, the structured line too');
});

test('btf: every flag reaches the command', async () => {
  const w = await workDir('btf');
  const b = new BtfBuilder();
  const int = b.int('int', 4, { signed: true });
  b.struct('kheadersd_contract', 8, [{ name: 'a', type: int, bitOffset: 0 }, { name: 'b', type: int, bitOffset: 32 }]);
  const raw = path.join(w, 'raw.btf');
  await writeFile(raw, b.build());
  const out = path.join(w, 'vmlinux.h');
  const [toStdout, toFile, base, module, silent] = await each(
    [
      ['btf', '--btf', raw],
      ['btf', `--btf=${raw}`, '--out', out],
      ['btf', '--btf', raw, '--base', path.join(w, 'no-base.btf')],
      ['btf', '--module', 'kheadersd_no_such_module'],
      ['btf', '--module', 'kheadersd_no_such_module', '--log-level', 'silent'],
    ],
    (args) => kh(args),
  );
  assert.equal(toStdout!.code, 0, toStdout!.stderr);
  assert.match(toStdout!.stdout, /struct kheadersd_contract \{/, '--btf');
  assert.equal(toFile!.code, 0, toFile!.stderr);
  assert.doesNotMatch(toFile!.stdout, /struct kheadersd_contract/);
  assert.match(await readFile(out, 'utf8'), /struct kheadersd_contract \{/, '--out');
  assert.notEqual(base!.code, 0);
  assert.ok(base!.stderr.includes(path.join(w, 'no-base.btf')), `--base: ${base!.stderr}`);
  assert.notEqual(module!.code, 0);
  assert.match(module!.stderr, /kheadersd_no_such_module/, '--module');
  // --log-level silent: the failure is one plain line, with no structured log line.
  assert.notEqual(silent!.code, 0);
  assert.match(silent!.stderr, /kheadersd_no_such_module/);
  assert.doesNotMatch(silent!.stderr, /"level"/, '--log-level silent');
  assert.match(module!.stderr, /"level":50/, 'without it, the structured line too');
});

test('install-systemd and uninstall-systemd: every flag reaches the command', async () => {
  const w = await workDir('systemd');
  const u1 = path.join(w, 'units-1');
  const c1 = path.join(w, 'conf-1');
  const u2 = path.join(w, 'units-2');
  const c2 = path.join(w, 'conf-2');
  const u3 = path.join(w, 'units-3');
  // Away from /etc/systemd/system, systemctl is not run: what it would run is printed instead.
  const [plain, offs, dry] = await each(
    [
      ['install-systemd', '--unit-dir', u1, '--config-dir', c1],
      ['install-systemd', '--no-enable', '--no-start', '--http-only', `--unit-dir=${u2}`, `--config-dir=${c2}`],
      ['install-systemd', '--dry-run', '--http-only', '--unit-dir', u3],
    ],
    (args) => kh(args),
  );
  assert.equal(plain!.code, 0, plain!.stderr);
  assert.ok(existsSync(path.join(u1, 'kheadersd.service')), '--unit-dir');
  assert.ok(existsSync(path.join(c1, 'config.json')), '--config-dir');
  assert.equal(existsSync(path.join(u1, 'kheadersd.service.d')), false, 'no drop-in without --http-only');
  // What would run is the line after "To finish:".
  const toFinish = (r: RunResult): string => /To finish: (.*)$/m.exec(r.stdout)?.[1] ?? assert.fail(`no "To finish:" line: ${r.stdout}`);
  assert.match(toFinish(plain!), /systemctl enable kheadersd\.service/, 'enabled by default');
  assert.match(toFinish(plain!), /systemctl restart kheadersd\.service/, 'started by default');

  assert.equal(offs!.code, 0, offs!.stderr);
  assert.ok(existsSync(path.join(u2, 'kheadersd.service')));
  assert.ok(existsSync(path.join(c2, 'config.json')));
  assert.ok(existsSync(path.join(u2, 'kheadersd.service.d', 'http-only.conf')), '--http-only');
  assert.match(toFinish(offs!), /systemctl daemon-reload/);
  assert.doesNotMatch(toFinish(offs!), /systemctl enable/, '--no-enable');
  assert.doesNotMatch(toFinish(offs!), /systemctl restart/, '--no-start');

  assert.equal(dry!.code, 0, dry!.stderr);
  assert.ok(dry!.stdout.includes(`# ${path.join(u3, 'kheadersd.service')}`), '--dry-run prints the unit');
  assert.ok(dry!.stdout.includes(`# ${path.join(u3, 'kheadersd.service.d', 'http-only.conf')}`), '--dry-run --http-only prints the drop-in');
  assert.equal(existsSync(u3), false, '--dry-run writes nothing');

  const undry = await kh(['uninstall-systemd', '--dry-run', '--unit-dir', u1]);
  assert.equal(undry.code, 0, undry.stderr);
  assert.ok(undry.stdout.includes(path.join(u1, 'kheadersd.service')), undry.stdout);
  assert.ok(existsSync(path.join(u1, 'kheadersd.service')), 'uninstall --dry-run removes nothing');
  const un = await kh(['uninstall-systemd', `--unit-dir=${u1}`]);
  assert.equal(un.code, 0, un.stderr);
  assert.equal(existsSync(path.join(u1, 'kheadersd.service')), false, 'uninstall-systemd --unit-dir removes the unit there');
});
