/**
 * Loaded with `node --import` into a process under test: when the process exits, it writes its
 * peak resident set size (VmHWM, KiB) to stderr as `peak-rss-kib <n>`, so a test can bound the
 * memory a real CLI run took.
 */
import { readFileSync } from 'node:fs';

process.on('exit', () => {
  const status = readFileSync('/proc/self/status', 'utf8');
  const hwm = /^VmHWM:\s+(\d+) kB$/m.exec(status)?.[1];
  process.stderr.write(`\npeak-rss-kib ${hwm ?? 'unknown'}\n`);
});
