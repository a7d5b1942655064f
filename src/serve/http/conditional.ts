/**
 * The small parts of HTTP semantics (RFC 9110) the file responses need, as pure functions:
 * entity-tag matching, If-Modified-Since, Range / If-Range, Accept-Encoding and Accept.
 * Kept apart from the handlers so the edge cases are unit-tested without a socket.
 */

export type RangeResult =
  | { kind: 'none' } // no Range, or one we ignore (multiple ranges, bad syntax): send it all
  | { kind: 'range'; start: number; end: number } // inclusive, as in Content-Range
  | { kind: 'unsatisfiable' };

const INT_RE = /^\d{1,15}$/;

/**
 * A single `bytes=` range against a representation of `size` bytes. Several ranges are answered
 * with the whole representation (RFC 9110 lets a server ignore Range; multipart/byteranges buys
 * nothing for header files), and so is a header we cannot parse.
 */
export function parseRange(header: string | undefined, size: number): RangeResult {
  if (header === undefined) return { kind: 'none' };
  const m = /^\s*bytes\s*=\s*([^,]*?)\s*$/i.exec(header);
  if (!m) return { kind: 'none' };
  const spec = m[1]!;
  const dash = spec.indexOf('-');
  if (dash < 0) return { kind: 'none' };
  const first = spec.slice(0, dash).trim();
  const last = spec.slice(dash + 1).trim();
  if (first === '') {
    if (!INT_RE.test(last)) return { kind: 'none' };
    const n = Number(last);
    if (n === 0 || size === 0) return { kind: 'unsatisfiable' };
    return { kind: 'range', start: Math.max(0, size - n), end: size - 1 };
  }
  if (!INT_RE.test(first)) return { kind: 'none' };
  const start = Number(first);
  let end = size - 1;
  if (last !== '') {
    if (!INT_RE.test(last)) return { kind: 'none' };
    end = Number(last);
    if (end < start) return { kind: 'none' }; // invalid: ignore the header
    end = Math.min(end, size - 1);
  }
  if (start >= size) return { kind: 'unsatisfiable' };
  return { kind: 'range', start, end };
}

function opaque(tag: string): string {
  return tag.startsWith('W/') ? tag.slice(2) : tag;
}

/** If-None-Match: weak comparison against any of `etags` (the representations we could send). */
export function noneMatch(header: string, etags: readonly string[]): boolean {
  const wanted = header.trim();
  if (wanted === '*') return true;
  for (const raw of wanted.split(',')) {
    const t = opaque(raw.trim());
    if (t !== '' && etags.includes(t)) return true;
  }
  return false;
}

/** If-Modified-Since: true when the resource has not changed since the date given. */
export function notModifiedSince(header: string, mtimeSeconds: number): boolean {
  const since = Date.parse(header);
  if (Number.isNaN(since)) return false;
  return mtimeSeconds * 1000 <= since;
}

/** If-Range: strong comparison for a tag, exact equality for a date (RFC 9110 §13.1.5). */
export function ifRangeHolds(header: string | undefined, etag: string, lastModified: string): boolean {
  if (header === undefined) return true;
  const v = header.trim();
  if (v.startsWith('W/')) return false;
  if (v.startsWith('"')) return v === etag;
  const t = Date.parse(v);
  return !Number.isNaN(t) && t === Date.parse(lastModified);
}

function qualityOf(params: string[]): number {
  for (const p of params) {
    const m = /^\s*q\s*=\s*([0-9.]+)\s*$/i.exec(p);
    if (m) {
      const q = Number(m[1]);
      return Number.isFinite(q) ? q : 0;
    }
  }
  return 1;
}

/** Whether Accept-Encoding allows gzip (explicitly, as x-gzip, or through `*`). */
export function acceptsGzip(header: string | undefined): boolean {
  if (header === undefined || header === '') return false;
  let gzip: number | undefined;
  let star: number | undefined;
  for (const item of header.split(',')) {
    const [coding, ...params] = item.split(';');
    const name = coding!.trim().toLowerCase();
    if (name === 'gzip' || name === 'x-gzip') gzip = qualityOf(params);
    else if (name === '*') star = qualityOf(params);
  }
  return (gzip ?? star ?? 0) > 0;
}

/**
 * Whether a directory listing should be HTML: only when text/html is asked for by name and
 * preferred over JSON (a browser). `*\/*` alone (curl, fetch) gets JSON.
 */
export function prefersHtml(header: string | undefined): boolean {
  if (header === undefined) return false;
  let html = 0;
  let json = 0;
  let jsonExplicit = false;
  for (const item of header.split(',')) {
    const [type, ...params] = item.split(';');
    const name = type!.trim().toLowerCase();
    const q = qualityOf(params);
    if (name === 'text/html') html = Math.max(html, q);
    else if (name === 'application/json') {
      json = q;
      jsonExplicit = true;
    } else if (!jsonExplicit && (name === 'application/*' || name === '*/*')) json = Math.max(json, q);
  }
  return html > 0 && html > json;
}
