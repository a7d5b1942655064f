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
 * The total uncompressed size recorded in the indexes of every stream in `buf` (the kernel
 * writes exactly one; `xz` run over concatenated files makes several, with stream padding
 * between them), or undefined when a footer or index cannot be read (truncated file, trailing
 * garbage or padding): the decoder will then say precisely what is wrong. A decoder that
 * verifies the indexes (XZ Utils, liblzma) and succeeds has produced exactly this many bytes.
 */
export function xzUncompressedSize(buf: Buffer): number | undefined {
  if (!isXz(buf)) return undefined;
  let total = 0;
  let end = buf.length;
  for (let streams = 0; end > 0; streams++) {
    const stream = lastStream(buf, end);
    if (stream === undefined || streams > 1e4) return undefined;
    total += stream.uncompressed;
    end = stream.start;
    // Stream padding (zero bytes, a multiple of four) may separate streams, not begin the file.
    while (end >= 4 && buf.readUInt32LE(end - 4) === 0) end -= 4;
  }
  return Number.isSafeInteger(total) ? total : undefined;
}

/** The stream ending at `end`: where it starts and the uncompressed size its index records. */
function lastStream(buf: Buffer, end: number): { start: number; uncompressed: number } | undefined {
  if (end < 24) return undefined;
  const footer = end - 12;
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
  let blocks = 0;
  let uncompressed = 0;
  for (let i = 0; i < records; i++) {
    const unpadded = readVarint();
    const size = readVarint();
    if (unpadded === undefined || size === undefined) return undefined;
    blocks += Math.ceil(unpadded / 4) * 4;
    uncompressed += size;
  }
  const start = indexStart - blocks - 12;
  if (start < 0 || !XZ_MAGIC.every((b, i) => buf[start + i] === b)) return undefined;
  return { start, uncompressed };
}
