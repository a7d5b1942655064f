/**
 * How the CLI reaches a command's module. Run from tsc's output (tests), it is a plain import.
 * In the shipped bundle (scripts/bundle.mjs), the commands are one CommonJS file, `commands.js`,
 * run through code-cache.ts with V8's compiled code from the cache directory, which is known
 * only once the configuration is read: that is why the CLI, its arguments, the configuration and
 * the logger are a bundle file of their own, compiled from source at every start.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runBundle, type CodeCacheState } from './code-cache.js';
import type { CommandModules, CommandName } from './commands/index.js';
import type { Logger } from './log.js';

/** Set to true by scripts/bundle.mjs; undeclared (so `typeof` is 'undefined') in tsc's output. */
declare const KHEADERSD_BUNDLED: boolean | undefined;

interface Loaded {
  modules: CommandModules;
  save: () => Promise<boolean>;
  state: CodeCacheState;
}

let loading: Promise<Loaded> | undefined;
/** The same, once loaded: saving must take V8's data synchronously (see saveCompiledCommands). */
let loaded: Loaded | undefined;

/**
 * A command's module. `cacheDir` is where compiled code may be found (undefined for the commands
 * that read no configuration); only the first call's counts, since the commands file runs once.
 */
export async function loadCommand<K extends CommandName>(name: K, cacheDir: string | undefined, log?: Logger): Promise<Awaited<ReturnType<CommandModules[K]>>> {
  loading ??= loadCommands(cacheDir, log).then((l) => (loaded = l));
  const { modules } = await loading;
  return (await modules[name]()) as Awaited<ReturnType<CommandModules[K]>>;
}

/**
 * Keep the code compiled so far for the next start (code-cache.ts's `save`): V8's data is taken
 * before this returns; the promise is the write. Never rejects: a cache that cannot be written
 * costs the next start a compile, nothing more, and says so in the log.
 */
export function saveCompiledCommands(log: Logger): Promise<void> {
  if (loaded === undefined) return Promise.resolve();
  const { state } = loaded;
  let saving: Promise<boolean>;
  try {
    saving = loaded.save();
  } catch (err) {
    saving = Promise.reject(err instanceof Error ? err : new Error(String(err)));
  }
  return saving
    .then((wrote) => {
      if (wrote) log.debug({ previously: state }, 'compiled code kept for the next start');
    })
    .catch((err: unknown) => log.warn({ err }, 'the compiled code could not be kept for the next start (it costs that start a compile)'));
}

async function loadCommands(cacheDir: string | undefined, log: Logger | undefined): Promise<Loaded> {
  if (typeof KHEADERSD_BUNDLED === 'undefined' || !KHEADERSD_BUNDLED) {
    return { modules: (await import('./commands/index.js')).COMMAND_MODULES, save: () => Promise.resolve(false), state: 'off' };
  }
  const file = path.join(path.dirname(fileURLToPath(import.meta.url)), 'commands.js');
  const run = await runBundle(file, cacheDir);
  log?.debug({ codeCache: run.state, file: run.cacheFile, ...(run.why ? { why: run.why } : {}) }, `compiled code: ${run.state}`);
  return { modules: (run.exports as { COMMAND_MODULES: CommandModules }).COMMAND_MODULES, save: () => run.save(), state: run.state };
}
