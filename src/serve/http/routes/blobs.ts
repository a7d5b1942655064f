/**
 * /v1/blobs/{sha256}: the same files and archive, addressed by the archive's digest. The bytes
 * behind such a URL can never change, so they are `immutable` for a year: any standard HTTP
 * cache in front of many devices can answer them without asking a device again.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { isDigest } from '../../../store/cache.js';
import { endsWithSlash } from '../paths.js';
import { sendError } from '../respond.js';
import { IMMUTABLE, serveArchive, serveTreePath } from '../tree.js';
import { getAndHead, type RouteContext } from './context.js';
import { segmentsAfter } from './kernels.js';

const PREFIX = ['v1', 'blobs'];

export async function blobRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  const { catalog } = ctx;

  const lookup = async (reply: FastifyReply, digest: string) => {
    if (!isDigest(digest)) {
      sendError(reply, 'E_NOT_FOUND', 'a blob is named by the 64 lowercase hex digits of its archive sha256');
      return undefined;
    }
    const served = await catalog.byDigest(digest);
    if (!served) sendError(reply, 'E_NOT_FOUND', `no cached entry has archive sha256 ${digest}`);
    return served;
  };

  getAndHead(app, '/v1/blobs/:digest/archive.tar.xz', async (req, reply) => {
    const rest = segmentsAfter(req, reply, PREFIX);
    if (!Array.isArray(rest)) return rest;
    if (rest.length !== 2 || rest[1] !== 'archive.tar.xz') return sendError(reply, 'E_NOT_FOUND', 'no such route');
    const served = await lookup(reply, rest[0]!);
    if (!served) return reply;
    return serveArchive(catalog, req, reply, served, IMMUTABLE);
  });

  const files = async (req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> => {
    const rest = segmentsAfter(req, reply, PREFIX);
    if (!Array.isArray(rest)) return rest;
    if (rest[1] !== 'files') return sendError(reply, 'E_NOT_FOUND', 'no such route');
    const served = await lookup(reply, rest[0]!);
    if (!served) return reply;
    return serveTreePath(catalog, req, reply, { served, segments: rest.slice(2), base: `/v1/blobs/${served.manifest.digest}`, cacheControl: IMMUTABLE, trailingSlash: endsWithSlash(req.raw.url) });
  };
  getAndHead(app, '/v1/blobs/:digest/files', files);
  getAndHead(app, '/v1/blobs/:digest/files/*', files);
}
