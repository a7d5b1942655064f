/**
 * Sending one representation (a file of the tree, the archive, a directory listing) with the
 * HTTP semantics a client needs to cache and resume (RFC 9110): strong ETag, Last-Modified,
 * 304s, single Range (206/416), HEAD, and gzip for text when the client accepts it (never for a
 * range, never for the archive).
 *
 * We do this by hand rather than through @fastify/send: send stats the file it is given and
 * derives its own ETag from the pack's size and mtime, which would change on every re-pack and
 * be shared by all 6,000 files of an entry; here a file is just (pack, offset, size) and its
 * tag is per file. A file up to BUFFER_MAX_BYTES (nearly every header) is one buffer (from the
 * hot-body cache or one async pread), written in one go; a larger one is streamed in chunks of
 * preads (see bytes.ts).
 */
import { Transform, pipeline, type Readable, type TransformCallback } from 'node:stream';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { ERRORS, type ErrorCode } from '../../errors.js';
import { GZIP_OPTIONS, bodySize, type Body, type ByteSource } from './bytes.js';
import { acceptsGzip, ifRangeHolds, noneMatch, notModifiedSince, parseRange } from './conditional.js';
import './types.js';

export type { Body } from './bytes.js';

/** Bodies up to this size are sent as one buffer; larger ones are streamed. */
export const BUFFER_MAX_BYTES = 256 * 1024;
/** Smaller bodies are sent as they are: gzip would save next to nothing. */
export const GZIP_MIN_BYTES = 256;

export interface Representation {
  body: Body;
  /** Strong ETag of the identity encoding, quoted. */
  etag: string;
  /** HTTP date, and the same as seconds for If-Modified-Since; null when there is none. */
  lastModified: string | null;
  mtime: number | null;
  contentType: string;
  cacheControl: string;
  /** Offer gzip (text). */
  compressible: boolean;
  /** Serve byte ranges. */
  ranges: boolean;
  /** Varies on Accept (a listing). */
  varyAccept?: boolean;
  headers?: Readonly<Record<string, string>>;
}

export function gzipEtag(etag: string): string {
  return `${etag.slice(0, -1)}-gz"`;
}

/** Counts bytes passing through (for the bytes-sent metric of streamed, compressed bodies). */
class Counter extends Transform {
  constructor(private readonly onBytes: (n: number) => void) {
    super();
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.onBytes(chunk.length);
    cb(null, chunk);
  }
}

/** Request headers the decision reads (node's IncomingHttpHeaders satisfies it). */
export interface ConditionalHeaders {
  range?: string | undefined;
  'if-range'?: string | string[] | undefined;
  'if-none-match'?: string | undefined;
  'if-modified-since'?: string | undefined;
  'accept-encoding'?: string | undefined;
}

/**
 * What to answer, decided from the representation and the request headers alone (no I/O), so
 * the fastify route and the raw fast path (fast-path.ts) answer exactly alike.
 */
export type Decision =
  | { kind: 'not-modified'; headers: Record<string, string> }
  | { kind: 'unsatisfiable'; headers: Record<string, string>; size: number }
  | { kind: 'body'; status: 200 | 206; headers: Record<string, string>; start: number; end: number; gzip: boolean };

export function decide(rep: Representation, h: ConditionalHeaders): Decision {
  const size = bodySize(rep.body);
  const rangeHeader = rep.ranges ? h.range : undefined;
  const gzip = rep.compressible && size >= GZIP_MIN_BYTES && rangeHeader === undefined && acceptsGzip(h['accept-encoding']);
  const headers: Record<string, string> = {
    etag: gzip ? gzipEtag(rep.etag) : rep.etag,
    'cache-control': rep.cacheControl,
  };
  if (rep.lastModified !== null) headers['last-modified'] = rep.lastModified;
  if (rep.ranges) headers['accept-ranges'] = 'bytes';
  if (rep.compressible || rep.varyAccept) headers.vary = rep.compressible && rep.varyAccept ? 'Accept-Encoding, Accept' : rep.compressible ? 'Accept-Encoding' : 'Accept';
  if (rep.headers) Object.assign(headers, rep.headers);
  // A Repr-Digest states the identity bytes: it does not describe a gzip-encoded representation.
  if (gzip) delete headers['repr-digest'];

  // Conditional GET: If-None-Match wins; If-Modified-Since only without it (RFC 9110 §13.2.2).
  const inm = h['if-none-match'];
  const ims = h['if-modified-since'];
  const fresh =
    inm !== undefined
      ? noneMatch(inm, rep.compressible ? [rep.etag, gzipEtag(rep.etag)] : [rep.etag])
      : ims !== undefined && rep.mtime !== null && notModifiedSince(ims, rep.mtime);
  if (fresh) return { kind: 'not-modified', headers };

  headers['content-type'] = rep.contentType;
  let start = 0;
  let end = size; // exclusive
  let status: 200 | 206 = 200;
  const ifRange = h['if-range'];
  if (rangeHeader !== undefined && ifRangeHolds(Array.isArray(ifRange) ? ifRange[0] : ifRange, rep.etag, rep.lastModified ?? '')) {
    const r = parseRange(rangeHeader, size);
    if (r.kind === 'unsatisfiable') return { kind: 'unsatisfiable', headers, size };
    if (r.kind === 'range') {
      start = r.start;
      end = r.end + 1;
      status = 206;
      headers['content-range'] = `bytes ${r.start}-${r.end}/${size}`;
    }
  }
  if (gzip) headers['content-encoding'] = 'gzip';
  else headers['content-length'] = String(end - start);
  return { kind: 'body', status, headers, start, end, gzip };
}

