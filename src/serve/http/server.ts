/**
 * The HTTP server of `kheadersd serve --http HOST:PORT`: the cached header trees and archives
 * for hosts and fleets (see the README's HTTP section for the API).
 *
 * A node:http server of our own listens from the start and answers what it can itself
 * (fast-path.ts: health, readiness, metrics, entry metadata, small files). fastify, with every
 * route, is loaded only for the first request the fast path declines (lazy-app.ts), and is handed
 * that request and every one after that the fast path declines. Timeouts, limits and the
 * per-client cap are the server's, so they hold whichever answers.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import { isIP } from 'node:net';
import { KheadersError, errnoOf } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { CacheStore } from '../../store/cache.js';
import type { ModuleHeaderSource } from '../../store/module-btf.js';
import type { DaemonState } from '../state.js';
import { bearerChecker } from './auth.js';
import { capConnectionsPerClient } from './client-cap.js';
import { Catalog } from './catalog.js';
import { createFastPath, type FastPath } from './fast-path.js';
import { LazyApp, type FastifyState } from './lazy-app.js';
import { DEFAULT_HTTP_LIMITS, type HttpLimits } from './limits.js';
import { HttpMetrics } from './metrics.js';
import { answerClientError, serviceUnavailable } from './raw-reply.js';
import { BUFFER_MAX_BYTES } from './respond.js';
import type { RouteContext } from './routes/context.js';

export { readTokenFile } from '../../token.js';
export { DEFAULT_HTTP_LIMITS, type HttpLimits } from './limits.js';

export interface HttpServerOptions {
  listen: { host: string; port: number };
  store: CacheStore;
  state: DaemonState;
  log: Logger;
  /** When set, every route but /healthz needs `Authorization: Bearer <token>`. */
  token?: string;
  limits?: Partial<HttpLimits>;
  /** Answer what fast-path.ts can without fastify; default on. Off only to compare or test (fastify then answers everything). */
  fastPath?: boolean;
  /** Serve the loaded modules' headers under the running kernel's entry (`files/btf/`). */
  modules?: ModuleHeaderSource;
  /** The running kernel's BTF, for debuginfod's /buildid/<id>/section/.BTF (default /sys/kernel/btf/vmlinux). */
  liveBtf?: string;
  /** Awaited before fastify is loaded: tests hold the load open to have requests queue behind it. */
  beforeFastify?: () => Promise<void>;
}

export interface HttpServerHandle {
  /** e.g. http://127.0.0.1:7711 (the real port when 0 was asked for). */
  url: string;
  port: number;
  /** Graceful: stops accepting, lets in-flight responses finish (up to shutdownGraceMs), closes files. */
  close(): Promise<void>;
  /** fastify is loaded on the first request the fast path declines: for tests. */
  readonly fastify: FastifyState;
}

