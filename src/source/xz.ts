/**
 * Just enough of the .xz container format to check a file before decoding it: the stream
 * header magic, and the uncompressed size recorded in the stream's index (read backwards from
 * the footer). The size lets ingest refuse an xz bomb before decoding a byte and report progress
 * as a percentage. Pure: Buffer in, numbers out. The decoder itself verifies every CRC.
 */
export const XZ_MAGIC = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
const FOOTER_MAGIC = Buffer.from('YZ', 'latin1');

export function isXz(buf: Uint8Array): boolean {
  return buf.length >= XZ_MAGIC.length && XZ_MAGIC.every((b, i) => buf[i] === b);
}

/**
 * The total uncompressed size of the last stream in `buf` (the kernel writes exactly one), or
 * undefined when the footer or index cannot be read (truncated file, trailing garbage): the
 * decoder will then say precisely what is wrong.
 */
export function xzUncompressedSize(buf: Buffer): number | undefined {
  if (buf.length < 24 || !isXz(buf)) return undefined;
  const footer = buf.length - 12;
  if (!buf.subarray(footer + 10, footer + 12).equals(FOOTER_MAGIC)) return undefined;
  const indexSize = (buf.readUInt32LE(footer + 4) + 1) * 4; // "backward size"
  const indexStart = footer - indexSize;
  if (indexStart < 12 || buf[indexStart] !== 0x00) return undefined;
  let pos = indexStart + 1;
  const readVarint = (): number | undefined => {
    let value = 0;
    for (let shift = 0; shift < 63; shift += 7) {
      if (pos >= footer) return undefined;
      const byte = buf[pos++]!;
      value += (byte & 0x7f) * 2 ** shift;
      if ((byte & 0x80) === 0) return value;
    }
    return undefined;
  };
  const records = readVarint();
  if (records === undefined || records > 1e6) return undefined;
  let total = 0;
  for (let i = 0; i < records; i++) {
    const unpadded = readVarint();
    const uncompressed = readVarint();
    if (unpadded === undefined || uncompressed === undefined) return undefined;
    total += uncompressed;
  }
  return Number.isSafeInteger(total) ? total : undefined;
}
