/**
 * One FUSE session: turns each kernel request into an answer from the FsModel.
 *
 * No I/O of its own: messages come in through `dispatch()` and leave through a FuseChannel
 * (DevFuse in production, arrays in tests). Everything is answered synchronously on the JS
 * thread except READ, which awaits the model's asynchronous pack read — so any number of reads
 * are in flight at once and a slow one never holds up a lookup.
 *
 * Caching policy (why a warm compile costs almost no requests):
 * - entries, attributes and negative entries carry long timeouts: under a node id the tree never
 *   changes, and the names that do change (`current`, `<release>`, new digests) are pushed out of
 *   the kernel's caches with INVAL_ENTRY/INVAL_INODE when the model reports them;
 * - files open with KEEP_CACHE (page cache survives close/open) and NOFLUSH (no FLUSH on close),
 *   directories with CACHE_DIR (the kernel keeps the listing); with the kernel's zero-message
 *   open (NO_OPEN_SUPPORT), OPEN and RELEASE stop reaching us at all, with the same cache flags;
 * - READDIRPLUS fills the dentry cache while listing, so `find` and a later stat cost nothing;
 *   'always', not the kernel's adaptive mode: that one sends only a listing's first buffer as
 *   READDIRPLUS and the rest as plain READDIR, so every name past it costs a LOOKUP later
 *   (measured, reading every file after drop_caches: 2,015 LOOKUPs with 'auto', 4 with
 *   'always'); attributes of an immutable tree are as good in a listing as in a lookup;
 * - a file's first bytes are read as soon as it is looked up (prefetch.ts), so the READ that
 *   follows on a cold mount is answered from bytes already in hand;
 * - `default_permissions` on the mount (see mount.ts) lets the kernel check modes itself: no
 *   ACCESS requests.
 */
import fs from 'node:fs';
import type { Logger } from '../../../log.js';
import { errnoFor } from '../errno.js';
import { ROOT_INO, type FsAttr, type FsInvalidation, type FsModel } from '../fs-model.js';
import { LookupPrefetch, type PrefetchOptions, type PrefetchStats } from '../prefetch.js';
import type { FuseOpCounts } from '../types.js';
import type { FuseChannel } from './device.js';
import {
  decodeRequest,
  direntType,
  encodeAttrOut,
  encodeDirents,
  encodeDirentsPlus,
  encodeEntryOut,
  encodeError,
  encodeInitOut,
  encodeNotifyInvalEntry,
  encodeNotifyInvalInode,
  encodeOpenOut,
  encodeOutHeader,
  encodeReply,
  encodeStatfsOut,
  encodeXattrSizeOut,
  Errno,
  FOPEN,
  InitFlag,
  negotiateInit,
  NO_REPLY_OPS,
  Op,
  opName,
  timeout,
  WRITE_OPS,
  type DirentPlusIn,
  type EntryParams,
  type FuseRequest,
  type InitOut,
  type Timeout,
} from './protocol.js';

export interface SessionOptions {
  /** Seconds the kernel may cache a name → node (default one day: see the file comment). */
  entryTimeoutSec?: number;
  attrTimeoutSec?: number;
  /** Seconds a "no such name" is cached (include-path probing); 0 disables negative entries. */
  negativeTimeoutSec?: number;
  /** Use the kernel's zero-message open/opendir when offered (default true). */
  zeroMessageOpen?: boolean;
  /** READDIRPLUS: 'always' (default: every listing fills the dentry cache), 'auto' lets the
   * kernel choose per listing buffer, or 'off'. */
  readdirplus?: 'auto' | 'always' | 'off';
  /** Must match the read buffer: buffer >= maxWrite + headers (io-worker.ts). */
  maxWrite?: number;
  /** Largest READ in pages (1 MiB with 4 KiB pages). */
  maxPages?: number;
  /** How many background requests (readahead) the kernel keeps in flight. */
  maxBackground?: number;
  /** Read a file's first bytes when it is looked up (prefetch.ts); false turns it off. */
  prefetch?: boolean | Partial<PrefetchOptions>;
}

