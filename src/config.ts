/**
 * One set of settings, three spellings: a CLI flag (`--max-cache-bytes`), an environment
 * variable (`KHEADERSD_MAX_CACHE_BYTES`) and a key of /etc/kheadersd/config.json
 * (`maxCacheBytes`). Precedence: flag, then variable, then file, then the default. Every value is
 * parsed and checked here, so a bad one is a clear E_CONFIG/E_USAGE at start, naming its source.
 */
import { closeSync, constants, fstatSync, openSync, readSync, type Stats } from 'node:fs';
import { KheadersError, errnoOf } from './errors.js';
import { LOG_LEVELS, type LogLevel } from './log.js';
import { DEFAULT_HTTP_LIMITS } from './serve/http/limits.js';
import { moduleDirsProblem } from './source/modules.js';
import { defaultCacheDir, defaultMount } from './platform.js';
// From entry.js, not cache.js: the configuration of any command must not load the whole store.
import { validRelease } from './store/entry.js';

export const DEFAULT_CONFIG_FILE = '/etc/kheadersd/config.json';

type Kind = 'string' | 'boolean' | 'integer' | 'bytes' | 'enum' | 'dirs';

interface KeySpec {
  kind: Kind;
  values?: readonly string[];
  help: string;
}

/** Every configurable key. The CLI declares its flags from this table, so they cannot drift. */
export const KEYS = {
  cacheDir: { kind: 'string', help: 'cache directory (default /var/cache/kheadersd; /data/local/kheadersd on Android)' },
  archive: { kind: 'string', help: 'use this file instead of the running kernel\'s archive (.tar.xz, kheaders.ko, vmlinux)' },
  release: { kind: 'string', help: 'kernel release of an archive that names none' },
  modprobe: { kind: 'boolean', help: 'run `modprobe kheaders` when no archive is exposed (default on)' },
  unloadModule: { kind: 'boolean', help: 'unload the kheaders module afterwards if we loaded it (default on)' },
  moduleDirs: {
    kind: 'dirs',
    help: 'where to look for kheaders.ko: directories separated by ":" ({release} = uname -r), "default" = /lib/modules/<release> and Android\'s /system_dlkm, /vendor_dlkm, /vendor, /odm (default: default)',
  },
  keep: { kind: 'integer', help: 'keep at most N cache entries (default 3; the running kernel\'s is never evicted)' },
  maxCacheBytes: { kind: 'bytes', help: 'evict old entries beyond this many bytes (e.g. 512M)' },
  maxTotalBytes: { kind: 'bytes', help: 'refuse archives that expand beyond this (default 1G)' },
  maxEntries: { kind: 'integer', help: 'refuse archives with more entries (default 200000)' },
  maxFileBytes: { kind: 'bytes', help: 'refuse archives with a larger file (default 64M)' },
  btf: { kind: 'string', help: 'BTF for vmlinux.h: a file, "off", or "auto" (the running kernel\'s /sys/kernel/btf/vmlinux for its own entry)' },
  decoder: { kind: 'enum', values: ['auto', 'xz', 'lzma-native'], help: 'xz decoder: the xz binary (fastest) or lzma-native (default auto)' },
  lockTimeout: { kind: 'integer', help: 'seconds to wait for another process holding the cache lock (default 30)' },
  logLevel: { kind: 'enum', values: LOG_LEVELS, help: 'log level (default info)' },
  mount: { kind: 'string', help: 'FUSE mount point, or "off" (default /run/kheaders; /data/local/kheadersd/mnt on Android)' },
  fuseBackend: { kind: 'enum', values: ['auto', 'kernel', 'native'], help: 'FUSE transport: kernel (/dev/fuse protocol in TypeScript), native (fuse-native/libfuse2), auto' },
  linkModules: { kind: 'boolean', help: 'create /lib/modules/<release>/build -> <mount>/<release> when absent (default off)' },
  http: { kind: 'string', help: 'HTTP listen address HOST:PORT, or "off" (default 127.0.0.1:7711)' },
  tokenFile: { kind: 'string', help: 'require `Authorization: Bearer <token>` with the token in this file (mode 600 or stricter, yours or root\'s, one line of 16+ printable characters)' },
  httpMaxConnectionsPerClient: { kind: 'integer', help: 'connections one HTTP client (an address; IPv6: a /64) may hold open at once; 0 = no cap (default 128; raise it behind a reverse proxy)' },
  httpHeadersTimeout: { kind: 'integer', help: 'seconds an HTTP client has to send a request\'s headers (default 5)' },
  httpIdleTimeout: { kind: 'integer', help: 'seconds an HTTP connection may stay silent (a stalled download) before it is closed (default 30)' },
} as const satisfies Record<string, KeySpec>;

