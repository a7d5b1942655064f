/**
 * The requests the daemon answers without fastify, straight on node's request/response:
 *
 *   GET/HEAD /healthz, /readyz, /metrics, /v1/kernels, /v1/kernels/:ref
 *   GET/HEAD /v1/kernels/:ref/files/<file>, /v1/blobs/:digest/files/<file>  (up to
 *            BUFFER_MAX_BYTES: nearly every header; 200, 206, 304, HEAD, gzip), and the 404s for
 *            a name not in the tree or a file asked for as a directory, the 416 of a range past the end
 *   the 401 of any of these when a token is configured and not given
 *
 * Why: these are what a device is asked for all day (a BPF toolchain or fleet cache pulling
 * headers, a supervisor probing health, Prometheus scraping), and for them the framework is most
 * of the cost, and loading it at all costs memory and start-up (see lazy-app.ts). Answering
 * synchronously when the body is in memory matters too (a response written from a later
 * microtask cost ~10 µs more CPU per request).
 *
 * It decides nothing on its own. The path goes through the same parser (paths.ts), the entry is
 * the catalog's, a file's answer comes from the same decide()/bodyFor() as the fastify route,
 * JSON answers are written as fastify writes them (raw-reply.ts), and the same metrics are
 * recorded under the same route label. Anything else — a bad path, a directory listing, a big
 * file, an unknown entry, an error — is declined (false, or a promise of false) *before
 * anything is written*, and fastify answers it as usual. test/http-parity.test.ts asks both the
 * same requests and compares the answers.
 */
import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from 'node:http';
import { httpAnswer } from '../../errors.js';
import type { Logger } from '../../log.js';
import { isDigest } from '../../store/cache.js';
import type { ModuleHeaderSource } from '../../store/module-btf.js';
import { summarise } from '../../store/summary.js';
import type { DaemonState } from '../state.js';
import type { Catalog, ServedEntry, Snapshot } from './catalog.js';
import { acceptsGzip } from './conditional.js';
import type { HttpMetrics, RouteMetrics } from './metrics.js';
import { isModuleHeaderPath } from './module-headers.js';
import { PathError, parseRequestPath } from './paths.js';
import { sendJson, sendText } from './raw-reply.js';
import { BUFFER_MAX_BYTES, GZIP_MIN_BYTES, bodyFor, bodyForSync, decide, unsatisfiableBody, type Representation } from './respond.js';
import { IMMUTABLE, REVALIDATE, fileRepresentation } from './tree.js';

export const KERNEL_FILES_ROUTE = '/v1/kernels/:ref/files/*';
export const BLOB_FILES_ROUTE = '/v1/blobs/:digest/files/*';
const KERNEL_ROUTE = '/v1/kernels/:ref';

/** URLs whose file the fast path remembers (a fleet asks for the same few hundred headers). */
const KNOWN_URLS_KEPT = 4096;
/** Raw URLs longer than this are not remembered (bounds what the URL map holds), and their 401 is left to fastify (its router limits a parameter to 512 characters). */
const MAX_URL = 512;

export interface FastPathContext {
  catalog: Catalog;
  metrics: HttpMetrics;
  state: DaemonState;
  log: Logger;
  /** The token check, when a token is configured. */
  authorised: ((authorization: string | undefined) => boolean) | undefined;
  modules?: ModuleHeaderSource;
}

/** true: answered (or being answered); false: not touched, fastify's to answer. */
export type FastPath = (req: IncomingMessage, res: ServerResponse) => boolean | Promise<boolean>;

/** A file URL resolved once: its representation and the headers of its plain 200. */
interface KnownFile {
  epoch: number;
  served: ServedEntry;
  rep: Representation;
  /** The route's counters, held so that answering does not look them up. */
  stats: RouteMetrics;
  size: number;
  /** Whether Accept-Encoding can change the answer (text big enough to compress). */
  gzippable: boolean;
  /** The 200 identity answer's headers, as decide() makes them with nosniff first: made once, sent as they are. */
  plain: OutgoingHttpHeaders;
}

/** The request as far as the fast path is concerned. */
type Claim =
  | { kind: 'health' | 'ready' | 'metrics' | 'list'; route: string }
  | { kind: 'kernel'; route: string; ref: string }
  | { kind: 'file'; route: string; kernels: boolean; name: string; inside: string[]; trailingSlash: boolean };

const UNAUTHORISED_MESSAGE = 'this daemon requires `Authorization: Bearer <token>` (the token in its --token-file)';
const WWW_AUTHENTICATE = { 'www-authenticate': 'Bearer realm="kheadersd"' };

