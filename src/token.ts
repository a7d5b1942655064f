/**
 * The bearer token file (`--token-file`), and the one rule for it that `serve`, `pull` and
 * `doctor` all apply by calling readTokenFile: a token is a password, so the file must be
 *
 *   - a regular file, owned by the user running the command or by root,
 *   - mode 0600 or stricter (nobody else may read or write it),
 *   - one line holding at least 16 printable characters after trimming, with no spaces.
 *
 * The file is opened once and checked through that descriptor, so what is checked is what is read.
 */
import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import { KheadersError, errnoOf } from './errors.js';

export const TOKEN_MIN_CHARS = 16;
/** Far above any real token; a bigger file is not a token file (and is not read into memory). */
const TOKEN_MAX_BYTES = 4096;
const PRINTABLE = /^[\x21-\x7e]+$/;

export type TokenRule = 'readable' | 'regular-file' | 'owner' | 'mode' | 'one-line' | 'printable' | 'length';

/**
 * Read `file` and return its token, or throw E_CONFIG naming the rule it breaks (details.rule)
 * and what to do about it (details.fix).
 */
export async function readTokenFile(file: string): Promise<string> {
  const uid = process.getuid?.() ?? 0;
  const refuse = (rule: TokenRule, what: string, fix: string): KheadersError => {
    const problem = `the token file ${file} ${what}`;
    return new KheadersError('E_CONFIG', `${problem}; fix with: ${fix}`, { file, rule, problem, fix });
  };
  const newToken = `(umask 077; openssl rand -hex 32 > ${file})`;
  let text: string;
  try {
    // O_NONBLOCK: a FIFO named as the token file is refused below instead of blocking the open.
    const fh = await open(file, constants.O_RDONLY | constants.O_NONBLOCK);
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw refuse('regular-file', 'is not a regular file', 'point --token-file at a file holding the token');
      if (st.uid !== uid && st.uid !== 0) throw refuse('owner', `is owned by uid ${st.uid}, not by you (uid ${uid}) or root`, `chown ${uid} ${file}`);
      if ((st.mode & 0o077) !== 0) {
        throw refuse('mode', `is readable or writable by others (mode ${(st.mode & 0o777).toString(8).padStart(3, '0')}, must be 600 or stricter)`, `chmod 600 ${file}`);
      }
      if (st.size > TOKEN_MAX_BYTES) throw refuse('one-line', `is ${st.size} bytes, too big for a token`, newToken);
      text = await fh.readFile('utf8');
    } finally {
      await fh.close();
    }
  } catch (err) {
    if (err instanceof KheadersError) throw err;
    const code = errnoOf(err) ?? String(err);
    throw refuse('readable', `cannot be read (${code})`, newToken);
  }
  const token = text.trim();
  if (/[\r\n]/.test(token)) throw refuse('one-line', 'holds more than one line', newToken);
  if (token.length < TOKEN_MIN_CHARS) throw refuse('length', `holds fewer than ${TOKEN_MIN_CHARS} characters`, newToken);
  if (!PRINTABLE.test(token)) throw refuse('printable', 'holds a space or a character that is not printable ASCII', newToken);
  return token;
}