export type ConfigKey = keyof typeof KEYS;

export interface Config {
  cacheDir: string;
  archive?: string;
  release?: string;
  modprobe: boolean;
  unloadModule: boolean;
  /** Absolute directories ({release} allowed) and "default"; see src/source/modules.ts. */
  moduleDirs: readonly string[];
  keep: number;
  maxCacheBytes?: number;
  maxTotalBytes: number;
  maxEntries: number;
  maxFileBytes: number;
  decoder: 'auto' | 'xz' | 'lzma-native';
  btf: string;
  lockTimeout: number;
  logLevel: LogLevel;
  mount: string | null;
  fuseBackend: 'auto' | 'kernel' | 'native';
  linkModules: boolean;
  http: { host: string; port: number } | null;
  tokenFile?: string;
  httpMaxConnectionsPerClient: number;
  /** Seconds. */
  httpHeadersTimeout: number;
  /** Seconds. */
  httpIdleTimeout: number;
  /** Where each value that was set came from (`--keep`, `KHEADERSD_KEEP`, `<file>: keep`), for messages about it. */
  origins: Partial<Record<ConfigKey, string>>;
}

export function envName(key: ConfigKey): string {
  return 'KHEADERSD_' + key.replace(/[A-Z]/g, (c) => '_' + c).toUpperCase();
}

export function flagName(key: ConfigKey): string {
  return key.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase());
}

const SIZE_RE = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$/i;

export function parseBytes(text: string): number | undefined {
  const m = SIZE_RE.exec(text.trim());
  if (!m) return undefined;
  const unit = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  const n = Math.round(Number(m[1]) * unit);
  return Number.isSafeInteger(n) ? n : undefined;
}

export function parseListen(text: string): { host: string; port: number } | null | undefined {
  if (text === 'off') return null;
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s]*)):(\d{1,5})$/.exec(text);
  if (!m) return undefined;
  const port = Number(m[3]);
  if (port > 65535) return undefined;
  return { host: m[1] ?? (m[2] || '127.0.0.1'), port };
}

/** Parse one raw value (a flag or variable string, or a JSON value from the file). */
function parseValue(key: ConfigKey, raw: unknown, origin: string): string | number | boolean | string[] {
  const spec: KeySpec = KEYS[key];
  const bad = (expected: string): never => {
    throw new KheadersError('E_CONFIG', `${origin}: ${JSON.stringify(raw)} is not ${expected}`, { key, origin });
  };
  switch (spec.kind) {
    case 'string':
      return typeof raw === 'string' && raw !== '' ? raw : bad('a non-empty string');
    case 'boolean':
      if (typeof raw === 'boolean') return raw;
      if (typeof raw === 'string' && /^(1|true|yes|on)$/i.test(raw)) return true;
      if (typeof raw === 'string' && /^(0|false|no|off)$/i.test(raw)) return false;
      return bad('a boolean (true/false)');
    case 'integer': {
      const n = typeof raw === 'number' ? raw : typeof raw === 'string' && /^\d+$/.test(raw) ? Number(raw) : NaN;
      return Number.isSafeInteger(n) && n >= 0 ? n : bad('a whole number');
    }
    case 'bytes': {
      const n = typeof raw === 'number' ? raw : typeof raw === 'string' ? parseBytes(raw) : undefined;
      return n !== undefined && Number.isSafeInteger(n) && n > 0 ? n : bad('a size (bytes, or with K/M/G)');
    }
    case 'enum':
      return typeof raw === 'string' && spec.values!.includes(raw) ? raw : bad(`one of ${spec.values!.join(', ')}`);
    case 'dirs': {
      // "a:b" from a flag or variable (like PATH); a JSON array of strings, or the same string, from the file.
      const list = typeof raw === 'string' ? raw.split(':') : Array.isArray(raw) && raw.every((e) => typeof e === 'string') ? raw : undefined;
      if (list === undefined) return bad(`a list of directories ("DIR:DIR" or a JSON array of strings)`);
      const problem = moduleDirsProblem(list);
      return problem === undefined ? list : bad(`a list of absolute directories and "default": ${problem}`);
    }
  }
}

