/**
 * The rule for trusting a cache directory, apart from the store so that what runs before the
 * store is loaded (the compiled-code cache, code-cache.ts) applies the same rule; and the error a
 * reader meets when the cache's modes keep it out. Pure.
 */
import type { Stats } from 'node:fs';
import { KheadersError, errnoOf } from '../errors.js';

export interface CacheDirProblem {
  kind: 'not-directory' | 'writable' | 'owner';
  what: string;
  fix: string;
}

/**
 * The rule for trusting a cache directory, which serve, ingest, the readers and `doctor` all
 * apply: a directory, writable by its owner only, owned by the user, or (for reading) by root.
 * Undefined when it may be used.
 */
export function cacheDirProblem(dir: string, st: Pick<Stats, 'mode' | 'uid' | 'isDirectory'>, uid: number, forWriting: boolean): CacheDirProblem | undefined {
  if (!st.isDirectory()) return { kind: 'not-directory', what: `the cache path ${dir} is not a directory`, fix: 'remove it, or choose another with --cache-dir' };
  const mode = st.mode & 0o7777;
  if ((mode & 0o022) !== 0) {
    return {
      kind: 'writable',
      what: `refusing the cache directory ${dir}: it is writable by ${mode & 0o002 ? 'everyone' : 'its group'} (mode ${mode.toString(8)}), so anyone could plant headers in it`,
      fix: `chmod 755 ${dir}`,
    };
  }
  const acceptable = forWriting ? st.uid === uid : st.uid === uid || st.uid === 0;
  if (!acceptable) {
    return {
      kind: 'owner',
      what: `refusing the cache directory ${dir}: it is owned by uid ${st.uid}, not by ${forWriting ? 'you' : 'you or root'} (uid ${uid})`,
      fix: `chown ${uid} ${dir} (as root), or choose another with --cache-dir`,
    };
  }
  return undefined;
}

/** Errnos that mean the cache's modes keep this user out (not damage, not a bug). */
const REFUSED = new Set(['EACCES', 'EPERM']);

/**
 * The error for a read of the cache that its modes refused, or undefined when `err` is another
 * failure. A cache written under a tight umask by an older kheadersd (or chmodded by hand) keeps
 * the users who are not its owner out: that is the environment's doing, and says which file.
 */
export function unreadableCache(file: string, err: unknown): KheadersError | undefined {
  const errno = errnoOf(err);
  if (errno === undefined || !REFUSED.has(errno)) return undefined;
  const uid = process.getuid?.() ?? 0;
  return new KheadersError(
    'E_CACHE_UNREADABLE',
    `cannot read ${file} (${errno}): the cache is not readable by this user (uid ${uid}); run this as root or as the cache's owner, or let others read it (chmod -R a+rX on the cache directory)`,
    { file, errno, uid },
  );
}
