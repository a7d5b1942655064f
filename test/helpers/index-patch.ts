/**
 * Tampering with an encoded index the way an attacker who also fixes the checksum would: the
 * patch is re-sealed, so only the structural checks stand between it and a reader.
 */
import { createHash } from 'node:crypto';
import { B, H, HEADER_BYTES, NODE_BYTES } from '../../src/store/index-format.js';

/** Recompute the body checksum after a patch. */
export function reseal(buf: Buffer): Buffer {
  createHash('sha256').update(buf.subarray(HEADER_BYTES)).digest().copy(buf, H.checksum);
  return buf;
}

/** Point blob 0's name at `name` (appended to the strings), fix the sizes and re-seal. */
export function withBlobName(index: Buffer, name: string): Buffer {
  const extra = Buffer.from(name);
  const buf = Buffer.concat([index, extra]);
  const stringsBytes = buf.readUInt32LE(H.stringsBytes);
  buf.writeUInt32LE(stringsBytes + extra.length, H.stringsBytes);
  const blobs = HEADER_BYTES + buf.readUInt32LE(H.nodeCount) * NODE_BYTES;
  buf.writeUInt32LE(stringsBytes, blobs + B.nameOff);
  buf.writeUInt32LE(extra.length, blobs + B.nameLen);
  return reseal(buf);
}
