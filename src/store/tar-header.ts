/**
 * A pure tar header codec: one 512-byte block in, a typed header out. No streams, no I/O.
 *
 * tar-stream has such a codec internally (headers.js) but does not export it, and its extract
 * stream hides where each member's data starts in the uncompressed tar. The pack file *is* the
 * uncompressed tar, so ingest needs those offsets exactly; it scans with this codec instead
 * (see README, "Why not tar-stream's extract"). tar-stream still builds the test archives.
 */
export const BLOCK = 512;

export type TarType =
  | 'file'
  | 'link' // hard link
  | 'symlink'
  | 'char-device'
  | 'block-device'
  | 'directory'
  | 'fifo'
  | 'gnu-long-name'
  | 'gnu-long-link'
  | 'pax-header'
  | 'pax-global-header'
  | 'unsupported';

export interface TarHeader {
  name: string;
  mode: number;
  size: number;
  mtime: number;
  type: TarType;
  /** The raw type flag, for messages about unsupported members. */
  typeflag: string;
  linkname: string;
}

export class TarHeaderError extends Error {}

export function isZeroBlock(block: Uint8Array): boolean {
  for (let i = 0; i < BLOCK; i++) if (block[i] !== 0) return false;
  return true;
}

/** Decode one header block. Throws TarHeaderError on a bad checksum or unreadable numbers. */
export function decodeHeader(block: Buffer): TarHeader {
  if (block.length < BLOCK) throw new TarHeaderError('short header block');
  const stored = decodeNumber(block, 148, 8, 'checksum');
  if (stored !== checksum(block)) throw new TarHeaderError(`header checksum mismatch (stored ${stored}, computed ${checksum(block)})`);
  const typeflag = block[156] === 0 ? '0' : String.fromCharCode(block[156]!);
  let name = decodeString(block, 0, 100);
  // POSIX ustar splits long names into prefix/name; GNU tar uses ././@LongLink members instead.
  if (block.toString('latin1', 257, 263) === 'ustar\0') {
    const prefix = decodeString(block, 345, 155);
    if (prefix) name = `${prefix}/${name}`;
  }
  return {
    name,
    mode: decodeNumber(block, 100, 8, 'mode'),
    size: decodeNumber(block, 124, 12, 'size'),
    mtime: decodeNumber(block, 136, 12, 'mtime'),
    type: typeOf(typeflag),
    typeflag,
    linkname: decodeString(block, 157, 100),
  };
}

/** The body of a GNU long name/link member: a NUL-terminated name. */
export function decodeLongName(body: Buffer): string {
  const nul = body.indexOf(0);
  return body.toString('utf8', 0, nul < 0 ? body.length : nul);
}

/** PAX extended header records: "<len> key=value\n" repeated. */
export function decodePax(body: Buffer): Map<string, string> {
  const out = new Map<string, string>();
  let pos = 0;
  while (pos < body.length && body[pos] !== 0) {
    const space = body.indexOf(0x20, pos);
    if (space < 0) throw new TarHeaderError('malformed pax record (no length)');
    const len = Number(body.toString('latin1', pos, space));
    if (!Number.isSafeInteger(len) || len <= space - pos || pos + len > body.length) throw new TarHeaderError('malformed pax record length');
    const record = body.toString('utf8', space + 1, pos + len - 1); // drop trailing \n
    const eq = record.indexOf('=');
    if (eq < 0) throw new TarHeaderError('malformed pax record (no "=")');
    out.set(record.slice(0, eq), record.slice(eq + 1));
    pos += len;
  }
  return out;
}

/** Bytes a member's body occupies, padded to the block size. */
export function paddedSize(size: number): number {
  return Math.ceil(size / BLOCK) * BLOCK;
}

function typeOf(flag: string): TarType {
  switch (flag) {
    case '0':
    case '7': // contiguous file: a regular file everywhere that matters
      return 'file';
    case '1':
      return 'link';
    case '2':
      return 'symlink';
    case '3':
      return 'char-device';
    case '4':
      return 'block-device';
    case '5':
      return 'directory';
    case '6':
      return 'fifo';
    case 'L':
      return 'gnu-long-name';
    case 'K':
      return 'gnu-long-link';
    case 'x':
      return 'pax-header';
    case 'g':
      return 'pax-global-header';
    default:
      return 'unsupported';
  }
}

function checksum(block: Buffer): number {
  let sum = 8 * 0x20; // the checksum field itself counts as spaces
  for (let i = 0; i < 148; i++) sum += block[i]!;
  for (let i = 156; i < BLOCK; i++) sum += block[i]!;
  return sum;
}

function decodeString(block: Buffer, offset: number, length: number): string {
  const end = block.indexOf(0, offset);
  return block.toString('utf8', offset, end < 0 || end > offset + length ? offset + length : end);
}

/** Octal, space/NUL terminated; or GNU base-256 when the high bit of the first byte is set. */
function decodeNumber(block: Buffer, offset: number, length: number, field: string): number {
  if (block[offset]! & 0x80) {
    let value = block[offset]! & 0x3f; // the lead byte's low bits are the number's top bits
    for (let i = offset + 1; i < offset + length; i++) value = value * 256 + block[i]!;
    if ((block[offset]! & 0x40) !== 0 || !Number.isSafeInteger(value)) throw new TarHeaderError(`${field} out of range`);
    return value;
  }
  let i = offset;
  const end = offset + length;
  while (i < end && block[i] === 0x20) i++;
  let value = 0;
  let digits = 0;
  for (; i < end; i++) {
    const c = block[i]!;
    if (c === 0 || c === 0x20) break;
    if (c < 0x30 || c > 0x37) throw new TarHeaderError(`${field} is not an octal number`);
    value = value * 8 + (c - 0x30);
    digits++;
  }
  if (digits === 0 && field === 'checksum') throw new TarHeaderError('empty checksum');
  return value;
}
