/**
 * The HTTP server's limits and their defaults, apart from the server so that the configuration
 * can take its defaults from here without loading the server.
 */

export interface HttpLimits {
  /** Request line + headers (Node's maxHeaderSize). */
  maxHeaderBytes: number;
  /** Time to receive the request headers, from the connection or the previous response (slowloris guard); answered 408. */
  headersTimeoutMs: number;
  /** Time to receive the whole request (at least headersTimeoutMs). */
  requestTimeoutMs: number;
  /**
   * How often the two timeouts above are checked. Node's default (30 s) let a 10 s header
   * timeout hold a slow connection for up to 40 s.
   */
  timeoutCheckIntervalMs: number;
  /** An idle keep-alive connection is closed after this. */
  keepAliveTimeoutMs: number;
  /** A response in flight with no activity on its connection (a stalled download, an answer that does not come) is cut after this. */
  idleTimeoutMs: number;
  /** Connections beyond this are closed as soon as they are accepted (server.maxConnections). */
  maxConnections: number;
  /** Connections one client (address; IPv6: /64) may hold open; beyond, closed as soon as accepted. 0: no cap. */
  maxConnectionsPerClient: number;
  /** close(): how long in-flight responses may take before their connections are cut. */
  shutdownGraceMs: number;
  /** Hot file bodies kept in memory (see bytes.ts: a pread per request halves throughput); 0 = off. */
  bodyCacheBytes: number;
  /** gzip-compressed bodies kept in memory (compressing is the CPU cost of a gzip response). */
  gzipCacheBytes: number;
}

export const DEFAULT_HTTP_LIMITS: HttpLimits = {
  maxHeaderBytes: 16 * 1024,
  headersTimeoutMs: 5_000,
  requestTimeoutMs: 10_000,
  timeoutCheckIntervalMs: 1_000,
  keepAliveTimeoutMs: 5_000,
  idleTimeoutMs: 30_000,
  maxConnections: 512,
  // Above what a host pulling over `adb forward` (every connection from 127.0.0.1), the HTTP
  // bench (wrk -c32) or a fleet cache (100 at once in the tests) opens; one client still cannot
  // take more than a quarter of the slots.
  maxConnectionsPerClient: 128,
  // Within a service manager's stop (the daemon must be gone well before its SIGKILL): a stalled
  // client's response is cut after this; answers that can finish do so in far less.
  shutdownGraceMs: 3_000,
  bodyCacheBytes: 16 * 1024 * 1024, // half a kernel's headers; a BPF compile reads a few MiB of them
  gzipCacheBytes: 8 * 1024 * 1024,
};
