/**
 * A small file of the cache directory (the `current` pointer, sources.json), read whole with
 * synchronous calls: the cache directory is never the mount, and as promises each read was four
 * or five thread-pool round trips, which cost a start more than the reads (see entry-load.ts).
 * Opened O_NONBLOCK and checked on the open descriptor, so that a FIFO or a device put in the
 * file's place is refused at once instead of hanging the thread that serves.
 */
import { closeSync, constants, fstatSync, openSync, readFileSync } from 'node:fs';

/** The file's bytes; undefined when it is there but is not a regular file. Throws what open(2) throws (ENOENT, ...). */
export function readRegularFileSync(file: string): Buffer | undefined {
  const fd = openSync(file, constants.O_RDONLY | constants.O_NONBLOCK);
  try {
    return fstatSync(fd).isFile() ? readFileSync(fd) : undefined;
  } finally {
    closeSync(fd);
  }
}
