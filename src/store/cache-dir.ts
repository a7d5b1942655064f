/**
 * The rule for trusting a cache directory, apart from the store so that what runs before the
 * store is loaded (the compiled-code cache, code-cache.ts) applies the same rule. Pure.
 */
import type { Stats } from 'node:fs';

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
