/**
 * The command line as a user meets it, always as a real process: ingest (plain and --json), ls,
 * ls --json, cat by every kind of reference, export, the exit statuses (2 usage, 3 no archive,
 * 4 bad archive, 5 environment), and configuration precedence: flag > KHEADERSD_* > --config.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { CLI, goodTree, hasStackTrace, makeTar, runCli, runProcess, sha256, tempDir, textLike, treeContent, xz, type SynthEntry } from './helpers/archives.js';

const RUNNING = os.release();

async function archiveOf(dir: string, name: string, tree: SynthEntry[]): Promise<string> {
  const file = path.join(dir, name);
  await writeFile(file, xz(await makeTar(tree), 1));
  return file;
}

interface LsEntry {
  release: string;
  digest: string;
  files: number;
  bytes: number;
  buildId: string | null;
  source: string;
  ingestedAt: string;
  current: boolean;
}

async function lsJson(cacheDir: string, env: Record<string, string> = {}, extra: string[] = []): Promise<LsEntry[]> {
  const r = await runCli(['ls', '--json', ...(cacheDir ? ['--cache-dir', cacheDir] : []), ...extra], { env });
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as LsEntry[];
}

function assertCleanFailure(r: { code: number | null; stderr: string; stdout: string }, code: number, ...patterns: RegExp[]): void {
  assert.equal(r.code, code, `exit ${code} expected; stderr: ${r.stderr}`);
  for (const p of patterns) assert.match(r.stderr, p);
  assert.equal(hasStackTrace(r.stderr + r.stdout), false, `no stack trace: ${r.stderr}`);
}

test('ingest, ls, ls --json, cat and export, end to end', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const tree: SynthEntry[] = [...goodTree(RUNNING), { name: './include/big.h', content: textLike(2 * 2 ** 20, 9) }];
  const archive = await archiveOf(dir, 'running.tar.xz', tree);

  // ls on an empty (just created) cache says what to do.
  await mkdir(cacheDir, { mode: 0o755 });
  const empty = await runCli(['ls', '--cache-dir', cacheDir]);
  assert.equal(empty.code, 0);
  assert.match(empty.stdout, /no entries in .*: run `kheadersd ingest`/);
  assert.deepEqual(await lsJson(cacheDir), []);

  // ingest --json: one JSON document on stdout, even at the default log level (logs go to stderr).
  const ing = await runCli(['ingest', '--archive', archive, '--release', RUNNING, '--cache-dir', cacheDir, '--json', '--btf', 'off']);
  assert.equal(ing.code, 0, ing.stderr);
  const result = JSON.parse(ing.stdout) as LsEntry & { reused: boolean; evicted: string[]; durationMs: number; kind: string };
  assert.equal(result.release, RUNNING);
  assert.match(result.digest, /^[0-9a-f]{64}$/);
  assert.equal(result.digest, sha256(await readFile(archive)));
  assert.equal(result.files, 7);
  assert.equal(result.kind, 'headers');
  assert.equal(result.current, true, 'the running kernel\'s release becomes current');
  assert.equal(result.reused, false);
  assert.deepEqual(result.evicted, []);
  assert.equal(typeof result.durationMs, 'number');
  assert.equal(result.source, `file:${archive}`);

  // A second archive, not the running kernel's: plain output, not current.
  const other = await archiveOf(dir, 'other.tar.xz', goodTree('6.99.9-other'));
  const plain = await runCli(['ingest', '--archive', other, '--cache-dir', cacheDir, '--log-level', 'warn', '--btf', 'off']);
  assert.equal(plain.code, 0, plain.stderr);
  assert.equal(plain.stdout, '', 'nothing on stdout at --log-level warn');
  assert.match(plain.stderr, /^ingested: 6\.99\.9-other \(sha256 [0-9a-f]{12}\), 6 files, [\d.]+ KiB in \d+ ms\n/);
  // Not the running kernel's: said plainly, with how to name it instead of `current`.
  assert.match(plain.stderr, /\nnote: this is not the running kernel's entry: it is 6\.99\.9-other; the running kernel is .*; `current` still means the running kernel: use `6\.99\.9-other` to name this entry\n$/);
  const reused = await runCli(['ingest', '--archive', other, '--cache-dir', cacheDir, '--log-level', 'warn', '--btf', 'off']);
  assert.match(reused.stderr, /^already cached: 6\.99\.9-other/);

  // ls: a table; ls --json: the documented fields.
  const ls = await runCli(['ls', '--cache-dir', cacheDir]);
  assert.equal(ls.code, 0);
  const [tableText, footer] = ls.stdout.split('\n\n');
  const lines = tableText!.trimEnd().split('\n');
  // The current entry has the running kernel's release but came from a file: ls says so plainly.
  assert.match(footer ?? '', new RegExp(`^current is ${RUNNING.replace(/[.+]/g, '\\$&')} \\(sha256 [0-9a-f]{12}\\), not known to be the running kernel: .* came from file:`));
  assert.match(lines[0]!, /^RELEASE\s+DIGEST\s+FILES\s+SIZE\s+BUILD-ID\s+INGESTED\s+CURRENT\s+RUNNING\s+EXTRAS\s+SOURCE$/);
  assert.equal(lines.length, 3);
  assert.match(ls.stdout, new RegExp(`^${RUNNING.replace(/[.+]/g, '\\$&')}\\s+${result.digest.slice(0, 12)}\\s+7\\s+.*\\byes\\b`, 'm'));
  const entries = await lsJson(cacheDir);
  assert.equal(entries.length, 2);
  for (const e of entries) {
    for (const key of ['release', 'digest', 'files', 'bytes', 'buildId', 'source', 'ingestedAt', 'current'] as const) assert.ok(key in e, `ls --json has ${key}`);
    assert.match(e.digest, /^[0-9a-f]{64}$/);
    assert.equal(typeof e.files, 'number');
    assert.equal(typeof e.bytes, 'number');
    assert.ok(e.buildId === null || /^[0-9a-f]+$/.test(e.buildId));
    assert.ok(!Number.isNaN(Date.parse(e.ingestedAt)));
    assert.equal(typeof e.current, 'boolean');
  }
  assert.deepEqual(entries.map((e) => [e.release, e.current]), [['6.99.9-other', false], [RUNNING, true]], 'newest first');
  const running = entries.find((e) => e.current)!;
  assert.equal(running.bytes, tree.reduce((n, e) => n + (e.content ? Buffer.byteLength(e.content) : 0), 0));

  // cat by current, release, digest, digest prefix, and id; symlinks followed.
  const types = '/* SPDX-License-Identifier: GPL-2.0 */\ntypedef unsigned int u32;\n';
  for (const ref of ['current', RUNNING, running.digest, running.digest.slice(0, 8), `${RUNNING}~${running.digest}`]) {
    const r = await runCli(['cat', ref, 'include/linux/types.h', '--cache-dir', cacheDir]);
    assert.equal(r.code, 0, `${ref}: ${r.stderr}`);
    assert.equal(r.stdout, types, ref);
  }
  const viaLink = await runCli(['cat', 'current', './include/dt-bindings/input/linux-event-codes.h', '--cache-dir', cacheDir]);
  assert.equal(viaLink.stdout, '#define KEY_A 30\n');
  const big = await runCli(['cat', 'current', 'include/big.h', '--cache-dir', cacheDir]);
  assert.equal(sha256(big.stdout), sha256(textLike(2 * 2 ** 20, 9)));
  assert.equal((await runCli(['cat', 'current', 'include/linux/empty.h', '--cache-dir', cacheDir])).stdout, '');

  // A reader that stops early (| head) is not an error.
  const head = await runProcess('bash', ['-c', `set -o pipefail; "${process.execPath}" "${CLI}" cat current include/big.h --cache-dir "${cacheDir}" | head -c 100 >/dev/null`]);
  assert.equal(head.code, 0, head.stderr);

  // cat failures.
  assertCleanFailure(await runCli(['cat', 'current', 'include/nope.h', '--cache-dir', cacheDir]), 6, /include\/nope\.h: no such file in /);
  assertCleanFailure(await runCli(['cat', '9.9.9', 'include/linux/types.h', '--cache-dir', cacheDir]), 6, /no cached entry matches "9\.9\.9"/);
  assertCleanFailure(await runCli(['cat', 'current', 'include/linux', '--cache-dir', cacheDir]), 2, /include\/linux is a directory/);
  const escape = await runCli(['cat', 'current', '../../../../etc/passwd', '--cache-dir', cacheDir]);
  assert.notEqual(escape.code, 0);
  assert.doesNotMatch(escape.stdout, /root:/);
  assert.equal(hasStackTrace(escape.stderr), false);

  // export: the same tree tar extracts from the same archive.
  const out = path.join(dir, 'exported');
  const exp = await runCli(['export', 'current', out, '--cache-dir', cacheDir]);
  assert.equal(exp.code, 0, exp.stderr);
  assert.match(exp.stderr, new RegExp(`use it with: export BCC_KERNEL_SOURCE=${out} BPFTRACE_KERNEL_SOURCE=${out}`));
  const ref = path.join(dir, 'tar-extracted');
  await mkdir(ref);
  execFileSync('tar', ['-xJf', archive, '-C', ref]);
  assert.deepEqual(await treeContent(out), await treeContent(ref));
  assertCleanFailure(await runCli(['export', 'nope', path.join(dir, 'x'), '--cache-dir', cacheDir]), 6, /no cached entry matches "nope"/);
});

