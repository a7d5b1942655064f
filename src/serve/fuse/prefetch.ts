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
 * Following includes: a compiler takes one header at a time (LOOKUP, READ, parse, the next
 * `#include`), and on a cold cache each READ then waits for its pack pread (measured on a cold
 * BPF compile: 70% of the READs arrived before the read started at their LOOKUP had finished,
 * ~130-190 ms of waiting per compile). So once a prefetched header's bytes are in hand, its
 * `#include` lines are resolved in the tree and those headers are read too, depth first as the
 * compiler will take them, a few at a time: by the time the compiler looks one up, its bytes
 * are usually already here. `<a/b.h>` is looked for under the include roots, learnt from the
 * kernel's own lookups (a directory in which the compiler looked up a name that begins an
 * `<...>` include, such as `linux` or `asm`); `"b.h"` beside the header, then under the roots.
 * Nothing is served from a guess: the bytes are the model's read() as a READ would get them,
 * and they answer only a READ of that very node.
 *
 * Bounded, since a lookup is not always followed by a read (`stat`, `test -e`) and a followed
 * include is not always compiled (`#ifdef`): at most `maxEntries` files and `maxBytes` bytes are
 * held, oldest dropped first (followed includes never push anything out: they wait for room),
 * and whatever nobody took within `ttlMs` is dropped, so an idle daemon holds nothing.
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
  /** Reads of followed includes in flight at once (0: includes are not followed). Small, so
   * the READs and lookups the compiler waits on never queue behind them in the threadpool. */
  includeReads: number;
}

// 1,024 files / 4 MiB: a cold BPF compile reads ~710 headers, ~3 MiB of first windows, and a
// compile takes ~1.5 s; the followed ones are read well ahead of the compiler.
export const DEFAULT_PREFETCH: Readonly<PrefetchOptions> = { maxEntries: 1024, maxBytes: 4 * 1024 * 1024, maxFileBytes: 128 * 1024, ttlMs: 3000, includeReads: 2 };

/** First components of `<...>` includes known before any header is read (the kernel's own). */
const SEED_INCLUDE_DIRS = ['linux', 'asm', 'asm-generic', 'uapi', 'net', 'generated'];
/** `#include <x>` / `#include "x"` at the start of a line (the compiler's own syntax, roughly). */
const INCLUDE_RE = /^[ \t]*#[ \t]*include[ \t]*([<"])([^>"\n]+)[>"]/gm;
/** A header holds at most this many includes worth following (bounds the work per header). */
const MAX_INCLUDES_PER_FILE = 256;

/** A header to read ahead: the node and the directory it was found in (for its `"x"` includes). */
interface Wanted {
  attr: FsAttr;
  dir: number;
}

export interface PrefetchStats {
  /** Reads started on a lookup. */
  started: number;
  /** READs answered from a prefetch. */
  used: number;
  /** Prefetches dropped untaken (bounds, age). */
  dropped: number;
  /** Of `started`: reads of headers found in the `#include` lines of prefetched ones. */
  followed: number;
  /** Of `used`: READs whose bytes were already in hand when they arrived (no wait at all). */
  ready: number;
  /** Files held now. */
  held: number;
}

interface Pending {
  data: Promise<Buffer>;
  length: number;
  /** Whole file (then a READ asking for more than `length` is still fully answered). */
  whole: boolean;
  /** The read has finished. */
  settled: boolean;
  at: number;
}

export class LookupPrefetch {
  private readonly options: PrefetchOptions;
  private readonly pending = new Map<number, Pending>();
  private bytes = 0;
  private timer: NodeJS.Timeout | undefined;
  private readonly stats = { started: 0, used: 0, dropped: 0, followed: 0, ready: 0 };
  /** Directories the compiler searches for `<...>` includes (see the file comment). */
  private readonly roots = new Set<number>();
  private readonly includeDirs = new Set<string>(SEED_INCLUDE_DIRS);
  /** Files whose includes were followed already (cleared with everything when idle). */
  private readonly scanned = new Set<number>();
  /** Followed includes not read yet: a stack, so the reading goes depth first like the compiler. */
  private wanted: Wanted[] = [];
  private following = 0;

  constructor(
    private readonly model: FsModel,
    options: Partial<PrefetchOptions> = {},
  ) {
    this.options = { ...DEFAULT_PREFETCH, ...options };
  }

  /** The kernel looks up `name` in directory `parent` (whether or not it exists). */
  probed(parent: number, name: string): void {
    if (this.options.includeReads > 0 && this.includeDirs.has(name)) this.roots.add(parent);
  }

  /** The kernel was just told about `a`, found in directory `dir`, by a LOOKUP: its first READ
   * is likely moments away. */
  looked(a: FsAttr, dir?: number): void {
    const o = this.options;
    if (!this.readable(a) || this.pending.has(a.ino)) return;
    const length = Math.min(a.size, o.maxFileBytes);
    if (length > o.maxBytes) return;
    while (this.pending.size >= o.maxEntries || this.bytes + length > o.maxBytes) this.drop(this.pending.keys().next().value!);
    void this.start(a, length, dir);
  }