export interface ResolvedSessionOptions {
  entryTimeoutSec: number;
  attrTimeoutSec: number;
  negativeTimeoutSec: number;
  zeroMessageOpen: boolean;
  readdirplus: 'auto' | 'always' | 'off';
  maxWrite: number;
  maxPages: number;
  maxBackground: number;
  prefetch: boolean | Partial<PrefetchOptions>;
}

export const DEFAULT_SESSION_OPTIONS: Readonly<ResolvedSessionOptions> = {
  entryTimeoutSec: 86_400,
  attrTimeoutSec: 86_400,
  negativeTimeoutSec: 86_400,
  zeroMessageOpen: true,
  readdirplus: 'always',
  maxWrite: 128 * 1024,
  maxPages: 256,
  maxBackground: 64,
  prefetch: true,
};

/** What INIT settled on, for logs and tests. */
export interface NegotiatedInit {
  kernelMajor: number;
  kernelMinor: number;
  minor: number;
  flags: number;
  maxWrite: number;
  maxPages: number;
  maxReadahead: number;
}

/** A directory listing as served: '.', '..', then the children, cookie = index + 1. */
interface DirRecord {
  ino: number;
  name: Buffer;
  type: number;
  /** Undefined for '.' and '..' (READDIRPLUS sends those without attributes). */
  attr: FsAttr | undefined;
}

/** Seconds the kernel may cache a volatile node (FsAttr.volatile): long enough for one compile's lookups. */
const VOLATILE_TIMEOUT_SEC = 1;
/** Not an opcode: of the LOOKUPs counted, those answered with a negative entry. */
export const NEGATIVE_LOOKUP = 'lookup-negative';
const O_ACCMODE = 3;
const W_OK = fs.constants.W_OK;
const DOT = Buffer.from('.');
const DOTDOT = Buffer.from('..');
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

/** A name from the kernel as the model's string, or undefined if it is not valid UTF-8 (then no
 * archived name can equal it). */
function decodeName(raw: Buffer): string | undefined {
  for (let i = 0; i < raw.length; i++) {
    if (raw[i]! >= 0x80) {
      try {
        return strictUtf8.decode(raw);
      } catch {
        return undefined;
      }
    }
  }
  return raw.toString('latin1');
}

export class FuseSession {
  readonly options: ResolvedSessionOptions;
  private readonly model: FsModel;
  private readonly channel: FuseChannel;
  private readonly log: Logger;
  private readonly entryValid: Timeout;
  private readonly attrValid: Timeout;
  private readonly negativeValid: Timeout;
  /** Entry and attribute timeout of volatile nodes (see FsAttr.volatile). */
  private readonly volatileValid: Timeout;

  private minor = 0;
  private negotiated: NegotiatedInit | undefined;
  private destroyed = false;
  private readonly counts = new Map<string, number>();
  /** nodeid → how many lookups the kernel holds (LOOKUP/READDIRPLUS add, FORGET removes). */
  private readonly lookups = new Map<number, number>();
  /** directory ino → its parent, learnt from lookups and listings (for '..' in READDIR). */
  private readonly parents = new Map<number, number>([[ROOT_INO, ROOT_INO]]);
  /** OPENDIR handle → the listing it snapshotted, so one pass sees one consistent directory. */
  private readonly dirHandles = new Map<bigint, { ino: number; records: DirRecord[] }>();
  /** Without OPENDIR (zero-message opendir) a listing read in pages reuses its last snapshot. */
  private lastListing: { ino: number; records: DirRecord[] } | undefined;
  private nextFh = 1n;
  /** READs being answered: an INTERRUPT answers them EINTR and their late result is dropped. */
  private readonly inflight = new Map<bigint, { answered: boolean }>();
  private initWaiters: Array<{ resolve: (i: NegotiatedInit) => void; reject: (e: Error) => void }> = [];
  private unsubscribe: (() => void) | undefined;
  /** Made at INIT, when the size of the kernel's first READ (its readahead window) is known. */
  private prefetch: LookupPrefetch | undefined;
  private endedBy: string | undefined;

