/**
 * Does a BTF blob belong to a tree of kernel headers? BTF names no release, so this compares the
 * layout facts the headers carry as numbers, generated at build time from the same compiled
 * kernel, with what the BTF records:
 *
 *   include/generated/bounds.h        NR_PAGEFLAGS, MAX_NR_ZONES (enumerators), SPINLOCK_SIZE
 *   include/generated/asm-offsets.h   `<struct>_<member>` offsets (pt_regs_bx, pbe_address, …),
 *                                     SIZEOF_<struct>, and the task_struct / pt_regs offsets
 *                                     the architectures name their own way (TASK_threadsp, …)
 *
 * task_struct offsets move with nearly every configuration change, so another kernel's BTF is
 * caught; a name that matches nothing in the BTF is skipped, never counted against it. Pure.
 */
import { BtfKind, type Btf } from './reader.js';

export interface HeaderFacts {
  /** include/generated/asm-offsets.h (any architecture's), if the tree has it. */
  asmOffsets?: string;
  /** include/generated/bounds.h, if the tree has it. */
  bounds?: string;
}

export interface BtfHeadersCheck {
  /** Facts compared, e.g. `offsetof(struct pt_regs, bx) = 40`. */
  checked: string[];
  /** Facts that differ, e.g. `offsetof(struct task_struct, thread.sp): headers 2968, BTF 3160`. */
  mismatches: string[];
}

/** asm-offsets names that do not follow `<struct>_<member>`: what they measure, per architecture. */
const KNOWN: Readonly<Record<string, { struct: string; member?: string }>> = {
  TASK_threadsp: { struct: 'task_struct', member: 'thread.sp' }, // x86
  TASK_stack_canary: { struct: 'task_struct', member: 'stack_canary' }, // x86
  PTREGS_SIZE: { struct: 'pt_regs' }, // x86
  TSK_STACK_CANARY: { struct: 'task_struct', member: 'stack_canary' }, // arm64
  TSK_TI_FLAGS: { struct: 'task_struct', member: 'thread_info.flags' }, // arm64
  TSK_TI_PREEMPT: { struct: 'task_struct', member: 'thread_info.preempt_count' }, // arm64
  THREAD_CPU_CONTEXT: { struct: 'task_struct', member: 'thread.cpu_context' }, // arm64
  PT_REGS_SIZE: { struct: 'pt_regs' }, // arm64
  S_FRAME_SIZE: { struct: 'pt_regs' }, // older arm64
};

/** bounds.h names and the enumerator (or typedef size) they copy. */
const BOUNDS: Readonly<Record<string, { enumerator?: string; typedefSize?: string }>> = {
  NR_PAGEFLAGS: { enumerator: '__NR_PAGEFLAGS' },
  MAX_NR_ZONES: { enumerator: '__MAX_NR_ZONES' },
  SPINLOCK_SIZE: { typedefSize: 'spinlock_t' },
};

function defines(text: string): Array<[string, number]> {
  const out: Array<[string, number]> = [];
  for (const line of text.split('\n')) {
    const m = /^#define\s+([A-Za-z_][A-Za-z0-9_]*)\s+(-?\d+)\s*$/.exec(line);
    if (m) out.push([m[1]!, Number(m[2])]);
  }
  return out;
}

export function checkBtfAgainstHeaders(btf: Btf, facts: HeaderFacts): BtfHeadersCheck {
  const index = new BtfIndex(btf);
  const checked: string[] = [];
  const mismatches: string[] = [];
  const compare = (what: string, headers: number, fromBtf: number | undefined): void => {
    if (fromBtf === undefined) return;
    if (headers === fromBtf) checked.push(`${what} = ${headers}`);
    else mismatches.push(`${what}: headers ${headers}, BTF ${fromBtf}`);
  };
  for (const [name, value] of defines(facts.bounds ?? '')) {
    const rule = BOUNDS[name];
    if (rule?.enumerator !== undefined) compare(`${name} (${rule.enumerator})`, value, index.enumerator(rule.enumerator));
    else if (rule?.typedefSize !== undefined) compare(`sizeof(${rule.typedefSize})`, value, index.typedefSize(rule.typedefSize));
  }
  for (const [name, value] of defines(facts.asmOffsets ?? '')) {
    const known = KNOWN[name];
    if (known !== undefined) {
      const struct = index.struct(known.struct);
      if (struct === undefined) continue;
      if (known.member === undefined) compare(`sizeof(struct ${known.struct})`, value, btf.size(struct));
      else compare(`offsetof(struct ${known.struct}, ${known.member})`, value, index.offsetOf(struct, known.member.split('.')));
      continue;
    }
    const sizeOf = /^SIZEOF_([a-z][a-z0-9_]*)$/.exec(name);
    if (sizeOf) {
      const struct = index.struct(sizeOf[1]!);
      if (struct !== undefined) compare(`sizeof(struct ${sizeOf[1]})`, value, btf.size(struct));
      continue;
    }
    // `<struct>_<member>`: every split of the name at an underscore, the struct name lower-cased
    // (KVM_STEAL_TIME_preempted is struct kvm_steal_time's `preempted`); the first that names a
    // struct with such a member is the one.
    for (let at = name.indexOf('_'); at > 0; at = name.indexOf('_', at + 1)) {
      const structName = name.slice(0, at).toLowerCase();
      const member = name.slice(at + 1);
      const struct = index.struct(structName);
      const offset = struct === undefined ? undefined : index.offsetOf(struct, [member]);
      if (offset === undefined) continue;
      compare(`offsetof(struct ${structName}, ${member})`, value, offset);
      break;
    }
  }
  return { checked, mismatches };
}

