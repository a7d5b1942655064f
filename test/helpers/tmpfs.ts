/**
 * A small real tmpfs, for tests of a full disk: mounted on a fresh directory, unmounted and
 * removed when the test ends. Needs root (or CAP_SYS_ADMIN); otherwise the reason to skip.
 */
import { execFileSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';

/** `options`: more tmpfs mount options, e.g. `nr_inodes=300` (a volume that runs out of inodes). */
export async function mountTmpfs(t: TestContext, size: string, options = ''): Promise<{ dir: string } | { skip: string }> {
  if (process.getuid?.() !== 0) return { skip: 'mounting a tmpfs needs root' };
  // Not inside another test's temp dir, and unmounted before it is removed.
  const dir = await mkdtemp(path.join(os.tmpdir(), 'kheadersd-tmpfs-'));
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}${options ? `,${options}` : ''}`, 'tmpfs', dir], { stdio: 'pipe' });
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    return { skip: `mount -t tmpfs is not permitted here: ${String((err as { stderr?: Buffer }).stderr ?? err).trim()}` };
  }
  t.after(async () => {
    execFileSync('umount', [dir]);
    await rm(dir, { recursive: true, force: true });
  });
  return { dir };
}
