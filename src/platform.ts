/**
 * Where kheadersd keeps things by default on this kind of system: Android keeps daemons' data
 * under /data/local (no /var, and /run is not writable by a shell-started daemon); elsewhere the
 * FHS places. Configuration reads these defaults; the store and the servers take the resolved
 * directories and know nothing of platforms.
 */

export const DEFAULT_CACHE_DIR = '/var/cache/kheadersd';
export const ANDROID_CACHE_DIR = '/data/local/kheadersd';
export const DEFAULT_MOUNT = '/run/kheaders';
export const ANDROID_MOUNT = '/data/local/kheadersd/mnt';

export function isAndroid(): boolean {
  return process.platform === 'android' || process.env.ANDROID_ROOT !== undefined;
}

/** KHEADERSD_CACHE_DIR in `env`, then the platform default. */
export function defaultCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.KHEADERSD_CACHE_DIR || (isAndroid() ? ANDROID_CACHE_DIR : DEFAULT_CACHE_DIR);
}

export function defaultMount(): string {
  return isAndroid() ? ANDROID_MOUNT : DEFAULT_MOUNT;
}
