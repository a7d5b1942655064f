/**
 * The C header emitter: a parsed Btf in, the text of a `vmlinux.h` out, equivalent to
 * `bpftool btf dump file X format c`.
 *
 * The algorithm is libbpf's btf_dump.c, re-implemented so that the output matches bpftool's line
 * for line (the tests diff the two), including its choices that matter for compiling:
 *  - Types are visited in id order; each is emitted after the types it strongly depends on
 *    (embedded by value, or reached through an anonymous type that has to be written inline),
 *    and forward-declared when it is only reached through a pointer (orderType/emitType).
 *  - Layouts are reproduced, not trusted to the compiler: explicit `type: N;` padding fills gaps,
 *    `__attribute__((packed))` is added when a member sits below its natural alignment or the
 *    size is not a multiple of the alignment (isStructPacked), bitfields keep their widths.
 *  - Duplicate names get `___N` suffixes (struct/union/enum tags in one namespace, typedefs and
 *    enumerators in another), numbered in the order names are first used.
 *
 * Where this emitter knowingly differs from bpftool v7.1 / libbpf v1.1 it follows newer libbpf:
 * 1-byte enums get `__attribute__((mode(byte)))` and 8-byte enums whose values fit 32 bits get
 * `__attribute__((mode(word)))`, without which clang lays out structs holding them differently
 * from the kernel.
 *
 * The output is written as bytes into one growing buffer and decoded to a string once at the end:
 * no string concatenation and no per-piece strings kept alive (an array of ~1M pieces joined at
 * the end spent more time in garbage collection than in emitting). Every byte written is ASCII:
 * the reader only lets C identifiers, base type names and plain tags through.
 */
import { KheadersError } from '../errors.js';
import { type Btf, BtfKind, btfKindName } from './reader.js';

export interface EmitOptions {
  /**
   * Refuse (E_BTF) to produce more than this many characters. Anonymous types are written out
   * inline at every use, so a small crafted blob could otherwise expand exponentially.
   * Default 256 MiB; the real kernel header is a few MiB.
   */
  maxOutputChars?: number;
}

const DEFAULT_MAX_OUTPUT = 256 * 1024 * 1024;
/** Deeper nesting than this is refused (E_BTF) rather than risking the JS stack. */
const MAX_DEPTH = 1500;
/** libbpf's MAX_RESOLVE_DEPTH: how many modifiers/typedefs/arrays btf__resolve_size follows. */
const MAX_RESOLVE_DEPTH = 32;

/* order states: 0 is not yet ordered */
const ORDERING = 1;
const ORDERED = 2;

const NOT_EMITTED = 0;
const EMITTING = 1;
const EMITTED = 2;

/** libbpf indents with at most 13 tabs. */
const PFX: readonly string[] = Array.from({ length: 14 }, (_, i) => '\t'.repeat(i));
const NL_PFX: readonly string[] = PFX.map((p) => `\n${p}`);
/** A newline and the indentation of level `lvl`. */
function nlPfx(lvl: number): string {
  return NL_PFX[lvl >= 13 ? 13 : lvl]!;
}

/** GCC emits typedefs to its internal Arm SIMD polynomial types; alias them to standard types. */
const MISSING_BASE_TYPES: ReadonlyMap<string, string> = new Map([
  ['__Poly8_t', 'unsigned char'],
  ['__Poly16_t', 'unsigned short'],
  ['__Poly64_t', 'unsigned long long'],
  ['__Poly128_t', 'unsigned __int128'],
]);

const PREAMBLE =
  '#ifndef __VMLINUX_H__\n' +
  '#define __VMLINUX_H__\n' +
  '\n' +
  '#ifndef BPF_NO_PRESERVE_ACCESS_INDEX\n' +
  '#pragma clang attribute push (__attribute__((preserve_access_index)), apply_to = record)\n' +
  '#endif\n' +
  '\n';

const SPACE = 0x20;
const STAR = 0x2a;
const SEMI = 0x3b;
const COMMA = 0x2c;
const LPAREN = 0x28;
const RPAREN = 0x29;
const LBRACKET = 0x5b;
const RBRACKET = 0x5d;
const LBRACE = 0x7b;
const RBRACE = 0x7d;

const EPILOGUE = '#ifndef BPF_NO_PRESERVE_ACCESS_INDEX\n' + '#pragma clang attribute pop\n' + '#endif\n' + '\n' + '#endif /* __VMLINUX_H__ */\n';

function roundUp(x: number, to: number): number {
  return Math.ceil(x / to) * to;
}

function isModifier(kind: number): boolean {
  return kind === BtfKind.VOLATILE || kind === BtfKind.CONST || kind === BtfKind.RESTRICT || kind === BtfKind.TYPE_TAG;
}

function isComposite(kind: number): boolean {
  return kind === BtfKind.STRUCT || kind === BtfKind.UNION;
}

/** A frame of the shared declaration stack: entries base … base+cnt-1, popped from the top. */
interface DeclFrame {
  readonly base: number;
  cnt: number;
}

/**
 * Counts uses of names, keyed by their bytes in the BTF string section. An open-addressing table
 * of string offsets compared byte by byte: a Map keyed by freshly sliced strings spent ~0.5 µs
 * per lookup hashing them, and the kernel has tens of thousands of enumerators.
 */
