/**
 * The full router: every route as a fastify plugin (health, metrics, kernels, blobs,
 * debuginfod), with the hooks that must see every request (token, metrics, security header) at
 * the root.
 *
 * This module is imported only when the fast path (fast-path.ts) first declines a request (see
 * lazy-app.ts): fastify costs ~8 MiB of heap and ~200 ms of CPU to load, which a daemon serving
 * only headers and health checks never needs to pay. fastify never listens: it is given our
 * server through serverFactory and answers the requests we hand to its handler.
 */
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import { KheadersError, httpAnswer } from '../../errors.js';
import type { Logger } from '../../log.js';
import { PathError, parseRequestPath } from './paths.js';
import { sendError } from './respond.js';
import { blobRoutes } from './routes/blobs.js';
import type { RouteContext } from './routes/context.js';
import { debuginfodRoutes } from './routes/debuginfod.js';
import { healthRoutes } from './routes/health.js';
import { kernelRoutes } from './routes/kernels.js';
import { metricsRoutes } from './routes/metrics.js';
import './types.js';

export interface AppOptions {
  /** Our server (already listening): fastify is told it is its own, and never listens on it. */
  server: Server;
  log: Logger;
  ctx: RouteContext;
  /** The token check, when a token is configured. */
  authorised: ((authorization: string | undefined) => boolean) | undefined;
  /** The running kernel's BTF, for debuginfod's /buildid/<id>/section/.BTF. */
  liveBtf?: string;
}

export interface App {
  /** fastify's request handler (routing, hooks, replies). */
  handler: (req: IncomingMessage, res: ServerResponse) => void;
  /** Runs fastify's onClose hooks; the server itself is closed by its owner. */
  close(): Promise<void>;
}

export async function buildApp(opts: AppOptions): Promise<App> {
  const { log, ctx, authorised } = opts;
  const { metrics } = ctx;
  const { default: fastify, LogController } = await import('fastify');
  let handler: App['handler'] | undefined;

  const app = fastify({
    loggerInstance: log,
    // Access logs per request would cost more than the request; errors are still logged.
    logController: new LogController({ disableRequestLogging: true }),
    serverFactory: (h) => {
      handler = h;
      return opts.server;
    },
    // Malformed requests (408, 431, 400) are answered by the server's own handler, which is
    // there before fastify is (server.ts); fastify's would find the socket already gone.
    clientErrorHandler: () => {},
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
  await app.ready();
  if (!handler) throw new KheadersError('E_INTERNAL', 'fastify did not ask for a server');
  return { handler, close: () => app.close() };
}
