/** GET /metrics: Prometheus text exposition (guarded by the token like everything but /healthz). */
import type { FastifyInstance } from 'fastify';
import { getAndHead, type RouteContext } from './context.js';

export async function metricsRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  getAndHead(app, '/metrics', async (_req, reply) => {
    const snap = await ctx.catalog.snapshot();
    const quarantine = await ctx.catalog.quarantined().catch(() => []);
    reply.header('cache-control', 'no-store');
    reply.type('text/plain; version=0.0.4; charset=utf-8');
    return ctx.metrics.render(snap.manifests, ctx.state, ctx.catalog.bytes.cachedBytes, quarantine.length);
  });
}