export function createFastPath(ctx: FastPathContext): FastPath {
  const { catalog, metrics, state } = ctx;
  const known = new Map<string, KnownFile>();
  /** The catalog epoch of everything in `known`. */
  let knownEpoch = -1;

  const elapsed = (started: number): number => (performance.now() - started) / 1000;

  const sendFile = (k: KnownFile, req: IncomingMessage, res: ServerResponse, started: number): boolean | Promise<boolean> => {
    const h = req.headers;
    const head = req.method === 'HEAD';
    const { rep, stats } = k;
    // The common case, no conditions and no encoding to choose: the answer made once.
    if (h.range === undefined && h['if-none-match'] === undefined && h['if-modified-since'] === undefined && !(k.gzippable && acceptsGzip(h['accept-encoding']))) {
      const body = head ? null : catalog.bytes.peek(rep.body, 0, k.size);
      if (body !== undefined) {
        res.writeHead(200, k.plain);
        if (body === null) res.end();
        else res.end(body);
        stats.observe(200, elapsed(started), body === null ? 0 : body.length);
        return true;
      }
    }
    const d = decide(rep, h);
    const headers: Record<string, string> = { 'x-content-type-options': 'nosniff', ...d.headers };
    if (d.kind === 'unsatisfiable') {
      // As sendRepresentation answers it: the representation's headers, then the error's.
      const body = unsatisfiableBody(d.size);
      headers['content-range'] = `bytes */${d.size}`;
      headers['content-type'] = 'application/json; charset=utf-8';
      headers['cache-control'] = 'no-store';
      headers['content-length'] = String(body.length);
      res.writeHead(416, headers);
      res.end(body);
      stats.observe(416, elapsed(started), head ? 0 : body.length);
      return true;
    }
    if (d.kind === 'not-modified') {
      res.writeHead(304, headers);
      res.end();
      stats.observe(304, elapsed(started), 0);
      return true;
    }
    const finish = (buf: Buffer | null): void => {
      // content-length of a compressed body is set on d.headers once known.
      if (d.headers['content-length'] !== undefined) headers['content-length'] = d.headers['content-length'];
      res.writeHead(d.status, headers);
      if (buf) res.end(buf);
      else res.end();
      stats.observe(d.status, elapsed(started), buf ? buf.length : 0);
    };
    // In memory already (the common case for hot headers): answer before returning.
    const ready = bodyForSync(d, rep, catalog.bytes, head);
    if (ready !== undefined) {
      finish(ready);
      return true;
    }
    return bodyFor(d, rep, catalog.bytes, head).then(
      // Small bodies only, so never a stream here.
      (body) => {
        finish(Buffer.isBuffer(body) ? body : null);
        return true;
      },
      (err: unknown) => {
        // As fastify's error handler answers a route's error.
        const { status, error } = httpAnswer(err);
        if (status >= 500) ctx.log.error({ err, url: req.url }, 'request failed');
        stats.observe(status, elapsed(started), sendJson(res, status, 'no-store', { error }));
        return true;
      },
    );
  };

  /** A file claim with its entry in hand: answer, or decline. */
  const answerFile = (c: Extract<Claim, { kind: 'file' }>, served: ServedEntry, url: string, req: IncomingMessage, res: ServerResponse, started: number): boolean | Promise<boolean> => {
    if (c.kernels && ctx.modules && isModuleHeaderPath(served, state.runningId, c.inside)) return false;
    const wanted = c.inside.join('/');
    const node = served.lookup(wanted);
    const m = served.manifest;
    if (node < 0) return notFound(res, c.route, started, `${wanted}: no such file in ${m.release} (${m.digest.slice(0, 12)})`);
    const index = served.entry.index;
    if (index.kindOf(node) !== 'file') return false; // a listing
    if (c.trailingSlash) return notFound(res, c.route, started, `${wanted}/: not a directory (${wanted} is a file in ${m.release})`);
    const size = index.sizeOf(node);
    if (size > BUFFER_MAX_BYTES) return false; // streamed by fastify
    const rep = fileRepresentation(served, node, c.kernels ? REVALIDATE : IMMUTABLE);
    const plain = decide(rep, {});
    const k: KnownFile = {
      epoch: catalog.epoch,
      served,
      rep,
      stats: metrics.route(c.route),
      size,
      gzippable: rep.compressible && size >= GZIP_MIN_BYTES,
      plain: { 'x-content-type-options': 'nosniff', ...plain.headers },
    };
    // A longer URL (a long query string: it changes nothing in the answer) is answered, not
    // remembered: 4,096 of 16 KiB ones would hold 64 MiB.
    if (url.length <= MAX_URL) {
      // What was remembered in an earlier epoch is never used again, and would keep entries
      // that left the cache (their index, their reader) in memory: forget it all.
      if (known.size >= KNOWN_URLS_KEPT || k.epoch !== knownEpoch) known.clear();
      knownEpoch = k.epoch;
      known.set(url, k);
    }
    return sendFile(k, req, res, started);
  };

  const notFound = (res: ServerResponse, route: string, started: number, message: string): true => {
    metrics.observe(route, 404, elapsed(started), sendJson(res, 404, 'no-store', { error: { code: 'E_NOT_FOUND', message } }));
    return true;
  };

  /** What needs the catalog's snapshot, once there is a fresh one. */
  const withSnapshot = (c: Claim, url: string, req: IncomingMessage, res: ServerResponse, started: number, snap: Snapshot): boolean | Promise<boolean> => {
    if (c.kind === 'list') {
      metrics.observe(c.route, 200, elapsed(started), sendJson(res, 200, REVALIDATE, snap.manifests.map((m) => summarise(m, snap.currentId, state.live))));
      return true;
    }
    if (c.kind === 'metrics') {
      return catalog
        .quarantined()
        .catch(() => [])
        .then((quarantine) => {
          const text = metrics.render(snap.manifests, state, catalog.bytes.cachedBytes, quarantine.length);
          metrics.observe(c.route, 200, elapsed(started), sendText(res, 200, 'no-store', 'text/plain; version=0.0.4; charset=utf-8', text));
          return true;
        });
    }
    if (c.kind !== 'kernel' && c.kind !== 'file') return false;
    const byDigest = c.kind === 'file' && !c.kernels;
    const name = c.kind === 'kernel' ? c.ref : c.name;
    const answer = (served: ServedEntry | undefined): boolean | Promise<boolean> => {
      if (!served) return false; // fastify's 404 names what is missing
      if (c.kind === 'file') return answerFile(c, served, url, req, res, started);
      metrics.observe(c.route, 200, elapsed(started), sendJson(res, 200, REVALIDATE, summarise(served.manifest, snap.currentId, state.live)));
      return true;
    };
    const served = catalog.peek(byDigest ? 'digest' : 'ref', name);
    if (served) return answer(served);
    // Not loaded yet (the first request for this entry): load it, then answer.
    return (byDigest ? catalog.byDigest(name) : catalog.byRef(name)).then(answer);
  };

  const claimed = (c: Claim, url: string, req: IncomingMessage, res: ServerResponse, started: number): boolean | Promise<boolean> => {
    if (ctx.authorised && c.kind !== 'health' && !ctx.authorised(req.headers.authorization)) {
      if (url.length > MAX_URL) return false;
      metrics.observe(c.route, 401, elapsed(started), sendJson(res, 401, 'no-store', { error: { code: 'E_UNAUTHORIZED', message: UNAUTHORISED_MESSAGE } }, WWW_AUTHENTICATE));
      return true;
    }
    if (c.kind === 'health') {
      metrics.observe(c.route, 200, elapsed(started), sendJson(res, 200, 'no-store', { status: 'ok', startedAt: state.startedAt, uptimeSeconds: Math.round(process.uptime()) }));
      return true;
    }
    if (c.kind === 'ready') {
      let status = 200;
      let body: object = { ready: true, current: state.currentId };
      if (!state.ready) {
        const e = state.lastIngestError;
        const reason = e ? `ingest failed (${e.code}): ${e.message}` : "the running kernel's headers are not cached yet (ingest in progress)";
        status = 503;
        body = { ready: false, reason, ...(e ? { error: e } : {}) };
      }
      metrics.observe(c.route, status, elapsed(started), sendJson(res, status, 'no-store', body));
      return true;
    }
    const snap = catalog.snapshot();
    if (snap instanceof Promise) return snap.then((s) => withSnapshot(c, url, req, res, started, s));
    return withSnapshot(c, url, req, res, started, snap);
  };

  return (req, res) => {
    const method = req.method;
    if (method !== 'GET' && method !== 'HEAD') return false;
    const url = req.url ?? '';
    const started = performance.now();
    const k = known.get(url);
    if (k !== undefined && k.epoch === catalog.epoch && catalog.fresh(started) && (!ctx.authorised || ctx.authorised(req.headers.authorization))) {
      return sendFile(k, req, res, started);
    }
    const c = claim(url);
    if (!c) return false;
    const answer = claimed(c, url, req, res, started);
    // An error before anything was written (the store unreadable, say): fastify's to answer.
    return answer instanceof Promise ? answer.catch(() => res.headersSent) : answer;
  };
}

