/**
 * The HTTP server of `kheadersd serve --http HOST:PORT`: the cached header trees and archives
 * for hosts and fleets (see the README's HTTP section for the API).
 *
 * fastify is imported inside startHttpServer, so only `serve` pays for loading it. The routes
 * are small plugins (health, metrics, kernels, blobs); the hooks that must see every request
 * (token, metrics, security headers) are registered at the root.
 */
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import http, { type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { isIP } from 'node:net';
import { KheadersError, errnoOf, httpAnswer } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { CacheStore } from '../../store/cache.js';
import type { ModuleHeaderSource } from '../../store/module-btf.js';
import type { DaemonState } from '../state.js';
import { bearerChecker } from './auth.js';
import { capConnectionsPerClient } from './client-cap.js';
import { Catalog } from './catalog.js';
import { createFastPath, type FastPath } from './fast-path.js';
import { DEFAULT_HTTP_LIMITS, type HttpLimits } from './limits.js';
import { HttpMetrics } from './metrics.js';
import { PathError, parseRequestPath } from './paths.js';
import { BUFFER_MAX_BYTES, sendError } from './respond.js';
import { blobRoutes } from './routes/blobs.js';
import { debuginfodRoutes } from './routes/debuginfod.js';
import type { RouteContext } from './routes/context.js';
import { healthRoutes } from './routes/health.js';
import { kernelRoutes } from './routes/kernels.js';
import { metricsRoutes } from './routes/metrics.js';
import './types.js';

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
  /** Answer small-file GETs below fastify (fast-path.ts); default on. Off only to compare or test. */
  fastPath?: boolean;
  /** Serve the loaded modules' headers under the running kernel's entry (`files/btf/`). */
  modules?: ModuleHeaderSource;
  /** The running kernel's BTF, for debuginfod's /buildid/<id>/section/.BTF (default /sys/kernel/btf/vmlinux). */
  liveBtf?: string;
}

export interface HttpServerHandle {
  /** e.g. http://127.0.0.1:7711 (the real port when 0 was asked for). */
  url: string;
  port: number;
  /** Graceful: stops accepting, lets in-flight responses finish (up to shutdownGraceMs), closes files. */
  close(): Promise<void>;
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
  const { default: fastify, LogController } = await import('fastify');

  const catalog = new Catalog(opts.store, opts.state, log, {
    bodyCacheBytes: limits.bodyCacheBytes,
    bodyCacheItemBytes: BUFFER_MAX_BYTES,
    gzipCacheBytes: limits.gzipCacheBytes,
  });
  const metrics = new HttpMetrics();
  const ctx: RouteContext = { catalog, metrics, state: opts.state, ...(opts.modules ? { modules: opts.modules } : {}) };
  const authorised = opts.token !== undefined ? bearerChecker(opts.token) : undefined;
  let closing = false;
  const fast: FastPath | undefined = opts.fastPath === false ? undefined : createFastPath({ catalog, metrics, log, authorised, closing: () => closing });

  // Our own node server, so the fast path sees requests before fastify does; with a
  // serverFactory fastify leaves the timeouts to us, so they are all set here.
  const serverFactory = (handler: (req: IncomingMessage, res: ServerResponse) => void): Server => {
    const server = http.createServer(
      {
        maxHeaderSize: limits.maxHeaderBytes,
        headersTimeout: limits.headersTimeoutMs,
        requestTimeout: Math.max(limits.requestTimeoutMs, limits.headersTimeoutMs),
        connectionsCheckingInterval: limits.timeoutCheckIntervalMs,
      },
      (req, res) => {
        if (!fast?.(req, res)) handler(req, res);
      },
    );
    server.keepAliveTimeout = limits.keepAliveTimeoutMs;
    server.setTimeout(limits.idleTimeoutMs);
    server.maxConnections = limits.maxConnections;
    capConnectionsPerClient(server, limits.maxConnectionsPerClient, log);
    return server;
  };

