/**
 * `kheadersd serve` as a child process, as a user runs it: its JSON log lines collected, waited
 * on by predicate, and a SIGTERM (then SIGKILL) when the test ends, so a failed test never leaves
 * a daemon or a mount behind.
 */
import { execFile, spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import type { TestContext } from 'node:test';
import { CLI, cleanEnv } from './archives.js';

export interface Daemon {
  child: ChildProcessWithoutNullStreams;
  logs: Array<Record<string, unknown>>;
  waitFor(pred: (line: Record<string, unknown>) => boolean, what: string, timeoutMs?: number): Promise<Record<string, unknown>>;
  exited: Promise<number | null>;
  /**
   * SIGTERM (then SIGKILL after 10 s) if still running. For a test's `finally`: its `t.after`
   * hooks run in the order they were added and stop at the first that fails, so the temp dir's
   * removal (added first, and failing on a live mount) would keep this one from ever running.
   */
  stop(): Promise<void>;
}

/** Unmount `mountpoint` if a killed daemon left it mounted (lazily: a test may still hold a file there). */
export async function unmountIfLeft(mountpoint: string): Promise<void> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
  if (!mountinfo.includes(` ${mountpoint} `)) return;
  await new Promise<void>((resolve) => execFile('umount', ['-l', mountpoint], () => resolve()));
}

/** `node`: the node binary to run it with (a test may remove it later: the daemon then cannot start node again). */
export function startServe(t: TestContext, args: string[], env: Record<string, string> = {}, node = process.execPath): Daemon {
  return startDaemonProcess(t, node, [CLI, 'serve', ...args], env);
}

/** A daemon started as `node ...argv` (startServe's, or a test's own script that runs serve's start). */
export function startDaemonProcess(t: TestContext, node: string, argv: string[], env: Record<string, string> = {}): Daemon {
  const child = spawn(node, argv, { stdio: ['pipe', 'pipe', 'pipe'], env: cleanEnv(env) });
  const logs: Array<Record<string, unknown>> = [];
  const waiters = new Set<() => void>();
  let buffered = '';
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (s: string) => {
    buffered += s;
    let nl;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      try {
        logs.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        logs.push({ msg: line });
      }
      for (const w of waiters) w();
    }
  });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => (stderr += s));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  const stop = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
      if (child.exitCode === null) child.kill('SIGKILL');
      await exited;
    }
  };
  t.after(stop);
  return {
    child,
    logs,
    exited,
    stop,
    waitFor(pred, what, timeoutMs = 60_000) {
      return new Promise((resolve, reject) => {
        const check = (): void => {
          const hit = logs.find(pred);
          if (hit) {
            waiters.delete(check);
            clearTimeout(timer);
            resolve(hit);
          }
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`timed out waiting for ${what}; stderr: ${stderr}; logs: ${JSON.stringify(logs.slice(-5))}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
  };
}

/**
 * Wait until the daemon has repaired what its start found damaged and serves the result: serve
 * answers for `current` first, and checks and repairs the other entries after.
 */
export async function repairedAndServed(d: Daemon): Promise<void> {
  const repaired = (l: Record<string, unknown>): boolean => /^cache repaired/.test(String(l.msg));
  await d.waitFor(repaired, 'the repair of the damaged entries');
  await d.waitFor((l) => l.msg === 'serving' && d.logs.indexOf(l) > d.logs.findIndex(repaired), 'the repaired entries served');
}

/** The daemon's exit status, or 'still running' after `boundMs`. */
export async function exitWithin(d: Daemon, boundMs: number): Promise<number | null | 'still running'> {
  let timer: NodeJS.Timeout | undefined;
  const bound = new Promise<'still running'>((resolve) => (timer = setTimeout(() => resolve('still running'), boundMs)));
  try {
    return await Promise.race([d.exited, bound]);
  } finally {
    clearTimeout(timer);
  }
}

export async function pollUntil<T>(fn: () => Promise<T | undefined>, what: string, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn().catch(() => undefined);
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * `serve` with `args` (and no mount, HTTP on a free loopback port, debug logs) until it listens,
 * then stopped; or until it exits. Its logs and exit status. Polled, not waitFor(): its timer
 * would keep the test alive after a start that fails.
 */
export async function serveOnce(t: TestContext, args: readonly string[]): Promise<{ d: Daemon; code: number | null }> {
  const d = startServe(t, [...args, '--mount', 'off', '--http', '127.0.0.1:0', '--log-level', 'debug']);
  const deadline = Date.now() + 120_000;
  while (d.child.exitCode === null && !d.logs.some((l) => l.msg === 'HTTP listening')) {
    if (Date.now() > deadline) throw new Error(`serve neither listened nor exited:\n${d.logs.map((l) => String(l.msg)).join('\n')}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  if (d.child.exitCode === null) d.child.kill('SIGTERM');
  return { d, code: await d.exited };
}
