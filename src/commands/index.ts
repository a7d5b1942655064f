/**
 * Every command's module, each loaded on first use. The CLI reaches the commands only through
 * this table (command-loader.ts): in the shipped bundle it is the entry of `commands.js`, the one
 * file whose compiled code is kept in the cache directory (code-cache.ts), and each module below
 * stays unevaluated until its command runs.
 */
export const COMMAND_MODULES = {
  store: () => import('./store-commands.js'),
  serve: () => import('./serve.js'),
  pull: () => import('./pull.js'),
  doctor: () => import('./doctor.js'),
  install: () => import('./install.js'),
  btf: () => import('../btf/command.js'),
};

export type CommandModules = typeof COMMAND_MODULES;
export type CommandName = keyof CommandModules;
