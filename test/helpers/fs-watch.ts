/**
 * Watching what a test's own process asks of the file system, through node's own fs: its
 * functions are wrapped (and the named imports of node:fs and node:fs/promises re-bound to the
 * wrappers with syncBuiltinESMExports), counting the calls that name a path under a directory.
 * Nothing of the code under test is replaced.
 */
import fs from 'node:fs';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import path from 'node:path';

const require = createRequire(import.meta.url);
export const fsp = require('node:fs/promises') as Record<string, unknown>;
export const fsSync = fs as unknown as Record<string, unknown>;

/** Count calls of these functions of `target` whose first argument is a path under `under`; undo() puts them back. */
export function watch(target: Record<string, unknown>, names: readonly string[], under: string): { calls: string[]; undo(): void } {
  const calls: string[] = [];
  const saved = new Map<string, unknown>();
  for (const name of names) {
    const original = target[name] as (...args: unknown[]) => unknown;
    saved.set(name, original);
    target[name] = function (this: unknown, ...args: unknown[]): unknown {
      const p = args[0];
      if (typeof p === 'string' && (p === under || p.startsWith(under + path.sep))) calls.push(`${name} ${path.relative(under, p)}`);
      return original.apply(this, args);
    };
  }
  syncBuiltinESMExports();
  return {
    calls,
    undo: () => {
      for (const [name, original] of saved) target[name] = original;
      syncBuiltinESMExports();
    },
  };
}