test('cat current with no entry for the running kernel says what to do', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const ing = await runCli(['ingest', '--archive', await archiveOf(dir, 'a.tar.xz', goodTree('6.99.1-notrunning')), '--cache-dir', cacheDir, '--btf', 'off']);
  assert.equal(ing.code, 0, ing.stderr);
  // `current` means the running kernel: the message names it, says it is not cached, and which releases are.
  const running = (await import('node:os')).release().replace(/[.+]/g, '\\$&');
  assertCleanFailure(
    await runCli(['cat', 'current', 'include/linux/types.h', '--cache-dir', cacheDir]),
    6,
    new RegExp(`"current" is the running kernel, ${running}, and no entry for it is cached \\(cached: 6\\.99\\.1-notrunning: name one of them instead of "current"\\); \`kheadersd ingest\` caches`),
  );
  assertCleanFailure(await runCli(['ls', '--cache-dir', path.join(dir, 'absent')]), 6, /does not exist yet/);
});

test('exit 2 for usage errors', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const cases: Array<[string[], RegExp]> = [
    [['ingest', '--bogus'], /unknown option '--bogus'/],
    [['ingest', '--decoder', 'gzip'], /argument 'gzip' is invalid/],
    [['cat', 'current'], /missing required argument 'path'/],
    [['frobnicate'], /unknown command 'frobnicate'/],
    [['ingest', '--keep', 'many', '--cache-dir', cacheDir], /--keep: "many" is not a whole number/],
    [['ingest', '--max-file-bytes', '12 parsecs', '--cache-dir', cacheDir], /--max-file-bytes: "12 parsecs" is not a size/],
    [['ingest', '--archive', '/dev/null', '--release', '../etc', '--cache-dir', cacheDir], /--release: "\.\.\/etc" is not a valid kernel release/],
    // Every bad value names where it came from: the flag, the variable, or the file's key.
    [['serve', '--http', 'nonsense', '--cache-dir', cacheDir], /--http: "nonsense" is not HOST:PORT or "off"/],
  ];
  for (const [args, pattern] of cases) assertCleanFailure(await runCli(args), 2, pattern);
  assert.equal((await runCli(['--version'])).code, 0);
  const help = await runCli(['--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /Exit status: 0 ok, 2 usage or configuration error, 3 no archive found, 4 bad archive/);
});

test('exit 3 when this kernel has no header archive, with the way out in the message', async (t) => {
  if (existsSync('/sys/kernel/kheaders.tar.xz') || existsSync('/proc/kheaders.tar.xz')) return t.skip('this kernel exposes its archive');
  const dir = await tempDir(t);
  // --btf off: on a kernel with BTF, ingest otherwise falls back to an entry holding vmlinux.h alone.
  const r = await runCli(['ingest', '--no-modprobe', '--btf', 'off', '--cache-dir', path.join(dir, 'cache')]);
  assertCleanFailure(r, 3, /no kernel header archive found for the running kernel/, /CONFIG_IKHEADERS/, /--archive/, /--no-modprobe/);
  assertCleanFailure(await runCli(['ingest', '--archive', path.join(dir, 'missing.tar.xz'), '--cache-dir', path.join(dir, 'cache')]), 3, /cannot read --archive .*missing\.tar\.xz: ENOENT/);
});

test('exit 4 for a bad archive', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'junk.tar.xz');
  await writeFile(file, 'this is not xz');
  assertCleanFailure(await runCli(['ingest', '--archive', file, '--cache-dir', path.join(dir, 'cache'), '--btf', 'off']), 4, /kheadersd: corrupt archive: .* is neither an xz archive nor an ELF file/);
});