  constructor(model: FsModel, channel: FuseChannel, log: Logger, options: SessionOptions = {}) {
    this.model = model;
    this.channel = channel;
    this.log = log;
    this.options = { ...DEFAULT_SESSION_OPTIONS, ...definedOnly(options) };
    this.entryValid = timeout(this.options.entryTimeoutSec);
    this.attrValid = timeout(this.options.attrTimeoutSec);
    this.negativeValid = timeout(this.options.negativeTimeoutSec);
    this.volatileValid = timeout(VOLATILE_TIMEOUT_SEC);
    this.unsubscribe = model.onInvalidate((inval) => this.invalidate(inval));
  }

  /** Resolves once INIT has been answered (the mount is usable from then on). */
  initialized(): Promise<NegotiatedInit> {
    if (this.negotiated) return Promise.resolve(this.negotiated);
    if (this.endedBy !== undefined) return Promise.reject(new Error(`the FUSE connection ended before INIT: ${this.endedBy}`));
    return new Promise((resolve, reject) => this.initWaiters.push({ resolve, reject }));
  }

  get init(): NegotiatedInit | undefined {
    return this.negotiated;
  }

  /** Requests answered, by opcode name, plus 'malformed', 'notify' and 'lookup-negative' (the
   * LOOKUPs among them answered with a cached negative entry: a compile's include-path misses). */
  opCounts(): FuseOpCounts {
    return Object.fromEntries(this.counts);
  }

  /** What the lookup prefetch did (all zero when it is off). */
  prefetchCounts(): PrefetchStats {
    return this.prefetch?.counts() ?? { started: 0, used: 0, dropped: 0, followed: 0, ready: 0, held: 0 };
  }

  /** How many node ids the kernel currently holds references to. */
  knownNodes(): number {
    return this.lookups.size;
  }

  /** The connection is over: stop pushing invalidations, fail anyone waiting for INIT. */
  end(reason: string): void {
    this.endedBy ??= reason;
    this.unsubscribe?.();
    this.unsubscribe = undefined;
    this.prefetch?.clear();
    for (const w of this.initWaiters) w.reject(new Error(`the FUSE connection ended before INIT: ${reason}`));
    this.initWaiters = [];
  }

  private count(name: string): void {
    this.counts.set(name, (this.counts.get(name) ?? 0) + 1);
  }

  // ---- input --------------------------------------------------------------------------------

  /** Handle one message exactly as read from /dev/fuse. Never throws. */
  dispatch(buf: Buffer): void {
    const res = decodeRequest(buf);
    if (!res.ok) {
      this.count('malformed');
      this.log.warn({ reason: res.reason, opcode: res.header?.opcode, bytes: buf.length }, 'malformed FUSE request');
      // Without a readable header there is no unique to answer; the kernel then sees no reply
      // for a request it never sent in that shape, which cannot happen with a sane kernel.
      if (res.header && !NO_REPLY_OPS.has(res.header.opcode)) this.send(encodeError(res.header.unique, Errno.EIO));
      return;
    }
    const req = res.req;
    this.count(opName(req.opcode));
    try {
      this.handle(req);
    } catch (err) {
      this.log.error({ err, opcode: opName(req.opcode), nodeid: req.nodeid }, 'FUSE request handler failed');
      if (!NO_REPLY_OPS.has(req.opcode)) this.send(encodeError(req.unique, Errno.EIO));
    }
  }

