/**
 * A small BTF blob writer for tests: add types, get their ids, build the bytes in either byte
 * order. It writes whatever it is told (out-of-range ids, bad names, raw records), so tests can
 * build malformed blobs as easily as good ones.
 */

export interface MemberSpec {
  name: string;
  type: number;
  /** Offset from the start of the struct, in bits. */
  bitOffset: number;
  /** Bitfield width in bits; makes the struct use kind_flag offsets. */
  bitfieldSize?: number;
}

export interface BuildOptions {
  endianness?: 'little' | 'big';
  /** Override header fields after they are computed (to make malformed blobs). */
  header?: Partial<{ magic: number; version: number; flags: number; hdrLen: number; typeOff: number; typeLen: number; strOff: number; strLen: number }>;
  /** Bytes appended to the header (a longer, newer header); counted in hdrLen unless overridden. */
  headerExtra?: number;
  /** Replace the string section bytes entirely. */
  strings?: Uint8Array;
}

const KIND = {
  INT: 1,
  PTR: 2,
  ARRAY: 3,
  STRUCT: 4,
  UNION: 5,
  ENUM: 6,
  FWD: 7,
  TYPEDEF: 8,
  VOLATILE: 9,
  CONST: 10,
  RESTRICT: 11,
  FUNC: 12,
  FUNC_PROTO: 13,
  VAR: 14,
  DATASEC: 15,
  FLOAT: 16,
  DECL_TAG: 17,
  TYPE_TAG: 18,
  ENUM64: 19,
} as const;

function info(kind: number, vlen: number, kflag = false): number {
  return ((kflag ? 1 : 0) * 0x80000000 + ((kind & 0x1f) << 24) + (vlen & 0xffff)) >>> 0;
}

export class BtfBuilder {
  /** Every record as 32-bit words: the whole type section is words. */
  private readonly records: number[][] = [];
  private readonly strTab: number[];
  private readonly strOffsets: Map<string, number>;

  /**
   * A base blob, or (with `base`) split BTF over it, as a module's: ids continue after the
   * base's types, string offsets after the base's string section, and a name the base already
   * has is referred to there (as pahole and libbpf do).
   */
  constructor(private readonly base?: BtfBuilder) {
    this.strTab = base ? [] : [0];
    this.strOffsets = base ? new Map<string, number>() : new Map([['', 0]]);
  }

  /** A split-BTF builder over this one (build this one's blob first, or after: it is not changed). */
  split(): BtfBuilder {
    return new BtfBuilder(this);
  }

  private get firstId(): number {
    return this.base ? this.base.nextId : 1;
  }

  private get strStart(): number {
    return this.base ? this.base.strStart + this.base.strTab.length : 0;
  }

  private knownStr(s: string): number | undefined {
    return this.strOffsets.get(s) ?? this.base?.knownStr(s);
  }

  /** The offset of `s` in the string section (added once). */
  str(s: string): number {
    const known = this.knownStr(s);
    if (known !== undefined) return known;
    const off = this.strStart + this.strTab.length;
    for (const b of Buffer.from(s, 'utf8')) this.strTab.push(b);
    this.strTab.push(0);
    this.strOffsets.set(s, off);
    return off;
  }

  /** Append a raw record (words); returns its type id. */
  raw(words: number[]): number {
    this.records.push(words.map((w) => w >>> 0));
    return this.firstId + this.records.length - 1;
  }

  /** The id the next added type will get. */
  get nextId(): number {
    return this.firstId + this.records.length;
  }

  int(name: string, size: number, opts: { signed?: boolean; char?: boolean; bool?: boolean; bits?: number; offset?: number } = {}): number {
    const enc = (opts.signed ? 1 : 0) | (opts.char ? 2 : 0) | (opts.bool ? 4 : 0);
    const bits = opts.bits ?? size * 8;
    return this.raw([this.str(name), info(KIND.INT, 0), size, ((enc << 24) | ((opts.offset ?? 0) << 16) | bits) >>> 0]);
  }

  float(name: string, size: number): number {
    return this.raw([this.str(name), info(KIND.FLOAT, 0), size]);
  }

  ptr(type: number): number {
    return this.raw([0, info(KIND.PTR, 0), type]);
  }

  const(type: number): number {
    return this.raw([0, info(KIND.CONST, 0), type]);
  }

  volatile(type: number): number {
    return this.raw([0, info(KIND.VOLATILE, 0), type]);
  }

  restrict(type: number): number {
    return this.raw([0, info(KIND.RESTRICT, 0), type]);
  }

