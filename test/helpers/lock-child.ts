/**
 * A process that takes the cache lock ROUNDS times and, holding it, does a slow read-modify-write
 * of a counter file: if two processes ever hold the lock at once, increments are lost.
 *
 *   node dist/test/helpers/lock-child.js LOCK_PATH COUNTER_FILE ROUNDS
 */
import { readFile, writeFile } from 'node:fs/promises';
import { withLock } from '../../src/store/lock.js';

const [lockPath, counter, rounds = '20'] = process.argv.slice(2);
if (!lockPath || !counter) {
  process.stderr.write('usage: lock-child LOCK_PATH COUNTER_FILE [ROUNDS]\n');
  process.exit(2);
}
for (let i = 0; i < Number(rounds); i++) {
  await withLock(lockPath, { timeoutMs: 60_000, pollMs: 1 }, async () => {
    const n = Number(await readFile(counter, 'utf8'));
    await new Promise((r) => setImmediate(r));
    await writeFile(counter, `${n + 1}\n`);
  });
}