  private handle(req: FuseRequest): void {
    if (req.kind === 'init') return this.onInit(req);
    if (!this.negotiated) {
      // The kernel sends nothing before INIT is answered; anything else is a confused peer.
      if (!NO_REPLY_OPS.has(req.opcode)) this.replyError(req, Errno.EIO);
      return;
    }
    switch (req.kind) {
      case 'lookup':
        return this.onLookup(req);
      case 'forget':
        return this.forget(req.nodeid, req.nlookup);
      case 'batch_forget':
        for (const f of req.items) this.forget(f.nodeid, f.nlookup);
        return;
      case 'getattr': {
        const a = this.model.getattr(req.nodeid);
        if (!a) return this.replyError(req, Errno.ENOENT);
        return this.replyOk(req, encodeAttrOut(a, a.volatile ? this.volatileValid : this.attrValid, this.minor));
      }
      case 'readlink': {
        const a = this.model.getattr(req.nodeid);
        if (!a) return this.replyError(req, Errno.ENOENT);
        const target = a.kind === 'symlink' ? this.model.readlink(req.nodeid) : undefined;
        if (target === undefined) return this.replyError(req, Errno.EINVAL);
        return this.replyOk(req, Buffer.from(target, 'utf8'));
      }
      case 'open':
        return req.opcode === Op.OPENDIR ? this.onOpendir(req) : this.onOpen(req);
      case 'read':
        if (req.opcode === Op.READ) return this.onRead(req);
        return this.onReaddir(req, req.opcode === Op.READDIRPLUS);
      case 'release':
        if (req.opcode === Op.RELEASEDIR) this.dirHandles.delete(req.release.fh);
        return this.replyOk(req);
      case 'statfs':
        return this.replyOk(req, encodeStatfsOut(this.model.statfs(), this.minor));
      case 'access': {
        // Only sent without default_permissions; modes are 0444/0555, so only writing is refused.
        if (!this.model.getattr(req.nodeid)) return this.replyError(req, Errno.ENOENT);
        return req.mask & W_OK ? this.replyError(req, Errno.EROFS) : this.replyOk(req);
      }
      case 'getxattr':
        // No extended attributes: "this one does not exist" keeps xattrs "supported" (ls, cp -a).
        return this.replyError(req, Errno.ENODATA);
      case 'listxattr':
        // An empty list, consistent with ENODATA above: the size probe says 0 bytes.
        return this.replyOk(req, req.size === 0 ? encodeXattrSizeOut(0) : undefined);
      case 'flush':
        // Nothing is ever written, so there is nothing to flush. ENOSYS is the kernel's "flush
        // not needed" (it counts it as success and stops sending FLUSH on every close); files
        // opened through OPEN carry NOFLUSH anyway, this is for zero-message opens.
        return this.replyError(req, Errno.ENOSYS);
      case 'interrupt':
        return this.onInterrupt(req.target);
      case 'destroy':
        this.destroyed = true;
        this.replyOk(req);
        this.end('DESTROY');
        return;
      case 'other':
        if (req.opcode === Op.NOTIFY_REPLY) return; // the answer to our wake-up retrieve: no reply
        if (WRITE_OPS.has(req.opcode)) return this.replyError(req, Errno.EROFS);
        // FSYNC, SYNCFS, LSEEK, IOCTL, POLL, BMAP, locks, STATX, …: ENOSYS, which for several of
        // them also tells the kernel never to ask again.
        return this.replyError(req, Errno.ENOSYS);
    }
  }

  // ---- INIT ---------------------------------------------------------------------------------

  private onInit(req: FuseRequest & { kind: 'init' }): void {
    const o = this.options;
    let want = InitFlag.ASYNC_READ | InitFlag.PARALLEL_DIROPS | InitFlag.CACHE_SYMLINKS | InitFlag.MAX_PAGES | InitFlag.BIG_WRITES | InitFlag.ABORT_ERROR;
    if (o.readdirplus !== 'off') want |= InitFlag.DO_READDIRPLUS;
    if (o.readdirplus === 'auto') want |= InitFlag.READDIRPLUS_AUTO;
    if (o.zeroMessageOpen) want |= InitFlag.NO_OPEN_SUPPORT | InitFlag.NO_OPENDIR_SUPPORT;
    const decision = negotiateInit(req.init, {
      flags: want >>> 0,
      maxWrite: o.maxWrite,
      maxPages: o.maxPages,
      maxBackground: o.maxBackground,
      congestionThreshold: Math.floor((o.maxBackground * 3) / 4),
      timeGran: 1,
    });
    if (decision.kind === 'refuse') {
      this.log.error({ kernel: `${req.init.major}.${req.init.minor}` }, decision.reason);
      return this.replyError(req, Errno.EPROTO);
    }
    if (decision.kind === 'retry') {
      this.log.warn({ kernel: `${req.init.major}.${req.init.minor}` }, 'kernel FUSE major version is newer than ours; offering 7.x');
      return this.replyOk(req, encodeInitOut(decision.reply, decision.reply.minor));
    }
    this.minor = decision.minor;
    const reply: InitOut = decision.reply;
    const info: NegotiatedInit = {
      kernelMajor: req.init.major,
      kernelMinor: req.init.minor,
      minor: this.minor,
      flags: reply.flags,
      maxWrite: reply.maxWrite,
      maxPages: reply.maxPages,
      maxReadahead: reply.maxReadahead,
    };
    const err = this.send(encodeReply(req.unique, encodeInitOut(reply, this.minor)));
    if (err) {
      this.log.error({ errno: err }, 'the kernel refused our INIT reply');
      for (const w of this.initWaiters) w.reject(new Error(`INIT reply refused: ${err}`));
      this.initWaiters = [];
      return;
    }
    this.negotiated = info;
    if (o.prefetch !== false) {
      // The kernel's first READ of a file asks for up to its readahead window, within the
      // largest READ (32 pages when MAX_PAGES was not negotiated).
      const window = Math.min(info.maxReadahead || 128 * 1024, (info.maxPages || 32) * 4096);
      this.prefetch = new LookupPrefetch(this.model, { maxFileBytes: window, ...(o.prefetch === true ? {} : o.prefetch) });
    }
    this.log.debug({ ...info, flags: `0x${info.flags.toString(16)}` }, 'FUSE session initialised');
    for (const w of this.initWaiters) w.resolve(info);
    this.initWaiters = [];
  }

