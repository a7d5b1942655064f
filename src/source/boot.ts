/**
 * Which boot of the machine this is. The kernel draws a random id at every boot; the cache's
 * `current` pointer records it, so that after a reboot (possibly into another kernel) nothing
 * takes the last boot's choice for this one's.
 */
import { readFileSync } from 'node:fs';

export const BOOT_ID_PATH = '/proc/sys/kernel/random/boot_id';

let cached: Promise<string | null> | undefined;

/** The running boot's id, or null where the kernel does not say (not Linux, /proc hidden). */
export function readBootId(): Promise<string | null> {
  // Synchronous: one small file of procfs, once per process.
  if (cached === undefined) {
    try {
      cached = Promise.resolve(readFileSync(BOOT_ID_PATH, 'utf8').trim() || null);
    } catch {
      cached = Promise.resolve(null);
    }
  }
  return cached;
}