class NameCounter {
  // Sized for the kernel's ~20k names per namespace without rehashing; grows past half full.
  private keys = new Int32Array(1 << 16); // string offset + 1; 0 = empty slot
  private counts = new Int32Array(1 << 16);
  private size = 0;

  constructor(private readonly strs: Uint8Array) {}

  private hash(off: number): number {
    // FNV-1a over the name's bytes.
    const s = this.strs;
    let h = 0x811c9dc5;
    for (let p = off; s[p] !== 0; p++) h = Math.imul(h ^ s[p]!, 0x01000193);
    return h >>> 0;
  }

  private same(a: number, b: number): boolean {
    if (a === b) return true;
    const s = this.strs;
    for (;;) {
      const c = s[a++];
      if (c !== s[b++]) return false;
      if (c === 0) return true;
    }
  }

  /** Count one more use of the name at `off`; returns the count including this one. */
  bump(off: number): number {
    if (this.size * 2 >= this.keys.length) this.rehash();
    const mask = this.keys.length - 1;
    for (let i = this.hash(off) & mask; ; i = (i + 1) & mask) {
      const k = this.keys[i]!;
      if (k === 0) {
        this.keys[i] = off + 1;
        this.counts[i] = 1;
        this.size++;
        return 1;
      }
      if (this.same(k - 1, off)) return ++this.counts[i]!;
    }
  }

  private rehash(): void {
    const oldKeys = this.keys;
    const oldCounts = this.counts;
    this.keys = new Int32Array(oldKeys.length * 2);
    this.counts = new Int32Array(oldKeys.length * 2);
    const mask = this.keys.length - 1;
    for (let j = 0; j < oldKeys.length; j++) {
      const k = oldKeys[j]!;
      if (k === 0) continue;
      let i = this.hash(k - 1) & mask;
      while (this.keys[i] !== 0) i = (i + 1) & mask;
      this.keys[i] = k;
      this.counts[i] = oldCounts[j]!;
    }
  }
}

class CEmitter {
  private buf: Uint8Array;
  private len = 0;
  private readonly maxChars: number;
  /** The BTF string section: names are copied from it as bytes. */
  private readonly strs: Uint8Array;
  private depth = 0;

  private readonly n: number;
  private readonly ptrSize: number;
  private readonly orderState: Uint8Array;
  private readonly emitState: Uint8Array;
  private readonly fwdEmitted: Uint8Array;
  private readonly referenced: Uint8Array;
  private readonly nameResolved: Uint8Array;
  private readonly resolvedNames: (string | undefined)[];
  /** Cached alignments (0 = not yet computed) and a marker for structs being computed. */
  private readonly alignCache: Int32Array;
  private readonly alignBusy: Uint8Array;
  /** struct/union/enum tags: how many times each name has been used. */
  private readonly typeNames: NameCounter;
  /** typedef names and enumerators share C's ordinary identifier namespace. */
  private readonly identNames: NameCounter;
  private emitQueue = new Int32Array(64);
  private emitQueueLen = 0;
  /** The declaration stack shared by nested emitTypeDecl calls, each using a frame of it. */
  private declStack = new Int32Array(1024);
  private declTop = 0;

  constructor(
    private readonly btf: Btf,
    opts: EmitOptions,
  ) {
    this.n = btf.count;
    this.ptrSize = btf.pointerSize;
    this.maxChars = opts.maxOutputChars ?? DEFAULT_MAX_OUTPUT;
    this.strs = btf.stringBytes();
    this.typeNames = new NameCounter(this.strs);
    this.identNames = new NameCounter(this.strs);
    // The kernel's header is about half the size of its BTF: start there and grow if needed.
    this.buf = new Uint8Array(Math.max(64 * 1024, Math.min(this.maxChars, btf.stringBytes().length * 2)));
    this.orderState = new Uint8Array(this.n);
    this.emitState = new Uint8Array(this.n);
    this.fwdEmitted = new Uint8Array(this.n);
    this.referenced = new Uint8Array(this.n);
    this.nameResolved = new Uint8Array(this.n);
    this.resolvedNames = new Array<string | undefined>(this.n);
    this.alignCache = new Int32Array(this.n);
    this.alignBusy = new Uint8Array(this.n);
    // void is always "defined".
    this.orderState[0] = ORDERED;
    this.emitState[0] = EMITTED;
    this.markReferenced();
  }

  run(): Buffer {
    this.w(PREAMBLE);
    for (let id = 1; id < this.n; id++) {
      this.emitQueueLen = 0;
      this.orderType(id, false);
      for (let i = 0; i < this.emitQueueLen; i++) this.emitType(this.emitQueue[i]!, 0);
    }
    this.w(EPILOGUE);
    return Buffer.from(this.buf.buffer, this.buf.byteOffset, this.len);
  }

  private enqueue(id: number): void {
    if (this.emitQueueLen === this.emitQueue.length) {
      const grown = new Int32Array(this.emitQueue.length * 2);
      grown.set(this.emitQueue);
      this.emitQueue = grown;
    }
    this.emitQueue[this.emitQueueLen++] = id;
  }

  /** Make room for `n` more bytes. */
  private grow(n: number): void {
    const need = this.len + n;
    if (need > this.maxChars) {
      throw new KheadersError('E_BTF', `the C header would exceed ${this.maxChars} characters; refusing a BTF blob that expands this much`, {
        maxOutputChars: this.maxChars,
      });
    }
    let cap = this.buf.length * 2;
    while (cap < need) cap *= 2;
    const grown = new Uint8Array(Math.min(cap, Math.max(need, this.maxChars)));
    grown.set(this.buf.subarray(0, this.len));
    this.buf = grown;
  }

