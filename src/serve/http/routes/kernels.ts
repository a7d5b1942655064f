/**
 * /v1/kernels: entries named by release (or `current`). Responses are revalidated (`no-cache` +
 * ETag): what a release name points at can change (a re-ingest, a kernel swap for `current`).
 *
 * The router picks the handler; the path itself is always re-parsed from the raw URL by
 * parseRequestPath (see paths.ts), never taken from the router's decoded parameters.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { summarise } from '../../../store/summary.js';
import { endsWithSlash, parseRequestPath, PathError } from '../paths.js';
import { sendError } from '../respond.js';
import { isModuleHeaderPath, serveModuleHeaders } from '../module-headers.js';
import { REVALIDATE, serveArchive, serveTreePath } from '../tree.js';
import { getAndHead, type RouteContext } from './context.js';

const PREFIX = ['v1', 'kernels'];

/** The decoded segments after /v1/kernels, or an error reply. */
export function segmentsAfter(req: FastifyRequest, reply: FastifyReply, prefix: readonly string[]): string[] | FastifyReply {
  let segments: string[];
  try {
    segments = parseRequestPath(req.raw.url ?? '/').segments;
  } catch (err) {
    if (err instanceof PathError) return sendError(reply, 'E_BAD_PATH', err.message);
    throw err;
  }
  for (let i = 0; i < prefix.length; i++) {
    if (segments[i] !== prefix[i]) return sendError(reply, 'E_NOT_FOUND', 'no such route');
  }
  return segments.slice(prefix.length);
}

export async function kernelRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  const { catalog } = ctx;

  const notCached = (reply: FastifyReply, ref: string): FastifyReply =>
    sendError(reply, 'E_NOT_FOUND', ref === 'current' ? "the running kernel's entry is not cached yet" : `no cached entry for release ${JSON.stringify(ref)}`);

  getAndHead(app, '/v1/kernels', async (_req, reply) => {
    const snap = await catalog.snapshot();
    reply.header('cache-control', REVALIDATE);
    // The same array `kheadersd ls --json` prints.
    return snap.manifests.map((m) => summarise(m, snap.currentId, ctx.state.live));
  });

  getAndHead(app, '/v1/kernels/:ref', async (req, reply) => {
    const rest = segmentsAfter(req, reply, PREFIX);
    if (!Array.isArray(rest)) return rest;
    const served = rest.length === 1 ? await catalog.byRef(rest[0]!) : undefined;
    if (!served) return notCached(reply, rest[0] ?? '');
    const snap = await catalog.snapshot();
    reply.header('cache-control', REVALIDATE);
    return summarise(served.manifest, snap.currentId, ctx.state.live);
  });

  getAndHead(app, '/v1/kernels/:ref/archive.tar.xz', async (req, reply) => {
    const rest = segmentsAfter(req, reply, PREFIX);
    if (!Array.isArray(rest)) return rest;
    const served = rest[1] === 'archive.tar.xz' && rest.length === 2 ? await catalog.byRef(rest[0]!) : undefined;
    if (!served) return notCached(reply, rest[0] ?? '');
    return serveArchive(catalog, req, reply, served, REVALIDATE);
  });

  const files = async (req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> => {
    const rest = segmentsAfter(req, reply, PREFIX);
    if (!Array.isArray(rest)) return rest;
    if (rest[1] !== 'files') return sendError(reply, 'E_NOT_FOUND', 'no such route');
    const ref = rest[0]!;
    const served = await catalog.byRef(ref);
    if (!served) return notCached(reply, ref);
    const inside = rest.slice(2);
    if (ctx.modules && isModuleHeaderPath(served, ctx.state.runningId, inside)) return serveModuleHeaders(catalog, ctx.modules, req, reply, served, inside);
    return serveTreePath(catalog, req, reply, { served, segments: inside, base: `/v1/kernels/${encodeURIComponent(ref)}`, cacheControl: REVALIDATE, trailingSlash: endsWithSlash(req.raw.url) });
  };
  getAndHead(app, '/v1/kernels/:ref/files', files);
  getAndHead(app, '/v1/kernels/:ref/files/*', files);
}
