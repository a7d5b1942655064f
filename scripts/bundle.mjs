// The shipped daemon: tsc's output (dist/src) bundled by esbuild into dist/app, CommonJS, so that
// the commands can run with V8's compiled code kept from the previous start (src/code-cache.ts):
// Node 20 has no compile cache of its own, and none for ES modules. README has the figures.
//
//   core.js      what the CLI needs before it knows the cache directory: the argument parser,
//                the configuration, the logger, errors, the command loader (the static imports
//                of cli.js, found by esbuild itself, so the split cannot drift from the code)
//   cli.js       the command table; compiled from source at every start (small)
//   commands.js  every command (src/commands/index.ts) and all they load; run by the command
//                loader through code-cache.ts, and written as the function node's CommonJS
//                loader would wrap it in. Modules loaded with import() stay unevaluated until
//                asked for (esbuild wraps them), as when they were files of their own.
//   ingest-process-main.js, io-worker.js, vmlinux-worker.js
//                what node starts by path (the ingest child, the two worker threads), each
//                whole in itself: they run in a process or thread of their own.
//   code/        commands.js's compiled code, made by the node that built it, for the starts
//                that have none kept in their cache directory yet (src/code-cache.ts)
//
// - cli.js and commands.js take the core's modules from core.js (require('./core.js')), never a
//   copy: one KheadersError class, one logger module, whichever file threw.
// - import.meta.url, which the code uses to find the files above beside itself, is the running
//   file's URL (scripts/import-meta-url.js), so the same relative URL works in dist/src and here.
// - packages: 'external': every dependency (fastify, pino, fuse-native, lzma-native) is left to
//   node_modules, as before: two are native addons, pino finds its worker files by path.
// - dist/app/package.json says "commonjs", since the package's own says "module".
// - The input is tsc's JavaScript, so the bundle runs exactly the code tsc type-checked.
import { build } from 'esbuild';
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const compiled = path.join(root, 'dist', 'src');
const outdir = path.join(root, 'dist', 'app');
const COMMANDS_INDEX = path.join(compiled, 'commands', 'index.js');

const common = {
  bundle: true,
  format: 'cjs',
  platform: 'node',
  // The oldest node the suite runs under (engines says >=22; CI runs it under 20 and 22).
  target: 'node20',
  packages: 'external',
  // import() of a dependency becomes require(): code run through vm.Script with V8's cached code
  // has no working dynamic import in node 20 (ERR_VM_DYNAMIC_IMPORT_CALLBACK_MISSING), and every
  // dependency is CommonJS anyway.
  supported: { 'dynamic-import': false },
  inject: [path.join(root, 'scripts', 'import-meta-url.js')],
  define: { 'import.meta.url': 'import_meta_url', KHEADERSD_BUNDLED: 'true' },
  // Readable output: a stack trace from a device names real functions and lines.
  minify: false,
  legalComments: 'none',
  logLevel: 'warning',
};

/**
 * Resolve `./x.js` imports the way esbuild would, to an absolute path.
 * @param {import('esbuild').OnResolveArgs} args
 */
const resolveFrom = (args) => path.resolve(args.resolveDir, args.path);