  private has(flag: number): boolean {
    return ((this.negotiated?.flags ?? 0) & flag) !== 0;
  }

  // ---- names --------------------------------------------------------------------------------

  private entryFor(a: FsAttr): EntryParams {
    if (a.volatile) return { nodeid: a.ino, generation: 0, entryValid: this.volatileValid, attrValid: this.volatileValid, attr: a };
    return { nodeid: a.ino, generation: 0, entryValid: this.entryValid, attrValid: this.attrValid, attr: a };
  }

  private remember(a: FsAttr, parent: number): void {
    this.lookups.set(a.ino, (this.lookups.get(a.ino) ?? 0) + 1);
    if (a.kind === 'dir') this.parents.set(a.ino, parent);
  }

  private onLookup(req: FuseRequest & { kind: 'lookup' }): void {
    const name = decodeName(req.name);
    // A node made on request (a module's header) is answered once it exists; every other
    // lookup is answered here and now.
    const wait = name === undefined ? undefined : this.model.prepareLookup?.(req.nodeid, name);
    if (wait === undefined) return this.answerLookup(req, name);
    wait.then(
      () => this.answerLookup(req, name),
      (err: unknown) => {
        const code = errnoFor(err);
        if (code !== Errno.ENOENT) this.log.error({ err, parent: req.nodeid, name }, 'FUSE lookup failed');
        this.replyError(req, code);
      },
    );
  }

  private answerLookup(req: FuseRequest & { kind: 'lookup' }, name: string | undefined): void {
    const a = name === undefined ? undefined : this.model.lookup(req.nodeid, name);
    if (name !== undefined) this.prefetch?.probed(req.nodeid, name);
    if (a) {
      this.remember(a, req.nodeid);
      this.replyOk(req, encodeEntryOut(this.entryFor(a), this.minor));
      this.prefetch?.looked(a, req.nodeid);
      return;
    }
    const parent = this.model.getattr(req.nodeid);
    if (!parent) return this.replyError(req, Errno.ENOENT);
    if (parent.kind !== 'dir') return this.replyError(req, Errno.ENOTDIR);
    // Under a volatile directory a name may appear at any moment: its absence is not cached.
    if (parent.volatile) return this.replyError(req, Errno.ENOENT);
    // A negative entry: nodeid 0 with a timeout makes the kernel cache "no such name", so the
    // compiler's probing of every -I directory for every header is answered without us.
    if (this.options.negativeTimeoutSec <= 0 || this.minor < 4) return this.replyError(req, Errno.ENOENT);
    this.count(NEGATIVE_LOOKUP);
    return this.replyOk(req, encodeEntryOut({ nodeid: 0, generation: 0, entryValid: this.negativeValid, attrValid: timeout(0) }, this.minor));
  }

