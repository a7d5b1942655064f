/**
 * A small file of the cache directory (the `current` pointer, sources.json), read whole with
 * synchronous calls: the cache directory is never the mount, and as promises each read was four
 * or five thread-pool round trips, which cost a start more than the reads (see entry-load.ts).
 *
 * Synchronous, the read runs on the thread that answers the daemon's own FUSE mount, so nothing
 * put in the file's place may make it wait: O_NONBLOCK, so that a FIFO is refused at once;
 * O_NOFOLLOW, since a symbolic link may point into the mount, whose answer this thread would
 * wait for itself, for good (seen: a `current` linked to a header of the mount hung the daemon
 * at the next SIGHUP, past a SIGTERM); a bound on the size, checked on the open descriptor
 * before anything is read. None of these is ever written here (each is a regular file renamed
 * in): what is not is no file, as the callers' damage rules already say.
 */
import { closeSync, constants, fstatSync, openSync, readFileSync, type Stats } from 'node:fs';
import { open } from 'node:fs/promises';
import { errnoOf } from '../errors.js';

/**
 * How the cache's small files are read: synchronously during the start (measured wins, above and
 * in entry-load.ts), through the thread pool once serving. A request's refresh of the HTTP
 * catalog must not hold the thread that answers every other request (and the mount) on the disk.
 */
export type ReadMode = 'sync' | 'async';

const FLAGS = constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOFOLLOW;

/** What open(2) answers for a name that is there but is no regular file it may read (a symlink, a socket, a device without its driver). */
const NOT_A_FILE = new Set(['ELOOP', 'ENXIO', 'ENODEV', 'EISDIR']);

/**
 * The file's bytes; undefined when it is there but is not a regular file of at most `maxBytes`.
 * Throws what open(2) throws otherwise (ENOENT, EACCES, ...).
 */
export function readRegularFileSync(file: string, maxBytes: number): Buffer | undefined {
  let fd: number;
  try {
    fd = openSync(file, FLAGS);
  } catch (err) {
    return notAFile(err);
  }
  try {
    return wanted(fstatSync(fd), maxBytes) ? readFileSync(fd) : undefined;
  } finally {
    closeSync(fd);
  }
}

/** readRegularFileSync through the thread pool: the same flags, checks and answers. */
export async function readRegularFile(file: string, maxBytes: number): Promise<Buffer | undefined> {
  const fh = await open(file, FLAGS).catch(notAFile);
  if (fh === undefined) return undefined;
  try {
    return wanted(await fh.stat(), maxBytes) ? await fh.readFile() : undefined;
  } finally {
    await fh.close();
  }
}

/** Either reader, as `mode` says. */
export function readRegularFileAs(mode: ReadMode, file: string, maxBytes: number): Buffer | undefined | Promise<Buffer | undefined> {
  return mode === 'sync' ? readRegularFileSync(file, maxBytes) : readRegularFile(file, maxBytes);
}

function notAFile(err: unknown): undefined {
  if (NOT_A_FILE.has(errnoOf(err) ?? '')) return undefined;
  throw err;
}

function wanted(st: Stats, maxBytes: number): boolean {
  return st.isFile() && st.size <= maxBytes;
}
