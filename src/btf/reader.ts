/**
 * A BTF reader: the raw bytes of a `.BTF` blob (e.g. /sys/kernel/btf/vmlinux) in, a typed model out.
 *
 * The format is the one in <linux/btf.h> and the kernel's Documentation/bpf/btf.rst: a 24-byte
 * header, a type section of variable-length records (type id 1 is the first record, id 0 is
 * `void`), and a string section of NUL-terminated names addressed by byte offset.
 *
 * parseBtf() returns a Btf: typed accessors over the validated type section (what the emitter
 * walks, allocation-free) and `type(id)` / `types()` for the typed model objects (BtfType).
 *
 * Pure: no I/O. The blob is untrusted (a user may point `--btf` at anything), so every read is
 * bounds-checked up front and every malformed input becomes a KheadersError('E_BTF') naming the
 * problem, never a RangeError or an out-of-bounds `undefined`. Checks mirror the kernel's own
 * verifier where the emitter depends on them (valid type ids, valid string offsets, C identifiers
 * for the names that end up in C, no reference loops that C could not express).
 *
 * Split BTF: a module's BTF (/sys/kernel/btf/<module>, or the .BTF section of a .ko) continues a
 * base BTF (the kernel's): its first type id is the base's type count, and its string offsets
 * start at the base's string-section length, so an offset below that names a base string. With
 * `parseBtf(module, { base })` the result is one Btf over both, ids 1 … count-1, exactly the
 * type space libbpf's btf__parse_split gives; only the module's own records are checked again.
 */
import { isAscii } from 'node:buffer';
import { KheadersError } from '../errors.js';