  /** Write an ASCII string. */
  private w(s: string): void {
    const n = s.length;
    if (this.len + n > this.buf.length) this.grow(n);
    const buf = this.buf;
    let p = this.len;
    for (let i = 0; i < n; i++) buf[p++] = s.charCodeAt(i);
    this.len = p;
  }

  /** Write one ASCII character by code. */
  private wc(c: number): void {
    if (this.len + 1 > this.buf.length) this.grow(1);
    this.buf[this.len++] = c;
  }

  /** Write a non-negative integer. */
  private wNum(v: number): void {
    if (v >= 0 && v < 10) this.wc(48 + v);
    else this.w(String(v));
  }

  /** Write the NUL-terminated name at string-section offset `off` (checked ASCII by the reader). */
  private wStr(off: number): void {
    const src = this.strs;
    let end = off;
    while (src[end] !== 0) end++;
    const n = end - off;
    if (this.len + n > this.buf.length) this.grow(n);
    const buf = this.buf;
    let p = this.len;
    for (let i = off; i < end; i++) buf[p++] = src[i]!;
    this.len = p;
  }

  /**
   * Count one level of recursion. Callers decrement on their normal exits only: an exception
   * aborts the whole emission, so the count need not be restored then.
   */
  private enter(id: number): void {
    if (++this.depth > MAX_DEPTH) {
      throw new KheadersError('E_BTF', `malformed BTF: types nest more than ${MAX_DEPTH} deep at type [${id}]`, { typeId: id });
    }
  }

  /**
   * Anonymous enums are declared inline where they are used, except top-level ones (global
   * constants) which nothing refers to: remember which types something refers to.
   */
  private markReferenced(): void {
    const b = this.btf;
    const r = this.referenced;
    for (let id = 1; id < this.n; id++) {
      switch (b.kind(id)) {
        case BtfKind.VOLATILE:
        case BtfKind.CONST:
        case BtfKind.RESTRICT:
        case BtfKind.PTR:
        case BtfKind.TYPEDEF:
        case BtfKind.FUNC:
        case BtfKind.VAR:
        case BtfKind.DECL_TAG:
        case BtfKind.TYPE_TAG:
          r[b.ref(id)] = 1;
          break;
        case BtfKind.ARRAY:
          r[b.arrayIndexType(id)] = 1;
          r[b.ref(id)] = 1;
          break;
        case BtfKind.STRUCT:
        case BtfKind.UNION: {
          const vlen = b.vlen(id);
          for (let i = 0; i < vlen; i++) r[b.memberType(id, i)] = 1;
          break;
        }
        case BtfKind.FUNC_PROTO: {
          // As libbpf: parameters only, not the return type.
          const vlen = b.vlen(id);
          for (let i = 0; i < vlen; i++) r[b.paramType(id, i)] = 1;
          break;
        }
        case BtfKind.DATASEC: {
          const vlen = b.vlen(id);
          for (let i = 0; i < vlen; i++) r[b.datasecVarType(id, i)] = 1;
          break;
        }
        default:
          break;
      }
    }
  }

  /**
   * Topological ordering. Returns true when the link to `id` is strong (it must be fully defined
   * first), false when a forward declaration is enough. A struct reached through a pointer only
   * needs its tag, unless it is anonymous and so has to be written out inline.
   */
  private orderType(id: number, throughPtr: boolean): boolean {
    if (this.orderState[id] === ORDERED) return true;
    const b = this.btf;
    const kind = b.kind(id);
    if (this.orderState[id] === ORDERING) {
      // A loop, which C can break only at a named struct/union reached through a pointer.
      if (isComposite(kind) && throughPtr && b.name(id) !== '') return false;
      throw new KheadersError('E_BTF', `malformed BTF: type [${id}] (${btfKindName(kind)} '${b.name(id)}') contains itself by value`, {
        typeId: id,
      });
    }
    this.enter(id);
    const strong = this.orderKind(id, kind, throughPtr);
    this.depth--;
    return strong;
  }

