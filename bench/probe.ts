/**
 * Probes the start-up benches share: a free loopback port to give a server, the status of one
 * GET (0 while nothing answers), to poll a starting server until it is ready, and its stop.
 */
import type { ChildProcess } from 'node:child_process';
import http from 'node:http';
import net from 'node:net';

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
    srv.on('error', reject);
  });
}

/** The status of a GET of `url`; 0 when it fails or takes over 2 s. */
export function statusOf(url: string): Promise<number> {
  return new Promise((resolve) => {
    const req = http.get(url, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', () => resolve(0));
    req.setTimeout(2000, () => req.destroy());
  });
}

/** SIGTERM `child` and wait for it to close; SIGKILL it if it has not after `killAfterMs`. */
export async function stopChild(child: ChildProcess, killAfterMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const closed = new Promise((r) => child.once('close', r));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), killAfterMs);
  await closed;
  clearTimeout(timer);
}
