/**
 * A cap on the connections one client may hold open at once. server.maxConnections alone lets a
 * single slow client (a slowloris that reconnects whenever it is closed) take every slot, and
 * then every other client is turned away. With the cap, one address holds at most `max`; the
 * rest of the slots stay free for everyone else.
 *
 * A client is its address; IPv6 clients are grouped by their /64, since one host is usually
 * given a whole /64 and could otherwise open each connection from a new address.
 * Over `adb forward` every request from the host arrives from 127.0.0.1 on the device: the cap
 * is also the host's parallelism, so its default leaves room for parallel downloads.
 */
import { isIP, type Server, type Socket } from 'node:net';
import type { Logger } from '../../log.js';

/** The key connections are counted under: an IPv4 address (also when IPv4-mapped) or an IPv6 /64. */
export function clientKey(address: string): string {
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(address);
  if (mapped) return mapped[1]!;
  if (isIP(address) !== 6) return address;
  const bare = address.split('%')[0]!; // a link-local zone (fe80::1%eth0) names the same host
  const [head = '', tail] = bare.split('::');
  const left = head === '' ? [] : head.split(':');
  const right = tail === undefined || tail === '' ? [] : tail.split(':');
  const groups = tail === undefined ? left : [...left, ...Array<string>(8 - left.length - right.length).fill('0'), ...right];
  return `${groups.slice(0, 4).map((g) => parseInt(g, 16).toString(16)).join(':')}::/64`;
}

/** Close, as soon as it is accepted, any connection past `max` open from the same client. 0: no cap. */
export function capConnectionsPerClient(server: Server, max: number, log: Logger): void {
  if (max <= 0) return;
  const open = new Map<string, number>();
  /** Clients told about in the log since they last had no connection (one line per episode, not per refusal). */
  const reported = new Set<string>();
  server.on('connection', (socket: Socket) => {
    const address = socket.remoteAddress;
    if (address === undefined) return; // already gone
    const key = clientKey(address);
    const count = open.get(key) ?? 0;
    if (count >= max) {
      socket.destroy();
      if (!reported.has(key)) {
        reported.add(key);
        log.warn({ client: key, max }, `HTTP client ${key} holds ${max} connections (the per-client cap): refusing more from it until it closes some`);
      }
      return;
    }
    open.set(key, count + 1);
    socket.once('close', () => {
      const left = (open.get(key) ?? 1) - 1;
      if (left > 0) {
        open.set(key, left);
      } else {
        open.delete(key);
        reported.delete(key);
      }
    });
  });
}