  private orderKind(id: number, kind: number, throughPtr: boolean): boolean {
    const b = this.btf;
    {
      switch (kind) {
        case BtfKind.INT:
        case BtfKind.FLOAT:
          this.orderState[id] = ORDERED;
          return false;
        case BtfKind.PTR: {
          const strong = this.orderType(b.ref(id), true);
          this.orderState[id] = ORDERED;
          return strong;
        }
        case BtfKind.ARRAY:
          return this.orderType(b.ref(id), false);
        case BtfKind.STRUCT:
        case BtfKind.UNION: {
          const named = b.name(id) !== '';
          if (throughPtr && named) return false;
          this.orderState[id] = ORDERING;
          const vlen = b.vlen(id);
          for (let i = 0; i < vlen; i++) this.orderType(b.memberType(id, i), false);
          if (named) this.enqueue(id);
          this.orderState[id] = ORDERED;
          return true;
        }
        case BtfKind.ENUM:
        case BtfKind.ENUM64:
        case BtfKind.FWD:
          // Named or unreferenced (top-level constants) enums are declarations of their own.
          if (b.name(id) !== '' || this.referenced[id] === 0) this.enqueue(id);
          this.orderState[id] = ORDERED;
          return true;
        case BtfKind.TYPEDEF: {
          const strong = this.orderType(b.ref(id), throughPtr);
          // Like a struct: through a pointer, a typedef of something weak can wait.
          if (throughPtr && !strong) return false;
          this.enqueue(id);
          this.orderState[id] = ORDERED;
          return true;
        }
        case BtfKind.VOLATILE:
        case BtfKind.CONST:
        case BtfKind.RESTRICT:
        case BtfKind.TYPE_TAG:
          return this.orderType(b.ref(id), throughPtr);
        case BtfKind.FUNC_PROTO: {
          let strong = this.orderType(b.ref(id), throughPtr);
          const vlen = b.vlen(id);
          for (let i = 0; i < vlen; i++) if (this.orderType(b.paramType(id, i), throughPtr)) strong = true;
          return strong;
        }
        default:
          // FUNC, VAR, DATASEC, DECL_TAG: not part of a C header.
          this.orderState[id] = ORDERED;
          return false;
      }
    }
  }

  /**
   * Emit `id` (a top-level definition when contId is 0) and, first, whatever forward declarations
   * its members need. contId is the struct being defined, which needs no forward declaration of
   * itself.
   */
  private emitType(id: number, contId: number): void {
    const st = this.emitState[id]!;
    if (st === EMITTED) return;
    const b = this.btf;
    const kind = b.kind(id);
    if (st === EMITTING) {
      if (this.fwdEmitted[id] === 1) return;
      if (isComposite(kind)) {
        // Referring to the struct being defined needs no forward declaration.
        if (id === contId) return;
        if (b.name(id) === '') {
          throw new KheadersError('E_BTF', `malformed BTF: anonymous ${btfKindName(kind)} [${id}] refers to itself`, { typeId: id });
        }
        this.emitStructFwd(id);
        this.w(';\n\n');
        this.fwdEmitted[id] = 1;
      } else if (kind === BtfKind.TYPEDEF) {
        // The typedef is needed (through a pointer) before its target is complete: emit it now.
        if (!this.isBlacklisted(id)) {
          this.emitTypedefDef(id, 0);
          this.w(';\n\n');
        }
        this.fwdEmitted[id] = 1;
      }
      return;
    }
    this.enter(id);
    {
      switch (kind) {
        case BtfKind.INT:
          this.emitMissingAliases(id);
          this.emitState[id] = EMITTED;
          break;
        case BtfKind.ENUM:
        case BtfKind.ENUM64:
          if (contId === 0) {
            this.emitEnumDef(id, 0);
            this.w(';\n\n');
          }
          this.emitState[id] = EMITTED;
          break;
        case BtfKind.PTR:
        case BtfKind.VOLATILE:
        case BtfKind.CONST:
        case BtfKind.RESTRICT:
        case BtfKind.TYPE_TAG:
        case BtfKind.ARRAY:
          this.emitType(b.ref(id), contId);
          break;
        case BtfKind.FWD:
          this.emitFwdDef(id);
          this.w(';\n\n');
          this.emitState[id] = EMITTED;
          break;
        case BtfKind.TYPEDEF:
          this.emitState[id] = EMITTING;
          this.emitType(b.ref(id), id);
          // Unless something already needed it early (see above), the typedef goes here.
          if (this.fwdEmitted[id] === 0 && !this.isBlacklisted(id)) {
            this.emitTypedefDef(id, 0);
            this.w(';\n\n');
          }
          this.emitState[id] = EMITTED;
          break;
        case BtfKind.STRUCT:
        case BtfKind.UNION: {
          this.emitState[id] = EMITTING;
          const named = b.name(id) !== '';
          // A definition (top-level, or an anonymous one written inline) spells out every member,
          // so every member type needs its forward declaration first.
          if (contId === 0 || !named) {
            const newCont = named ? id : contId;
            const vlen = b.vlen(id);
            for (let i = 0; i < vlen; i++) this.emitType(b.memberType(id, i), newCont);
          } else if (this.fwdEmitted[id] === 0 && id !== contId) {
            this.emitStructFwd(id);
            this.w(';\n\n');
            this.fwdEmitted[id] = 1;
          }
          if (contId === 0) {
            this.emitStructDef(id, 0);
            this.w(';\n\n');
            this.emitState[id] = EMITTED;
          } else {
            this.emitState[id] = NOT_EMITTED;
          }
          break;
        }
        case BtfKind.FUNC_PROTO: {
          this.emitType(b.ref(id), contId);
          const vlen = b.vlen(id);
          for (let i = 0; i < vlen; i++) this.emitType(b.paramType(id, i), contId);
          break;
        }
        default:
          break;
      }
    }
    this.depth--;
  }

  /** `__builtin_va_list` is the compiler's own; redefining it breaks compilation. */
  private isBlacklisted(id: number): boolean {
    return this.btf.name(id) === '__builtin_va_list';
  }

  // ---- names ------------------------------------------------------------------------------

