// The shipped daemon: tsc's output (dist/src) bundled by esbuild into dist/app. Node 20's ESM
// loader pays for every module it resolves, loads and links, and a `serve` start with its entry
// cached loaded ~50 of ours; bundled, the same start runs ~44M fewer instructions (README).
//
// - Entry points: the CLI, and every file that node starts by path rather than by import: the
//   ingest child's entry and the two worker threads. Their code finds them with
//   `new URL('./<name>.js', import.meta.url)`, so every output file lands in one flat directory
//   under the same base name as in dist/src: the same relative URL then works in both layouts.
// - splitting: what the code loads with import() (fastify's app, the FUSE backends, the ingest,
//   the BTF emitter...) stays a chunk of its own, loaded when it is asked for, as unbundled.
// - packages: 'external': every dependency (fastify, pino, fuse-native, lzma-native) is left to
//   node_modules, as before: two are native addons, pino finds its worker files by path, and
//   fastify is loaded lazily anyway.
// - The input is tsc's JavaScript, so the bundle runs exactly the code tsc type-checked.
import { build } from 'esbuild';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const compiled = path.join(root, 'dist', 'src');
const outdir = path.join(root, 'dist', 'app');

const entryPoints = {
  cli: 'cli.js',
  'ingest-process-main': 'commands/ingest-process-main.js',
  'io-worker': 'serve/fuse/kernel/io-worker.js',
  'vmlinux-worker': 'store/vmlinux-worker.js',
};

await rm(outdir, { recursive: true, force: true });
await build({
  entryPoints: Object.fromEntries(Object.entries(entryPoints).map(([name, file]) => [name, path.join(compiled, file)])),
  outdir,
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  // The oldest node the suite runs under (engines says >=22; CI runs it under 20 and 22).
  target: 'node20',
  packages: 'external',
  chunkNames: '[name]-[hash]',
  // Readable output: a stack trace from a device names real functions and lines.
  minify: false,
  legalComments: 'none',
  logLevel: 'warning',
});
