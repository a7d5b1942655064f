/**
 * Configuration parsing: sizes, listen addresses, names of flags and variables, precedence of
 * flag > environment > file > default, and clear errors that name where a bad value came from.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { KheadersError } from '../src/errors.js';
import { envName, flagName, parseBytes, parseListen, readConfigFile, resolveConfig, KEYS, type ConfigKey } from '../src/config.js';
import { REPO_ROOT, runProcess, tempDir, type RunResult } from './helpers/archives.js';

test('parseBytes reads plain numbers and K/M/G/T suffixes (binary units)', () => {
  const cases: Array<[string, number]> = [
    ['0', 0],
    ['100', 100],
    ['64M', 64 * 2 ** 20],
    ['64m', 64 * 2 ** 20],
    ['64MiB', 64 * 2 ** 20],
    ['64MB', 64 * 2 ** 20],
    ['64 M', 64 * 2 ** 20],
    ['512k', 512 * 1024],
    ['1G', 2 ** 30],
    ['2T', 2 * 2 ** 40],
    ['1.5M', 1.5 * 2 ** 20],
    [' 8K ', 8192],
    ['100b', 100],
  ];
  for (const [text, value] of cases) assert.equal(parseBytes(text), value, text);
  for (const bad of ['', 'abc', '-1', '1X', '1.', '.5M', 'M', '1 2', '10 MiBs', '9'.repeat(30)]) assert.equal(parseBytes(bad), undefined, JSON.stringify(bad));
});

test('parseListen reads HOST:PORT, [IPv6]:PORT, :PORT and off', () => {
  assert.deepEqual(parseListen('127.0.0.1:7711'), { host: '127.0.0.1', port: 7711 });
  assert.deepEqual(parseListen('[::1]:7711'), { host: '::1', port: 7711 });
  assert.deepEqual(parseListen('[fe80::1:2]:80'), { host: 'fe80::1:2', port: 80 });
  assert.deepEqual(parseListen('localhost:0'), { host: 'localhost', port: 0 });
  assert.deepEqual(parseListen(':7711'), { host: '127.0.0.1', port: 7711 }, 'an empty host is loopback, never all interfaces');
  assert.deepEqual(parseListen('0.0.0.0:65535'), { host: '0.0.0.0', port: 65535 });
  assert.equal(parseListen('off'), null);
  for (const bad of ['7711', '::1:7711', '[::1]', '[::1]7711', 'host:', 'host:70000', 'host:123456', 'a b:1', '[zz::1]:80', 'host:-1']) {
    assert.equal(parseListen(bad), undefined, bad);
  }
});

test('envName and flagName spell every key', () => {
  assert.equal(envName('maxCacheBytes'), 'KHEADERSD_MAX_CACHE_BYTES');
  assert.equal(envName('cacheDir'), 'KHEADERSD_CACHE_DIR');
  assert.equal(envName('keep'), 'KHEADERSD_KEEP');
  assert.equal(flagName('maxFileBytes'), 'max-file-bytes');
  assert.equal(flagName('lockTimeout'), 'lock-timeout');
  for (const key of Object.keys(KEYS) as ConfigKey[]) {
    assert.match(envName(key), /^KHEADERSD_[A-Z_]+$/);
    assert.match(flagName(key), /^[a-z-]+$/);
  }
});

const base = { flags: {}, env: {}, file: {}, fileName: '/etc/kheadersd/config.json' };

test('resolveConfig defaults', () => {
  const cfg = resolveConfig(base);
  assert.equal(cfg.cacheDir, '/var/cache/kheadersd');
  assert.equal(cfg.keep, 3);
  assert.equal(cfg.maxTotalBytes, 2 ** 30);
  assert.equal(cfg.maxFileBytes, 64 * 2 ** 20);
  assert.equal(cfg.maxEntries, 200_000);
  assert.equal(cfg.decoder, 'auto');
  assert.equal(cfg.lockTimeout, 30);
  assert.equal(cfg.logLevel, 'info');
  assert.equal(cfg.modprobe, true);
  assert.deepEqual(cfg.http, { host: '127.0.0.1', port: 7711 });
  assert.equal(cfg.maxCacheBytes, undefined);
  assert.equal(cfg.archive, undefined);
  assert.equal(cfg.release, undefined);
});

test('resolveConfig: flag beats environment beats file', () => {
  const file = { keep: 4, maxCacheBytes: '1G', decoder: 'xz', http: '[::1]:8000', cacheDir: '/from/file', modprobe: false };
  const env = { KHEADERSD_KEEP: '5', KHEADERSD_MAX_CACHE_BYTES: '512M', KHEADERSD_CACHE_DIR: '/from/env' };
  const flags = { keep: '6' };

  const fileOnly = resolveConfig({ ...base, file });
  assert.equal(fileOnly.keep, 4);
  assert.equal(fileOnly.maxCacheBytes, 2 ** 30);
  assert.equal(fileOnly.decoder, 'xz');
  assert.deepEqual(fileOnly.http, { host: '::1', port: 8000 });
  assert.equal(fileOnly.cacheDir, '/from/file');
  assert.equal(fileOnly.modprobe, false);

  const withEnv = resolveConfig({ ...base, file, env });
  assert.equal(withEnv.keep, 5);
  assert.equal(withEnv.maxCacheBytes, 512 * 2 ** 20);
  assert.equal(withEnv.cacheDir, '/from/env');
  assert.equal(withEnv.decoder, 'xz', 'keys the environment does not set still come from the file');

  const all = resolveConfig({ ...base, file, env, flags });
  assert.equal(all.keep, 6);
  assert.equal(all.maxCacheBytes, 512 * 2 ** 20);

  // An empty variable is unset, not an empty value.
  assert.equal(resolveConfig({ ...base, file, env: { KHEADERSD_KEEP: '' } }).keep, 4);
  // Boolean spellings from the environment.
  assert.equal(resolveConfig({ ...base, env: { KHEADERSD_MODPROBE: 'no' } }).modprobe, false);
  assert.equal(resolveConfig({ ...base, env: { KHEADERSD_LINK_MODULES: 'on' } }).linkModules, true);
  assert.equal(resolveConfig({ ...base, flags: { http: 'off' } }).http, null);
  assert.equal(resolveConfig({ ...base, flags: { mount: 'off' } }).mount, null);
});

function expectConfigError(fn: () => unknown, ...patterns: RegExp[]): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof KheadersError, String(err));
    assert.equal(err.code, 'E_CONFIG');
    assert.equal(err.exitCode, 2);
    for (const p of patterns) assert.match(err.message, p);
    return true;
  });
}

test('resolveConfig: a bad value names its source', () => {
  expectConfigError(() => resolveConfig({ ...base, flags: { maxFileBytes: 'lots' } }), /--max-file-bytes/, /"lots" is not a size/);
  expectConfigError(() => resolveConfig({ ...base, env: { KHEADERSD_KEEP: 'three' } }), /KHEADERSD_KEEP/, /not a whole number/);
  expectConfigError(() => resolveConfig({ ...base, file: { decoder: 'gzip' } }), /config\.json: decoder/, /one of auto, xz, lzma-native/);
  expectConfigError(() => resolveConfig({ ...base, file: { modprobe: 'maybe' } }), /modprobe/, /boolean/);
  expectConfigError(() => resolveConfig({ ...base, file: { keep: -1 } }), /keep/, /whole number/);
  expectConfigError(() => resolveConfig({ ...base, file: { keep: 1.5 } }), /keep/);
  expectConfigError(() => resolveConfig({ ...base, file: { maxTotalBytes: 0 } }), /maxTotalBytes/);
  expectConfigError(() => resolveConfig({ ...base, file: { cacheDir: '' } }), /cacheDir/, /non-empty string/);
  expectConfigError(() => resolveConfig({ ...base, flags: { keep: '0' } }), /keep must be at least 1/);
  expectConfigError(() => resolveConfig({ ...base, flags: { http: 'nonsense' } }), /http: "nonsense" is not HOST:PORT/);
  // A bad value in a lower layer does not matter when a higher one is given.
  assert.equal(resolveConfig({ ...base, file: { keep: 'bad' }, flags: { keep: '2' } }).keep, 2);
});

test('readConfigFile: missing, unreadable, not JSON, not an object, unknown keys', async (t) => {
  const dir = await tempDir(t);
  const good = path.join(dir, 'good.json');
  await writeFile(good, JSON.stringify({ keep: 2, maxCacheBytes: '64M' }));
  assert.deepEqual(await readConfigFile(good, true), { keep: 2, maxCacheBytes: '64M' });

  const missing = path.join(dir, 'missing.json');
  assert.deepEqual(await readConfigFile(missing, false), {}, 'the default file may be absent');
  await assert.rejects(readConfigFile(missing, true), (err: unknown) => err instanceof KheadersError && err.code === 'E_CONFIG' && /cannot read .*missing\.json: ENOENT/.test(err.message));
  await assert.rejects(readConfigFile(dir, true), (err: unknown) => err instanceof KheadersError && err.code === 'E_CONFIG' && /is a directory, not a regular file/.test(err.message));

  const cases: Array<[string, string, RegExp]> = [
    ['syntax.json', '{"keep": 2,', /is not valid JSON/],
    ['array.json', '[1, 2]', /must hold a JSON object/],
    ['null.json', 'null', /must hold a JSON object/],
    ['typo.json', '{"kep": 2}', /unknown key "kep"/],
  ];
  for (const [name, text, pattern] of cases) {
    const f = path.join(dir, name);
    await writeFile(f, text);
    await assert.rejects(readConfigFile(f, false), (err: unknown) => {
      assert.ok(err instanceof KheadersError);
      assert.equal(err.code, 'E_CONFIG');
      assert.match(err.message, pattern);
      assert.ok(err.message.includes(f), 'the message names the file');
      return true;
    });
  }
});

/**
 * readConfigFile in a node of its own, with a deadline: what it used to do with these files was
 * block for good (a FIFO with no writer) or read until memory ran out (/dev/zero).
 */
