/**
 * Reading a file's first bytes as soon as it is looked up, before the kernel asks for them.
 *
 * Why: on a cold mount a compiler costs one LOOKUP and then one READ per header, back to back.
 * Between our LOOKUP answer and the READ arriving, the compiler opens the file and the kernel
 * queues the read (~0.15 ms measured); answering that READ then takes a pack pread through the
 * threadpool plus the chunk check (~0.15 ms median, cold disk). Starting the read at LOOKUP time
 * overlaps the two, so the READ is mostly answered from bytes already in hand.
 *
 * What it reads is exactly what the READ would have read: the model's read(), bytes proven
 * before first served. Node ids never change meaning (fs-model.ts), so a prefetched buffer is
 * valid for its node for ever; volatile nodes (made on request, they can change) are never
 * prefetched.
 *
 * Bounded, since a lookup is not always followed by a read (`stat`, `test -e`): at most
 * `maxEntries` files and `maxBytes` bytes are held, oldest dropped first, and whatever nobody
 * took within `ttlMs` is dropped, so an idle daemon holds nothing.
 */
import type { FsAttr, FsModel } from './fs-model.js';

export interface PrefetchOptions {
  /** Files held at once. */
  maxEntries: number;
  /** Bytes held at once (counting reads still in flight). */
  maxBytes: number;
  /** Largest prefix read per file: the size of the kernel's first READ (its readahead window). */
  maxFileBytes: number;
  /** A prefetch nobody took for this long is dropped. */
  ttlMs: number;
}

export const DEFAULT_PREFETCH: Readonly<PrefetchOptions> = { maxEntries: 32, maxBytes: 512 * 1024, maxFileBytes: 128 * 1024, ttlMs: 1000 };

export interface PrefetchStats {
  /** Reads started on a lookup. */
  started: number;
  /** READs answered from a prefetch. */
  used: number;
  /** Prefetches dropped untaken (bounds, age). */
  dropped: number;
  /** Files held now. */
  held: number;
}

interface Pending {
  data: Promise<Buffer>;
  length: number;
  /** Whole file (then a READ asking for more than `length` is still fully answered). */
  whole: boolean;
  at: number;
}

export class LookupPrefetch {
  private readonly options: PrefetchOptions;
  private readonly pending = new Map<number, Pending>();
  private bytes = 0;
  private timer: NodeJS.Timeout | undefined;
  private readonly stats = { started: 0, used: 0, dropped: 0 };

  constructor(
    private readonly model: FsModel,
    options: Partial<PrefetchOptions> = {},
  ) {
    this.options = { ...DEFAULT_PREFETCH, ...options };
  }

  /** The kernel was just told about `a` by a LOOKUP: its first READ is likely moments away. */
  looked(a: FsAttr): void {
    const o = this.options;
    if (a.kind !== 'file' || a.volatile || a.size === 0 || o.maxEntries <= 0 || this.pending.has(a.ino)) return;
    const length = Math.min(a.size, o.maxFileBytes);
    if (length > o.maxBytes) return;
    while (this.pending.size >= o.maxEntries || this.bytes + length > o.maxBytes) this.drop(this.pending.keys().next().value!);
    const data = this.model.read(a.ino, 0, length);
    // A failure is the READ's to report (the same error a direct read would give); untaken, it
    // has already been reported by the reader to the entry's owner.
    data.catch(() => {});
    this.pending.set(a.ino, { data, length, whole: length === a.size, at: Date.now() });
    this.bytes += length;
    this.stats.started++;
    this.timer ??= setTimeout(() => this.expire(), o.ttlMs).unref();
  }

  /** The bytes for READ(ino, offset, size) if a prefetch holds them (each is used once). */
  take(ino: number, offset: number, size: number): Promise<Buffer> | undefined {
    const p = this.pending.get(ino);
    if (!p) return undefined;
    this.forget(ino, p);
    if (offset !== 0 || (size > p.length && !p.whole)) {
      this.stats.dropped++;
      return undefined;
    }
    this.stats.used++;
    return size >= p.length ? p.data : p.data.then((buf) => buf.subarray(0, size));
  }

  counts(): PrefetchStats {
    return { ...this.stats, held: this.pending.size };
  }

  /** Drop everything held (the connection ended). */
  clear(): void {
    for (const ino of [...this.pending.keys()]) this.drop(ino);
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private forget(ino: number, p: Pending): void {
    this.pending.delete(ino);
    this.bytes -= p.length;
  }

  private drop(ino: number): void {
    const p = this.pending.get(ino);
    if (!p) return;
    this.forget(ino, p);
    this.stats.dropped++;
  }

  private expire(): void {
    this.timer = undefined;
    const oldest = Date.now() - this.options.ttlMs;
    for (const [ino, p] of this.pending) if (p.at <= oldest) this.drop(ino);
    if (this.pending.size > 0) this.timer = setTimeout(() => this.expire(), this.options.ttlMs).unref();
  }
}
