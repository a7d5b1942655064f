/**
 * Walks an uncompressed tar stream chunk by chunk and builds the index: for every member its
 * normalised path, kind, and the exact offset of its data in the stream (the pack file is the
 * stream itself, so readers later pread those bytes in place). Nothing of the tree is held in
 * memory but the records. Every safety rule and xz-bomb limit is applied here, as bytes arrive,
 * so a hostile archive is stopped before it is fully decoded.
 */
import { createHash, type Hash } from 'node:crypto';
import { KheadersError } from '../errors.js';
import { DEFAULT_CHUNK_BYTES, DIGEST_BYTES } from './index-format.js';
import { BLOCK, TarHeaderError, decodeHeader, decodeLongName, decodePax, isZeroBlock, paddedSize, type TarHeader } from './tar-header.js';
import { normaliseEntryPath, type IndexRecord, type PackDigests } from './tree-index.js';

export interface IngestLimits {
  /** Uncompressed bytes of the whole tar stream. */
  maxTotalBytes: number;
  maxEntries: number;
  maxFileBytes: number;
}

export const DEFAULT_LIMITS: IngestLimits = {
  maxTotalBytes: 1024 * 1024 * 1024,
  maxEntries: 200_000,
  maxFileBytes: 64 * 1024 * 1024,
};

/** GNU long names and pax headers are metadata: anything larger than this is hostile. */
const MAX_META_BYTES = 1024 * 1024;
/** Small files whose content ingest wants to see (e.g. include/generated/utsrelease.h). */
const MAX_CAPTURE_BYTES = 64 * 1024;

type State =
  | { kind: 'header' }
  | { kind: 'skip'; remaining: number }
  | { kind: 'collect'; member: TarHeader; body: Buffer; filled: number; padding: number; onDone: (body: Buffer) => void }
  | { kind: 'end' };

export class TarIndexer {
  readonly records: IndexRecord[] = [];
  /** Contents of the captured paths that were present. */
  readonly captured = new Map<string, Buffer>();
  /** Bytes seen so far (the pack's size when the stream ends). */
  position = 0;

  private state: State = { kind: 'header' };
  private readonly headerBuf = Buffer.alloc(BLOCK);
  private headerFill = 0;
  private zeroBlocks = 0;
  private members = 0;
  private longName: string | undefined;
  private longLink: string | undefined;
  private pax: Map<string, string> | undefined;
  private readonly chunks = new ChunkDigester();

  constructor(
    private readonly limits: IngestLimits = DEFAULT_LIMITS,
    private readonly capturePaths: ReadonlySet<string> = new Set(),
  ) {}

  get entryCount(): number {
    return this.records.length;
  }

  /** Feed the next chunk of the uncompressed stream. Throws KheadersError on bad input. */
  push(chunk: Buffer): void {
    if (this.position + chunk.length > this.limits.maxTotalBytes) {
      throw totalBytesLimit(this.limits.maxTotalBytes);
    }
    this.chunks.push(chunk);
    let i = 0;
    while (i < chunk.length) {
      const state = this.state;
      switch (state.kind) {
        case 'skip': {
          const n = Math.min(state.remaining, chunk.length - i);
          state.remaining -= n;
          i += n;
          if (state.remaining === 0) this.state = { kind: 'header' };
          break;
        }
        case 'header': {
          const n = Math.min(BLOCK - this.headerFill, chunk.length - i);
          chunk.copy(this.headerBuf, this.headerFill, i, i + n);
          this.headerFill += n;
          i += n;
          if (this.headerFill === BLOCK) {
            this.headerFill = 0;
            this.onHeader(this.position + i - BLOCK);
          }
          break;
        }
        case 'collect': {
          const n = Math.min(state.body.length - state.filled, chunk.length - i);
          chunk.copy(state.body, state.filled, i, i + n);
          state.filled += n;
          i += n;
          if (state.filled === state.body.length) {
            this.state = state.padding > 0 ? { kind: 'skip', remaining: state.padding } : { kind: 'header' };
            state.onDone(state.body);
          }
          break;
        }
        case 'end': {
          // After the end-of-archive marker only zero padding may follow.
          for (; i < chunk.length; i++) {
            if (chunk[i] !== 0) throw corrupt(`data after the end-of-archive marker at offset ${this.position + i}`);
          }
          break;
        }
      }
    }
    this.position += chunk.length;
  }