async function readConfigElsewhere(file: string): Promise<RunResult> {
  const program = `
    const { readConfigFile } = await import(${JSON.stringify(path.join(REPO_ROOT, 'dist', 'src', 'config.js'))});
    try { await readConfigFile(process.argv[1], true); process.stdout.write('read'); }
    catch (err) { process.stdout.write(JSON.stringify({ code: err.code, message: err.message })); }`;
  return runProcess(process.execPath, ['--max-old-space-size=256', '--input-type=module', '-e', program, file], { timeoutMs: 10_000 });
}

test('readConfigFile refuses at once, by name, what is not a regular file (a FIFO with no writer, a device), and a file too large to be one; a link to a file is read', async (t) => {
  const dir = await tempDir(t);
  const fifo = path.join(dir, 'config.fifo');
  execFileSync('mkfifo', [fifo]);
  const big = path.join(dir, 'big.json');
  await writeFile(big, `{"keep": 2, "x": "${'a'.repeat(2 * 1024 * 1024)}"}`);
  const cases: Array<[string, RegExp]> = [
    [fifo, /is a FIFO \(named pipe\), not a regular file/],
    ['/dev/zero', /is a character device, not a regular file/],
    [big, /is larger than 1048576 bytes/],
  ];
  for (const [file, pattern] of cases) {
    const r = await readConfigElsewhere(file);
    assert.equal(r.signal, null, `${file}: killed at the deadline (${r.signal}): it did not return`);
    const got = JSON.parse(r.stdout) as { code: string; message: string };
    assert.equal(got.code, 'E_CONFIG', file);
    assert.match(got.message, pattern);
    assert.ok(got.message.includes(file), 'the message names the file');
  }
  const good = path.join(dir, 'good.json');
  await writeFile(good, '{"keep": 2}');
  await symlink(good, path.join(dir, 'link.json'));
  assert.deepEqual(await readConfigFile(path.join(dir, 'link.json'), true), { keep: 2 });
});