  /** The emitted name of a type: its BTF name, or `name___N` for the Nth use of a duplicate. */
  private resolveName(id: number, map: NameCounter): string {
    const b = this.btf;
    const orig = b.name(id);
    if (orig === '') return '';
    if (this.nameResolved[id] === 1) return this.resolvedNames[id] ?? orig;
    const kind = b.kind(id);
    // Forward declarations and empty enums never clash: repeating them is valid C.
    if (kind === BtfKind.FWD || (kind === BtfKind.ENUM && b.vlen(id) === 0)) {
      this.nameResolved[id] = 1;
      return orig;
    }
    const dups = map.bump(b.nameOffset(id));
    if (dups > 1) this.resolvedNames[id] = `${orig}___${dups}`;
    this.nameResolved[id] = 1;
    return this.resolvedNames[id] ?? orig;
  }

  private typeName(id: number): string {
    return this.resolveName(id, this.typeNames);
  }

  private identName(id: number): string {
    return this.resolveName(id, this.identNames);
  }

  // ---- layout -----------------------------------------------------------------------------

  /**
   * Alignment of a type as the compiler would compute it (libbpf's btf__align_of); 0 if unknown.
   * The modifier/typedef/array chase terminates: the reader rejects reference loops that do not
   * pass through a named struct or union, and a struct ends the chase.
   */
  private alignOf(start: number): number {
    const b = this.btf;
    let id = start;
    // Modifiers, typedefs and arrays take their target's alignment: follow them iteratively.
    for (;;) {
      const kind = b.kind(id);
      switch (kind) {
        case BtfKind.INT:
        case BtfKind.ENUM:
        case BtfKind.ENUM64:
        case BtfKind.FLOAT:
          return Math.min(this.ptrSize, b.size(id));
        case BtfKind.PTR:
          return this.ptrSize;
        case BtfKind.TYPEDEF:
        case BtfKind.VOLATILE:
        case BtfKind.CONST:
        case BtfKind.RESTRICT:
        case BtfKind.TYPE_TAG:
        case BtfKind.ARRAY:
          id = b.ref(id);
          continue;
        case BtfKind.STRUCT:
        case BtfKind.UNION:
          return this.compositeAlign(id);
        default:
          return 0;
      }
    }
  }

  private compositeAlign(id: number): number {
    const cached = this.alignCache[id]!;
    if (cached !== 0) return cached - 1;
    if (this.alignBusy[id] === 1) {
      throw new KheadersError('E_BTF', `malformed BTF: type [${id}] (${btfKindName(this.btf.kind(id))}) contains itself by value`, {
        typeId: id,
      });
    }
    this.alignBusy[id] = 1;
    this.enter(id);
    const result = this.computeCompositeAlign(id);
    this.depth--;
    this.alignBusy[id] = 0;
    this.alignCache[id] = result + 1;
    return result;
  }

  private computeCompositeAlign(id: number): number {
    const b = this.btf;
    const vlen = b.vlen(id);
    let maxAlign = 1;
    for (let i = 0; i < vlen; i++) {
      const align = this.alignOf(b.memberType(id, i));
      if (align <= 0) return 0;
      if (align > maxAlign) maxAlign = align;
      // A member below its type's natural alignment means the struct was packed.
      if (b.memberBitfieldSize(id, i) === 0 && b.memberBitOffset(id, i) % (8 * align) !== 0) return 1;
    }
    // So does a size that is not a multiple of the alignment.
    if (b.size(id) % maxAlign !== 0) return 1;
    return maxAlign;
  }

  /** Byte size of a type (libbpf's btf__resolve_size), or -1 when it has none. */
  private resolveSize(start: number): number {
    const b = this.btf;
    let id = start;
    let nelems = 1;
    for (let i = 0; i < MAX_RESOLVE_DEPTH && id !== 0; i++) {
      switch (b.kind(id)) {
        case BtfKind.INT:
        case BtfKind.STRUCT:
        case BtfKind.UNION:
        case BtfKind.ENUM:
        case BtfKind.ENUM64:
        case BtfKind.DATASEC:
        case BtfKind.FLOAT:
          return this.sized(nelems, b.size(id));
        case BtfKind.PTR:
          return this.sized(nelems, this.ptrSize);
        case BtfKind.TYPEDEF:
        case BtfKind.VOLATILE:
        case BtfKind.CONST:
        case BtfKind.RESTRICT:
        case BtfKind.VAR:
        case BtfKind.DECL_TAG:
        case BtfKind.TYPE_TAG:
          id = b.ref(id);
          break;
        case BtfKind.ARRAY: {
          const ne = b.arrayNelems(id);
          if (nelems !== 0 && ne > Math.floor(0xffffffff / nelems)) return -1;
          nelems *= ne;
          id = b.ref(id);
          break;
        }
        default:
          return -1; // FWD (incomplete), FUNC_PROTO, …
      }
    }
    return -1;
  }

  private sized(nelems: number, size: number): number {
    if (nelems !== 0 && size > Math.floor(0xffffffff / nelems)) return -1;
    return nelems * size;
  }

  /** Whether a struct must be declared packed to get its BTF layout. */
  private isStructPacked(id: number): boolean {
    const b = this.btf;
    const vlen = b.vlen(id);
    let maxAlign = 1;
    for (let i = 0; i < vlen; i++) {
      const align = this.alignOf(b.memberType(id, i));
      if (align !== 0 && b.memberBitfieldSize(id, i) === 0 && b.memberBitOffset(id, i) % (8 * align) !== 0) return true;
      if (align > maxAlign) maxAlign = align;
    }
    // A naturally laid out struct that the source marked packed is detected as not packed: fine.
    return b.size(id) % maxAlign !== 0;
  }