  typedef(name: string, type: number): number {
    return this.raw([this.str(name), info(KIND.TYPEDEF, 0), type]);
  }

  typeTag(value: string, type: number, attribute = false): number {
    return this.raw([this.str(value), info(KIND.TYPE_TAG, 0, attribute), type]);
  }

  array(elem: number, indexType: number, nelems: number): number {
    return this.raw([0, info(KIND.ARRAY, 0), 0, elem, indexType, nelems]);
  }

  private composite(kind: number, name: string, size: number, members: MemberSpec[]): number {
    const kflag = members.some((m) => (m.bitfieldSize ?? 0) > 0);
    const words = [this.str(name), info(kind, members.length, kflag), size];
    for (const m of members) {
      const off = kflag ? (((m.bitfieldSize ?? 0) << 24) | (m.bitOffset & 0xffffff)) >>> 0 : m.bitOffset;
      words.push(this.str(m.name), m.type, off);
    }
    return this.raw(words);
  }

  struct(name: string, size: number, members: MemberSpec[]): number {
    return this.composite(KIND.STRUCT, name, size, members);
  }

  union(name: string, size: number, members: MemberSpec[]): number {
    return this.composite(KIND.UNION, name, size, members);
  }

  enum(name: string, size: number, values: [string, number][], signed = false): number {
    const words = [this.str(name), info(KIND.ENUM, values.length, signed), size];
    for (const [n, v] of values) words.push(this.str(n), v >>> 0);
    return this.raw(words);
  }

  enum64(name: string, size: number, values: [string, bigint][], signed = false): number {
    const words = [this.str(name), info(KIND.ENUM64, values.length, signed), size];
    for (const [n, v] of values) {
      const u = BigInt.asUintN(64, v);
      words.push(this.str(n), Number(u & 0xffffffffn), Number(u >> 32n));
    }
    return this.raw(words);
  }

  fwd(name: string, union = false): number {
    return this.raw([this.str(name), info(KIND.FWD, 0, union), 0]);
  }

  funcProto(ret: number, params: [string, number][]): number {
    const words = [0, info(KIND.FUNC_PROTO, params.length), ret];
    for (const [n, t] of params) words.push(this.str(n), t);
    return this.raw(words);
  }

  func(name: string, proto: number, linkage = 1): number {
    return this.raw([this.str(name), info(KIND.FUNC, linkage), proto]);
  }

  var(name: string, type: number, linkage = 1): number {
    return this.raw([this.str(name), info(KIND.VAR, 0), type, linkage]);
  }

  datasec(name: string, size: number, vars: { type: number; offset: number; size: number }[]): number {
    const words = [this.str(name), info(KIND.DATASEC, vars.length), size];
    for (const v of vars) words.push(v.type, v.offset, v.size);
    return this.raw(words);
  }

  declTag(value: string, type: number, componentIdx = -1): number {
    return this.raw([this.str(value), info(KIND.DECL_TAG, 0), type, componentIdx >>> 0]);
  }

  /** The blob: header, type section, string section. */
  build(opts: BuildOptions = {}): Buffer {
    const le = (opts.endianness ?? 'little') === 'little';
    const words = this.records.flat();
    const strings = opts.strings ?? Uint8Array.from(this.strTab);
    const extra = opts.headerExtra ?? 0;
    const h = {
      magic: 0xeb9f,
      version: 1,
      flags: 0,
      hdrLen: 24 + extra,
      typeOff: 0,
      typeLen: words.length * 4,
      strOff: words.length * 4,
      strLen: strings.length,
      ...opts.header,
    };
    const buf = Buffer.alloc(24 + extra + words.length * 4 + strings.length);
    const u16 = (v: number, o: number): number => (le ? buf.writeUInt16LE(v, o) : buf.writeUInt16BE(v, o));
    const u32 = (v: number, o: number): number => (le ? buf.writeUInt32LE(v >>> 0, o) : buf.writeUInt32BE(v >>> 0, o));
    u16(h.magic, 0);
    buf.writeUInt8(h.version, 2);
    buf.writeUInt8(h.flags, 3);
    u32(h.hdrLen, 4);
    u32(h.typeOff, 8);
    u32(h.typeLen, 12);
    u32(h.strOff, 16);
    u32(h.strLen, 20);
    let p = 24 + extra;
    for (const w of words) {
      u32(w, p);
      p += 4;
    }
    buf.set(strings, p);
    return buf;
  }
}