/** Far above any configuration (a few dozen keys): a larger file is not one. */
const MAX_CONFIG_BYTES = 1024 * 1024;

export async function readConfigFile(file: string, required: boolean): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = readConfigText(file); // synchronous: one small file, before anything else is under way
  } catch (err) {
    if (err instanceof KheadersError) throw err;
    if (!required && errnoOf(err) === 'ENOENT') return {};
    throw new KheadersError('E_CONFIG', `cannot read the configuration file ${file}: ${errnoOf(err) ?? String(err)}`, { file });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new KheadersError('E_CONFIG', `${file} is not valid JSON: ${(err as Error).message}`, { file });
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new KheadersError('E_CONFIG', `${file} must hold a JSON object`, { file });
  for (const key of Object.keys(json)) {
    if (!(key in KEYS)) throw new KheadersError('E_CONFIG', `${file}: unknown key "${key}" (known: ${Object.keys(KEYS).join(', ')})`, { file, key });
  }
  return json as Record<string, unknown>;
}

export interface ConfigSources {
  /** Parsed CLI flags by key (camelCase), only those given. */
  flags: Partial<Record<ConfigKey, unknown>>;
  env: NodeJS.ProcessEnv;
  file: Record<string, unknown>;
  fileName: string;
}

export function resolveConfig({ flags, env, file, fileName }: ConfigSources): Config {
  const origins: Partial<Record<ConfigKey, string>> = {};
  const from = (key: ConfigKey, raw: unknown, origin: string): string | number | boolean | string[] => {
    origins[key] = origin;
    return parseValue(key, raw, origin);
  };
  const pick = (key: ConfigKey): string | number | boolean | string[] | undefined => {
    if (flags[key] !== undefined) return from(key, flags[key], `--${flagName(key)}`);
    const e = env[envName(key)];
    if (e !== undefined && e !== '') return from(key, e, envName(key));
    if (file[key] !== undefined) return from(key, file[key], `${fileName}: ${key}`);
    return undefined;
  };
  /** A value that parsed but is not acceptable, named by where it came from. */
  const refuse = (key: ConfigKey, why: string): never => {
    throw new KheadersError('E_CONFIG', `${origins[key] ?? key}: ${why}`, { key, origin: origins[key] ?? 'default' });
  };
  const str = (key: ConfigKey): string | undefined => pick(key) as string | undefined;
  const num = (key: ConfigKey): number | undefined => pick(key) as number | undefined;
  const bool = (key: ConfigKey, dflt: boolean): boolean => (pick(key) as boolean | undefined) ?? dflt;

  const httpText = str('http') ?? '127.0.0.1:7711';
  const http = parseListen(httpText);
  if (http === undefined) refuse('http', `${JSON.stringify(httpText)} is not HOST:PORT or "off" (e.g. 127.0.0.1:7711)`);
  const mount = str('mount') ?? defaultMount();

  const cfg: Config = {
    cacheDir: str('cacheDir') ?? defaultCacheDir({}),
    modprobe: bool('modprobe', true),
    unloadModule: bool('unloadModule', true),
    moduleDirs: (pick('moduleDirs') as string[] | undefined) ?? ['default'],
    keep: num('keep') ?? 3,
    maxTotalBytes: num('maxTotalBytes') ?? 1024 ** 3,
    maxEntries: num('maxEntries') ?? 200_000,
    maxFileBytes: num('maxFileBytes') ?? 64 * 1024 ** 2,
    decoder: (str('decoder') as Config['decoder'] | undefined) ?? 'auto',
    btf: str('btf') ?? 'auto',
    lockTimeout: num('lockTimeout') ?? 30,
    logLevel: (str('logLevel') as LogLevel | undefined) ?? 'info',
    mount: mount === 'off' ? null : mount,
    fuseBackend: (str('fuseBackend') as Config['fuseBackend'] | undefined) ?? 'auto',
    linkModules: bool('linkModules', false),
    http: http ?? null,
    httpMaxConnectionsPerClient: num('httpMaxConnectionsPerClient') ?? DEFAULT_HTTP_LIMITS.maxConnectionsPerClient,
    httpHeadersTimeout: num('httpHeadersTimeout') ?? DEFAULT_HTTP_LIMITS.headersTimeoutMs / 1000,
    httpIdleTimeout: num('httpIdleTimeout') ?? DEFAULT_HTTP_LIMITS.idleTimeoutMs / 1000,
    origins,
  };
  const optional: Array<[keyof Config, ConfigKey]> = [
    ['archive', 'archive'],
    ['release', 'release'],
    ['tokenFile', 'tokenFile'],
  ];
  for (const [field, key] of optional) {
    const v = str(key);
    if (v !== undefined) (cfg as unknown as Record<string, unknown>)[field] = v;
  }
  const maxCache = num('maxCacheBytes');
  if (maxCache !== undefined) cfg.maxCacheBytes = maxCache;
  if (cfg.keep < 1) refuse('keep', 'keep must be at least 1');
  if (cfg.httpHeadersTimeout < 1) refuse('httpHeadersTimeout', 'httpHeadersTimeout must be at least 1 (seconds)');
  if (cfg.httpIdleTimeout < 1) refuse('httpIdleTimeout', 'httpIdleTimeout must be at least 1 (seconds)');
  if (cfg.release !== undefined && !validRelease(cfg.release)) refuse('release', `${JSON.stringify(cfg.release)} is not a valid kernel release (letters, digits, ".", "_", "+", "-")`);
  return cfg;
}

