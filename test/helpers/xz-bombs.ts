/**
 * Real xz bombs whose announced size lies, built from one small compression: a block of
 * 64 MiB of zeros (about 10 KB compressed by the real xz) repeated inside a stream, or whole
 * streams repeated. Every stream is valid .xz that `xz -dc` and lzma-native decode; only the
 * size an archive announces (the last stream's index, read before decoding) is made to lie:
 *
 *   multi-stream   a tar stream, then streams of zeros, then a tiny stream (multi-stream files
 *                  are valid xz): the up-front check sums every stream's index and refuses it
 *   lying-index    one stream whose index records claim 1 byte per block (the decoder finds
 *                  out only at the index, after decoding every block)
 *   hidden-index   one stream with an honest index, followed by stream padding, so no size
 *                  can be read up front at all
 *
 * The decoded bytes are a small valid kernel-header tar followed by zeros, which a tar reader
 * takes as end-of-archive padding: nothing but the total size limit can stop it.
 */
import { crc32 } from 'node:zlib';
import { goodTree, makeTar, xz } from './archives.js';

export type BombKind = 'multi-stream' | 'lying-index' | 'hidden-index';
export const BOMB_KINDS: readonly BombKind[] = ['multi-stream', 'lying-index', 'hidden-index'];

const ZERO_BLOCK_BYTES = 64 * 1024 * 1024;
/** Made once per process: compressing 64 MiB takes the xz binary a fraction of a second. */
let zeroBlock: Parts | undefined;

interface Parts {
  header: Buffer;
  block: Buffer;
  /** The block's unpadded size (header + compressed data + check), as the index records it. */
  unpadded: number;
  uncompressed: number;
  flags: Buffer;
}

/** The single block of a one-block stream the xz binary made, and what its index says of it. */
function oneBlock(stream: Buffer): Parts {
  const footer = stream.length - 12;
  if (stream.toString('latin1', footer + 10) !== 'YZ') throw new Error('not an xz stream');
  const indexStart = footer - (stream.readUInt32LE(footer + 4) + 1) * 4;
  let pos = indexStart + 1;
  const varint = (): number => {
    let value = 0;
    for (let shift = 0; ; shift += 7) {
      const byte = stream[pos++]!;
      value += (byte & 0x7f) * 2 ** shift;
      if ((byte & 0x80) === 0) return value;
    }
  };
  if (varint() !== 1) throw new Error('expected a stream of one block (xz -T1)');
  const unpadded = varint();
  const uncompressed = varint();
  return { header: stream.subarray(0, 12), block: stream.subarray(12, indexStart), unpadded, uncompressed, flags: stream.subarray(6, 8) };
}

function varintBytes(n: number): number[] {
  const out: number[] = [];
  let v = n;
  while (v >= 0x80) {
    out.push((v % 0x80) | 0x80);
    v = Math.floor(v / 0x80);
  }
  out.push(v);
  return out;
}

function u32le(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0);
  return b;
}

/** A stream of the given blocks (all made with the same check), with an index of `records`. */
function assemble(header: Buffer, flags: Buffer, blocks: Buffer[], records: Array<[unpadded: number, uncompressed: number]>): Buffer {
  const body = [0x00, ...varintBytes(records.length)];
  for (const [unpadded, uncompressed] of records) body.push(...varintBytes(unpadded), ...varintBytes(uncompressed));
  while (body.length % 4 !== 0) body.push(0);
  const index = Buffer.from(body);
  const indexWithCrc = Buffer.concat([index, u32le(crc32(index))]);
  const backward = u32le(indexWithCrc.length / 4 - 1);
  const footerFields = Buffer.concat([backward, flags]);
  const footer = Buffer.concat([u32le(crc32(footerFields)), footerFields, Buffer.from('YZ', 'latin1')]);
  return Buffer.concat([header, ...blocks, indexWithCrc, footer]);
}

/**
 * A bomb of `kind` that decodes to a small kernel-header tar and then at least `minBytes` of
 * zeros (rounded up to 64 MiB), whatever its up-front size says.
 */
export async function xzBomb(kind: BombKind, minBytes: number, release = '6.99.66-bomb'): Promise<Buffer> {
  const tar = oneBlock(xz(await makeTar(goodTree(release)), 6));
  zeroBlock ??= oneBlock(xz(Buffer.alloc(ZERO_BLOCK_BYTES), 0));
  const zeros = zeroBlock;
  const count = Math.ceil(minBytes / ZERO_BLOCK_BYTES);
  const zeroBlocks: Buffer[] = Array.from({ length: count }, () => zeros.block);
  switch (kind) {
    case 'multi-stream': {
      const zeroStream = assemble(zeros.header, zeros.flags, [zeros.block], [[zeros.unpadded, zeros.uncompressed]]);
      const tarStream = assemble(tar.header, tar.flags, [tar.block], [[tar.unpadded, tar.uncompressed]]);
      return Buffer.concat([tarStream, ...Array.from({ length: count }, () => zeroStream), xz(Buffer.alloc(1024))]);
    }
    case 'lying-index':
      return assemble(tar.header, tar.flags, [tar.block, ...zeroBlocks], [
        [tar.unpadded, tar.uncompressed],
        ...zeroBlocks.map((): [number, number] => [zeros.unpadded, 1]),
      ]);
    case 'hidden-index':
      return Buffer.concat([
        assemble(tar.header, tar.flags, [tar.block, ...zeroBlocks], [
          [tar.unpadded, tar.uncompressed],
          ...zeroBlocks.map((): [number, number] => [zeros.unpadded, zeros.uncompressed]),
        ]),
        Buffer.alloc(4), // stream padding: valid, and the footer is no longer where a reader looks
      ]);
  }
}