/** Whether `host` only accepts connections from this machine. */
export function isLoopbackHost(host: string): boolean {
  if (host === 'localhost' || host === 'ip6-localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  if (isIP(host) === 6) return host === '::1' || /^::ffff:127\./i.test(host);
  return false;
}

/** The loud warning for a listener other machines can reach without a token; undefined when safe. */
export function exposureWarning(host: string, url: string, hasToken: boolean): string | undefined {
  if (hasToken || isLoopbackHost(host)) return undefined;
  return (
    `HTTP is listening on ${url}, reachable from other machines, WITHOUT a token: anyone who can reach it can read the cached ` +
    `kernel headers and this daemon's metrics. Pass --token-file, or bind 127.0.0.1 and use \`adb forward\` / an SSH tunnel.`
  );
}

function formatUrl(host: string, port: number): string {
  return `http://${isIP(host) === 6 ? `[${host}]` : host}:${port}`;
}

export async function startHttpServer(opts: HttpServerOptions): Promise<HttpServerHandle> {
  const limits: HttpLimits = { ...DEFAULT_HTTP_LIMITS, ...opts.limits };
  const log = opts.log.child({ component: 'http' });

  const catalog = new Catalog(opts.store, opts.state, log, {
    bodyCacheBytes: limits.bodyCacheBytes,
    bodyCacheItemBytes: BUFFER_MAX_BYTES,
    gzipCacheBytes: limits.gzipCacheBytes,
  });
  const metrics = new HttpMetrics();
  const ctx: RouteContext = { catalog, metrics, state: opts.state, ...(opts.modules ? { modules: opts.modules } : {}) };
  const authorised = opts.token !== undefined ? bearerChecker(opts.token) : undefined;
  let closing = false;
  const fast: FastPath | undefined =
    opts.fastPath === false ? undefined : createFastPath({ catalog, metrics, state: opts.state, log, authorised, ...(opts.modules ? { modules: opts.modules } : {}) });

  const server = http.createServer(
    {
      maxHeaderSize: limits.maxHeaderBytes,
      headersTimeout: limits.headersTimeoutMs,
      requestTimeout: Math.max(limits.requestTimeoutMs, limits.headersTimeoutMs),
      connectionsCheckingInterval: limits.timeoutCheckIntervalMs,
    },
    (req, res) => onRequest(req, res),
  );
  server.keepAliveTimeout = limits.keepAliveTimeoutMs;
  // The idle timeout is armed per response, only while one is in flight (watchInFlight), not
  // with server.setTimeout: node re-arms that one on every request of a keep-alive connection
  // (a timer object and a bound function each time) and refreshes it on every write. Between
  // requests the keep-alive timeout holds, before the first request's headers the headers
  // timeout: the idle timeout only ever mattered while a response was in flight.
  server.maxConnections = limits.maxConnections;
  server.on('clientError', answerClientError);
  capConnectionsPerClient(server, limits.maxConnectionsPerClient, log);

  const app = new LazyApp(async () => {
    await opts.beforeFastify?.();
    const { buildApp } = await import('./fastify-app.js');
    return buildApp({ server, log, ctx, authorised, ...(opts.liveBtf !== undefined ? { liveBtf: opts.liveBtf } : {}) });
  }, log);

  /**
   * A response still in flight when the request handler returns (the kernel has not taken all of
   * it, or it is still being made): its connection is closed after idleTimeoutMs without
   * activity. Node replaces this timer with the keep-alive one once the response is done.
   */
  const watchInFlight = (req: IncomingMessage, res: ServerResponse): void => {
    if (!res.writableFinished) req.socket.setTimeout(limits.idleTimeoutMs);
  };

  function onRequest(req: IncomingMessage, res: ServerResponse): void {
    if (closing) {
      serviceUnavailable(res);
      return watchInFlight(req, res);
    }
    let answered: boolean | Promise<boolean> = false;
    try {
      answered = fast ? fast(req, res) : false;
    } catch (err) {
      // A bug in the fast path must not take the daemon down: fastify answers (or says 500).
      log.error({ err, url: req.url }, 'fast path failed');
      if (res.headersSent) return void res.destroy();
    }
    // Answered at once (nearly always): the kernel has usually taken the whole response already.
    if (answered === true) return watchInFlight(req, res);
    watchInFlight(req, res);
    if (answered === false) return app.handle(req, res);
    answered.then(
      (done) => done || app.handle(req, res),
      (err: unknown) => {
        log.error({ err, url: req.url }, 'fast path failed');
        if (res.headersSent) res.destroy();
        else app.handle(req, res);
      },
    );
  }

  const { host, port } = opts.listen;
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port }, () => {
        server.off('error', reject);
        resolve();
      });
    });
  } catch (err) {
    await catalog.close();
    const code = errnoOf(err);
    const why =
      code === 'EADDRINUSE'
        ? 'the address is already in use (another kheadersd?)'
        : code === 'EACCES'
          ? 'permission denied (ports below 1024 need privileges)'
          : code === 'EADDRNOTAVAIL' || code === 'ENOTFOUND'
            ? 'no such local address'
            : (code ?? String(err));
    throw new KheadersError('E_HTTP', `cannot listen on ${formatUrl(host, port)}: ${why}`, { host, port }, { cause: err });
  }
  const address = server.address();
  const realPort = typeof address === 'object' && address !== null ? address.port : port;
  const url = formatUrl(host, realPort);

  const warning = exposureWarning(host, url, opts.token !== undefined);
  if (warning) log.warn({ host, port: realPort }, warning);
  log.info({ url, token: opts.token !== undefined }, 'HTTP listening');
  // Warm the catalog (manifests, and the current entry's index) so the first request does not
  // pay for reading them.
  void catalog.byRef('current').catch((err: unknown) => log.warn({ err }, 'cannot read the cache'));

  let closingPromise: Promise<void> | null = null;
  return {
    url,
    port: realPort,
    get fastify() {
      return app.state;
    },
    close: () => {
      closing = true;
      closingPromise ??= (async () => {
        // No new connections; idle keep-alive ones are cut now, busy ones once their response
        // is done (checked often: node only closes idle connections when asked).
        const drained = new Promise<void>((resolve) => server.close(() => resolve()));
        server.closeIdleConnections();
        const reaper = setInterval(() => server.closeIdleConnections(), 50);
        const deadline = setTimeout(() => {
          log.warn({ graceMs: limits.shutdownGraceMs }, 'in-flight HTTP responses did not finish in time: cutting them');
          server.closeAllConnections();
        }, limits.shutdownGraceMs);
        deadline.unref();
        try {
          await app.close();
          await drained;
        } finally {
          clearInterval(reaper);
          clearTimeout(deadline);
          await catalog.close();
        }
        log.info('HTTP closed');
      })();
      return closingPromise;
    },
  };
}