  /**
   * Fill the gap between bit offsets `cur` and `next` with anonymous bitfields (`long: 64;`),
   * relying on natural alignment where the compiler will pad by itself anyway. `nextAlign` is the
   * alignment of the member at `next`; `inBitfield` says the gap follows a bitfield.
   */
  private emitBitPadding(cur: number, next: number, nextAlignIn: number, inBitfield: boolean, lvl: number): void {
    if (cur >= next) return;
    const nextAlign = nextAlignIn > 0 ? nextAlignIn : 1;
    const pads: readonly (readonly [string, number])[] = [
      ['long', this.ptrSize * 8],
      ['int', 32],
      ['short', 16],
      ['char', 8],
    ];
    let padType = 'char';
    let padBits = 8;
    let newOff = 0;
    // The largest padding type whose alignment boundary falls inside the gap.
    for (const [name, bits] of pads) {
      padType = name;
      padBits = bits;
      newOff = roundUp(cur, bits);
      if (newOff <= next) break;
    }
    if (newOff > cur && newOff <= next) {
      // An explicit `<type>: 0` aligning mark is needed when the compiler would not align there
      // by itself, or when a `<type>: N` would fit in the hole and so be ignored.
      if (
        inBitfield ||
        (newOff === next && roundUp(cur, nextAlign * 8) !== newOff) ||
        (newOff !== next && next - newOff <= newOff - cur)
      ) {
        this.emitPad(lvl, padType, inBitfield ? newOff - cur : 0);
      }
      cur = newOff;
    }
    // From an aligned offset: whole `<type>: bits;` units, then the smallest type for the rest.
    while (cur !== next) {
      const bits = Math.min(next - cur, padBits);
      if (bits === padBits) {
        this.emitPad(lvl, padType, padBits);
        cur += bits;
        continue;
      }
      for (let i = pads.length - 1; i >= 0; i--) {
        const [name, pb] = pads[i]!;
        padType = name;
        padBits = pb;
        if (pb < bits) continue;
        this.emitPad(lvl, name, bits);
        cur += bits;
        break;
      }
    }
  }

  private emitPad(lvl: number, type: string, bits: number): void {
    this.w(nlPfx(lvl));
    this.w(type);
    this.w(': ');
    this.wNum(bits);
    this.wc(SEMI);
  }

  // ---- definitions ------------------------------------------------------------------------

  private emitStructFwd(id: number): void {
    const name = this.typeName(id);
    const isStruct = this.btf.kind(id) === BtfKind.STRUCT;
    if (name === '') {
      this.w(isStruct ? 'struct' : 'union');
    } else {
      this.w(isStruct ? 'struct ' : 'union ');
      this.w(name);
    }
  }

  private emitStructDef(id: number, lvl: number): void {
    const b = this.btf;
    const isStruct = b.kind(id) === BtfKind.STRUCT;
    const vlen = b.vlen(id);
    const size = b.size(id);
    const align = this.alignOf(id);
    const packed = isStruct ? this.isStructPacked(id) : false;
    this.enter(id);
    {
      const name = this.typeName(id);
      this.w(isStruct ? 'struct ' : 'union ');
      if (name !== '') {
        this.w(name);
        this.wc(SPACE);
      }
      this.wc(LBRACE);
      let off = 0;
      let prevBitfield = false;
      const inner = nlPfx(lvl + 1);
      for (let i = 0; i < vlen; i++) {
        const mType = b.memberType(id, i);
        const mOff = b.memberBitOffset(id, i);
        let mSize = b.memberBitfieldSize(id, i);
        const mAlign = packed ? 1 : this.alignOf(mType);
        this.emitBitPadding(off, mOff, mAlign, prevBitfield && mSize !== 0, lvl + 1);
        this.w(inner);
        this.emitTypeDecl(mType, b.memberNameOffset(id, i), null, lvl + 1);
        if (mSize !== 0) {
          this.w(': ');
          this.wNum(mSize);
          this.wc(SEMI);
          off = mOff + mSize;
          prevBitfield = true;
        } else {
          mSize = Math.max(0, this.resolveSize(mType));
          off = mOff + mSize * 8;
          prevBitfield = false;
          this.wc(SEMI);
        }
      }
      // Tail padding up to the size.
      if (isStruct) this.emitBitPadding(off, size * 8, align, false, lvl + 1);
      // `struct empty {}` stays on one line.
      if (vlen !== 0 || size !== 0) this.w(nlPfx(lvl));
      this.wc(RBRACE);
      if (packed) this.w(' __attribute__((packed))');
    }
    this.depth--;
  }

  private emitMissingAliases(id: number): void {
    const name = this.typeName(id);
    const alias = MISSING_BASE_TYPES.get(name);
    if (alias !== undefined) this.w(`typedef ${alias} ${name};\n\n`);
  }

