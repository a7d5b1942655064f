/**
 * `GET /v1/kernels/<ref>/files/btf/[<module>.h]` for the running kernel's entry: the loaded
 * modules' headers, from the ModuleHeaderSource (src/store/module-btf.ts), made on the first
 * request on a worker thread and then served like any file (ETag, ranges, gzip). Nothing here is
 * content-addressed under /v1/blobs: the set of modules changes while the daemon runs.
 */
import type { FastifyReply, FastifyRequest } from 'fastify';
import { MODULE_HEADERS_DIR, type ModuleHeaderSource } from '../../store/module-btf.js';
import { fileBody } from './bytes.js';
import type { Catalog, ServedEntry } from './catalog.js';
import { httpDate } from './catalog.js';
import { contentTypeFor, sendError, sendRepresentation } from './respond.js';
import { REVALIDATE } from './tree.js';

/** Whether `segments` (the path inside the entry) is for module headers of this entry. */
export function isModuleHeaderPath(served: ServedEntry, runningId: string | null, segments: readonly string[]): boolean {
  return segments[0] === MODULE_HEADERS_DIR && served.manifest.id === runningId && served.lookup(MODULE_HEADERS_DIR) < 0;
}

export async function serveModuleHeaders(
  catalog: Catalog,
  source: ModuleHeaderSource,
  req: FastifyRequest,
  reply: FastifyReply,
  served: ServedEntry,
  segments: readonly string[],
): Promise<FastifyReply> {
  const m = served.manifest;
  if (segments.length === 1) {
    const modules = await source.modules();
    reply.header('cache-control', 'no-store');
    return reply.type('application/json; charset=utf-8').send({
      release: m.release,
      digest: m.digest,
      path: MODULE_HEADERS_DIR,
      // Sizes are known only once a header is made: null until then.
      entries: modules.map((mod) => ({ name: `${mod.name}.h`, type: 'file', size: null, mtime: null })),
    });
  }
  const name = segments[1]!;
  const module = segments.length === 2 && name.endsWith('.h') ? name.slice(0, -2) : undefined;
  const header = module === undefined ? undefined : await source.header(module);
  if (!header) {
    const loaded = (await source.modules()).map((mod) => mod.name);
    return sendError(reply, 'E_NOT_FOUND',
      `${segments.join('/')}: no such module header in ${m.release}: a module's header exists while it is loaded and has BTF (loaded with BTF: ${loaded.length > 0 ? loaded.join(', ') : 'none'})`,
    );
  }
  const ct = contentTypeFor(name);
  const seconds = Math.floor(header.mtimeMs / 1000);
  return sendRepresentation(
    req,
    reply,
    {
      body: fileBody(header.file, 0, header.size),
      // The key names the header's content (module BTF, kernel BTF, format): a strong validator.
      etag: `"m-${header.key.slice(0, 40)}"`,
      lastModified: httpDate(seconds),
      mtime: seconds,
      contentType: ct.type,
      cacheControl: REVALIDATE,
      compressible: ct.text,
      ranges: true,
    },
    catalog.bytes,
  );
}