  private readable(a: FsAttr): boolean {
    return a.kind === 'file' && !a.volatile && a.size > 0 && this.options.maxEntries > 0;
  }

  private start(a: FsAttr, length: number, dir: number | undefined): Promise<Buffer> {
    const data = this.model.read(a.ino, 0, length);
    // A failure is the READ's to report (the same error a direct read would give); untaken, it
    // has already been reported by the reader to the entry's owner.
    const p: Pending = { data, length, whole: length === a.size, settled: false, at: Date.now() };
    data.then(
      (buf) => {
        p.settled = true;
        if (dir !== undefined) this.follow(a.ino, dir, buf);
      },
      () => {
        p.settled = true;
      },
    );
    this.pending.set(a.ino, p);
    this.bytes += length;
    this.stats.started++;
    this.timer ??= setTimeout(() => this.expire(), this.options.ttlMs).unref();
    return data;
  }

  /** The bytes of `ino` (in directory `dir`) are in hand: queue the headers it includes. */
  private follow(ino: number, dir: number, buf: Buffer): void {
    if (this.options.includeReads <= 0 || this.scanned.has(ino)) return;
    this.scanned.add(ino);
    const found: Wanted[] = [];
    let n = 0;
    for (const m of buf.toString('latin1').matchAll(INCLUDE_RE)) {
      if (++n > MAX_INCLUDES_PER_FILE) break;
      const angle = m[1] === '<';
      const parts = m[2]!.trim().split('/');
      if (angle && parts.length > 1) this.includeDirs.add(parts[0]!);
      const w = (angle ? undefined : this.resolve(dir, parts)) ?? this.resolveInRoots(parts);
      if (w && !this.scanned.has(w.attr.ino) && !this.pending.has(w.attr.ino)) found.push(w);
    }
    // The first include on top: the compiler reads them in order, each one's own includes first.
    for (let i = found.length - 1; i >= 0; i--) this.wanted.push(found[i]!);
    this.pump();
  }

  private resolveInRoots(parts: string[]): Wanted | undefined {
    for (const root of this.roots) {
      const w = this.resolve(root, parts);
      if (w) return w;
    }
    return undefined;
  }

  /** `parts` from directory `dir`, in memory; only plain names (no `..`, no symlinks). */
  private resolve(dir: number, parts: string[]): Wanted | undefined {
    let at = dir;
    for (let i = 0; i < parts.length; i++) {
      const part = parts[i]!;
      if (part === '' || part === '.' || part === '..') return undefined;
      const a = this.model.lookup(at, part);
      if (!a || a.volatile) return undefined;
      if (i === parts.length - 1) return this.readable(a) ? { attr: a, dir: at } : undefined;
      if (a.kind !== 'dir') return undefined;
      at = a.ino;
    }
    return undefined;
  }

  /** Read followed includes, `includeReads` at a time, while there is room (never evicting). */
  private pump(): void {
    const o = this.options;
    while (this.following < o.includeReads && this.wanted.length > 0) {
      const w = this.wanted[this.wanted.length - 1]!;
      if (this.pending.has(w.attr.ino) || this.scanned.has(w.attr.ino)) {
        this.wanted.pop();
        continue;
      }
      const length = Math.min(w.attr.size, o.maxFileBytes);
      if (this.pending.size >= o.maxEntries || this.bytes + length > o.maxBytes) return;
      this.wanted.pop();
      this.following++;
      this.stats.followed++;
      void this.start(w.attr, length, w.dir)
        .catch(() => {})
        .finally(() => {
          this.following--;
          this.pump();
        });
    }
  }

  /** The bytes for READ(ino, offset, size) if a prefetch holds them (each is used once). */
  take(ino: number, offset: number, size: number): Promise<Buffer> | undefined {
    const p = this.pending.get(ino);
    if (!p) return undefined;
    this.forget(ino, p);
    this.pump();
    if (offset !== 0 || (size > p.length && !p.whole)) {
      this.stats.dropped++;
      return undefined;
    }
    this.stats.used++;
    if (p.settled) this.stats.ready++;
    return size >= p.length ? p.data : p.data.then((buf) => buf.subarray(0, size));
  }

  counts(): PrefetchStats {
    return { ...this.stats, held: this.pending.size };
  }

  /** Drop everything held (the connection ended). */
  clear(): void {
    this.wanted = [];
    this.scanned.clear();
    this.roots.clear();
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
    // Includes still queued belong to a compile that has gone quiet: forget them too.
    if (this.pending.size === 0) {
      this.wanted = [];
      this.scanned.clear();
    }
    this.pump();
    if (this.pending.size > 0) this.timer = setTimeout(() => this.expire(), this.options.ttlMs).unref();
  }
}