  private forget(nodeid: number, nlookup: number): void {
    const left = (this.lookups.get(nodeid) ?? 0) - nlookup;
    if (left > 0) this.lookups.set(nodeid, left);
    else {
      this.lookups.delete(nodeid);
      if (nodeid !== ROOT_INO) this.parents.delete(nodeid);
    }
  }

  // ---- files --------------------------------------------------------------------------------

  private onOpen(req: FuseRequest & { kind: 'open' }): void {
    const a = this.model.getattr(req.nodeid);
    if (!a) return this.replyError(req, Errno.ENOENT);
    if (a.kind === 'dir') return this.replyError(req, Errno.EISDIR);
    if ((req.open.flags & O_ACCMODE) !== fs.constants.O_RDONLY || req.open.flags & fs.constants.O_TRUNC) return this.replyError(req, Errno.EROFS);
    // ENOSYS to an OPEN, after NO_OPEN_SUPPORT was negotiated, switches the kernel to opens
    // that never reach us (and no RELEASE), with KEEP_CACHE implied.
    if (this.options.zeroMessageOpen && this.has(InitFlag.NO_OPEN_SUPPORT)) return this.replyError(req, Errno.ENOSYS);
    this.replyOk(req, encodeOpenOut(this.nextFh++, FOPEN.KEEP_CACHE | FOPEN.NOFLUSH));
  }

  private onOpendir(req: FuseRequest & { kind: 'open' }): void {
    const a = this.model.getattr(req.nodeid);
    if (!a) return this.replyError(req, Errno.ENOENT);
    if (a.kind !== 'dir') return this.replyError(req, Errno.ENOTDIR);
    if (this.options.zeroMessageOpen && this.has(InitFlag.NO_OPENDIR_SUPPORT)) return this.replyError(req, Errno.ENOSYS);
    const records = this.listing(req.nodeid);
    if (!records) return this.replyError(req, Errno.ENOTDIR);
    const fh = this.nextFh++;
    this.dirHandles.set(fh, { ino: req.nodeid, records });
    this.replyOk(req, encodeOpenOut(fh, a.volatile ? 0 : FOPEN.KEEP_CACHE | FOPEN.CACHE_DIR));
  }

  private onRead(req: FuseRequest & { kind: 'read' }): void {
    const a = this.model.getattr(req.nodeid);
    if (!a) return this.replyError(req, Errno.ENOENT);
    if (a.kind === 'dir') return this.replyError(req, Errno.EISDIR);
    if (a.kind !== 'file') return this.replyError(req, Errno.EINVAL);
    const { offset, size } = req.read;
    if (size === 0 || offset >= a.size) return this.replyOk(req);
    const state = { answered: false };
    this.inflight.set(req.unique, state);
    (this.prefetch?.take(req.nodeid, offset, size) ?? this.model.read(req.nodeid, offset, size)).then(
      (data) => {
        this.inflight.delete(req.unique);
        if (state.answered) return;
        state.answered = true;
        const body = data.length > size ? data.subarray(0, size) : data;
        this.send([encodeOutHeader(req.unique, body.length), body]);
      },
      (err: unknown) => {
        this.inflight.delete(req.unique);
        const code = errnoFor(err);
        if (code !== Errno.ENOENT) this.log.error({ err, ino: req.nodeid, offset, size }, 'FUSE read failed');
        if (state.answered) return;
        state.answered = true;
        this.replyError(req, code);
      },
    );
  }

  private onInterrupt(target: bigint): void {
    // Only READs are ever pending (everything else is answered before the next message is
    // looked at); an interrupt for anything else arrived after its answer and needs nothing.
    const state = this.inflight.get(target);
    if (!state || state.answered) return;
    state.answered = true;
    this.send(encodeError(target, Errno.EINTR));
  }

  // ---- directories --------------------------------------------------------------------------

  private listing(ino: number): DirRecord[] | undefined {
    const children = this.model.readdir(ino);
    if (!children) return undefined;
    const records: DirRecord[] = [
      { ino, name: DOT, type: 4, attr: undefined },
      { ino: this.parents.get(ino) ?? ino, name: DOTDOT, type: 4, attr: undefined },
    ];
    for (const d of children) {
      // A lazy child goes without attributes (node id 0): the kernel looks it up before use.
      records.push({ ino: d.attr.ino, name: Buffer.from(d.name, 'utf8'), type: direntType(d.attr.mode), attr: d.lazy ? undefined : d.attr });
    }
    return records;
  }

