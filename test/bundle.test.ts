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
import { createRequire } from 'node:module';
import path from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { BUNDLE_WRAPPER, cacheFileName, nodeBuild } from '../src/code-cache.js';
import { systemdQuote } from '../src/commands/install.js';
import { CLI, REPO_ROOT, SYNTH_RELEASE, goodArchive, runCli, tempDir } from './helpers/archives.js';
import { request } from './helpers/http-env.js';
import { startServe } from './helpers/serve-child.js';

const APP = path.dirname(CLI);

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
    // scripts/import-meta-url.js stands for import.meta.url in the bundle.
    for (const m of code.matchAll(/new URL\("\.\/([^"]+)", import_meta_url\)/g)) named.add(m[1]!);
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

test('the bundle is CommonJS without import(), and cli.js and commands.js share one core', async () => {
  const files = await outputs();
  assert.deepEqual(JSON.parse(await readFile(path.join(APP, 'package.json'), 'utf8')), { type: 'commonjs' });
  for (const [name, code] of files) {
    // Code run with V8's cached code cannot import() in node 20 (src/code-cache.ts).
    assert.doesNotMatch(code, /\bimport\(/, `${name} still calls import()`);
    assert.doesNotMatch(code, /^export |^import /m, `${name} is not CommonJS`);
    // One character that is not ASCII makes V8 hold the whole source as a two-byte string.
    assert.doesNotMatch(code, /[^\t-~]/, `${name} is not ASCII`);
  }
  // One copy of the core (errors, the logger, the configuration): `instanceof KheadersError` must
  // hold for an error thrown in commands.js and reported by cli.js.
  const core = sourcesOf(files.get('core.js')!);
  for (const s of ['errors.js', 'config.js', 'log.js', 'command-loader.js', 'code-cache.js']) assert.ok(core.includes(s), `core.js does not hold ${s}`);
  for (const f of ['cli.js', 'commands.js']) {
    const shared = sourcesOf(files.get(f)!).filter((s) => core.includes(s));
    assert.deepEqual(shared, [], `${f} holds its own copy of core modules`);
    assert.match(files.get(f)!, /require\("\.\/core\.js"\)/);
  }
  assert.deepEqual([...new Set(sourcesOf(files.get('cli.js')!))], ['cli.js']);
  assert.ok(sourcesOf(files.get('commands.js')!).includes('commands/serve.js'));
  // commands.js is node's function wrapper written out, which the loader gives V8 as it is.
  const commands = files.get('commands.js')!;
  assert.ok(commands.startsWith(BUNDLE_WRAPPER.head) && commands.trimEnd().endsWith(BUNDLE_WRAPPER.tail), 'commands.js is not written in BUNDLE_WRAPPER');
});

test("core.js's exports are plain values, which is safe because no core module reassigns one", async () => {
  const core = createRequire(import.meta.url)(path.join(APP, 'core.js')) as Record<string, unknown>;
  const names = Object.keys(core);
  assert.ok(names.includes('KheadersError') && names.includes('loadCommand'), names.join(' '));
  for (const name of names) {
    const d = Object.getOwnPropertyDescriptor(core, name)!;
    // A getter here costs every read of the core from cli.js and commands.js two calls (scripts/bundle.mjs).
    assert.ok('value' in d && d.get === undefined, `core.js exports ${name} through a getter`);
  }
  assert.ok(Object.isFrozen(core));
  // A live binding (`export let`, reassigned later) would be frozen at its first value.
  for (const module of sourcesOf((await outputs()).get('core.js')!).filter((m) => m !== 'core-entry.js')) {
    const text = await readFile(path.join(REPO_ROOT, 'src', module.replace(/\.js$/, '.ts')), 'utf8');
    assert.doesNotMatch(text, /^export (?:let|var) /m, `src/${module} exports a binding it may reassign: core.js would hand out its first value`);
  }
});

test('a serve start with its entry cached runs none of the lazily imported code, and keeps its compiled code for the next', { timeout: 180_000 }, async (t) => {
  const work = await tempDir(t, 'kheadersd-bundle-');
  const archive = path.join(work, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive());
  const cacheDir = path.join(work, 'cache');
  const args = ['--archive', archive, '--release', SYNTH_RELEASE, '--cache-dir', cacheDir, '--btf', 'off', '--no-modprobe'];
  const ingested = await runCli(['ingest', ...args, '--log-level', 'warn']);
  assert.equal(ingested.code, 0, ingested.stderr);

  /** One start to ready and stop; what V8 says ran (NODE_V8_COVERAGE), and the start's log. */
  const start = async (): Promise<{ ran: Map<string, number>; scripts: string[]; log: Array<Record<string, unknown>> }> => {
    const coverage = await tempDir(t, 'kheadersd-coverage-');
    const daemon = startServe(t, [...args, '--mount', 'off', '--http', '127.0.0.1:0', '--log-level', 'debug'], { NODE_V8_COVERAGE: coverage });
    const listening = await daemon.waitFor((l) => l['msg'] === 'HTTP listening' && typeof l['url'] === 'string', 'HTTP listening');
    assert.equal((await request(Number(new URL(String(listening['url'])).port), '/readyz')).status, 200);
    await daemon.waitFor((l) => l['msg'] === 'compiled code kept for the next start' || l['codeCache'] === 'used', 'the code cache used or kept');
    await daemon.stop();
    const ran = new Map<string, number>();
    const scripts: string[] = [];
    for (const f of await readdir(coverage)) {
      const { result } = JSON.parse(await readFile(path.join(coverage, f), 'utf8')) as { result: Array<{ url: string; functions: Array<{ functionName: string; ranges: Array<{ count: number }> }> }> };
      for (const script of result) {
        scripts.push(script.url);
        if (script.url !== pathToFileURL(path.join(APP, 'commands.js')).href && script.url !== path.join(APP, 'commands.js')) continue;
        // esbuild wraps each module of commands.js in a function named by its dist/src path, run when the module is first needed.
        for (const fn of script.functions) if (fn.functionName.startsWith('dist/src/')) ran.set(fn.functionName.slice('dist/src/'.length), Math.max(ran.get(fn.functionName.slice('dist/src/'.length)) ?? 0, fn.ranges[0]?.count ?? 0));
      }
    }
    return { ran, scripts, log: daemon.logs };
  };

  const first = await start();
  for (const url of first.scripts) {
    assert.doesNotMatch(url, /[\\/]dist[\\/]src[\\/]/, 'the bundle loaded a module of dist/src');
    assert.doesNotMatch(url, /[\\/]node_modules[\\/]fastify[\\/]/, 'fastify was loaded before any request needed it');
  }
  // The recording works: the modules that serve does need ran.
  for (const s of ['commands/serve.js', 'serve/http/server.js', 'store/cache.js']) assert.ok((first.ran.get(s) ?? 0) > 0, `${s} did not run: ${[...first.ran].filter(([, n]) => n > 0).map(([s]) => s).join(' ')}`);
  const lazy = ['serve/http/fastify-app.js', 'serve/fuse/index.js', 'serve/fuse/native.js', 'serve/fuse/kernel/index.js', 'store/decompress.js', 'store/pack-writer.js', 'store/extras.js', 'btf/c-emitter.js', 'commands/ingest-process.js', 'commands/doctor.js', 'commands/pull.js'];
  for (const s of lazy) assert.ok(first.ran.has(s), `commands.js has no module ${s} (renamed? update this test)`);
  assert.deepEqual(lazy.filter((s) => (first.ran.get(s) ?? 0) > 0), [], 'code imported lazily ran at a cached start');

  // The first start ran with the code the build shipped (scripts/bundle.mjs), when the build's
  // node is this one (CI also runs this suite under another node, on the same build: that node
  // compiles from source), and kept its own; the second runs with that.
  const state = (log: Array<Record<string, unknown>>): unknown => log.find((l) => l['codeCache'] !== undefined)?.['codeCache'];
  const shipped = await readdir(path.join(APP, 'code'));
  assert.equal(shipped.length, 1, shipped.join(' '));
  assert.match(shipped[0]!, /^commands-[0-9a-f]{16}-v\d+\.\d+\.\d+-\w+-[0-9a-f]{8}\.v8$/);
  const builtByThisNode = shipped[0] === cacheFileName(path.join(APP, 'commands.js'), await readFile(path.join(APP, 'commands.js')), nodeBuild());
  assert.equal(state(first.log), builtByThisNode ? 'shipped' : 'absent');
  const kept = await readdir(path.join(cacheDir, 'code'));
  assert.equal(kept.length, 1, kept.join(' '));
  assert.match(kept[0]!, /^commands-[0-9a-f]{16}-v\d+\.\d+\.\d+-\w+-[0-9a-f]{8}\.v8$/);
  const second = await start();
  assert.equal(state(second.log), 'used');
});
