/**
 * The optional bearer token (`--token-file`). Compared in constant time: both sides are hashed
 * to 32 bytes first, so neither the token's content nor its length leaks through timing.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { KheadersError, errnoOf } from '../../errors.js';

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

/**
 * Read a token file: the first line, trimmed. Refuses an empty token and a file others can
 * read or write (the token is a password).
 */
export async function readTokenFile(file: string): Promise<string> {
  let text: string;
  try {
    const st = await stat(file);
    if ((st.mode & 0o077) !== 0) {
      throw new KheadersError('E_CONFIG', `the token file ${file} is readable or writable by others (mode ${(st.mode & 0o777).toString(8)}); fix with: chmod 600 ${file}`, { file });
    }
    text = await readFile(file, 'utf8');
  } catch (err) {
    if (err instanceof KheadersError) throw err;
    throw new KheadersError('E_CONFIG', `cannot read the token file ${file}: ${errnoOf(err) ?? String(err)}`, { file });
  }
  const token = (text.split('\n')[0] ?? '').trim();
  if (token === '' || /\s/.test(token)) throw new KheadersError('E_CONFIG', `the token file ${file} must hold one token (no spaces) on its first line`, { file });
  return token;
}
