/**
 * The hot path, below fastify: GET/HEAD of one small file of a tree, answered straight on
 * node's request/response.
 *
 * Why: a BPF compile or a fleet cache asks for hundreds of small headers, and for those the
 * framework is most of the cost: on this project's 2-core box a minimal fastify route served
 * ~9.7k req/s where bare node:http served ~12.5k, and the bench (BENCHMARKS.md, "http") puts
 * bare node:http itself at ~0.6 of nginx. Answering synchronously when the body is in memory
 * matters too (a response written from a later microtask cost ~10 µs more CPU per request).
 *
 * It decides nothing on its own. The path goes through the same parser (paths.ts), the entry is
 * the catalog's, the answer comes from the same decide()/bodyFor() as the fastify route, and the
 * same metrics are recorded under the same route label. Anything it does not handle exactly —
 * a bad path, a missing token, an entry not yet loaded, a directory, a big file, a 416, an error
 * — returns false *before writing anything*, and fastify answers it as usual.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { httpAnswer } from '../../errors.js';
import type { Logger } from '../../log.js';
import { isDigest } from '../../store/cache.js';
import type { Catalog } from './catalog.js';
import type { HttpMetrics } from './metrics.js';
import { parseRequestPath } from './paths.js';
import { BUFFER_MAX_BYTES, bodyFor, bodyForSync, decide } from './respond.js';
import { IMMUTABLE, REVALIDATE, fileRepresentation } from './tree.js';

export const KERNEL_FILES_ROUTE = '/v1/kernels/:ref/files/*';
export const BLOB_FILES_ROUTE = '/v1/blobs/:digest/files/*';

export interface FastPathContext {
  catalog: Catalog;
  metrics: HttpMetrics;
  log: Logger;
  /** The token check, when a token is configured. */
  authorised: ((authorization: string | undefined) => boolean) | undefined;
  /** True once close() began: fastify then answers 503 for new requests. */
  closing: () => boolean;
}

export type FastPath = (req: IncomingMessage, res: ServerResponse) => boolean;

export function createFastPath(ctx: FastPathContext): FastPath {
  const { catalog, metrics } = ctx;
  return (req, res) => {
    const method = req.method;
    if (method !== 'GET' && method !== 'HEAD') return false;
    const url = req.url ?? '';
    const kernels = url.startsWith('/v1/kernels/');
    if (!kernels && !url.startsWith('/v1/blobs/')) return false;
    if (ctx.closing()) return false;
    if (ctx.authorised && !ctx.authorised(req.headers.authorization)) return false;
    let segments: string[];
    try {
      const parsed = parseRequestPath(url);
      if (parsed.trailingSlash) return false; // a directory listing, or a 404 for a file
      segments = parsed.segments;
    } catch {
      return false; // fastify answers 400 with the parser's reason
    }
    if (segments.length < 5 || segments[3] !== 'files') return false;
    const name = segments[2]!;
    if (!kernels && !isDigest(name)) return false;
    const served = catalog.peek(kernels ? 'ref' : 'digest', name);
    if (!served) return false;
    const node = served.lookup(segments.slice(4).join('/'));
    const index = served.entry.index;
    if (node < 0 || index.kindOf(node) !== 'file' || index.sizeOf(node) > BUFFER_MAX_BYTES) return false;

    const started = performance.now();
    const rep = fileRepresentation(served, node, kernels ? REVALIDATE : IMMUTABLE);
    const d = decide(rep, req.headers);
    if (d.kind === 'unsatisfiable') return false;
    const route = kernels ? KERNEL_FILES_ROUTE : BLOB_FILES_ROUTE;
    d.headers['x-content-type-options'] = 'nosniff';

    if (d.kind === 'not-modified') {
      res.writeHead(304, d.headers);
      res.end();
      metrics.observe(route, 304, (performance.now() - started) / 1000, 0);
      return true;
    }
    const finish = (buf: Buffer | null): void => {
      res.writeHead(d.status, d.headers);
      if (buf) res.end(buf);
      else res.end();
      metrics.observe(route, d.status, (performance.now() - started) / 1000, buf ? buf.length : 0);
    };
    // In memory already (the common case for hot headers): answer before returning.
    const ready = bodyForSync(d, rep, catalog.bytes, method === 'HEAD');
    if (ready !== undefined) {
      finish(ready);
      return true;
    }
    bodyFor(d, rep, catalog.bytes, method === 'HEAD').then(
      // Small bodies only, so never a stream here.
      (body) => finish(Buffer.isBuffer(body) ? body : null),
      (err: unknown) => {
        ctx.log.error({ err, url }, 'request failed');
        const { status, error } = httpAnswer(err);
        if (!res.headersSent) {
          res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'cache-control': 'no-store', 'x-content-type-options': 'nosniff' });
          res.end(JSON.stringify({ error }));
        } else res.destroy();
        metrics.observe(route, status, (performance.now() - started) / 1000, 0);
      },
    );
    return true;
  };
}
