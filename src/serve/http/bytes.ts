/**
 * Where response bytes come from: the entries' readers (store/reader.ts: exact preads, proven
 * against the index's digests before first served) and two bounded LRU caches.
 *
 * Measured with wrk on 200 real headers: one async pread per request held the daemon at ~7k
 * req/s, the same bodies from memory gave ~11k, because the libuv threadpool hand-off (main
 * thread → worker → main thread) costs context switches on cores busy with clients. nginx serves the
 * same file from the page cache with sendfile; the equivalent here is to keep hot header bodies
 * in memory. Entries are immutable, so a cached body never goes stale; the cache is bounded
 * (HttpLimits.bodyCacheBytes, small files only) and dropped per entry when it leaves the cache.
 * Concurrent misses for one body share one read.
 *
 * Never synchronous I/O: FUSE callbacks run on the same thread.
 */
import { Readable } from 'node:stream';
import type zlib from 'node:zlib';
import { open, type FileHandle } from 'node:fs/promises';
import { KheadersError } from '../../errors.js';
import { PreadStream, preadAll, type EntryReader } from '../../store/reader.js';

/** zlib (~4 ms to load) is loaded by the first gzip answer, not by the start. */
const gzipAsync = (data: Buffer, options: zlib.ZlibOptions): Promise<Buffer> =>
  new Promise((resolve, reject) => process.getBuiltinModule('node:zlib').gzip(data, options, (err, out) => (err ? reject(err) : resolve(out))));
export const GZIP_OPTIONS: zlib.ZlibOptions = { level: 6 };

export type Body =
  | { kind: 'buffer'; data: Buffer }
  /** A file outside the entries (a module header made on request): read as it is, short reads refused. */
  | { kind: 'file'; file: string; offset: number; size: number; key: string }
  /** A file of an entry's tree; `key` names these bytes in the caches (computed once per file). */
  | { kind: 'node'; reader: EntryReader; node: number; size: number; key: string }
  /** An entry's original archive. */
  | { kind: 'archive'; reader: EntryReader; size: number; key: string };

export function entryBody(reader: EntryReader, node: number, size: number, keyPrefix: string): Body {
  return { kind: 'node', reader, node, size, key: `${keyPrefix}${node}` };
}

export function fileBody(file: string, offset: number, size: number): Body {
  return { kind: 'file', file, offset, size, key: `${file}\0${offset}\0${size}` };
}

export function archiveBody(reader: EntryReader, size: number, keyPrefix: string): Body {
  return { kind: 'archive', reader, size, key: `${keyPrefix}archive` };
}

/** Exactly `length` bytes of a file outside the entries, or an error (it changed under us). */
async function readFileExactly(fh: FileHandle, file: string, position: number, length: number): Promise<Buffer> {
  const { buf, got } = await preadAll(fh, position, length);
  if (got < length) throw new KheadersError('E_INTERNAL', `${file} ends at byte ${position + got}, before the ${length} bytes at ${position} it should hold`, { file });
  return buf;
}

export function bodySize(body: Body): number {
  return body.kind === 'buffer' ? body.data.length : body.size;
}

/**
 * A cache of immutable byte strings, bounded in total bytes. Eviction is second-chance (CLOCK)
 * rather than strict LRU: a hit only sets a flag, so the hot path does no Map surgery; eviction
 * skips (and clears) flagged items once before dropping them.
 */
export class ByteLru {
  private readonly map = new Map<string, { buf: Buffer; used: boolean }>();
  private total = 0;

  constructor(
    readonly maxBytes: number,
    /** Larger values are not kept (one big file must not flush every small one). */
    readonly maxItemBytes: number,
  ) {}

  get bytes(): number {
    return this.total;
  }

  get(key: string): Buffer | undefined {
    const item = this.map.get(key);
    if (!item) return undefined;
    item.used = true;
    return item.buf;
  }

  set(key: string, value: Buffer): void {
    if (value.length > this.maxItemBytes || value.length > this.maxBytes || this.map.has(key)) return;
    this.map.set(key, { buf: value, used: false });
    this.total += value.length;
    while (this.total > this.maxBytes) {
      const [k, item] = this.map.entries().next().value as [string, { buf: Buffer; used: boolean }];
      this.map.delete(k);
      if (item.used && k !== key) {
        item.used = false; // second chance: back of the queue
        this.map.set(k, item);
      } else this.total -= item.buf.length;
    }
  }

  deletePrefix(prefix: string): void {
    for (const [k, item] of this.map) {
      if (!k.startsWith(prefix)) continue;
      this.map.delete(k);
      this.total -= item.buf.length;
    }
  }
}

