/**
 * The optional bearer token (`--token-file`, read by ../../token.ts). Compared in constant time:
 * both sides are hashed to 32 bytes first, so neither the token's content nor its length leaks
 * through timing.
 */
import { createHash, timingSafeEqual } from 'node:crypto';

const BEARER_RE = /^Bearer[ \t]+([^\s]+)[ \t]*$/i;

function sha256(s: string): Buffer {
  return createHash('sha256').update(s, 'utf8').digest();
}

/** A checker for Authorization headers against `token`. */
export function bearerChecker(token: string): (authorization: string | undefined) => boolean {
  const expected = sha256(token);
  return (authorization) => {
    const m = authorization === undefined ? null : BEARER_RE.exec(authorization);
    // Hash something even without a header, so a missing header costs the same as a wrong one.
    const given = sha256(m ? m[1]! : '\0');
    return timingSafeEqual(given, expected) && m !== null;
  };
}