/** Lookups by name over a Btf, built on first use. */
class BtfIndex {
  private structs: Map<string, number | null> | undefined;
  private enumerators: Map<string, number> | undefined;

  constructor(private readonly btf: Btf) {}

  /** The one struct of this name (null in the map when several differ: ambiguous, skipped). */
  struct(name: string): number | undefined {
    if (!this.structs) {
      const map = new Map<string, number | null>();
      for (let id = 1; id < this.btf.count; id++) {
        if (this.btf.kind(id) !== BtfKind.STRUCT || this.btf.vlen(id) === 0) continue;
        const n = this.btf.name(id);
        if (n === '') continue;
        const have = map.get(n);
        if (have === undefined) map.set(n, id);
        else if (have !== null && this.btf.size(have) !== this.btf.size(id)) map.set(n, null);
      }
      this.structs = map;
    }
    return this.structs.get(name) ?? undefined;
  }

  enumerator(name: string): number | undefined {
    if (!this.enumerators) {
      const map = new Map<string, number>();
      for (let id = 1; id < this.btf.count; id++) {
        if (this.btf.kind(id) !== BtfKind.ENUM) continue;
        for (let i = 0; i < this.btf.vlen(id); i++) map.set(this.btf.enumValueName(id, i), this.btf.enumValue(id, i));
      }
      this.enumerators = map;
    }
    return this.enumerators.get(name);
  }

  typedefSize(name: string): number | undefined {
    for (let id = 1; id < this.btf.count; id++) {
      if (this.btf.kind(id) !== BtfKind.TYPEDEF || this.btf.name(id) !== name) continue;
      let t = this.btf.ref(id);
      for (let hops = 0; hops < 32 && this.btf.kind(t) === BtfKind.TYPEDEF; hops++) t = this.btf.ref(t);
      const k = this.btf.kind(t);
      return k === BtfKind.STRUCT || k === BtfKind.UNION ? this.btf.size(t) : undefined;
    }
    return undefined;
  }

  /** Byte offset of a member path (`thread.sp`) in a struct, looking through anonymous members. */
  offsetOf(struct: number, path: readonly string[]): number | undefined {
    let id = struct;
    let bits = 0;
    for (const part of path) {
      const found = this.member(id, part);
      if (found === undefined) return undefined;
      bits += found.bitOffset;
      id = found.type;
    }
    return bits % 8 === 0 ? bits / 8 : undefined;
  }

  private member(start: number, name: string, depth = 0): { bitOffset: number; type: number } | undefined {
    const id = this.composite(start);
    if (id === undefined || depth > 8) return undefined;
    for (let i = 0; i < this.btf.vlen(id); i++) {
      if (this.btf.memberBitfieldSize(id, i) !== 0) continue;
      const type = this.btf.memberType(id, i);
      if (this.btf.memberName(id, i) === name) return { bitOffset: this.btf.memberBitOffset(id, i), type };
      if (this.btf.memberNameIsEmpty(id, i)) {
        const inner = this.member(type, name, depth + 1);
        if (inner) return { bitOffset: this.btf.memberBitOffset(id, i) + inner.bitOffset, type: inner.type };
      }
    }
    return undefined;
  }

  /** The struct or union a type is, through typedefs and qualifiers. */
  private composite(start: number): number | undefined {
    let id = start;
    for (let hops = 0; hops < 32; hops++) {
      const k = this.btf.kind(id);
      if (k === BtfKind.STRUCT || k === BtfKind.UNION) return id;
      if (k === BtfKind.TYPEDEF || k === BtfKind.CONST || k === BtfKind.VOLATILE || k === BtfKind.TYPE_TAG || k === BtfKind.RESTRICT) id = this.btf.ref(id);
      else return undefined;
    }
    return undefined;
  }
}