  private emitEnumDef(id: number, lvl: number): void {
    const b = this.btf;
    const vlen = b.vlen(id);
    const name = this.typeName(id);
    if (name === '') {
      this.w('enum');
    } else {
      this.w('enum ');
      this.w(name);
    }
    if (vlen === 0) return;
    this.w(' {');
    const is64 = b.kind(id) === BtfKind.ENUM64;
    const signed = b.kflag(id);
    const inner = nlPfx(lvl + 1);
    let anyHi32 = false;
    for (let i = 0; i < vlen; i++) {
      const vname = b.enumValueNameOffset(id, i);
      // Enumerators share their namespace with typedef names.
      const dups = this.identNames.bump(vname);
      this.w(inner);
      this.wStr(vname);
      if (dups > 1) {
        this.w('___');
        this.wNum(dups);
      }
      this.w(' = ');
      if (is64) {
        if (b.enum64Hi32(id, i) !== 0) anyHi32 = true;
        this.w(String(b.enum64Value(id, i)));
        this.w(signed ? 'LL,' : 'ULL,');
      } else {
        const v = b.enumValue(id, i);
        if (v < 0) this.w(String(v));
        else this.wNum(v);
        this.wc(COMMA);
      }
    }
    this.w(nlPfx(lvl));
    this.wc(RBRACE);
    // C sizes an enum by its values; force the sizes that values alone would not give.
    const size = b.size(id);
    if (size === 1) {
      this.w(' __attribute__((mode(byte)))');
    } else if (size === 8 && this.ptrSize === 8) {
      // A 32-bit ENUM of 8 bytes, or an ENUM64 whose values all fit 32 bits, needs word mode.
      if (!is64 || !anyHi32) this.w(' __attribute__((mode(word)))');
    }
  }

  private emitFwdDef(id: number): void {
    const name = this.typeName(id);
    this.w(this.btf.kflag(id) ? 'union ' : 'struct ');
    this.w(name);
  }

  private emitTypedefDef(id: number, lvl: number): void {
    const b = this.btf;
    const name = this.identName(id);
    const target = b.ref(id);
    // Old GCC emits __gnuc_va_list as a typedef of void: make it the builtin it really is.
    if (target === 0 && name === '__gnuc_va_list') {
      this.w('typedef __builtin_va_list __gnuc_va_list');
      return;
    }
    this.w('typedef ');
    this.emitTypeDecl(target, 0, name, lvl);
  }

  // ---- declarations -----------------------------------------------------------------------

  /**
   * Emit a declaration of a name with type `id` in C syntax. The name is `fnameStr` if not null,
   * else the string at section offset `fnameOff` (member and parameter names are copied as bytes;
   * typedef names may carry a `___N` suffix and come as strings). BTF chains run outside-in
   * (`typedef → array → ptr → const → int`) while C declarators read inside-out, so the chain is
   * pushed on a stack down to its base type and emitted from the top (emitTypeChain).
   */
  private emitTypeDecl(start: number, fnameOff: number, fnameStr: string | null, lvl: number): void {
    const b = this.btf;
    const base = this.declTop;
    let id = start;
    for (;;) {
      if (this.declTop === this.declStack.length) {
        const grown = new Int32Array(this.declStack.length * 2);
        grown.set(this.declStack);
        this.declStack = grown;
      }
      this.declStack[this.declTop++] = id;
      if (id === 0) break;
      const kind = b.kind(id);
      if (
        kind === BtfKind.PTR ||
        kind === BtfKind.VOLATILE ||
        kind === BtfKind.CONST ||
        kind === BtfKind.RESTRICT ||
        kind === BtfKind.FUNC_PROTO ||
        kind === BtfKind.TYPE_TAG ||
        kind === BtfKind.ARRAY
      ) {
        id = b.ref(id);
        continue;
      }
      if (
        kind === BtfKind.INT ||
        kind === BtfKind.ENUM ||
        kind === BtfKind.ENUM64 ||
        kind === BtfKind.FWD ||
        kind === BtfKind.STRUCT ||
        kind === BtfKind.UNION ||
        kind === BtfKind.TYPEDEF ||
        kind === BtfKind.FLOAT
      ) {
        break;
      }
      throw new KheadersError('E_BTF', `malformed BTF: type [${id}] (${btfKindName(kind)}) cannot be part of a declaration`, { typeId: id });
    }
    // Nested declarations (parameters, members of inline structs) push above this frame.
    const frame: DeclFrame = { base, cnt: this.declTop - base };
    this.emitTypeChain(frame, fnameOff, fnameStr, lvl);
    this.declTop = base;
  }

  private emitDim(nelems: number): void {
    this.wc(LBRACKET);
    this.wNum(nelems);
    this.wc(RBRACKET);
  }

  private top(frame: DeclFrame): number {
    return this.declStack[frame.base + frame.cnt - 1]!;
  }

  /** Emit the qualifiers at the top of the frame, in C's prefix position (`const int`). */
  private emitMods(frame: DeclFrame): void {
    while (frame.cnt > 0) {
      const kind = this.btf.kind(this.top(frame));
      if (kind === BtfKind.VOLATILE) this.w('volatile ');
      else if (kind === BtfKind.CONST) this.w('const ');
      else if (kind === BtfKind.RESTRICT) this.w('restrict ');
      else return;
      frame.cnt--;
    }
  }

  /** Drop qualifiers C cannot express where they are (on arrays, on functions). */
  private dropMods(frame: DeclFrame): void {
    while (frame.cnt > 0 && isModifier(this.btf.kind(this.top(frame)))) frame.cnt--;
  }

  private hasName(fnameOff: number, fnameStr: string | null): boolean {
    return fnameStr !== null ? fnameStr !== '' : this.strs[fnameOff] !== 0;
  }