/** Which fast-path route a raw request target is, if any. */
function claim(url: string): Claim | undefined {
  const q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);
  switch (path) {
    case '/healthz':
      return { kind: 'health', route: path };
    case '/readyz':
      return { kind: 'ready', route: path };
    case '/metrics':
      return { kind: 'metrics', route: path };
    case '/v1/kernels':
      return { kind: 'list', route: path };
  }
  const kernels = path.startsWith('/v1/kernels/');
  if (!kernels && !path.startsWith('/v1/blobs/')) return undefined;
  let segments: string[];
  let trailingSlash: boolean;
  try {
    ({ segments, trailingSlash } = parseRequestPath(path));
  } catch (err) {
    if (err instanceof PathError) return undefined; // fastify answers 400 with the parser's reason
    throw err;
  }
  if (kernels && segments.length === 3 && !trailingSlash) return { kind: 'kernel', route: KERNEL_ROUTE, ref: segments[2]! };
  if (segments.length < 5 || segments[3] !== 'files') return undefined;
  const name = segments[2]!;
  if (!kernels && !isDigest(name)) return undefined;
  return { kind: 'file', route: kernels ? KERNEL_FILES_ROUTE : BLOB_FILES_ROUTE, kernels, name, inside: segments.slice(4), trailingSlash };
}
