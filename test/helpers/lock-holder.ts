/**
 * A process that takes the cache lock and holds it until it is killed: another kheadersd's
 * writer, busy. Prints "held" once it holds it. Exits when its stdin closes (the test that
 * started it is gone), so a failed test never leaves it holding a lock.
 *
 *   node dist/test/helpers/lock-holder.js LOCK_PATH
 */
import { withLock } from '../../src/store/lock.js';

const [lockPath] = process.argv.slice(2);
if (!lockPath) {
  process.stderr.write('usage: lock-holder LOCK_PATH\n');
  process.exit(2);
}
process.stdin.on('end', () => process.exit(0)).resume();
await withLock(lockPath, { timeoutMs: 60_000 }, async () => {
  process.stdout.write('held\n');
  await new Promise(() => setInterval(() => {}, 60_000));
});
