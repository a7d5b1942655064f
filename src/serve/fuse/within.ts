/**
 * The deadline both FUSE backends put on the kernel starting a session: without one, a mount
 * that never gets its INIT would hang `serve` at start.
 */

/** `p`, or a rejection saying `what` did not happen within `ms` (the timer never outlives it). */
export async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
