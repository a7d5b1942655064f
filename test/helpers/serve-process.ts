/**
 * `kheadersd serve` as a child process, for tests of what its configuration does: it either
 * gets as far as listening on HTTP (its URL is returned, and it is stopped when the test ends)
 * or exits first (its status and stderr are returned).
 */
import { spawn } from 'node:child_process';
import type { TestContext } from 'node:test';
import { CLI, cleanEnv } from './archives.js';

export type Served = { listening: true; url: string; logs: string } | { listening: false; code: number | null; stderr: string; logs: string };

export function serveUntilListening(t: TestContext, args: readonly string[], deadlineMs = 120_000): Promise<Served> {
  const child = spawn(process.execPath, [CLI, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: cleanEnv() });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let logs = '';
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve neither listened nor exited; logs:\n${logs}\nstderr:\n${stderr}`)), deadlineMs);
    child.stdout.setEncoding('utf8').on('data', (s: string) => {
      logs += s;
      for (const line of logs.split('\n').slice(0, -1)) {
        if (!line.startsWith('{')) continue;
        const entry = JSON.parse(line) as { msg?: unknown; url?: unknown };
        if (entry.msg === 'HTTP listening' && typeof entry.url === 'string') {
          clearTimeout(timer);
          resolve({ listening: true, url: entry.url, logs });
        }
      }
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ listening: false, code, stderr, logs });
    });
  });
}