  /** The stream ended: check that it ended where a tar may end. */
  finish(): IndexRecord[] {
    if (this.state.kind === 'header' && this.headerFill === 0) return this.records; // tolerated: no end marker
    if (this.state.kind === 'end') return this.records;
    throw corrupt(`tar stream ends in the middle of a member (at offset ${this.position})`);
  }

  /** The sha256 of every chunk of the stream seen so far: what readers prove the pack against. */
  packDigests(): PackDigests {
    return this.chunks.finish(this.position);
  }

  private onHeader(headerOffset: number): void {
    if (isZeroBlock(this.headerBuf)) {
      if (++this.zeroBlocks === 2) this.state = { kind: 'end' };
      return;
    }
    if (this.zeroBlocks > 0) throw corrupt(`a lone zero block before offset ${headerOffset}`);
    let header: TarHeader;
    try {
      header = decodeHeader(this.headerBuf);
    } catch (err) {
      if (err instanceof TarHeaderError) throw corrupt(`bad tar header at offset ${headerOffset}: ${err.message}`);
      throw err;
    }
    const dataOffset = headerOffset + BLOCK;

    switch (header.type) {
      case 'gnu-long-name':
      case 'gnu-long-link':
      case 'pax-header':
      case 'pax-global-header':
        this.collectMeta(header);
        return;
      default:
        break;
    }

    // Extension headers describe the member that follows them, and only that one.
    const pax = this.pax;
    const name = pax?.get('path') ?? this.longName ?? header.name;
    const linkname = pax?.get('linkpath') ?? this.longLink ?? header.linkname;
    const size = pax?.has('size') ? Number(pax.get('size')) : header.size;
    this.pax = this.longName = this.longLink = undefined;
    if (!Number.isSafeInteger(size) || size < 0) throw corrupt(`member ${JSON.stringify(name)} has an unreadable size`);

    if (++this.members > this.limits.maxEntries) {
      throw new KheadersError('E_LIMIT', `archive has more than ${this.limits.maxEntries} entries (--max-entries)`, {
        limit: 'maxEntries',
        value: this.limits.maxEntries,
        entry: name,
      });
    }
    const path = normaliseEntryPath(name);
    const mtime = pax?.has('mtime') ? Math.floor(Number(pax.get('mtime'))) : header.mtime;
    const mode = header.mode & 0o7777;

    switch (header.type) {
      case 'file': {
        if (size > this.limits.maxFileBytes) {
          throw new KheadersError('E_LIMIT', `entry ${JSON.stringify(path)} is ${size} bytes, over the ${this.limits.maxFileBytes}-byte limit (--max-file-bytes)`, {
            limit: 'maxFileBytes',
            value: this.limits.maxFileBytes,
            entry: path,
          });
        }
        if (path === '') throw unsafe(name, 'a file cannot be the root of the tree');
        this.records.push({ path, kind: 'file', mode, mtime, size, offset: dataOffset });
        if (this.capturePaths.has(path) && size <= MAX_CAPTURE_BYTES && size > 0) {
          this.state = {
            kind: 'collect',
            member: header,
            body: Buffer.alloc(size),
            filled: 0,
            padding: paddedSize(size) - size,
            onDone: (body) => this.captured.set(path, body),
          };
        } else if (size > 0) {
          this.state = { kind: 'skip', remaining: paddedSize(size) };
        }
        return;
      }
      case 'directory':
        this.records.push({ path, kind: 'dir', mode, mtime, size: 0 });
        if (size > 0) this.state = { kind: 'skip', remaining: paddedSize(size) };
        return;
      case 'symlink':
        this.records.push({ path, kind: 'symlink', mode, mtime, size: Buffer.byteLength(linkname), target: linkname });
        // A symlink has no body; one that claims one must not have it parsed as headers.
        if (size > 0) this.state = { kind: 'skip', remaining: paddedSize(size) };
        return;
      case 'link':
        throw unsafe(name, `is a hard link (to ${JSON.stringify(linkname)}); only files, directories and symlinks are accepted`);
      case 'char-device':
      case 'block-device':
        throw unsafe(name, 'is a device node; only files, directories and symlinks are accepted');
      case 'fifo':
        throw unsafe(name, 'is a FIFO; only files, directories and symlinks are accepted');
      default:
        throw unsafe(name, `has unsupported tar type ${JSON.stringify(header.typeflag)}`);
    }
  }

