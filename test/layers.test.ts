/**
 * The folders are the data's path, and no module imports up it. From the bottom:
 *
 *   foundation  errors.ts, log.ts, token.ts, platform.ts, v8-flags.ts, types/   (used by every layer)
 *   source      source/     where archives, modules, notes and BTF files come from
 *   btf         btf/        the BTF codec and C emitter (reads ELF through source/elf)
 *   store       store/      ingest, the index, the cache on disk, reading an entry back
 *   serve       serve/      HTTP and FUSE, answering from the store
 *   config      config.ts   flags, variables and config.json resolved into one Config
 *   commands    commands/   each command (serve, ingest, doctor, pull...) composing the above, and
 *                           ingest-process-main.ts, the entry point of serve's ingest process
 *   cli         cli.ts      the commands' table that calls the commands (cli-args.ts: its argument
 *               parsing and help; command-loader.ts: how it reaches the commands' modules, in the
 *               bundle through code-cache.ts, V8's compiled code kept in the cache directory)
 *
 * A module may import its own layer and any layer below. The test reads the import specifiers
 * (static, `export ... from` and dynamic `import()`) of every file under src/, so a new file
 * or a new folder without a layer fails too.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const SRC = fileURLToPath(new URL('../../src/', import.meta.url));

const LAYERS: ReadonlyArray<readonly [string, readonly string[]]> = [
  ['foundation', ['errors.ts', 'log.ts', 'token.ts', 'platform.ts', 'v8-flags.ts', 'types/']],
  ['source', ['source/']],
  ['btf', ['btf/']],
  ['store', ['store/']],
  ['serve', ['serve/']],
  ['config', ['config.ts']],
  ['commands', ['commands/']],
  ['cli', ['cli.ts', 'cli-args.ts', 'command-loader.ts', 'code-cache.ts']],
];

/** The layer's rank of a path relative to src/ (forward slashes), or -1 when none claims it. */
function layerOf(rel: string): number {
  return LAYERS.findIndex(([, parts]) => parts.some((p) => (p.endsWith('/') ? rel.startsWith(p) : rel === p)));
}

/** The relative import specifiers of a TypeScript source (package imports are not layers). */
function relativeImports(source: string): string[] {
  const found: string[] = [];
  const re = /(?:\bfrom\s*|\bimport\s*\(\s*|^\s*import\s+)['"](\.{1,2}\/[^'"]+)['"]/gm;
  for (const m of source.matchAll(re)) found.push(m[1]!);
  return found;
}

function sourceFiles(): string[] {
  return (readdirSync(SRC, { recursive: true }) as string[]).map((f) => f.split(path.sep).join('/')).filter((f) => f.endsWith('.ts'));
}

test('the import scanner sees static, re-export, side-effect and dynamic imports', () => {
  const text = [
    "import { a } from '../store/cache.js';",
    "import type { B } from './b.js';",
    "export { c } from '../serve/c.js';",
    "import './side.js';",
    "const { d } = await import('../commands/d.js');",
    "import { readFile } from 'node:fs/promises';",
    '// a comment naming ../nothing.js',
  ].join('\n');
  assert.deepEqual(relativeImports(text), ['../store/cache.js', './b.js', '../serve/c.js', './side.js', '../commands/d.js']);
  assert.equal(layerOf('serve/http/server.ts'), 4);
  assert.equal(layerOf('errors.ts'), 0);
  assert.equal(layerOf('elsewhere.ts'), -1);
});

test('every file under src/ has a layer, and imports only its own layer or those below', () => {
  const files = sourceFiles();
  assert.ok(files.length > 50, `found only ${files.length} files under ${SRC}`);
  const problems: string[] = [];
  for (const file of files) {
    const rank = layerOf(file);
    if (rank < 0) {
      problems.push(`${file}: in no layer (add it to LAYERS in test/layers.test.ts)`);
      continue;
    }
    for (const spec of relativeImports(readFileSync(path.join(SRC, file), 'utf8'))) {
      const target = path.posix.normalize(path.posix.join(path.posix.dirname(file), spec)).replace(/\.js$/, '.ts');
      const to = layerOf(target);
      if (to > rank) problems.push(`${file} (${LAYERS[rank]![0]}) imports ${target} (${LAYERS[to]![0]}), up the stack`);
      else if (to < 0) problems.push(`${file} imports ${target}, outside every layer`);
    }
  }
  assert.deepEqual(problems, []);
});