export interface ByteSourceOptions {
  /** Total bytes of hot file bodies kept in memory (0 disables the cache). */
  bodyCacheBytes: number;
  /** Only bodies up to this size are cached. */
  bodyCacheItemBytes: number;
  /** Total bytes of gzip-compressed bodies kept. */
  gzipCacheBytes: number;
}

export class ByteSource {
  private readonly bodies: ByteLru;
  private readonly zipped: ByteLru;
  private readonly inflight = new Map<string, Promise<Buffer>>();

  constructor(opts: ByteSourceOptions) {
    this.bodies = new ByteLru(opts.bodyCacheBytes, opts.bodyCacheItemBytes);
    this.zipped = new ByteLru(opts.gzipCacheBytes, opts.gzipCacheBytes / 8);
  }

  /** Bytes held by the two caches (for /metrics). */
  get cachedBytes(): number {
    return this.bodies.bytes + this.zipped.bytes;
  }

  /** The whole body as one buffer (callers only do this for small bodies). */
  async whole(body: Body): Promise<Buffer> {
    if (body.kind === 'buffer') return body.data;
    if (body.size === 0) return Buffer.alloc(0);
    const cacheable = body.size <= this.bodies.maxItemBytes && this.bodies.maxBytes > 0;
    if (!cacheable) return this.read(body, 0, body.size);
    const key = body.key;
    const hit = this.bodies.get(key);
    if (hit) return hit;
    let pending = this.inflight.get(key);
    if (!pending) {
      pending = this.read(body, 0, body.size).finally(() => this.inflight.delete(key));
      this.inflight.set(key, pending);
      void pending.then(
        (buf) => this.bodies.set(key, buf),
        () => {},
      );
    }
    return pending;
  }

  /**
   * Bytes [start, end) if they can be had without I/O (an in-memory body or a cache hit), else
   * undefined. The fast path answers synchronously with these: a response written inside the
   * request event costs measurably less CPU than one written from a later microtask.
   */
  peek(body: Body, start: number, end: number): Buffer | undefined {
    if (body.kind === 'buffer') return body.data.subarray(start, end);
    if (body.size === 0) return Buffer.alloc(0);
    const hit = this.bodies.get(body.key);
    return hit && (start === 0 && end === hit.length ? hit : hit.subarray(start, end));
  }

  /** The cached gzip encoding for this ETag, if any. */
  peekGzip(etag: string): Buffer | undefined {
    return this.zipped.get(etag);
  }

  /** Bytes [start, end) of the body as one buffer. */
  async slice(body: Body, start: number, end: number): Promise<Buffer> {
    if (body.kind === 'buffer') return body.data.subarray(start, end);
    if (start === 0 && end === body.size) return this.whole(body);
    const cached = this.bodies.get(body.key);
    if (cached) return cached.subarray(start, end);
    return this.read(body, start, end - start);
  }

  /** Bytes [start, end) of the body as a stream of preads (large bodies), proven first. */
  async stream(body: Body, start: number, end: number): Promise<Readable> {
    if (body.kind === 'buffer') return Readable.from([body.data.subarray(start, end)]);
    if (body.kind === 'archive') return body.reader.streamArchive(start, end);
    if (body.kind === 'file') {
      const { file } = body;
      const fh = await open(file, 'r');
      return new PreadStream((pos, n) => readFileExactly(fh, file, pos, n), body.offset + start, body.offset + end, () => void fh.close().catch(() => {}));
    }
    return body.reader.stream(body.node, start, end);
  }

  /** The gzip encoding of a small body, compressed once per ETag. */
  async gzip(etag: string, body: Body): Promise<Buffer> {
    const hit = this.zipped.get(etag);
    if (hit) return hit;
    const z = await gzipAsync(await this.whole(body), GZIP_OPTIONS);
    this.zipped.set(etag, z);
    return z;
  }

  /** Forget an entry's cached bodies (keys start with the served entry's cache key). */
  retire(keyPrefix: string): void {
    this.bodies.deletePrefix(keyPrefix);
    // Compressed bodies are keyed by ETag (digest-derived): they age out of the LRU.
  }

  private async read(body: Exclude<Body, { kind: 'buffer' }>, position: number, length: number): Promise<Buffer> {
    switch (body.kind) {
      case 'archive':
        return body.reader.readArchive(position, length);
      case 'node':
        return body.reader.read(body.node, position, length);
      case 'file': {
        const fh = await open(body.file, 'r');
        try {
          return await readFileExactly(fh, body.file, body.offset + position, length);
        } finally {
          await fh.close();
        }
      }
    }
  }
}
