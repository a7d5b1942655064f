/**
 * Where a kheaders module may sit on disk, and whether one found there is the running kernel's.
 * Pure: names and bytes in, paths out (src/source/module-files.ts does the I/O; whether a module
 * file is the running kernel's is judgeModule's, in elf.ts).
 *
 * A distribution installs modules under /lib/modules/<release>/ (kheaders.ko in kernel/kernel/,
 * often compressed). An Android GKI device has no /lib/modules: its GKI modules, kheaders.ko
 * among them, ship in the system_dlkm partition, vendor modules in vendor_dlkm, vendor or odm,
 * each under lib/modules/ (flat) or lib/modules/<release>/. The archive inside kheaders.ko is
 * the same bytes the loaded module exposes in sysfs, so reading the file spares loading it.
 */

/** The word in a moduleDirs list that stands for the built-in places. */
export const DEFAULT_PLACES = 'default';
/** Replaced by the running kernel's release in a moduleDirs entry. */
export const RELEASE_TOKEN = '{release}';

/** Android's module partitions, in the order their modules are trusted to be GKI's own. */
export const ANDROID_MODULE_PARTITIONS = ['/system_dlkm', '/vendor_dlkm', '/vendor', '/odm'] as const;

/** The module's file names, uncompressed first (the cheapest to read). */
export const MODULE_FILE_NAMES = ['kheaders.ko', 'kheaders.ko.xz', 'kheaders.ko.zst', 'kheaders.ko.gz'] as const;

/** Where in a module directory kheaders.ko lives: flat (Android), or where Kbuild installs it. */
const IN_DIR = ['', 'kernel/kernel/'] as const;

export type ModuleCompression = 'none' | 'xz' | 'gzip' | 'zstd';

/** The built-in places for `release`: the distribution's directory, then Android's. */
export function defaultModuleDirs(release: string): string[] {
  return [`/lib/modules/${release}`, ...ANDROID_MODULE_PARTITIONS.flatMap((p) => [`${p}/lib/modules/${release}`, `${p}/lib/modules`])];
}

/**
 * Check a moduleDirs setting: every entry is an absolute directory (which may contain
 * `{release}`) or the word `default`. Returns the problem in words, or undefined when it is fine.
 */
export function moduleDirsProblem(entries: readonly string[]): string | undefined {
  if (entries.length === 0) return 'an empty list (use "default" for the built-in places)';
  const bad = entries.find((e) => e !== DEFAULT_PLACES && !e.startsWith('/'));
  return bad === undefined ? undefined : `${JSON.stringify(bad)} is neither an absolute directory nor "${DEFAULT_PLACES}"`;
}

/**
 * The directories to search, in order, without repeats: `default` expands to the built-in
 * places, and `{release}` in an entry becomes the running release.
 */
export function moduleSearchDirs(setting: readonly string[], release: string): string[] {
  const dirs = setting.flatMap((entry) => (entry === DEFAULT_PLACES ? defaultModuleDirs(release) : [entry.split(RELEASE_TOKEN).join(release)]));
  return [...new Set(dirs.map(normaliseDir))];
}

function normaliseDir(dir: string): string {
  const trimmed = dir.replace(/\/+/g, '/');
  return trimmed.length > 1 ? trimmed.replace(/\/$/, '') : trimmed;
}

/** Is this name one of kheaders.ko's (compressed or not)? */
export function isKheadersModuleName(name: string): boolean {
  return (MODULE_FILE_NAMES as readonly string[]).includes(name);
}

/** Relative names to try inside one module directory, in order. */
export function namesInModuleDir(): string[] {
  return IN_DIR.flatMap((sub) => MODULE_FILE_NAMES.map((name) => sub + name));
}

/**
 * The kheaders entries of a modules.dep: each line is `path: deps...`, the path relative to the
 * directory holding modules.dep or absolute (Android's lists often name /system_dlkm/... or
 * /lib/modules/... as the device mounts them).
 */
export function kheadersInModulesDep(text: string): string[] {
  const found: string[] = [];
  for (const line of text.split('\n')) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    const file = line.slice(0, colon).trim();
    const base = file.slice(file.lastIndexOf('/') + 1);
    if (isKheadersModuleName(base) && !found.includes(file)) found.push(file);
  }
  return found;
}

/** What the first bytes say the file is: a bare ELF module, or one of the compressions kmod reads. */
export function moduleCompression(head: Uint8Array): ModuleCompression | undefined {
  const starts = (...magic: number[]): boolean => head.length >= magic.length && magic.every((b, i) => head[i] === b);
  if (starts(0x7f, 0x45, 0x4c, 0x46)) return 'none';
  if (starts(0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00)) return 'xz';
  if (starts(0x1f, 0x8b)) return 'gzip';
  if (starts(0x28, 0xb5, 0x2f, 0xfd)) return 'zstd';
  return undefined;
}