export const BTF_MAGIC = 0xeb9f;
export const BTF_VERSION = 1;
const HEADER_LEN = 24;
/** <linux/btf.h> BTF_MAX_TYPE: type ids are 20 bits wide in the kernel. */
const MAX_TYPE_ID = 0x000fffff;
const HOST_LE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Kind numbers as in <linux/btf.h> (BTF_KIND_*). */
export const BtfKind = {
  VOID: 0,
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
export type BtfKind = (typeof BtfKind)[keyof typeof BtfKind];

const KIND_NAMES: readonly string[] = Object.keys(BtfKind);

/** `STRUCT`, `ENUM64`, … (or `KIND_<n>` for a number outside the table). */
export function btfKindName(kind: number): string {
  return KIND_NAMES[kind] ?? `KIND_${kind}`;
}

export type BtfEndianness = 'little' | 'big';

export interface BtfHeader {
  readonly magic: number;
  readonly version: number;
  readonly flags: number;
  readonly hdrLen: number;
  /** Offsets are relative to the end of the header, as in the format. */
  readonly typeOff: number;
  readonly typeLen: number;
  readonly strOff: number;
  readonly strLen: number;
}

interface BtfTypeCommon {
  /** The type id: the index of this type in `Btf.types`. */
  readonly id: number;
  /** '' for anonymous types. */
  readonly name: string;
}

export interface BtfVoid extends BtfTypeCommon {
  readonly kind: typeof BtfKind.VOID;
}

export interface BtfInt extends BtfTypeCommon {
  readonly kind: typeof BtfKind.INT;
  readonly size: number;
  readonly signed: boolean;
  readonly char: boolean;
  readonly bool: boolean;
  readonly bitsOffset: number;
  readonly bits: number;
}

export interface BtfFloat extends BtfTypeCommon {
  readonly kind: typeof BtfKind.FLOAT;
  readonly size: number;
}

/** PTR, TYPEDEF, VOLATILE, CONST, RESTRICT: a name (typedef only) and the type referred to. */
export interface BtfRef extends BtfTypeCommon {
  readonly kind:
    | typeof BtfKind.PTR
    | typeof BtfKind.TYPEDEF
    | typeof BtfKind.VOLATILE
    | typeof BtfKind.CONST
    | typeof BtfKind.RESTRICT;
  readonly type: number;
}

export interface BtfTypeTag extends BtfTypeCommon {
  readonly kind: typeof BtfKind.TYPE_TAG;
  readonly type: number;
  /** kind_flag: the tag is a plain attribute (`__attribute__((name))`) rather than btf_type_tag. */
  readonly attribute: boolean;
}

export interface BtfArray extends BtfTypeCommon {
  readonly kind: typeof BtfKind.ARRAY;
  /** The element type. */
  readonly type: number;
  readonly indexType: number;
  readonly nelems: number;
}

export interface BtfMember {
  readonly name: string;
  readonly type: number;
  /** Offset of the member from the start of the struct, in bits. */
  readonly bitOffset: number;
  /** Width of a bitfield member in bits; 0 for an ordinary member. */
  readonly bitfieldSize: number;
}

export interface BtfComposite extends BtfTypeCommon {
  readonly kind: typeof BtfKind.STRUCT | typeof BtfKind.UNION;
  readonly size: number;
  readonly members: readonly BtfMember[];
}

export interface BtfEnumValue {
  readonly name: string;
  /** Already interpreted: negative only when the enum is signed. */
  readonly value: number;
}

export interface BtfEnum extends BtfTypeCommon {
  readonly kind: typeof BtfKind.ENUM;
  readonly size: number;
  /** kind_flag: the values are signed. */
  readonly signed: boolean;
  readonly values: readonly BtfEnumValue[];
}

export interface BtfEnum64Value {
  readonly name: string;
  /** A bigint because 64-bit values do not fit a double; negative only when the enum is signed. */
  readonly value: bigint;
  /** The upper 32 bits as stored (the emitter needs to know whether any value uses them). */
  readonly hi32: number;
}

export interface BtfEnum64 extends BtfTypeCommon {
  readonly kind: typeof BtfKind.ENUM64;
  readonly size: number;
  readonly signed: boolean;
  readonly values: readonly BtfEnum64Value[];
}

export interface BtfFwd extends BtfTypeCommon {
  readonly kind: typeof BtfKind.FWD;
  /** kind_flag: a forward declaration of a union rather than a struct. */
  readonly union: boolean;
}

export type BtfLinkage = 'static' | 'global' | 'extern' | 'unknown';

export interface BtfFunc extends BtfTypeCommon {
  readonly kind: typeof BtfKind.FUNC;
  /** The FUNC_PROTO. */
  readonly type: number;
  readonly linkage: BtfLinkage;
}

export interface BtfParam {
  readonly name: string;
  /** 0 (void) as the last parameter means `...`. */
  readonly type: number;
}

export interface BtfFuncProto extends BtfTypeCommon {
  readonly kind: typeof BtfKind.FUNC_PROTO;
  /** The return type. */
  readonly type: number;
  readonly params: readonly BtfParam[];
}

export interface BtfVar extends BtfTypeCommon {
  readonly kind: typeof BtfKind.VAR;
  readonly type: number;
  readonly linkage: BtfLinkage;
}

export interface BtfVarSecinfo {
  readonly type: number;
  readonly offset: number;
  readonly size: number;
}

export interface BtfDatasec extends BtfTypeCommon {
  readonly kind: typeof BtfKind.DATASEC;
  readonly size: number;
  readonly vars: readonly BtfVarSecinfo[];
}

export interface BtfDeclTag extends BtfTypeCommon {
  readonly kind: typeof BtfKind.DECL_TAG;
  /** The tagged type (a struct, union, typedef, func or var). */
  readonly type: number;
  /** -1 for the type itself, else the member or parameter index. */
  readonly componentIdx: number;
  readonly attribute: boolean;
}

export type BtfType =
  | BtfVoid
  | BtfInt
  | BtfFloat
  | BtfRef
  | BtfTypeTag
  | BtfArray
  | BtfComposite
  | BtfEnum
  | BtfEnum64
  | BtfFwd
  | BtfFunc
  | BtfFuncProto
  | BtfVar
  | BtfDatasec
  | BtfDeclTag;

/** Where a problem is, for messages: `type [12] (STRUCT) member 3`. */
function where(id: number, kind: number, part?: string, index?: number): string {
  return `type [${id}] (${btfKindName(kind)})${part === undefined ? '' : ` ${part}${index === undefined ? '' : ` ${index}`}`}`;
}

function bad(message: string, details: Record<string, unknown> = {}): KheadersError {
  return new KheadersError('E_BTF', `malformed BTF: ${message}`, details);
}

/** 32-bit words of kind-specific data after the 3-word common record, or -1 for an unknown kind. */
function extraWords(kind: number, vlen: number): number {
  switch (kind) {
    case BtfKind.INT:
    case BtfKind.VAR:
    case BtfKind.DECL_TAG:
      return 1;
    case BtfKind.ARRAY:
      return 3;
    case BtfKind.STRUCT:
    case BtfKind.UNION:
    case BtfKind.ENUM64:
    case BtfKind.DATASEC:
      return 3 * vlen;
    case BtfKind.ENUM:
    case BtfKind.FUNC_PROTO:
      return 2 * vlen;
    case BtfKind.PTR:
    case BtfKind.FWD:
    case BtfKind.TYPEDEF:
    case BtfKind.VOLATILE:
    case BtfKind.CONST:
    case BtfKind.RESTRICT:
    case BtfKind.FUNC:
    case BtfKind.FLOAT:
    case BtfKind.TYPE_TAG:
      return 0;
    default:
      return -1;
  }
}

const LINKAGES: readonly BtfLinkage[] = ['static', 'global', 'extern'];

function linkageOf(n: number): BtfLinkage {
  return LINKAGES[n] ?? 'unknown';
}

const IDENT_OK = 1;
const BASE_NAME_OK = 2;
const TAG_OK = 4;

/**
 * The string section. Names are decoded on demand; when the section is pure ASCII (every
 * kernel's is) it is decoded once and names are substrings of it, which is several times faster
 * than decoding each name from the bytes.
 */
class StringTable {
  /** The section decoded as latin1: one char per byte, so string offsets index it directly. */
  private readonly bin: string;
  /** Whether the section is pure ASCII (every kernel's is), so `bin` slices are the names. */
  private readonly ascii: boolean;
  /** Per offset: which name checks already passed, so repeated member names are checked once. */
  private readonly checked: Uint8Array;

  constructor(readonly bytes: Buffer) {
    this.bin = bytes.toString('latin1');
    this.ascii = isAscii(bytes);
    this.checked = new Uint8Array(bytes.length);
  }

  /** The string at a checked offset (the section ends with a NUL, so the search terminates). */
  get(off: number): string {
    if (off === 0) return '';
    if (this.ascii) return this.bin.slice(off, this.bin.indexOf('\0', off));
    return this.bytes.toString('utf8', off, this.bytes.indexOf(0, off));
  }

  /**
   * Check that `off` is inside the section and, when `rule` says so, that the name there is a C
   * identifier (what the kernel's btf_name_valid_identifier() accepts) or a base type name
   * (`long unsigned int`). Names are emitted verbatim into C, so anything else could inject code.
   * The context (`id`, `kind`, `part`, `index`) is passed in pieces: building a message string per
   * name would cost more than the whole parse.
   */
  check(off: number, rule: number, required: boolean, id: number, kind: number, part?: string, index?: number): void {
    if (off >= this.bytes.length) {
      throw bad(`${where(id, kind, part, index)}: string offset ${off} is past the end of the string section (${this.bytes.length} bytes)`, {
        typeId: id,
        offset: off,
        strLen: this.bytes.length,
      });
    }
    if (this.bytes[off] === 0) {
      if (required) throw bad(`${where(id, kind, part, index)}: the name is empty but must not be`, { typeId: id });
      return;
    }
    if (rule === 0 || (this.checked[off]! & rule) !== 0) return;
    // A sticky regex over the latin1 text runs as compiled code even before the JIT warms up.
    const re = rule === IDENT_OK ? IDENT_RE : rule === BASE_NAME_OK ? BASE_NAME_RE : TAG_RE;
    re.lastIndex = off;
    if (!re.test(this.bin)) {
      const what = rule === IDENT_OK ? 'a valid C identifier' : rule === BASE_NAME_OK ? 'a C base type name' : 'a plain attribute or tag';
      throw bad(`${where(id, kind, part, index)}: name ${JSON.stringify(this.get(off))} is not ${what}`, { typeId: id, name: this.get(off) });
    }
    this.checked[off] = this.checked[off]! | rule;
  }
}

const IDENT_RE = /[A-Za-z_][A-Za-z0-9_]*\0/y;
const BASE_NAME_RE = /[A-Za-z0-9_ ]+\0/y;
/**
 * Type tags are emitted as `btf_type_tag("rcu")` or `__attribute__((address_space(1)))`: an
 * identifier with at most one plain argument list, so a tag cannot close the attribute early.
 */
const TAG_RE = /[A-Za-z_][A-Za-z0-9_]*(?:\([A-Za-z0-9_, ]*\))?\0/y;

/** What parseBtf hands the Btf it builds. */
interface BtfParts {
  endianness: BtfEndianness;
  header: BtfHeader;
  words: Uint32Array;
  at: Uint32Array;
  kinds: Uint8Array;
  strings: StringTable;
  /** The base of split BTF, whose ids and strings come first in the arrays above. */
  base?: Btf;
}

/** The parts of every Btf, so that a split blob can be parsed on top of a base (kept private to this module). */
const PARTS = new WeakMap<Btf, BtfParts>();

/**
 * A parsed, validated BTF blob.
 *
 * The accessors read the type section in place, as 32-bit words already in host byte order, so
 * that walking the 100k-type kernel graph allocates nothing (an object per type and per member
 * costs more in garbage collection than the walk itself). `type(id)` builds the typed model object
 * of one type for callers who want it. Accessors taking a member/parameter/value index `i` expect
 * `0 <= i < vlen(id)`; ids are valid from 0 (void) to `count - 1`.
 */
export class Btf {
  readonly endianness: BtfEndianness;
  readonly header: BtfHeader;
  /** Number of type ids including void: valid ids are 0 … count-1. */
  readonly count: number;
  /** Target pointer size in bytes, guessed as libbpf does from the `long` integer types (8 if none). */
  readonly pointerSize: 4 | 8;
  /** For split BTF, the base it continues; undefined for a base (vmlinux) blob. */
  readonly base: Btf | undefined;
  /** The first type id this blob defines: 1, or the base's count for split BTF. */
  readonly firstId: number;
  private readonly w: Uint32Array;
  private readonly at: Uint32Array;
  private readonly kinds: Uint8Array;
  private readonly strings: StringTable;
  private readonly names: (string | undefined)[];

  /** Use parseBtf(); the parts are only valid once it has checked them. */
  constructor(parts: BtfParts) {
    this.endianness = parts.endianness;
    this.header = parts.header;
    this.w = parts.words;
    this.at = parts.at;
    this.kinds = parts.kinds;
    this.strings = parts.strings;
    this.count = parts.kinds.length;
    this.names = new Array<string | undefined>(this.count);
    this.names[0] = '';
    this.base = parts.base;
    this.firstId = parts.base?.count ?? 1;
    // libbpf takes split BTF's pointer size from its base.
    this.pointerSize = parts.base?.pointerSize ?? this.guessPointerSize();
    PARTS.set(this, parts);
  }

  kind(id: number): BtfKind {
    return this.kinds[id] as BtfKind;
  }
  /** The name ('' if anonymous), decoded once and cached. */
  name(id: number): string {
    const n = this.names[id];
    if (n !== undefined) return n;
    return (this.names[id] = this.strings.get(this.w[this.at[id]!]!));
  }
  vlen(id: number): number {
    return this.w[this.at[id]! + 1]! & 0xffff;
  }
  kflag(id: number): boolean {
    return this.w[this.at[id]! + 1]! >>> 31 === 1;
  }
  /** Byte size of INT, FLOAT, STRUCT, UNION, ENUM, ENUM64 and DATASEC types. */
  size(id: number): number {
    return this.w[this.at[id]! + 2]!;
  }
  /**
   * The type referred to: target of PTR/TYPEDEF/VOLATILE/CONST/RESTRICT/TYPE_TAG, prototype of a
   * FUNC, return type of a FUNC_PROTO, type of a VAR, tagged type of a DECL_TAG, element of an ARRAY.
   */
  ref(id: number): number {
    const a = this.at[id]!;
    return this.kinds[id] === BtfKind.ARRAY ? this.w[a + 3]! : this.w[a + 2]!;
  }
  arrayNelems(id: number): number {
    return this.w[this.at[id]! + 5]!;
  }
  arrayIndexType(id: number): number {
    return this.w[this.at[id]! + 4]!;
  }
  /** The INT type's encoding/offset/bits word. */
  intInfo(id: number): number {
    return this.w[this.at[id]! + 3]!;
  }
  /** String-section offset of the type's name (0 if anonymous); see stringBytes(). */
  nameOffset(id: number): number {
    return this.w[this.at[id]!]!;
  }
  /** String-section offset of member `i`'s name. */
  memberNameOffset(id: number, i: number): number {
    return this.w[this.at[id]! + 3 + 3 * i]!;
  }
  /** String-section offset of parameter `i`'s name. */
  paramNameOffset(id: number, i: number): number {
    return this.w[this.at[id]! + 3 + 2 * i]!;
  }
  /** String-section offset of the name of enumerator `i` of an ENUM or ENUM64. */
  enumValueNameOffset(id: number, i: number): number {
    const step = this.kinds[id] === BtfKind.ENUM64 ? 3 : 2;
    return this.w[this.at[id]! + 3 + step * i]!;
  }
  /**
   * The string section (NUL-terminated names at the offsets above), for callers that copy names
   * as bytes instead of decoding them. Every offset in the types was checked to be inside it.
   * Do not modify it.
   */
  stringBytes(): Uint8Array {
    return this.strings.bytes;
  }
  memberName(id: number, i: number): string {
    return this.strings.get(this.w[this.at[id]! + 3 + 3 * i]!);
  }
  memberNameIsEmpty(id: number, i: number): boolean {
    return this.w[this.at[id]! + 3 + 3 * i] === 0;
  }
  memberType(id: number, i: number): number {
    return this.w[this.at[id]! + 4 + 3 * i]!;
  }
  /** Bit offset of member `i` from the start of its struct. */
  memberBitOffset(id: number, i: number): number {
    const a = this.at[id]!;
    const raw = this.w[a + 5 + 3 * i]!;
    // kind_flag set: the word packs bitfield size (high 8 bits) and bit offset (low 24 bits).
    return this.w[a + 1]! >>> 31 === 1 ? raw & 0xffffff : raw;
  }
  /** Bitfield width of member `i` in bits, 0 if it is not a bitfield. */
  memberBitfieldSize(id: number, i: number): number {
    const a = this.at[id]!;
    return this.w[a + 1]! >>> 31 === 1 ? this.w[a + 5 + 3 * i]! >>> 24 : 0;
  }
  paramName(id: number, i: number): string {
    return this.strings.get(this.w[this.at[id]! + 3 + 2 * i]!);
  }
  paramType(id: number, i: number): number {
    return this.w[this.at[id]! + 4 + 2 * i]!;
  }
  /** Name of enumerator `i` of an ENUM or ENUM64. */
  enumValueName(id: number, i: number): string {
    const step = this.kinds[id] === BtfKind.ENUM64 ? 3 : 2;
    return this.strings.get(this.w[this.at[id]! + 3 + step * i]!);
  }
  /** Value of enumerator `i` of an ENUM, negative only when the enum is signed (kind_flag). */
  enumValue(id: number, i: number): number {
    const v = this.w[this.at[id]! + 4 + 2 * i]!;
    return this.kflag(id) ? v | 0 : v;
  }
  /** Value of enumerator `i` of an ENUM64, negative only when the enum is signed. */
  enum64Value(id: number, i: number): bigint {
    const a = this.at[id]! + 4 + 3 * i;
    const u = (BigInt(this.w[a + 1]!) << 32n) | BigInt(this.w[a]!);
    return this.kflag(id) ? BigInt.asIntN(64, u) : u;
  }
  /** The upper 32 bits of enumerator `i` of an ENUM64, as stored. */
  enum64Hi32(id: number, i: number): number {
    return this.w[this.at[id]! + 5 + 3 * i]!;
  }

  /** The VAR of entry `i` of a DATASEC. */
  datasecVarType(id: number, i: number): number {
    return this.w[this.at[id]! + 3 + 3 * i]!;
  }

  /** The typed model object for one type (built on each call). */
  type(id: number): BtfType {
    if (id === 0) return { kind: BtfKind.VOID, id: 0, name: '' };
    const name = this.name(id);
    const a = this.at[id]!;
    const w = this.w;
    const vlen = this.vlen(id);
    const kflag = this.kflag(id);
    const kind = this.kind(id);
    switch (kind) {
      case BtfKind.INT: {
        const v = w[a + 3]!;
        const enc = (v >>> 24) & 0x0f;
        return {
          kind,
          id,
          name,
          size: w[a + 2]!,
          signed: (enc & 1) !== 0,
          char: (enc & 2) !== 0,
          bool: (enc & 4) !== 0,
          bitsOffset: (v >>> 16) & 0xff,
          bits: v & 0xff,
        };
      }
      case BtfKind.FLOAT:
        return { kind, id, name, size: w[a + 2]! };
      case BtfKind.PTR:
      case BtfKind.TYPEDEF:
      case BtfKind.VOLATILE:
      case BtfKind.CONST:
      case BtfKind.RESTRICT:
        return { kind, id, name, type: w[a + 2]! };
      case BtfKind.TYPE_TAG:
        return { kind, id, name, type: w[a + 2]!, attribute: kflag };
      case BtfKind.ARRAY:
        return { kind, id, name, type: w[a + 3]!, indexType: w[a + 4]!, nelems: w[a + 5]! };
      case BtfKind.STRUCT:
      case BtfKind.UNION: {
        const members: BtfMember[] = [];
        for (let i = 0; i < vlen; i++) {
          members.push({
            name: this.memberName(id, i),
            type: this.memberType(id, i),
            bitOffset: this.memberBitOffset(id, i),
            bitfieldSize: this.memberBitfieldSize(id, i),
          });
        }
        return { kind, id, name, size: w[a + 2]!, members };
      }
      case BtfKind.ENUM: {
        const values: BtfEnumValue[] = [];
        for (let i = 0; i < vlen; i++) values.push({ name: this.enumValueName(id, i), value: this.enumValue(id, i) });
        return { kind, id, name, size: w[a + 2]!, signed: kflag, values };
      }
      case BtfKind.ENUM64: {
        const values: BtfEnum64Value[] = [];
        for (let i = 0; i < vlen; i++) {
          values.push({ name: this.enumValueName(id, i), value: this.enum64Value(id, i), hi32: this.enum64Hi32(id, i) });
        }
        return { kind, id, name, size: w[a + 2]!, signed: kflag, values };
      }
      case BtfKind.FWD:
        return { kind, id, name, union: kflag };
      case BtfKind.FUNC:
        return { kind, id, name, type: w[a + 2]!, linkage: linkageOf(vlen) };
      case BtfKind.FUNC_PROTO: {
        const params: BtfParam[] = [];
        for (let i = 0; i < vlen; i++) params.push({ name: this.paramName(id, i), type: this.paramType(id, i) });
        return { kind, id, name, type: w[a + 2]!, params };
      }
      case BtfKind.VAR:
        return { kind, id, name, type: w[a + 2]!, linkage: linkageOf(w[a + 3]!) };
      case BtfKind.DATASEC: {
        const vars: BtfVarSecinfo[] = [];
        for (let i = 0; i < vlen; i++) {
          const p = a + 3 + 3 * i;
          vars.push({ type: w[p]!, offset: w[p + 1]!, size: w[p + 2]! });
        }
        return { kind, id, name, size: w[a + 2]!, vars };
      }
      case BtfKind.DECL_TAG:
        return { kind, id, name, type: w[a + 2]!, componentIdx: w[a + 3]! | 0, attribute: kflag };
      default:
        // Unreachable: parseBtf rejects unknown kinds.
        throw bad(`${where(id, kind)}: unknown kind`, { typeId: id, kind });
    }
  }

  /** Every type as a typed model object, indexed by id (index 0 is void). */
  types(): BtfType[] {
    const out: BtfType[] = [];
    for (let id = 0; id < this.count; id++) out.push(this.type(id));
    return out;
  }

  /** libbpf's guess: the size of `long` if an integer type of that name exists, else 8. */
  private guessPointerSize(): 4 | 8 {
    for (let id = 1; id < this.count; id++) {
      if (this.kinds[id] !== BtfKind.INT) continue;
      const n = this.name(id);
      if (n === 'long int' || n === 'long unsigned int' || n === 'long' || n === 'unsigned long') {
        const s = this.size(id);
        if (s === 4 || s === 8) return s;
      }
    }
    return 8;
  }
}

function checkSize(id: number, kind: number, size: number, allowed: readonly number[]): void {
  if (!allowed.includes(size)) {
    throw bad(`${where(id, kind)}: size ${size} is not one of ${allowed.join(', ')}`, { typeId: id, size });
  }
}
const INT_SIZES = [1, 2, 4, 8, 16];
const FLOAT_SIZES = [2, 4, 8, 12, 16];
const ENUM_SIZES = [1, 2, 4, 8];

/**
 * Whether a blob looks like split BTF: its strings do not start with the empty name at offset 0
 * (they continue a base's), or it has none. Only a hint for messages; parseBtf decides.
 */
export function looksSplit(data: Uint8Array): boolean {
  if (data.byteLength < HEADER_LEN) return false;
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const le = dv.getUint16(0, true) === BTF_MAGIC;
  if (!le && dv.getUint16(0, false) !== BTF_MAGIC) return false;
  const hdrLen = dv.getUint32(4, le);
  const strOff = dv.getUint32(16, le);
  const strLen = dv.getUint32(20, le);
  const first = hdrLen + strOff;
  return strLen === 0 || (first < data.byteLength && data[first] !== 0);
}

export interface ParseOptions {
  /** Parse `data` as split BTF continuing this base (a module's BTF over the kernel's). */
  base?: Btf;
}

/** Parse and validate a BTF blob. Throws KheadersError('E_BTF') on any malformed input. */
export function parseBtf(data: Uint8Array, opts: ParseOptions = {}): Btf {
  const base = opts.base === undefined ? undefined : PARTS.get(opts.base);
  if (data.byteLength < 4) throw bad(`truncated header: ${data.byteLength} bytes, need at least ${HEADER_LEN}`, { size: data.byteLength });
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  // The magic is written in the producer's byte order: read it both ways.
  let le: boolean;
  if (dv.getUint16(0, true) === BTF_MAGIC) le = true;
  else if (dv.getUint16(0, false) === BTF_MAGIC) le = false;
  else {
    const got = dv.getUint16(0, true).toString(16).padStart(4, '0');
    throw bad(`bad magic 0x${got} (expected 0xeb9f in either byte order)`, { magic: `0x${got}` });
  }
  if (data.byteLength < HEADER_LEN) throw bad(`truncated header: ${data.byteLength} bytes, need at least ${HEADER_LEN}`, { size: data.byteLength });
  const header: BtfHeader = {
    magic: BTF_MAGIC,
    version: dv.getUint8(2),
    flags: dv.getUint8(3),
    hdrLen: dv.getUint32(4, le),
    typeOff: dv.getUint32(8, le),
    typeLen: dv.getUint32(12, le),
    strOff: dv.getUint32(16, le),
    strLen: dv.getUint32(20, le),
  };
  if (header.version !== BTF_VERSION) throw bad(`unsupported version ${header.version} (expected ${BTF_VERSION})`, { version: header.version });
  // A longer header is a newer revision of the format: its extra fields are skipped, and section
  // offsets still count from its end.
  if (header.hdrLen < HEADER_LEN) throw bad(`header length ${header.hdrLen} is shorter than ${HEADER_LEN}`, { hdrLen: header.hdrLen });
  if (header.hdrLen > data.byteLength) {
    throw bad(`truncated header: header length ${header.hdrLen} exceeds the ${data.byteLength}-byte blob`, { hdrLen: header.hdrLen });
  }
  const dataLen = data.byteLength - header.hdrLen;
  if (header.typeOff + header.typeLen > dataLen) {
    throw bad(
      `truncated type section: it spans bytes ${header.typeOff}..${header.typeOff + header.typeLen} after the header but only ${dataLen} bytes follow it`,
      { typeOff: header.typeOff, typeLen: header.typeLen, dataLen },
    );
  }
  if (header.strOff + header.strLen > dataLen) {
    throw bad(
      `truncated string section: it spans bytes ${header.strOff}..${header.strOff + header.strLen} after the header but only ${dataLen} bytes follow it`,
      { strOff: header.strOff, strLen: header.strLen, dataLen },
    );
  }
  if (header.typeOff % 4 !== 0 || header.typeLen % 4 !== 0) {
    throw bad(`type section offset ${header.typeOff} / length ${header.typeLen} is not a multiple of 4`, {
      typeOff: header.typeOff,
      typeLen: header.typeLen,
    });
  }
  if (header.typeOff < header.strOff + header.strLen && header.strOff < header.typeOff + header.typeLen) {
    throw bad('the type and string sections overlap', { ...header });
  }
  const strStart = header.hdrLen + header.strOff;
  if (base !== undefined) {
    if (le !== (base.endianness === 'little')) throw bad(`split BTF in ${le ? 'little' : 'big'}-endian order over a ${base.endianness}-endian base`);
    // Split strings continue the base's (offsets count from the start of the base's section),
    // so they need not start with the empty name, and may be absent altogether.
    if (header.strLen > 0 && data[strStart + header.strLen - 1] !== 0) throw bad('the string section must end with a NUL byte', { strLen: header.strLen });
  } else if (header.strLen === 0 || data[strStart] !== 0 || data[strStart + header.strLen - 1] !== 0) {
    throw bad('the string section must start and end with a NUL byte', { strLen: header.strLen });
  }
  // Copies, so the model does not change if the caller reuses its buffer.
  const ownStrings = data.subarray(strStart, strStart + header.strLen);
  const strings = new StringTable(base === undefined ? Buffer.from(ownStrings) : Buffer.concat([base.strings.bytes, ownStrings]));

  // Every field of the type section is a 32-bit word: copy the section to an aligned buffer and
  // swap it to host order if needed (Buffer.swap32 is native), so reads are plain array loads.
  const nWords = header.typeLen / 4;
  const typeStart = header.hdrLen + header.typeOff;
  const words = new Uint32Array(nWords);
  const copy = Buffer.from(words.buffer);
  copy.set(data.subarray(typeStart, typeStart + header.typeLen));
  if (le !== HOST_LE) copy.swap32();

  // Pass 1: where each record starts, so pass 2 knows the type count and can check every id.
  // Split BTF's ids continue the base's: `at` and `count` start where the base's end.
  const firstId = base?.kinds.length ?? 1;
  let at = new Uint32Array(Math.max(1024, firstId * 2));
  if (base !== undefined) at.set(base.at);
  let count = firstId;
  for (let p = 0; p < nWords; ) {
    const id = count;
    if (id > MAX_TYPE_ID) throw bad(`more than ${MAX_TYPE_ID} types`, { maxTypes: MAX_TYPE_ID });
    if (p + 3 > nWords) {
      throw bad(`truncated type section: type [${id}] needs 12 bytes at offset ${p * 4}, only ${(nWords - p) * 4} left`, { typeId: id });
    }
    const info = words[p + 1]!;
    const kind = (info >>> 24) & 0x1f;
    const extra = extraWords(kind, info & 0xffff);
    if (extra < 0) throw bad(`type [${id}] has unknown kind ${kind}`, { typeId: id, kind });
    if (p + 3 + extra > nWords) {
      throw bad(
        `truncated type section: type [${id}] (${btfKindName(kind)}, vlen ${info & 0xffff}) needs ${(3 + extra) * 4} bytes, only ${(nWords - p) * 4} left`,
        { typeId: id, kind: btfKindName(kind) },
      );
    }
    if (id >= at.length) {
      const grown = new Uint32Array(at.length * 2);
      grown.set(at);
      at = grown;
    }
    at[id] = p;
    count++;
    p += 3 + extra;
  }
  at = at.slice(0, count);
  // One word array over base and split: the split's records follow the base's words.
  let allWords = words;
  if (base !== undefined) {
    allWords = new Uint32Array(base.words.length + nWords);
    allWords.set(base.words);
    allWords.set(words, base.words.length);
    for (let id = firstId; id < count; id++) at[id] = at[id]! + base.words.length;
  }
  const kinds = new Uint8Array(count);
  if (base !== undefined) kinds.set(base.kinds);
  for (let id = firstId; id < count; id++) kinds[id] = (allWords[at[id]! + 1]! >>> 24) & 0x1f;

  // Pass 2: every type id and string offset in range, names that reach C well-formed.
  const ref = (t: number, id: number, kind: number, part: string, index?: number): void => {
    if (t >= count) {
      throw bad(`${where(id, kind, part, index)} refers to type id ${t}, but the highest id is ${count - 1}`, {
        typeId: id,
        ref: t,
        maxId: count - 1,
      });
    }
  };
  const w = allWords;
  for (let id = firstId; id < count; id++) {
    const a = at[id]!;
    const nameOff = w[a]!;
    const vlen = w[a + 1]! & 0xffff;
    const sizeOrType = w[a + 2]!;
    const kind = kinds[id]!;
    switch (kind) {
      case BtfKind.INT: {
        strings.check(nameOff, BASE_NAME_OK, true, id, kind);
        checkSize(id, kind, sizeOrType, INT_SIZES);
        const v = w[a + 3]!;
        const bitsOffset = (v >>> 16) & 0xff;
        const bits = v & 0xff;
        if (bits === 0 || bitsOffset + bits > sizeOrType * 8) {
          throw bad(`${where(id, kind)}: ${bits} bits at bit ${bitsOffset} do not fit in ${sizeOrType} bytes`, { typeId: id });
        }
        break;
      }
      case BtfKind.FLOAT:
        strings.check(nameOff, BASE_NAME_OK, true, id, kind);
        checkSize(id, kind, sizeOrType, FLOAT_SIZES);
        break;
      case BtfKind.PTR:
      case BtfKind.VOLATILE:
      case BtfKind.CONST:
      case BtfKind.RESTRICT:
        strings.check(nameOff, 0, false, id, kind);
        ref(sizeOrType, id, kind, 'referenced type');
        break;
      case BtfKind.TYPEDEF:
        strings.check(nameOff, IDENT_OK, true, id, kind);
        ref(sizeOrType, id, kind, 'aliased type');
        break;
      case BtfKind.TYPE_TAG:
        // Emitted into declarations: restricted to characters that cannot end the attribute early.
        strings.check(nameOff, TAG_OK, true, id, kind);
        ref(sizeOrType, id, kind, 'tagged type');
        break;
      case BtfKind.DECL_TAG:
        strings.check(nameOff, 0, true, id, kind);
        ref(sizeOrType, id, kind, 'tagged type');
        break;
      case BtfKind.ARRAY:
        strings.check(nameOff, 0, false, id, kind);
        ref(w[a + 3]!, id, kind, 'element type');
        ref(w[a + 4]!, id, kind, 'index type');
        break;
      case BtfKind.STRUCT:
      case BtfKind.UNION:
        strings.check(nameOff, IDENT_OK, false, id, kind);
        for (let i = 0, p = a + 3; i < vlen; i++, p += 3) {
          strings.check(w[p]!, IDENT_OK, false, id, kind, 'member', i);
          ref(w[p + 1]!, id, kind, 'member', i);
        }
        break;
      case BtfKind.ENUM:
      case BtfKind.ENUM64: {
        strings.check(nameOff, IDENT_OK, false, id, kind);
        const step = kind === BtfKind.ENUM ? 2 : 3;
        for (let i = 0, p = a + 3; i < vlen; i++, p += step) strings.check(w[p]!, IDENT_OK, true, id, kind, 'enumerator', i);
        checkSize(id, kind, sizeOrType, ENUM_SIZES);
        break;
      }
      case BtfKind.FWD:
        strings.check(nameOff, IDENT_OK, true, id, kind);
        break;
      case BtfKind.FUNC:
      case BtfKind.VAR:
        strings.check(nameOff, 0, false, id, kind);
        ref(sizeOrType, id, kind, kind === BtfKind.FUNC ? 'prototype' : 'variable type');
        break;
      case BtfKind.FUNC_PROTO:
        strings.check(nameOff, 0, false, id, kind);
        ref(sizeOrType, id, kind, 'return type');
        for (let i = 0, p = a + 3; i < vlen; i++, p += 2) {
          strings.check(w[p]!, IDENT_OK, false, id, kind, 'parameter', i);
          ref(w[p + 1]!, id, kind, 'parameter', i);
        }
        break;
      case BtfKind.DATASEC:
        strings.check(nameOff, 0, false, id, kind);
        for (let i = 0, p = a + 3; i < vlen; i++, p += 3) ref(w[p]!, id, kind, 'variable', i);
        break;
      default:
        throw bad(`${where(id, kind)}: unknown kind`, { typeId: id, kind }); // unreachable: pass 1 checked
    }
  }
  const btf = new Btf({ endianness: le ? 'little' : 'big', header, words: allWords, at, kinds, strings, ...(opts.base !== undefined ? { base: opts.base } : {}) });
  // The base was checked when it was parsed, and it never refers to split ids.
  checkNoLoops(allWords, at, kinds, strings.bytes, firstId, (id) => {
    const name = btf.name(id);
    throw bad(
      `type [${id}] (${btfKindName(btf.kind(id))}${name ? ` '${name}'` : ''}) refers back to itself without passing through a named struct or union`,
      { typeId: id },
    );
  });
  return btf;
}

/**
 * Where the outgoing references of each type are, as (first word, count, stride) over the type
 * section: the edges a reference loop could run through (see checkNoLoops). A named struct or union
 * has none: its tag is where C breaks a loop.
 */
function edgeLayout(words: Uint32Array, at: Uint32Array, kinds: Uint8Array, strs: Uint8Array, id: number, out: Int32Array): void {
  const a = at[id]!;
  const vlen = words[a + 1]! & 0xffff;
  let first = a + 2;
  let count = 0;
  let stride = 0;
  switch (kinds[id]) {
    case BtfKind.PTR:
    case BtfKind.TYPEDEF:
    case BtfKind.VOLATILE:
    case BtfKind.CONST:
    case BtfKind.RESTRICT:
    case BtfKind.TYPE_TAG:
    case BtfKind.FUNC:
    case BtfKind.VAR:
    case BtfKind.DECL_TAG:
      count = 1;
      break;
    case BtfKind.ARRAY:
      first = a + 3;
      count = 1;
      break;
    case BtfKind.STRUCT:
    case BtfKind.UNION:
      if (strs[words[a]!] !== 0) break; // named
      first = a + 4;
      count = vlen;
      stride = 3;
      break;
    case BtfKind.FUNC_PROTO:
      // The return type at a+2, then parameter types at a+4, a+6, …: walk them as a+2+2k.
      count = vlen + 1;
      stride = 2;
      break;
    case BtfKind.DATASEC:
      first = a + 3;
      count = vlen;
      stride = 3;
      break;
    default:
      break;
  }
  out[0] = first;
  out[1] = count;
  out[2] = stride;
}

/**
 * In C every chain of references that comes back to where it started passes through a named
 * struct or union (`struct list_head { struct list_head *next; }`): its tag is what lets C refer
 * to it before it is complete. Any other loop (a pointer to itself, a typedef of itself, an
 * anonymous struct holding a pointer to itself) cannot be written in C, and following it would
 * recurse forever, so it is rejected here. Iterative DFS over the raw words, so a deep chain
 * cannot overflow the stack and the walk stays cheap before the JIT has warmed up.
 */
function checkNoLoops(words: Uint32Array, at: Uint32Array, kinds: Uint8Array, strs: Uint8Array, firstId: number, onLoop: (id: number) => never): void {
  const n = kinds.length;
  const state = new Uint8Array(n); // 0 unvisited, 1 on the current path, 2 done
  state.fill(2, 0, firstId); // already checked (a split blob's base)
  const stackId = new Int32Array(n);
  const stackNext = new Int32Array(n); // word index of the next edge
  const stackLeft = new Int32Array(n); // edges left
  const stackStride = new Int32Array(n);
  const e = new Int32Array(3);
  for (let root = firstId; root < n; root++) {
    if (state[root] !== 0) continue;
    let sp = 0;
    state[root] = 1;
    edgeLayout(words, at, kinds, strs, root, e);
    stackId[0] = root;
    stackNext[0] = e[0]!;
    stackLeft[0] = e[1]!;
    stackStride[0] = e[2]!;
    while (sp >= 0) {
      if (stackLeft[sp] === 0) {
        state[stackId[sp]!] = 2;
        sp--;
        continue;
      }
      const next = words[stackNext[sp]!]!;
      stackLeft[sp]!--;
      stackNext[sp]! += stackStride[sp]!;
      if (next === 0 || state[next] === 2) continue;
      if (state[next] === 1) onLoop(next);
      state[next] = 1;
      edgeLayout(words, at, kinds, strs, next, e);
      sp++;
      stackId[sp] = next;
      stackNext[sp] = e[0]!;
      stackLeft[sp] = e[1]!;
      stackStride[sp] = e[2]!;
    }
  }
}