  const app = fastify({
    loggerInstance: log,
    // Access logs per request would cost more than the request; errors are still logged.
    logController: new LogController({ disableRequestLogging: true }),
    serverFactory,
    forceCloseConnections: 'idle',
    return503OnClosing: true,
    bodyLimit: 1024, // every route is GET/HEAD: no request has a body worth reading
    exposeHeadRoutes: false, // routes declare HEAD themselves (see getAndHead)
    routerOptions: { maxParamLength: 512 },
    // The router refuses some URLs (invalid UTF-8 escapes) before any route: answer those with
    // our own error shape and reason, from the same parser the routes use.
    frameworkErrors: (err, req, reply) => {
      let message = err.message;
      try {
        parseRequestPath(req.raw.url ?? '/');
      } catch (pathErr) {
        if (pathErr instanceof PathError) message = pathErr.message;
      }
      sendError(reply, 'E_BAD_PATH', message);
    },
  }) as unknown as FastifyInstance;

  app.decorateRequest('bytesOut', 0);

  app.addHook('onRequest', async (req: FastifyRequest, reply: FastifyReply) => {
    reply.header('x-content-type-options', 'nosniff');
    if (authorised && req.routeOptions.url !== '/healthz' && !authorised(req.headers.authorization)) {
      reply.header('www-authenticate', 'Bearer realm="kheadersd"');
      return sendError(reply, 'E_UNAUTHORIZED', 'this daemon requires `Authorization: Bearer <token>` (the token in its --token-file)');
    }
    return undefined;
  });

  app.addHook('onResponse', async (req: FastifyRequest, reply: FastifyReply) => {
    let bytes = req.bytesOut;
    if (bytes === 0 && req.method !== 'HEAD' && reply.statusCode !== 304) bytes = Number(reply.getHeader('content-length') ?? 0) || 0;
    metrics.observe(req.routeOptions.url ?? 'unmatched', reply.statusCode, reply.elapsedTime / 1000, bytes);
  });

  app.setNotFoundHandler((_req, reply) => sendError(reply, 'E_NOT_FOUND', 'no such route (see /v1/kernels)'));

  app.setErrorHandler((err: FastifyError | KheadersError, req, reply) => {
    // fastify's own rejections of a malformed request keep their status (413, 415, ...).
    if (!(err instanceof KheadersError) && typeof err.statusCode === 'number' && err.statusCode >= 400 && err.statusCode < 500) {
      return sendError(reply, 'E_BAD_REQUEST', err.message, err.statusCode);
    }
    // The error table decides the status and whether the message may be sent; a damaged
    // entry's bytes are never sent, its answer names the entry and the file instead.
    const answer = httpAnswer(err);
    if (answer.status >= 500) req.log.error({ err, url: req.raw.url }, 'request failed');
    return sendError(reply, answer.error.code, answer.error.message, answer.status);
  });

  await app.register(healthRoutes, ctx);
  await app.register(metricsRoutes, ctx);
  await app.register(kernelRoutes, ctx);
  await app.register(blobRoutes, ctx);
  await app.register(debuginfodRoutes, { ...ctx, ...(opts.liveBtf !== undefined ? { liveBtf: opts.liveBtf } : {}) });

  const { host, port } = opts.listen;
  try {
    await app.listen({ host, port });
  } catch (err) {
    await app.close().catch(() => {});
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
  const address = app.server.address();
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
    close: () => {
      closing = true;
      closingPromise ??= (async () => {
        const deadline = setTimeout(() => {
          log.warn({ graceMs: limits.shutdownGraceMs }, 'in-flight HTTP responses did not finish in time: cutting them');
          app.server.closeAllConnections();
        }, limits.shutdownGraceMs);
        deadline.unref();
        try {
          await app.close();
        } finally {
          clearTimeout(deadline);
          await catalog.close();
        }
        log.info('HTTP closed');
      })();
      return closingPromise;
    },
  };
}