  private onReaddir(req: FuseRequest & { kind: 'read' }, plus: boolean): void {
    const { fh, offset, size } = req.read;
    let records = fh !== 0n ? this.dirHandles.get(fh)?.records : undefined;
    if (!records) {
      // No handle (zero-message opendir): a listing continued from a non-zero offset reuses the
      // snapshot its first page was served from, so a pass never mixes two versions.
      const last = this.lastListing;
      if (offset > 0 && last && last.ino === req.nodeid) records = last.records;
      else {
        records = this.listing(req.nodeid);
        if (!records) return this.replyError(req, this.model.getattr(req.nodeid) ? Errno.ENOTDIR : Errno.ENOENT);
        this.lastListing = { ino: req.nodeid, records };
      }
    }
    if (offset >= records.length) return this.replyOk(req);
    const slice = records.slice(offset, offset + Math.ceil(size / 24)); // a record is >= 24 bytes
    if (!plus) {
      const { buf } = encodeDirents(
        slice.map((r, i) => ({ ino: r.ino, name: r.name, type: r.type, off: offset + i + 1 })),
        size,
      );
      return this.replyOk(req, buf);
    }
    const entries: DirentPlusIn[] = slice.map((r, i) => ({
      ino: r.ino,
      name: r.name,
      type: r.type,
      off: offset + i + 1,
      // '.' and '..' go without a node id: the kernel does not count them as lookups.
      entry: r.attr ? this.entryFor(r.attr) : { nodeid: 0, generation: 0, entryValid: timeout(0), attrValid: timeout(0) },
    }));
    const { buf, count } = encodeDirentsPlus(entries, size);
    // Every record sent with a node id is a lookup the kernel will FORGET later.
    for (let i = 0; i < count; i++) {
      const r = slice[i]!;
      if (r.attr) this.remember(r.attr, req.nodeid);
    }
    this.replyOk(req, buf);
  }

  // ---- output -------------------------------------------------------------------------------

  private send(parts: Buffer | Buffer[]): string | undefined {
    const err = this.channel.reply(Array.isArray(parts) ? parts : [parts]);
    if (err === 'ENOENT') this.log.debug('FUSE reply to a request the kernel no longer waits for (interrupted)');
    else if (err && err !== 'ENODEV' && err !== 'EBADF') this.log.error({ errno: err }, 'the kernel refused a FUSE reply');
    return err;
  }

  private replyOk(req: FuseRequest, body?: Buffer): void {
    this.send(encodeReply(req.unique, body));
  }

  private replyError(req: FuseRequest, errnoValue: number): void {
    this.send(encodeError(req.unique, errnoValue));
  }

  // ---- invalidation -------------------------------------------------------------------------

  /**
   * A name changed meaning (kernel swap): drop the kernel's dentry for it, the inode it used to
   * point to (a re-pointed `current` keeps its ino, and its cached target lives in that inode's
   * page cache), and the parent's cached listing and attributes. Written by the notifier thread,
   * never this one (see io-worker.ts); ENOENT means the kernel had nothing cached: fine.
   */
  private invalidate(inval: FsInvalidation): void {
    if (!this.negotiated || this.destroyed || this.minor < 12) return;
    this.count('notify');
    const name = Buffer.from(inval.name, 'utf8');
    const msgs = [encodeNotifyInvalEntry(inval.parentIno, name)];
    if (inval.oldIno !== undefined) msgs.push(encodeNotifyInvalInode(inval.oldIno, 0, 0));
    msgs.push(encodeNotifyInvalInode(inval.parentIno, 0, 0));
    if (this.lastListing?.ino === inval.parentIno) this.lastListing = undefined;
    for (const m of msgs) {
      void this.channel.notify(m).then((code) => {
        if (code && code !== 'ENOENT') this.log.warn({ errno: code, parent: inval.parentIno, name: inval.name }, 'FUSE invalidation refused');
      });
    }
  }
}

function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
