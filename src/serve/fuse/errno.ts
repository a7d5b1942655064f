/**
 * The errno a failure reaches a reader of the mount as, the same through either FUSE backend:
 * the errno a KheadersError names in details.errno (a file that is not there, a directory read
 * as a file), ENOENT for any other E_NOT_FOUND, a system error's own errno, else EIO.
 */
import os from 'node:os';
import { errnoOf, isKheadersError } from '../../errors.js';

const ERRNO = os.constants.errno as Readonly<Record<string, number | undefined>>;

/** The positive errno for `err`. */
export function errnoFor(err: unknown): number {
  if (isKheadersError(err)) {
    const named = err.details['errno'];
    const value = typeof named === 'string' ? ERRNO[named] : undefined;
    if (value !== undefined) return value;
    return err.code === 'E_NOT_FOUND' ? os.constants.errno.ENOENT : os.constants.errno.EIO;
  }
  const named = errnoOf(err);
  return (named !== undefined ? ERRNO[named] : undefined) ?? os.constants.errno.EIO;
}