/** The command modules are reached only through the loader, never bundled beside the core. @type {import('esbuild').Plugin} */
const commandsApart = {
  name: 'commands-apart',
  setup(b) {
    b.onResolve({ filter: /^\.\.?\// }, (args) => (resolveFrom(args) === COMMANDS_INDEX ? { path: './commands.js', external: true } : undefined));
  },
};

/**
 * Imports of a core module become require('./core.js').
 * @param {Set<string>} core
 * @returns {import('esbuild').Plugin}
 */
const coreFromCoreJs = (core) => ({
  name: 'core-from-core-js',
  setup(b) {
    b.onResolve({ filter: /^\.\.?\// }, (args) => (core.has(resolveFrom(args)) ? { path: './core.js', external: true } : undefined));
  },
});

// The wrapper commands.js is written in: the loader's own constant (tsc's output, which this
// script runs after; typed here since dist/ does not exist when the code is linted).
/** @type {unknown} */
const codeCache = await import(pathToFileURL(path.join(compiled, 'code-cache.js')).href);
const { BUNDLE_WRAPPER, shipCompiledCode } = /** @type {{ BUNDLE_WRAPPER: { head: string; tail: string }; shipCompiledCode: (file: string) => Promise<string> }} */ (codeCache);

await rm(outdir, { recursive: true, force: true });
await mkdir(outdir, { recursive: true });

// 1. The core: every module cli.js imports statically, however deep.
const probe = await build({ ...common, entryPoints: [path.join(compiled, 'cli.js')], write: false, metafile: true, plugins: [commandsApart] });
const coreFiles = Object.keys(probe.metafile.inputs)
  .map((f) => path.resolve(root, f))
  .filter((f) => f.startsWith(compiled + path.sep) && f !== path.join(compiled, 'cli.js'));
const core = new Set(coreFiles);

// core.js re-exports every core module flat: two exporting the same name would make one shadow the other.
/** @type {Map<string, string>} */
const owner = new Map();
for (const file of coreFiles) {
  /** @type {unknown} */
  const exported = await import(pathToFileURL(file).href);
  for (const name of Object.keys(/** @type {object} */ (exported))) {
    if (owner.has(name)) throw new Error(`core modules ${owner.get(name)} and ${file} both export ${name}: rename one (core.js re-exports both)`);
    owner.set(name, file);
  }
}
await build({
  ...common,
  stdin: { contents: coreFiles.map((f) => `export * from ${JSON.stringify(f)};`).join('\n'), resolveDir: compiled, sourcefile: 'core-entry.js', loader: 'js' },
  outfile: path.join(outdir, 'core.js'),
  plugins: [commandsApart],
  // core.js's exports become plain values once it has run. esbuild exports an ES module's
  // bindings from CommonJS as getters, two deep here (core.js re-exports each module), and the
  // other files read the core through them: the index check's loop at every start read its field
  // offsets through ~140,000 getter calls, before V8 optimises anything (~9 ms of a cached start's
  // CPU, interleaved starts). A copy is safe because no core module reassigns an export (no
  // `export let`: bundle.test checks it) and core.js runs whole before anyone requires it.
  footer: {
    js: [
      '{',
      '  const live = module.exports;',
      '  const plain = Object.defineProperty({}, "__esModule", { value: true });',
      '  for (const name of Object.keys(live)) plain[name] = live[name];',
      '  module.exports = Object.freeze(plain);',
      '}',
    ].join('\n'),
  },
});

// 2. The CLI and the commands, each taking the core from core.js.
await build({ ...common, entryPoints: { cli: path.join(compiled, 'cli.js') }, outdir, plugins: [commandsApart, coreFromCoreJs(core)] });
// commands.js is node's CommonJS function wrapper written out (src/code-cache.ts, BUNDLE_WRAPPER):
// the loader gives V8 the file's text as it is, where adding the wrapper at run time would copy
// its 0.6 MB source once more at every start.
await build({
  ...common,
  entryPoints: { commands: COMMANDS_INDEX },
  outdir,
  plugins: [coreFromCoreJs(core)],
  banner: { js: BUNDLE_WRAPPER.head },
  footer: { js: BUNDLE_WRAPPER.tail },
});

// 3. What node starts by path, each whole.
await build({
  ...common,
  entryPoints: {
    'ingest-process-main': path.join(compiled, 'commands', 'ingest-process-main.js'),
    'io-worker': path.join(compiled, 'serve', 'fuse', 'kernel', 'io-worker.js'),
    'vmlinux-worker': path.join(compiled, 'store', 'vmlinux-worker.js'),
  },
  outdir,
});

// ASCII only. esbuild escapes what is not ASCII in strings and names, but not in the comments it
// keeps (an arrow, a dash): one such character made V8 hold commands.js's 0.6 MB source as a
// two-byte string, twice the memory for the daemon's whole life, and made decoding it slower.
for (const name of await readdir(outdir)) {
  if (!name.endsWith('.js')) continue;
  const file = path.join(outdir, name);
  const code = await readFile(file, 'utf8');
  // \uXXXX per UTF-16 unit means the same character in a comment, a string, a template or a regex.
  if (/[^\t-~]/.test(code)) await writeFile(file, code.replace(/[^\t-~]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`));
}

await writeFile(path.join(outdir, 'package.json'), `${JSON.stringify({ type: 'commonjs' }, null, 2)}\n`);

// 4. commands.js's code as V8 compiles it before running anything, for the starts that find none
// kept in their cache directory (a first boot, every command but serve): src/code-cache.ts. Made
// by this node, it serves this node only; a device's other node compiles from source, as before.
await shipCompiledCode(path.join(outdir, 'commands.js'));
