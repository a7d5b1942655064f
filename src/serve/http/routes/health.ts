/**
 * Liveness and readiness. /healthz answers as long as the event loop does (and needs no token,
 * so a supervisor can probe it); /readyz is 200 only once the running kernel's entry is cached.
 */
import type { FastifyInstance } from 'fastify';
import { getAndHead, type RouteContext } from './context.js';

export async function healthRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  getAndHead(app, '/healthz', async (_req, reply) => {
    reply.header('cache-control', 'no-store');
    return { status: 'ok', startedAt: ctx.state.startedAt, uptimeSeconds: Math.round(process.uptime()) };
  });

  getAndHead(app, '/readyz', async (_req, reply) => {
    const { state } = ctx;
    reply.header('cache-control', 'no-store');
    if (state.ready) return { ready: true, current: state.currentId };
    const e = state.lastIngestError;
    const reason = e ? `ingest failed (${e.code}): ${e.message}` : "the running kernel's headers are not cached yet (ingest in progress)";
    return reply.code(503).send({ ready: false, reason, ...(e ? { error: e } : {}) });
  });
}