  private collectMeta(header: TarHeader): void {
    if (header.size > MAX_META_BYTES) throw corrupt(`a ${header.type} member of ${header.size} bytes (over ${MAX_META_BYTES})`);
    const onDone = (body: Buffer): void => {
      try {
        if (header.type === 'gnu-long-name') this.longName = decodeLongName(body);
        else if (header.type === 'gnu-long-link') this.longLink = decodeLongName(body);
        else if (header.type === 'pax-header') this.pax = decodePax(body);
        // pax global headers set defaults nobody relies on for these archives: ignored.
      } catch (err) {
        if (err instanceof TarHeaderError) throw corrupt(`bad ${header.type} member: ${err.message}`);
        throw err;
      }
    };
    if (header.size === 0) {
      onDone(Buffer.alloc(0));
      return;
    }
    this.state = { kind: 'collect', member: header, body: Buffer.alloc(header.size), filled: 0, padding: paddedSize(header.size) - header.size, onDone };
  }
}

/**
 * sha256 of each DEFAULT_CHUNK_BYTES piece of a stream, as it goes by: the pack is hashed while
 * it is indexed, so proving it later costs no second pass over it here.
 */
class ChunkDigester {
  private digests = Buffer.alloc(64 * DIGEST_BYTES);
  private count = 0;
  private hash: Hash | undefined;
  private filled = 0;

  push(chunk: Buffer): void {
    for (let i = 0; i < chunk.length; ) {
      const n = Math.min(DEFAULT_CHUNK_BYTES - this.filled, chunk.length - i);
      (this.hash ??= createHash('sha256')).update(chunk.subarray(i, i + n));
      this.filled += n;
      i += n;
      if (this.filled === DEFAULT_CHUNK_BYTES) this.close();
    }
  }

  private close(): void {
    if (!this.hash) return;
    if ((this.count + 1) * DIGEST_BYTES > this.digests.length) {
      const bigger = Buffer.alloc(this.digests.length * 2);
      this.digests.copy(bigger);
      this.digests = bigger;
    }
    this.hash.digest().copy(this.digests, this.count * DIGEST_BYTES);
    this.count++;
    this.hash = undefined;
    this.filled = 0;
  }

  finish(packBytes: number): PackDigests {
    this.close();
    return { packBytes, chunkBytes: DEFAULT_CHUNK_BYTES, digests: Buffer.from(this.digests.subarray(0, this.count * DIGEST_BYTES)) };
  }
}

/** The decoded stream passed --max-total-bytes (seen by the indexer, or by the decoder's file-size limit). */
export function totalBytesLimit(maxTotalBytes: number): KheadersError {
  return new KheadersError('E_LIMIT', `archive expands past the limit of ${maxTotalBytes} bytes (--max-total-bytes)`, {
    limit: 'maxTotalBytes',
    value: maxTotalBytes,
  });
}

function corrupt(message: string): KheadersError {
  return new KheadersError('E_ARCHIVE_CORRUPT', `corrupt archive: ${message}`);
}

function unsafe(entry: string, why: string): KheadersError {
  return new KheadersError('E_UNSAFE_ENTRY', `unsafe archive entry ${JSON.stringify(entry)}: ${why}`, { entry, reason: why });
}
