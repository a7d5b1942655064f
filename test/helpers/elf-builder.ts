/**
 * A tiny ELF writer for tests: enough to lay out sections, a symbol table and its string table,
 * in either class and byte order, so the ELF codec can be tested on files we fully control.
 * It writes well-formed files; tests corrupt them afterwards through the offsets it returns.
 */

export const ET_REL = 1;
export const ET_EXEC = 2;
export const ET_DYN = 3;

export const SHT_PROGBITS = 1;
export const SHT_SYMTAB = 2;
export const SHT_STRTAB = 3;
export const SHT_NOBITS = 8;
export const SHT_DYNSYM = 11;

export interface SectionSpec {
  name: string;
  type?: number; // default SHT_PROGBITS
  data?: Buffer; // the bytes (ignored for SHT_NOBITS)
  size?: number; // sh_size for SHT_NOBITS
  addr?: bigint;
}

export interface SymbolSpec {
  name: string;
  value: bigint;
  /** A section name from `sections`, or a raw st_shndx (e.g. 0xfff1 for SHN_ABS). */
  section: string | number;
}

export interface ElfSpec {
  bits: 32 | 64;
  endian: 'le' | 'be';
  type: number;
  sections: SectionSpec[];
  /** Omit for a stripped file (no symbol table at all). */
  symbols?: SymbolSpec[];
  /** Which kind of symbol table to write (default .symtab). */
  symtabType?: typeof SHT_SYMTAB | typeof SHT_DYNSYM;
}

export interface BuiltElf {
  buf: Buffer;
  /** File offset of each section's bytes, by name. */
  offsets: Map<string, number>;
  /** Section index of each section, by name. */
  indexes: Map<string, number>;
  shoff: number;
  shentsize: number;
  /** Header field offsets, for tests that corrupt them. */
  fields: { shoff: number; shnum: number; shstrndx: number };
}

/** Writes fixed-size fields at explicit offsets in the chosen byte order and class. */
class FieldWriter {
  constructor(
    readonly buf: Buffer,
    private readonly le: boolean,
    private readonly is64: boolean,
  ) {}
  u8(off: number, v: number): void {
    this.buf[off] = v;
  }
  u16(off: number, v: number): void {
    if (this.le) this.buf.writeUInt16LE(v, off);
    else this.buf.writeUInt16BE(v, off);
  }
  u32(off: number, v: number): void {
    if (this.le) this.buf.writeUInt32LE(v, off);
    else this.buf.writeUInt32BE(v, off);
  }
  u64(off: number, v: bigint): void {
    if (this.le) this.buf.writeBigUInt64LE(v, off);
    else this.buf.writeBigUInt64BE(v, off);
  }
  word(off: number, v: bigint): void {
    if (this.is64) this.u64(off, v);
    else this.u32(off, Number(v));
  }
}

/** A string table: the strings, NUL-terminated, after a leading NUL (offset 0 is the empty name). */
function stringTable(names: string[]): { data: Buffer; offsetOf: Map<string, number> } {
  const offsetOf = new Map<string, number>();
  const parts: Buffer[] = [Buffer.alloc(1)];
  let size = 1;
  for (const name of names) {
    if (offsetOf.has(name)) continue;
    offsetOf.set(name, size);
    const bytes = Buffer.from(`${name}\0`, 'latin1');
    parts.push(bytes);
    size += bytes.length;
  }
  return { data: Buffer.concat(parts), offsetOf };
}

interface LaidOutSection {
  name: string;
  type: number;
  data: Buffer;
  size: number;
  addr: bigint;
  link: number;
  entsize: number;
  info: number;
}

const align = (n: number, to: number): number => Math.ceil(n / to) * to;

