/**
 * Materialise an entry as a plain directory tree, for systems without FUSE and for tools that
 * want a path (`BCC_KERNEL_SOURCE=<dir>`). Built beside the destination and renamed into place,
 * so the destination is either absent or complete. Paths come from the index (checked when it
 * was loaded); nothing is ever written outside the destination. Bytes come through the entry's
 * reader: a file that does not prove against its digest fails the export (nothing is left behind).
 */
import { chmod, mkdir, mkdtemp, readdir, rename, rm, rmdir, symlink, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { KheadersError, diskFullErrno, errnoOf } from '../errors.js';
import type { CacheEntry } from './entry.js';
import type { TreeNode } from './tree-index.js';

const PARALLEL_WRITES = 16;

export interface ExportResult {
  dir: string;
  files: number;
  dirs: number;
  symlinks: number;
}

export async function exportEntry(entry: CacheEntry, dest: string): Promise<ExportResult> {
  const target = path.resolve(dest);
  if (await nonEmptyDir(target)) {
    throw new KheadersError('E_USAGE', `${target} already exists and is not empty; choose a new directory`, { dest: target });
  }
  await mkdir(path.dirname(target), { recursive: true });
  const tmp = await mkdtemp(path.join(path.dirname(target), `.${path.basename(target)}.kheadersd-`));
  try {
    const nodes = entry.index.nodes;
    for (const n of nodes) if (n.kind === 'dir' && n.id !== 0) await mkdir(path.join(tmp, n.path), { mode: 0o755 });
    const files = nodes.filter((n) => n.kind === 'file');
    for (let i = 0; i < files.length; i += PARALLEL_WRITES) {
      await Promise.all(files.slice(i, i + PARALLEL_WRITES).map((n) => copyOut(entry, n, tmp)));
    }
    for (const n of nodes) if (n.kind === 'symlink') await symlink(n.target!, path.join(tmp, n.path));
    // Directory times last: creating their children changed them.
    for (const n of [...nodes].reverse()) if (n.kind === 'dir' && n.mtime > 0) await utimes(path.join(tmp, n.path), n.mtime, n.mtime);
    await chmod(tmp, 0o755); // mkdtemp made it 0700
    if (await exists(target)) await rmdir(target); // empty, checked above
    await rename(tmp, target);
    return { dir: target, files: files.length, dirs: entry.index.dirCount, symlinks: entry.index.symlinkCount };
  } catch (err) {
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
    if (diskFullErrno(err) !== undefined) throw new KheadersError('E_NO_SPACE', `no space left while exporting to ${target}; nothing was left behind`, { dest: target });
    throw err;
  }
}

async function copyOut(entry: CacheEntry, node: TreeNode, root: string): Promise<void> {
  const buf = await entry.reader.readWhole(node.id);
  const out = path.join(root, node.path);
  await writeFile(out, buf, { mode: (node.mode & 0o755) | 0o444 });
  if (node.mtime > 0) await utimes(out, node.mtime, node.mtime);
}

async function nonEmptyDir(dir: string): Promise<boolean> {
  try {
    return (await readdir(dir)).length > 0;
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return false;
    if (errnoOf(err) === 'ENOTDIR') return true;
    throw err;
  }
}

async function exists(p: string): Promise<boolean> {
  try {
    await readdir(p);
    return true;
  } catch {
    return false;
  }
}