test('resolveConfig: the HTTP slow-client settings (per-client cap, header and idle timeouts)', () => {
  const dflt = resolveConfig(base);
  assert.equal(dflt.httpMaxConnectionsPerClient, 128);
  assert.equal(dflt.httpHeadersTimeout, 5);
  assert.equal(dflt.httpIdleTimeout, 30);
  const set = resolveConfig({ ...base, env: { KHEADERSD_HTTP_MAX_CONNECTIONS_PER_CLIENT: '0' }, file: { httpHeadersTimeout: 2 }, flags: { httpIdleTimeout: '90' } });
  assert.equal(set.httpMaxConnectionsPerClient, 0, '0 turns the cap off');
  assert.equal(set.httpHeadersTimeout, 2);
  assert.equal(set.httpIdleTimeout, 90);
  expectConfigError(() => resolveConfig({ ...base, flags: { httpHeadersTimeout: '0' } }), /httpHeadersTimeout must be at least 1/);
  expectConfigError(() => resolveConfig({ ...base, file: { httpIdleTimeout: 0 } }), /httpIdleTimeout must be at least 1/);
  expectConfigError(() => resolveConfig({ ...base, env: { KHEADERSD_HTTP_MAX_CONNECTIONS_PER_CLIENT: 'many' } }), /KHEADERSD_HTTP_MAX_CONNECTIONS_PER_CLIENT/, /whole number/);
});
