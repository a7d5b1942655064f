/**
 * The shipped daemon is esbuild's bundle of tsc's output (scripts/bundle.mjs, dist/app): what it
 * must keep from the unbundled layout. Every file the code finds by a relative URL (the ingest
 * child's entry, the worker threads) is there under that name; no dependency was bundled in; and
 * a `serve` start with its entry cached runs none of the code that is imported lazily (fastify
 * and its routes, the FUSE backends, the ingest's decoder and pack writer, the BTF emitter),
 * which a careless split would have pulled into a chunk loaded at start.
 */
import assert from 'node:assert/strict';
import { access, constants, readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { systemdQuote } from '../src/commands/install.js';
import { CLI, REPO_ROOT, SYNTH_RELEASE, goodArchive, runCli, tempDir } from './helpers/archives.js';
import { request } from './helpers/http-env.js';
import { startServe } from './helpers/serve-child.js';

const APP = path.dirname(CLI);
const RECORDER = pathToFileURL(path.join(REPO_ROOT, 'dist/test/helpers/record-loads.js')).href;

/** The bundle's JavaScript files, by base name. */
async function outputs(): Promise<Map<string, string>> {
  const names = (await readdir(APP)).filter((f) => f.endsWith('.js'));
  return new Map(await Promise.all(names.map(async (f) => [f, await readFile(path.join(APP, f), 'utf8')] as const)));
}

/** The modules of dist/src whose code an output file holds: esbuild heads each with `// dist/src/<module>`. */
function sourcesOf(code: string): string[] {
  return [...code.matchAll(/^\/\/ dist\/src\/(\S+\.js)$/gm)].map((m) => m[1]!);
}

test('package.json\'s "bin" is the bundle, executable, with its shebang', async () => {
  assert.equal(path.relative(REPO_ROOT, CLI), path.join('dist', 'app', 'cli.js'));
  await access(CLI, constants.X_OK);
  assert.match(await readFile(CLI, 'utf8'), /^#!\/usr\/bin\/env node\n/);
});

test('install-systemd, run from the bundle, finds the package (its systemd/) and names the bundle in ExecStart', async (t) => {
  const units = await tempDir(t, 'kheadersd-bundle-units-');
  const r = await runCli(['install-systemd', '--dry-run', '--unit-dir', units, '--config-dir', units]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(r.stdout.includes(`from ${path.join(REPO_ROOT, 'systemd', 'kheadersd.service')};`), r.stdout.split('\n', 3).join('\n'));
  const execStart = r.stdout.split('\n').find((l) => l.startsWith('ExecStart='));
  assert.equal(execStart, `ExecStart=${systemdQuote(process.execPath)} ${systemdQuote(CLI)} serve`);
});

test('every file the code finds by a relative URL is a file of the bundle, and no dependency is bundled in', async () => {
  const files = await outputs();
  const named = new Set<string>();
  for (const code of files.values()) {
    for (const m of code.matchAll(/new URL\("\.\/([^"]+)", import\.meta\.url\)/g)) named.add(m[1]!);
    assert.doesNotMatch(code, /^\/\/ node_modules\//m, 'a dependency was bundled: scripts/bundle.mjs must leave packages external');
  }
  // The three that exist today; a new one is checked too.
  for (const f of ['ingest-process-main.js', 'io-worker.js', 'vmlinux-worker.js']) assert.ok(named.has(f), `no code names ./${f} any more: update this test`);
  for (const f of named) {
    assert.ok(files.has(f), `the code looks for ./${f} beside itself, and the bundle has no such file (add it to the entry points in scripts/bundle.mjs)`);
    // An entry point of its own, not a chunk that merely shares the name.
    assert.ok(sourcesOf(files.get(f)!).some((s) => path.basename(s) === f), `${f} in the bundle does not hold dist/src's ${f}`);
  }
});

test('a serve start with its entry cached loads none of the lazily imported code', { timeout: 180_000 }, async (t) => {
  const work = await tempDir(t, 'kheadersd-bundle-');
  const archive = path.join(work, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive());
  const cacheDir = path.join(work, 'cache');
  const args = ['--archive', archive, '--release', SYNTH_RELEASE, '--cache-dir', cacheDir, '--btf', 'off', '--no-modprobe'];
  const ingested = await runCli(['ingest', ...args, '--log-level', 'warn']);
  assert.equal(ingested.code, 0, ingested.stderr);

  const record = path.join(work, 'loaded.txt');
  await writeFile(record, '');
  const daemon = startServe(t, [...args, '--mount', 'off', '--http', '127.0.0.1:0', '--log-level', 'info'], { NODE_OPTIONS: `--import=${RECORDER}`, KH_RECORD_LOADS: record });
  const listening = await daemon.waitFor((l) => l['msg'] === 'HTTP listening' && typeof l['url'] === 'string', 'HTTP listening');
  assert.equal((await request(Number(new URL(String(listening['url'])).port), '/readyz')).status, 200);
  await daemon.stop();

  const urls = (await readFile(record, 'utf8')).split('\n').filter(Boolean);
  const files = await outputs();
  const ran = new Set<string>();
  for (const url of urls) {
    if (!url.startsWith('file:')) continue;
    const file = fileURLToPath(url);
    if (path.dirname(file) === APP) for (const s of sourcesOf(files.get(path.basename(file)) ?? '')) ran.add(s);
    assert.doesNotMatch(file, /[\\/]dist[\\/]src[\\/]/, 'the bundle loaded a module of dist/src');
    assert.doesNotMatch(file, /[\\/]node_modules[\\/]fastify[\\/]/, 'fastify was loaded before any request needed it');
  }
  // The recording works: the modules that serve does need are there.
  for (const s of ['cli.js', 'commands/serve.js', 'serve/http/server.js', 'store/cache.js']) assert.ok(ran.has(s), `${s} is not among the modules loaded: ${[...ran].join(' ')}`);
  const lazy = ['serve/http/fastify-app.js', 'serve/fuse/index.js', 'serve/fuse/native.js', 'serve/fuse/kernel/index.js', 'store/decompress.js', 'store/pack-writer.js', 'store/extras.js', 'btf/c-emitter.js', 'commands/ingest-process.js'];
  assert.deepEqual(lazy.filter((s) => ran.has(s)), [], 'code imported lazily was loaded at a cached start');
});