  private emitName(fnameOff: number, fnameStr: string | null, lastWasPtr: boolean): void {
    if (!this.hasName(fnameOff, fnameStr)) return;
    if (!lastWasPtr) this.wc(SPACE);
    if (fnameStr !== null) this.w(fnameStr);
    else this.wStr(fnameOff);
  }

  private emitTypeChain(frame: DeclFrame, fnameOff: number, fnameStr: string | null, lvl: number): void {
    const b = this.btf;
    // Whether the last thing written was a `*`, so `int ***p` gets no spaces between stars.
    let lastWasPtr = true;
    this.enter(this.declStack[frame.base]!);
    {
      while (frame.cnt > 0) {
        const id = this.declStack[frame.base + --frame.cnt]!;
        if (id === 0) {
          this.emitMods(frame);
          this.w('void');
          lastWasPtr = false;
          continue;
        }
        const kind = b.kind(id);
        switch (kind) {
          case BtfKind.INT:
          case BtfKind.FLOAT:
            this.emitMods(frame);
            this.w(b.name(id));
            break;
          case BtfKind.STRUCT:
          case BtfKind.UNION:
            this.emitMods(frame);
            // Anonymous structs and unions are defined inline.
            if (b.name(id) === '') this.emitStructDef(id, lvl);
            else this.emitStructFwd(id);
            break;
          case BtfKind.ENUM:
          case BtfKind.ENUM64:
            this.emitMods(frame);
            if (b.name(id) === '') this.emitEnumDef(id, lvl);
            else {
              this.w('enum ');
              this.w(this.typeName(id));
            }
            break;
          case BtfKind.FWD:
            this.emitMods(frame);
            this.emitFwdDef(id);
            break;
          case BtfKind.TYPEDEF:
            this.emitMods(frame);
            this.w(this.identName(id));
            break;
          case BtfKind.PTR:
            if (!lastWasPtr) this.wc(SPACE);
            this.wc(STAR);
            break;
          case BtfKind.VOLATILE:
            this.w(' volatile');
            break;
          case BtfKind.CONST:
            this.w(' const');
            break;
          case BtfKind.RESTRICT:
            this.w(' restrict');
            break;
          case BtfKind.TYPE_TAG:
            this.emitMods(frame);
            if (b.kflag(id)) {
              this.w(' __attribute__((');
              this.w(b.name(id));
              this.w('))');
            } else {
              this.w(' __attribute__((btf_type_tag("');
              this.w(b.name(id));
              this.w('")))');
            }
            break;
          case BtfKind.ARRAY: {
            // Qualifiers on an array (a GCC quirk) mean nothing: drop them.
            this.dropMods(frame);
            const nelems = b.arrayNelems(id);
            if (frame.cnt === 0) {
              this.emitName(fnameOff, fnameStr, lastWasPtr);
              this.emitDim(nelems);
              this.depth--;
              return;
            }
            const multidim = b.kind(this.top(frame)) === BtfKind.ARRAY;
            if (!lastWasPtr && this.hasName(fnameOff, fnameStr)) this.wc(SPACE);
            // No parentheses for a multi-dimensional array.
            if (!multidim) this.wc(LPAREN);
            this.emitTypeChain(frame, fnameOff, fnameStr, lvl);
            if (!multidim) this.wc(RPAREN);
            this.emitDim(nelems);
            this.depth--;
            return;
          }
          case BtfKind.FUNC_PROTO: {
            // GCC marks noreturn function pointers volatile; drop such qualifiers too.
            this.dropMods(frame);
            if (frame.cnt > 0) {
              this.w(' (');
              this.emitTypeChain(frame, fnameOff, fnameStr, lvl);
              this.w(')');
            } else {
              this.emitName(fnameOff, fnameStr, lastWasPtr);
            }
            this.w('(');
            const vlen = b.vlen(id);
            // No parameters, or clang's single void parameter: `(void)`.
            if (vlen === 0 || (vlen === 1 && b.paramType(id, 0) === 0)) {
              this.w('void)');
              this.depth--;
              return;
            }
            for (let i = 0; i < vlen; i++) {
              if (i > 0) this.w(', ');
              const pType = b.paramType(id, i);
              // A trailing void parameter is `...`.
              if (i === vlen - 1 && pType === 0) {
                this.w('...');
                break;
              }
              this.emitTypeDecl(pType, b.paramNameOffset(id, i), null, lvl);
            }
            this.w(')');
            this.depth--;
            return;
          }
          default:
            throw new KheadersError('E_BTF', `malformed BTF: type [${id}] (${btfKindName(kind)}) cannot be part of a declaration`, {
              typeId: id,
            });
        }
        lastWasPtr = kind === BtfKind.PTR;
      }
      this.emitName(fnameOff, fnameStr, lastWasPtr);
    }
    this.depth--;
  }
}

/** The whole `vmlinux.h` for a parsed BTF, as ASCII bytes: every named type, ordered so that it compiles. */
export function emitCHeaderBytes(btf: Btf, opts: EmitOptions = {}): Buffer {
  return new CEmitter(btf, opts).run();
}

/** The whole `vmlinux.h` for a parsed BTF: every named type, ordered so that it compiles. */
export function emitCHeader(btf: Btf, opts: EmitOptions = {}): string {
  return emitCHeaderBytes(btf, opts).toString('latin1');
}