test('configuration precedence: flag > KHEADERSD_* > --config file', async (t) => {
  const dir = await tempDir(t);
  const caches = { file: path.join(dir, 'c-file'), env: path.join(dir, 'c-env'), flag: path.join(dir, 'c-flag') };
  for (const [which, cacheDir] of Object.entries(caches)) {
    const r = await runCli(['ingest', '--archive', await archiveOf(dir, `${which}.tar.xz`, goodTree(`6.99.0-${which}`)), '--cache-dir', cacheDir, '--btf', 'off']);
    assert.equal(r.code, 0, r.stderr);
  }
  const config = path.join(dir, 'config.json');
  await writeFile(config, JSON.stringify({ cacheDir: caches.file, logLevel: 'warn' }));
  const release = (es: LsEntry[]): string[] => es.map((e) => e.release);

  assert.deepEqual(release(await lsJson('', {}, ['--config', config])), ['6.99.0-file']);
  assert.deepEqual(release(await lsJson('', { KHEADERSD_CONFIG: config })), ['6.99.0-file'], 'KHEADERSD_CONFIG names the file');
  assert.deepEqual(release(await lsJson('', { KHEADERSD_CACHE_DIR: caches.env }, ['--config', config])), ['6.99.0-env']);
  assert.deepEqual(release(await lsJson(caches.flag, { KHEADERSD_CACHE_DIR: caches.env }, ['--config', config])), ['6.99.0-flag']);

  // Limits too: the file says 1 KiB files at most, the environment lifts it, a flag lowers it again.
  const archive = await archiveOf(dir, 'limits.tar.xz', [...goodTree('6.99.0-limits'), { name: './include/four-k.h', content: 'x'.repeat(4096) }]);
  const limited = path.join(dir, 'limited.json');
  await writeFile(limited, JSON.stringify({ maxFileBytes: '1K', btf: 'off' }));
  const c = path.join(dir, 'c-limits');
  assertCleanFailure(await runCli(['ingest', '--archive', archive, '--cache-dir', c, '--config', limited]), 4, /over the 1024-byte limit \(--max-file-bytes\)/);
  const lifted = await runCli(['ingest', '--archive', archive, '--cache-dir', c, '--config', limited], { env: { KHEADERSD_MAX_FILE_BYTES: '1M' } });
  assert.equal(lifted.code, 0, lifted.stderr);
  assertCleanFailure(
    await runCli(['ingest', '--archive', archive, '--cache-dir', path.join(dir, 'c-limits2'), '--config', limited, '--max-file-bytes', '2K'], { env: { KHEADERSD_MAX_FILE_BYTES: '1M' } }),
    4,
    /over the 2048-byte limit/,
  );
});