/**
 * The configuration file's text: a regular file (a symbolic link to one is fine: /etc is often
 * links) of at most MAX_CONFIG_BYTES. Anything else is refused before it is read: a FIFO with no
 * writer held the start on the open for good, and /dev/zero was read until memory ran out.
 * O_NONBLOCK, so that opening a FIFO returns at once (to be refused on its fstat); the read is
 * bounded too, since a file may grow after its fstat.
 */
function readConfigText(file: string): string {
  const fd = openSync(file, constants.O_RDONLY | constants.O_NONBLOCK);
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) {
      throw new KheadersError('E_CONFIG', `the configuration file ${file} is ${fileKind(st)}, not a regular file: give --config (or KHEADERSD_CONFIG) a JSON file`, { file, reason: 'not a regular file' });
    }
    const tooBig = (): KheadersError => new KheadersError('E_CONFIG', `the configuration file ${file} is larger than ${MAX_CONFIG_BYTES} bytes: it is no kheadersd configuration`, { file, reason: 'too large' });
    if (st.size > MAX_CONFIG_BYTES) throw tooBig();
    const buf = Buffer.allocUnsafe(MAX_CONFIG_BYTES + 1); // not filled: only what is read is used
    let got = 0;
    for (let n = -1; n !== 0 && got < buf.length; got += n) n = readSync(fd, buf, got, buf.length - got, got);
    if (got > MAX_CONFIG_BYTES) throw tooBig();
    return buf.toString('utf8', 0, got);
  } finally {
    closeSync(fd);
  }
}

function fileKind(st: Stats): string {
  if (st.isDirectory()) return 'a directory';
  if (st.isFIFO()) return 'a FIFO (named pipe)';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  return 'not a regular file';
}
