/**
 * URL path validation for the HTTP server: the raw request target in, decoded segments out.
 *
 * We decode the raw URL ourselves instead of trusting the router's decoding, because the rules
 * are about what the client *sent*: an encoded slash (`%2f`) or backslash (`%5c`) must not turn
 * into a separator, `%2e%2e` must not become a traversal, and a NUL must never reach a lookup.
 * The decoded segments are then looked up in the entry's TreeIndex (the sandbox); nothing here
 * or anywhere else in the server joins them onto a filesystem path.
 *
 * Rules (each violation is a PathError, answered 400):
 * - the path part (before `?`) is at most MAX_PATH_BYTES raw bytes, each segment at most
 *   MAX_SEGMENT_BYTES decoded bytes (Linux PATH_MAX / NAME_MAX);
 * - only RFC 3986 `pchar` characters appear raw: no backslash, space, `#`, quotes, control
 *   characters or raw non-ASCII bytes (clients must percent-encode those);
 * - every `%` starts a valid escape; decoded bytes must be valid UTF-8 (fatal decoding, so
 *   over-long forms such as `%c0%ae` are refused) and contain no `/`, `\`, NUL or other control
 *   character;
 * - no `.` or `..` segment (decoded, so `%2e%2e` counts), no empty segment except one trailing
 *   slash (a directory URL).
 */

export const MAX_PATH_BYTES = 4096;
export const MAX_SEGMENT_BYTES = 255;

export class PathError extends Error {
  constructor(
    message: string,
    /** A stable reason for logs and tests, e.g. 'dot-segment'. */
    readonly reason: string,
  ) {
    super(message);
    this.name = 'PathError';
  }
}

export interface ParsedPath {
  /** Decoded segments, none empty. */
  segments: string[];
  /** The raw path ended with '/'. */
  trailingSlash: boolean;
}

// RFC 3986 pchar = unreserved / pct-encoded / sub-delims / ":" / "@" (plus the "/" separator).
const RAW_ALLOWED = (() => {
  const table = new Uint8Array(128);
  const chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@%/";
  for (const c of chars) table[c.charCodeAt(0)] = 1;
  return table;
})();

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

function hexValue(code: number): number {
  if (code >= 0x30 && code <= 0x39) return code - 0x30;
  if (code >= 0x41 && code <= 0x46) return code - 0x41 + 10;
  if (code >= 0x61 && code <= 0x66) return code - 0x61 + 10;
  return -1;
}

/** Decode one raw segment (no '/' in it), or throw PathError. */
export function decodeSegment(raw: string): string {
  let plain = true;
  for (let i = 0; i < raw.length; i++) {
    const c = raw.charCodeAt(i);
    if (c >= 128 || RAW_ALLOWED[c] !== 1 || c === 0x2f) {
      throw new PathError(`the path contains a character that must be percent-encoded (code ${c})`, c === 0x5c ? 'backslash' : 'raw-character');
    }
    if (c === 0x25) plain = false;
  }
  let text = raw; // the common case: nothing encoded, all ASCII
  if (!plain) {
    const bytes: number[] = [];
    for (let i = 0; i < raw.length; i++) {
      const c = raw.charCodeAt(i);
      if (c !== 0x25) {
        bytes.push(c);
        continue;
      }
      const hi = i + 2 < raw.length ? hexValue(raw.charCodeAt(i + 1)) : -1;
      const lo = i + 2 < raw.length ? hexValue(raw.charCodeAt(i + 2)) : -1;
      if (hi < 0 || lo < 0) throw new PathError('the path has a malformed percent-escape', 'bad-escape');
      const b = (hi << 4) | lo;
      if (b === 0x2f) throw new PathError('an encoded slash (%2F) is not allowed in a path segment', 'encoded-slash');
      if (b === 0x5c) throw new PathError('a backslash is not allowed in a path', 'backslash');
      if (b === 0) throw new PathError('a NUL byte is not allowed in a path', 'nul');
      if (b < 0x20 || b === 0x7f) throw new PathError('a control character is not allowed in a path', 'control-character');
      bytes.push(b);
      i += 2;
    }
    if (bytes.length > MAX_SEGMENT_BYTES) throw new PathError(`a path segment is longer than ${MAX_SEGMENT_BYTES} bytes`, 'segment-too-long');
    try {
      text = utf8.decode(Uint8Array.from(bytes));
    } catch {
      throw new PathError('the path is not valid UTF-8', 'invalid-utf8');
    }
  } else if (raw.length > MAX_SEGMENT_BYTES) {
    throw new PathError(`a path segment is longer than ${MAX_SEGMENT_BYTES} bytes`, 'segment-too-long');
  }
  if (text === '.' || text === '..') throw new PathError('"." and ".." segments are not allowed', 'dot-segment');
  return text;
}

/**
 * Split and decode the path of a raw request target (`/v1/kernels/x/files/a.h?q=1`).
 * The query string is ignored. Throws PathError.
 */
export function parseRequestPath(rawUrl: string): ParsedPath {
  const q = rawUrl.indexOf('?');
  const rawPath = q < 0 ? rawUrl : rawUrl.slice(0, q);
  if (rawPath.length > MAX_PATH_BYTES) throw new PathError(`the path is longer than ${MAX_PATH_BYTES} bytes`, 'path-too-long');
  if (rawPath.charCodeAt(0) !== 0x2f) throw new PathError('the request target must be an absolute path', 'not-absolute');
  const parts = rawPath.slice(1).split('/');
  let trailingSlash = false;
  if (parts.length > 1 && parts[parts.length - 1] === '') {
    trailingSlash = true;
    parts.pop();
  }
  const segments: string[] = [];
  for (const part of parts) {
    if (part === '') {
      if (parts.length === 1) break; // the root, "/"
      throw new PathError('empty path segments ("//") are not allowed', 'empty-segment');
    }
    segments.push(decodeSegment(part));
  }
  return { segments, trailingSlash };
}

/** Encode a tree path for use in a URL (each segment percent-encoded, slashes kept). */
export function encodeTreePath(treePath: string): string {
  return treePath === '' ? '' : treePath.split('/').map(encodeURIComponent).join('/');
}

/** Whether the path part of a raw request target ends with '/' (a directory URL). */
export function endsWithSlash(rawUrl: string | undefined): boolean {
  const url = rawUrl ?? '/';
  const q = url.indexOf('?');
  return (q < 0 ? url : url.slice(0, q)).endsWith('/');
}