export function buildElf(spec: ElfSpec): BuiltElf {
  const is64 = spec.bits === 64;
  const ehdrSize = is64 ? 64 : 52;
  const shentsize = is64 ? 64 : 40;
  const symSize = is64 ? 24 : 16;

  const sections: LaidOutSection[] = [{ name: '', type: 0, data: Buffer.alloc(0), size: 0, addr: 0n, link: 0, entsize: 0, info: 0 }];
  for (const s of spec.sections) {
    const type = s.type ?? SHT_PROGBITS;
    const data = type === SHT_NOBITS ? Buffer.alloc(0) : (s.data ?? Buffer.alloc(0));
    sections.push({ name: s.name, type, data, size: type === SHT_NOBITS ? (s.size ?? 0) : data.length, addr: s.addr ?? 0n, link: 0, entsize: 0, info: 0 });
  }
  const indexes = new Map(sections.map((s, i) => [s.name, i] as const));

  if (spec.symbols) {
    const dynamic = spec.symtabType === SHT_DYNSYM;
    const strtab = stringTable(spec.symbols.map((s) => s.name));
    const symtab = Buffer.alloc(symSize * (spec.symbols.length + 1)); // entry 0 is the null symbol
    const w = new FieldWriter(symtab, spec.endian === 'le', is64);
    spec.symbols.forEach((sym, i) => {
      const off = (i + 1) * symSize;
      const shndx = typeof sym.section === 'number' ? sym.section : indexes.get(sym.section);
      if (shndx === undefined) throw new Error(`elf-builder: no section ${String(sym.section)}`);
      w.u32(off, strtab.offsetOf.get(sym.name)!);
      if (is64) {
        w.u8(off + 4, 0x10); // STB_GLOBAL, STT_NOTYPE
        w.u16(off + 6, shndx);
        w.u64(off + 8, sym.value);
      } else {
        w.u32(off + 4, Number(sym.value));
        w.u8(off + 12, 0x10);
        w.u16(off + 14, shndx);
      }
    });
    const symtabIndex = sections.length;
    sections.push({
      name: dynamic ? '.dynsym' : '.symtab',
      type: dynamic ? SHT_DYNSYM : SHT_SYMTAB,
      data: symtab,
      size: symtab.length,
      addr: 0n,
      link: symtabIndex + 1,
      entsize: symSize,
      info: 1,
    });
    sections.push({ name: dynamic ? '.dynstr' : '.strtab', type: SHT_STRTAB, data: strtab.data, size: strtab.data.length, addr: 0n, link: 0, entsize: 0, info: 0 });
  }
  const shstrtab = stringTable([...sections.map((s) => s.name).filter(Boolean), '.shstrtab']);
  sections.push({ name: '.shstrtab', type: SHT_STRTAB, data: shstrtab.data, size: shstrtab.data.length, addr: 0n, link: 0, entsize: 0, info: 0 });
  const shstrndx = sections.length - 1;
  const allIndexes = new Map(sections.map((s, i) => [s.name, i] as const));

  // Layout: header, each section's bytes (8-aligned), then the section header table.
  const offsets = new Map<string, number>();
  const fileOffsets: number[] = [];
  let pos = ehdrSize;
  for (const s of sections) {
    pos = align(pos, 8);
    fileOffsets.push(s.type === 0 ? 0 : pos);
    if (s.name) offsets.set(s.name, pos);
    pos += s.data.length;
  }
  const shoff = align(pos, 8);
  const buf = Buffer.alloc(shoff + shentsize * sections.length);
  const w = new FieldWriter(buf, spec.endian === 'le', is64);

  buf.set([0x7f, 0x45, 0x4c, 0x46, is64 ? 2 : 1, spec.endian === 'le' ? 1 : 2, 1], 0);
  w.u16(16, spec.type);
  w.u16(18, is64 ? 62 : 20); // EM_X86_64 / EM_PPC: only for show
  w.u32(20, 1);
  const fields = is64 ? { shoff: 40, shnum: 60, shstrndx: 62 } : { shoff: 32, shnum: 48, shstrndx: 50 };
  w.word(fields.shoff, BigInt(shoff));
  w.u16(is64 ? 52 : 40, ehdrSize);
  w.u16(is64 ? 58 : 46, shentsize);
  w.u16(fields.shnum, sections.length);
  w.u16(fields.shstrndx, shstrndx);

  sections.forEach((s, i) => {
    s.data.copy(buf, fileOffsets[i]);
    const off = shoff + i * shentsize;
    w.u32(off, s.name ? shstrtab.offsetOf.get(s.name)! : 0);
    w.u32(off + 4, s.type);
    if (is64) {
      w.u64(off + 16, s.addr);
      w.u64(off + 24, BigInt(fileOffsets[i]!));
      w.u64(off + 32, BigInt(s.size));
      w.u32(off + 40, s.link);
      w.u32(off + 44, s.info);
      w.u64(off + 48, 1n);
      w.u64(off + 56, BigInt(s.entsize));
    } else {
      w.u32(off + 12, Number(s.addr));
      w.u32(off + 16, fileOffsets[i]!);
      w.u32(off + 20, s.size);
      w.u32(off + 24, s.link);
      w.u32(off + 28, s.info);
      w.u32(off + 32, 1);
      w.u32(off + 36, s.entsize);
    }
  });
  return { buf, offsets, indexes: allIndexes, shoff, shentsize, fields };
}

/** A section's header offset in a built file, for tests that corrupt one field of it. */
export function sectionHeaderOffset(elf: BuiltElf, name: string): number {
  const index = elf.indexes.get(name);
  if (index === undefined) throw new Error(`elf-builder: no section ${name}`);
  return elf.shoff + index * elf.shentsize;
}

/**
 * A kheaders.ko-like relocatable file: the archive in .rodata between kernel_headers_data and
 * kernel_headers_data_end, and a .modinfo with the module strings modpost writes (vermagic last
 * but one, as in a real module). `vermagic: null` leaves it out.
 */
export function buildKernelModule(opts: { archive: Buffer; vermagic: string | null; name?: string }): Buffer {
  const info = ['license=GPL v2', 'description=Kernel headers archive', 'depends=', `name=${opts.name ?? 'kheaders'}`];
  if (opts.vermagic !== null) info.splice(3, 0, `vermagic=${opts.vermagic} SMP preempt mod_unload aarch64`);
  return buildElf({
    bits: 64,
    endian: 'le',
    type: ET_REL,
    sections: [
      { name: '.text', data: Buffer.alloc(16, 0xcc) },
      { name: '.rodata', data: Buffer.concat([Buffer.alloc(8), opts.archive, Buffer.alloc(8)]) },
      { name: '.modinfo', data: Buffer.from(info.join('\0') + '\0', 'latin1') },
    ],
    symbols: [
      { name: 'kernel_headers_data', value: 8n, section: '.rodata' },
      { name: 'kernel_headers_data_end', value: BigInt(8 + opts.archive.length), section: '.rodata' },
    ],
  }).buf;
}