test('a bad configuration is exit 2 with a message naming the file or variable', async (t) => {
  const dir = await tempDir(t);
  const cacheDir = path.join(dir, 'cache');
  const write = async (name: string, text: string): Promise<string> => {
    const f = path.join(dir, name);
    await writeFile(f, text);
    return f;
  };
  const cases: Array<[string, RegExp]> = [
    [await write('syntax.json', '{ "keep": 2, }'), /syntax\.json is not valid JSON/],
    [await write('unknown.json', '{ "cachedir": "/tmp" }'), /unknown\.json: unknown key "cachedir" \(known: cacheDir,/],
    [await write('badvalue.json', '{ "keep": "lots" }'), /badvalue\.json: keep: "lots" is not a whole number/],
    [await write('array.json', '[]'), /array\.json must hold a JSON object/],
    [path.join(dir, 'missing.json'), /cannot read the configuration file .*missing\.json: ENOENT/],
  ];
  for (const [file, pattern] of cases) {
    assertCleanFailure(await runCli(['ls', '--cache-dir', cacheDir, '--config', file]), 2, pattern);
    assertCleanFailure(await runCli(['ingest', '--cache-dir', cacheDir], { env: { KHEADERSD_CONFIG: file } }), 2, pattern);
  }
  assertCleanFailure(await runCli(['ls', '--cache-dir', cacheDir], { env: { KHEADERSD_LOG_LEVEL: 'chatty' } }), 2, /KHEADERSD_LOG_LEVEL: "chatty" is not one of/);
  assertCleanFailure(await runCli(['gc', '--cache-dir', cacheDir], { env: { KHEADERSD_MAX_CACHE_BYTES: 'big' } }), 2, /KHEADERSD_MAX_CACHE_BYTES: "big" is not a size/);
});

test('on a terminal an error prints once, as a line of text (no JSON log line)', async () => {
  // script(1) gives the command a terminal for stdin, stdout and stderr, as a person has.
  const cmd = `"${process.execPath}" "${CLI}" btf --module no_such_module`;
  const r = await runProcess('script', ['-qec', cmd, '/dev/null']);
  const lines = r.stdout.split(/\r?\n/).filter((l) => l.trim() !== '');
  assert.deepEqual(lines.filter((l) => l.includes('no_such_module has no BTF')).length, 1, r.stdout);
  assert.doesNotMatch(r.stdout, /"level":/, 'no JSON log line on the terminal');
  // Exit status 6: not found (script -e passes the command's status on).
  assert.equal(r.code, 6, r.stdout);
  // Piped (a log collector, a script), the structured line is there for machines, the text line for people.
  const piped = await runCli(['btf', '--module', 'no_such_module']);
  assert.equal(piped.code, 6);
  assert.match(piped.stdout + piped.stderr, /"code":"E_NOT_FOUND"/);
  assert.match(piped.stderr, /^kheadersd: module no_such_module has no BTF/m);
});

test('pull and btf read no daemon configuration: a bad one meant for the daemon does not stop them', async (t) => {
  const dir = await tempDir(t);
  const badFile = path.join(dir, 'daemon.json');
  await writeFile(badFile, '{ "keep": "lots" }');
  const env = { KHEADERSD_CONFIG: badFile, KHEADERSD_LOG_LEVEL: 'chatty', KHEADERSD_KEEP: 'lots' };
  // Nothing listens on port 9 (discard) of loopback: the pull gets as far as connecting.
  const pull = await runCli(['pull', '--url', 'http://127.0.0.1:9', '--cache-dir', path.join(dir, 'host')], { env });
  assert.notEqual(pull.code, 0);
  assert.doesNotMatch(pull.stderr, /daemon\.json|KHEADERSD_|chatty|lots/, pull.stderr);
  assert.match(pull.stderr, /127\.0\.0\.1:9/, pull.stderr);
  const btf = await runCli(['btf', '--btf', path.join(dir, 'no-such-btf')], { env });
  assert.notEqual(btf.code, 0);
  assert.doesNotMatch(btf.stderr, /daemon\.json|KHEADERSD_|chatty|lots/, btf.stderr);
  assert.match(btf.stderr, /no-such-btf/, btf.stderr);
});