/**
 * The body for a 'body' decision: one buffer when small (from the hot-body or gzip cache, or
 * one pread), else a stream. Sets content-length on `headers` for a compressed small body.
 */
export async function bodyFor(d: Extract<Decision, { kind: 'body' }>, rep: Representation, bytes: ByteSource, head: boolean): Promise<Buffer | Readable | null> {
  const size = bodySize(rep.body);
  if (!d.gzip) {
    if (head) return null;
    return d.end - d.start <= BUFFER_MAX_BYTES ? bytes.slice(rep.body, d.start, d.end) : bytes.stream(rep.body, d.start, d.end);
  }
  if (size <= BUFFER_MAX_BYTES) {
    const zipped = await bytes.gzip(rep.etag, rep.body);
    d.headers['content-length'] = String(zipped.length);
    return head ? null : zipped;
  }
  if (head) return null; // length unknown without compressing it all: none is sent
  const source = await bytes.stream(rep.body, 0, size);
  // pipeline, not pipe: a client that goes away must destroy the source too, or its lease leaks.
  return pipeline(source, process.getBuiltinModule('node:zlib').createGzip(GZIP_OPTIONS), () => {});
}

/** bodyFor without waiting: the body if it is in memory already, else undefined. */
export function bodyForSync(d: Extract<Decision, { kind: 'body' }>, rep: Representation, bytes: ByteSource, head: boolean): Buffer | null | undefined {
  if (!d.gzip) {
    if (head) return null;
    return d.end - d.start <= BUFFER_MAX_BYTES ? bytes.peek(rep.body, d.start, d.end) : undefined;
  }
  if (bodySize(rep.body) > BUFFER_MAX_BYTES) return undefined;
  const zipped = bytes.peekGzip(rep.etag);
  if (zipped === undefined) return undefined;
  d.headers['content-length'] = String(zipped.length);
  return head ? null : zipped;
}

/** The 416 body for a representation of `size` bytes. */
export function unsatisfiableBody(size: number): string {
  const code: ErrorCode = 'E_RANGE';
  return JSON.stringify({ error: { code, message: `the range is outside the ${size} bytes of this representation` } });
}

/** Answer a fastify request with `rep`. */
export async function sendRepresentation(req: FastifyRequest, reply: FastifyReply, rep: Representation, bytes: ByteSource): Promise<FastifyReply> {
  const d = decide(rep, req.headers);
  if (d.kind === 'not-modified') return reply.code(304).headers(d.headers).send();
  if (d.kind === 'unsatisfiable') {
    reply.headers(d.headers);
    reply.header('content-range', `bytes */${d.size}`);
    reply.header('content-type', 'application/json; charset=utf-8');
    reply.header('cache-control', 'no-store');
    return reply.code(ERRORS.E_RANGE.http).send(unsatisfiableBody(d.size));
  }
  const body = await bodyFor(d, rep, bytes, req.method === 'HEAD');
  reply.code(d.status).headers(d.headers);
  if (body === null) return reply.send();
  if (Buffer.isBuffer(body)) {
    req.bytesOut = body.length;
    return reply.send(body);
  }
  if (d.gzip) {
    const counter = new Counter((n) => {
      req.bytesOut += n;
    });
    return reply.send(pipeline(body, counter, () => {}));
  }
  req.bytesOut = d.end - d.start;
  return reply.send(body);
}

/** The public error shape: `{ "error": { "code", "message" } }`, never cached. */
export function sendError(reply: FastifyReply, code: ErrorCode, message: string, status: number = ERRORS[code].http): FastifyReply {
  reply.header('cache-control', 'no-store');
  return reply.code(status).type('application/json; charset=utf-8').send({ error: { code, message } });
}

const TEXT_C = 'text/x-c; charset=utf-8';
const TEXT_PLAIN = 'text/plain; charset=utf-8';
const TYPES: Readonly<Record<string, string>> = {
  h: TEXT_C,
  c: TEXT_C,
  S: 'text/x-asm; charset=utf-8',
  s: 'text/x-asm; charset=utf-8',
  lds: TEXT_PLAIN,
  sh: 'text/x-shellscript; charset=utf-8',
  txt: TEXT_PLAIN,
  tbl: TEXT_PLAIN,
  awk: TEXT_PLAIN,
  pl: TEXT_PLAIN,
  py: TEXT_PLAIN,
  json: 'application/json; charset=utf-8',
};
const TEXT_NAMES = /^(?:Makefile|Kbuild|Kconfig.*|\.[A-Za-z].*)$/;

/** Content type of a tree file by its name; whether it is text (worth compressing). */
export function contentTypeFor(name: string): { type: string; text: boolean } {
  const dot = name.lastIndexOf('.');
  const t = dot > 0 ? TYPES[name.slice(dot + 1)] : undefined;
  if (t) return { type: t, text: true };
  if (TEXT_NAMES.test(name)) return { type: TEXT_PLAIN, text: true };
  return { type: 'application/octet-stream', text: false };
}
