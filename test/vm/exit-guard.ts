/**
 * A VM test file must end when its tests end. The runner runs one file at a time and waits for
 * each file's process to exit, and a process exits only once nothing holds its event loop: one
 * server, socket, child's pipe or timer that a failure path forgot (a poller of a forwarded port
 * that was never told to stop, in the case that made this) keeps it alive with no test left to
 * run, and every file after it never runs.
 *
 *   exitWhenDone(test('…', async (t) => { … }));
 *
 * Once the test has ended (its after hooks, which dispose of the VMs, included), the process has
 * `graceMs` to exit by itself. If it is still running then, it says what holds it and exits with
 * status 1: the file fails (the runner reports a non-zero exit as a failure) instead of hanging
 * the run, and the leak is named so it can be fixed. Any qemu still alive is killed on the way
 * out (vm.ts's killWithThisProcess hooks 'exit'). The timer is unref'd: a process that drains
 * exits at once, as it would without the guard.
 */
import { ChildProcess } from 'node:child_process';
import net from 'node:net';

/** Long enough for anything a test closes to finish closing; short against a run's budget. */
export const DEFAULT_DRAIN_MS = 30_000;

export function exitWhenDone(done: Promise<unknown>, graceMs = DEFAULT_DRAIN_MS): void {
  void done.finally(() => {
    const timer = setTimeout(() => {
      process.stderr.write(
        `${process.argv[1] ?? 'this test file'}: still running ${graceMs / 1000} s after its tests ended: something they opened was never closed.\n` +
          `  active: ${JSON.stringify(process.getActiveResourcesInfo())}\n` +
          activeHandles()
            .map((h) => `  - ${h}\n`)
            .join('') +
          '  exiting with status 1 so that the run goes on\n',
      );
      process.exit(1);
    }, graceMs);
    timer.unref();
  });
}

/** What holds the loop, in words: servers by address, sockets by peer, children by command. */
export function activeHandles(): string[] {
  const own = new Set<unknown>([process.stdin, process.stdout, process.stderr]);
  const handles = (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles();
  return handles.filter((h) => !own.has(h)).map(describeHandle);
}

function describeHandle(h: unknown): string {
  if (h instanceof net.Server) {
    const a = h.address();
    return `a listening server (${a === null ? 'no address' : typeof a === 'string' ? a : `${a.address}:${a.port}`})`;
  }
  if (h instanceof net.Socket) {
    const peer = h.remoteAddress !== undefined ? `${h.remoteAddress}:${h.remotePort ?? ''}` : 'a pipe or unix socket';
    return `a socket to ${peer}`;
  }
  if (h instanceof ChildProcess) return `child process ${h.pid ?? '?'}: ${h.spawnargs.join(' ').slice(0, 200)}`;
  const name = (h as { constructor?: { name?: string } } | null)?.constructor?.name;
  return name ?? typeof h;
}
