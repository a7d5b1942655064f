/**
 * A pure ELF codec, just enough to pull the kernel's header archive (CONFIG_IKHEADERS) out of
 * kheaders.ko, a vmlinux, or the compiled kernel/kheaders.o. No I/O: Buffer in, subarray out.
 *
 * The kernel embeds the archive with `.incbin` between the symbols `kernel_headers_data` and
 * `kernel_headers_data_end` (kernel/kheaders_data.S). We find them through the section headers
 * and the symbol tables; when the file is stripped we fall back to scanning for a complete,
 * CRC-checked xz stream.
 *
 * These files are untrusted input: every read is bounds-checked, and every failure is a
 * KheadersError (E_ELF for a file we cannot read, E_ARCHIVE_NOT_FOUND when it holds no archive),
 * never a RangeError. Addresses and offsets are bigints while they come from the file, because a
 * vmlinux's virtual addresses (0xffffffff8...) do not fit in a double; they become numbers only
 * once checked against the file's length.
 */
import { KheadersError } from '../errors.js';
import { parseBuildId } from './notes.js';

export interface EmbeddedArchive {
  /** A subarray of the input: the exact xz stream, no padding before or after. */
  data: Buffer;
  method: 'symbols' | 'magic-scan';
  /** The kernel release, from the `vermagic=` string in .modinfo, when the file has one (a .ko). */
  release?: string;
}

const START_SYMBOL = 'kernel_headers_data';
const END_SYMBOL = 'kernel_headers_data_end';

const ELF_MAGIC = Buffer.from([0x7f, 0x45, 0x4c, 0x46]);
const EI_NIDENT = 16;
const ELFCLASS32 = 1;
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const ELFDATA2MSB = 2;

const ET_REL = 1;
const ET_EXEC = 2;
const ET_DYN = 3;

const SHT_SYMTAB = 2;
const SHT_STRTAB = 3;
const SHT_NOTE = 7;
const SHT_NOBITS = 8;
const SHT_DYNSYM = 11;
const SHT_SYMTAB_SHNDX = 18;

const SHN_UNDEF = 0;
const SHN_LORESERVE = 0xff00;
const SHN_XINDEX = 0xffff;

const XZ_HEADER_MAGIC = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
const XZ_FOOTER_MAGIC = Buffer.from('YZ', 'latin1');
const XZ_HEADER_SIZE = 12;
const XZ_FOOTER_SIZE = 12;

/** Sizes of the structures we read, per ELF class. */
const LAYOUT = {
  32: { ehdr: 52, shdr: 40, sym: 16 },
  64: { ehdr: 64, shdr: 64, sym: 24 },
} as const;

interface Section {
  index: number;
  /** sh_name: where the name starts in the section-name string table. */
  nameOffset: number;
  name: string;
  type: number;
  addr: bigint;
  offset: bigint;
  size: bigint;
  link: number;
  entsize: bigint;
}

interface ElfFile {
  buf: Buffer;
  reader: FieldReader;
  bits: 32 | 64;
  type: number;
  sections: Section[];
}

interface ElfSymbol {
  name: string;
  value: bigint;
  /** The section index, already resolved through SHT_SYMTAB_SHNDX when st_shndx is SHN_XINDEX. */
  shndx: number;
  /** True when st_shndx is a reserved index (SHN_ABS, SHN_COMMON, ...): no section holds the symbol. */
  reservedIndex: boolean;
}

function elfError(message: string, details: Record<string, unknown> = {}): KheadersError {
  return new KheadersError('E_ELF', message, details);
}

function hex(value: bigint | number): string {
  return `0x${value.toString(16)}`;
}

/**
 * Endian- and class-aware field reads. Each read checks its own bounds, so a bug in a caller's
 * range check still ends in E_ELF rather than a RangeError.
 */
class FieldReader {
  constructor(
    private readonly buf: Buffer,
    private readonly littleEndian: boolean,
    private readonly is64: boolean,
  ) {}

  private need(offset: number, size: number, what: string): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + size > this.buf.length) {
      throw elfError(`truncated ELF file: ${what} at offset ${offset} needs ${size} bytes, the file has ${this.buf.length}`);
    }
  }

  u8(offset: number, what: string): number {
    this.need(offset, 1, what);
    return this.buf[offset]!;
  }

  u16(offset: number, what: string): number {
    this.need(offset, 2, what);
    return this.littleEndian ? this.buf.readUInt16LE(offset) : this.buf.readUInt16BE(offset);
  }

  u32(offset: number, what: string): number {
    this.need(offset, 4, what);
    return this.littleEndian ? this.buf.readUInt32LE(offset) : this.buf.readUInt32BE(offset);
  }

  u64(offset: number, what: string): bigint {
    this.need(offset, 8, what);
    return this.littleEndian ? this.buf.readBigUInt64LE(offset) : this.buf.readBigUInt64BE(offset);
  }

  /** An Elf_Addr / Elf_Off / Elf_Xword: 4 bytes in ELF32, 8 in ELF64. */
  word(offset: number, what: string): bigint {
    return this.is64 ? this.u64(offset, what) : BigInt(this.u32(offset, what));
  }
}

export function isElf(buf: Buffer): boolean {
  return buf.length >= ELF_MAGIC.length && buf.subarray(0, ELF_MAGIC.length).equals(ELF_MAGIC);
}

/** The ELF identification bytes: class and byte order decide how every later field is read. */
function readIdent(buf: Buffer): { bits: 32 | 64; littleEndian: boolean } {
  if (!isElf(buf)) throw elfError('not an ELF file: it does not start with the magic \\x7fELF');
  if (buf.length < EI_NIDENT) {
    throw elfError(`truncated ELF header: the file is ${buf.length} bytes, the identification alone needs ${EI_NIDENT}`);
  }
  const cls = buf[4]!;
  const data = buf[5]!;
  if (cls !== ELFCLASS32 && cls !== ELFCLASS64) throw elfError(`unknown ELF class ${cls} (EI_CLASS at offset 4 must be 1 or 2)`);
  if (data !== ELFDATA2LSB && data !== ELFDATA2MSB) throw elfError(`unknown ELF byte order ${data} (EI_DATA at offset 5 must be 1 or 2)`);
  return { bits: cls === ELFCLASS64 ? 64 : 32, littleEndian: data === ELFDATA2LSB };
}

/** A bigint offset/size from the file as a number, once we know it lies within `limit`. */
function withinFile(value: bigint, limit: number): number | undefined {
  return value >= 0n && value <= BigInt(limit) ? Number(value) : undefined;
}

/** Parse the ELF header and the whole section header table (with names), validating both. */
function parseElf(buf: Buffer): ElfFile {
  const { bits, littleEndian } = readIdent(buf);
  const layout = LAYOUT[bits];
  if (buf.length < layout.ehdr) {
    throw elfError(`truncated ELF header: the file is ${buf.length} bytes, an ELF${bits} header needs ${layout.ehdr}`);
  }
  const r = new FieldReader(buf, littleEndian, bits === 64);
  const at = bits === 64 ? { shoff: 40, shentsize: 58, shnum: 60, shstrndx: 62 } : { shoff: 32, shentsize: 46, shnum: 48, shstrndx: 50 };
  const type = r.u16(16, 'e_type');
  const shoff = r.word(at.shoff, 'e_shoff');
  const shentsize = r.u16(at.shentsize, 'e_shentsize');
  let shnum = r.u16(at.shnum, 'e_shnum');
  let shstrndx = r.u16(at.shstrndx, 'e_shstrndx');

  // e_shoff 0 means "no section header table" (allowed, e.g. a fully stripped image).
  if (shoff === 0n) return { buf, reader: r, bits, type, sections: [] };

  if (shentsize < layout.shdr) {
    throw elfError(`e_shentsize is ${shentsize}, smaller than an ELF${bits} section header (${layout.shdr} bytes)`);
  }
  const tableStart = withinFile(shoff, buf.length);
  if (tableStart === undefined || tableStart + shentsize > buf.length) {
    throw elfError(`section header table at offset ${shoff} (e_shoff) lies past the end of the file (${buf.length} bytes)`, {
      shoff: Number(shoff),
      fileSize: buf.length,
    });
  }
  // With 0xff00 sections or more, the real count and string-table index live in section 0.
  if (shnum === 0) {
    const extended = r.word(tableStart + (bits === 64 ? 32 : 20), 'section 0 sh_size');
    const count = withinFile(extended, buf.length);
    if (count === undefined) throw elfError(`section 0 gives an extended section count of ${extended}, more than the file (${buf.length} bytes) can hold`);
    shnum = count;
  }
  if (shstrndx === SHN_XINDEX) shstrndx = r.u32(tableStart + (bits === 64 ? 40 : 24), 'section 0 sh_link');

  const tableEnd = tableStart + shnum * shentsize;
  if (tableEnd > buf.length) {
    throw elfError(
      `section header table (${shnum} entries × ${shentsize} bytes at offset ${tableStart}) ends at ${tableEnd}, past the end of the file (${buf.length} bytes)`,
      { shoff: tableStart, shnum, shentsize, fileSize: buf.length },
    );
  }
  const sections: Section[] = [];
  for (let i = 0; i < shnum; i++) sections.push(readSectionHeader(r, bits, i, tableStart + i * shentsize));
  nameSections(buf, sections, shstrndx);
  return { buf, reader: r, bits, type, sections };
}

function readSectionHeader(r: FieldReader, bits: 32 | 64, index: number, off: number): Section {
  const what = `section header ${index}`;
  const f = bits === 64 ? { addr: 16, offset: 24, size: 32, link: 40, entsize: 56 } : { addr: 12, offset: 16, size: 20, link: 24, entsize: 36 };
  return {
    index,
    nameOffset: r.u32(off, what),
    name: '', // resolved by nameSections once the string table is known
    type: r.u32(off + 4, what),
    addr: r.word(off + f.addr, what),
    offset: r.word(off + f.offset, what),
    size: r.word(off + f.size, what),
    link: r.u32(off + f.link, what),
    entsize: r.word(off + f.entsize, what),
  };
}

/** Fill in section names from the section-name string table (e_shstrndx). */
function nameSections(buf: Buffer, sections: Section[], shstrndx: number): void {
  if (shstrndx === SHN_UNDEF) return; // no names: legal, sections stay anonymous
  if (shstrndx >= sections.length) {
    throw elfError(`e_shstrndx is ${shstrndx}, but the file has only ${sections.length} sections`, { shstrndx, shnum: sections.length });
  }
  const strtab = sections[shstrndx]!;
  if (strtab.type !== SHT_STRTAB) {
    throw elfError(`e_shstrndx points at section ${shstrndx}, which is of type ${strtab.type}, not a string table (SHT_STRTAB)`, { shstrndx });
  }
  const strings = sectionData(buf, strtab, 'the section-name string table');
  for (const section of sections) {
    const name = readCString(strings, section.nameOffset);
    if (name === undefined) {
      throw elfError(
        `section ${section.index}'s name (offset ${section.nameOffset}) is not a terminated string inside the section-name table (${strings.length} bytes)`,
      );
    }
    section.name = name;
  }
}

function describe(section: Section): string {
  return section.name ? `section [${section.index}] ${section.name}` : `section [${section.index}]`;
}

/** A section's bytes; E_ELF if it occupies no file space or runs past the end of the file. */
function sectionData(buf: Buffer, section: Section, role: string): Buffer {
  if (section.type === SHT_NOBITS) throw elfError(`${role}, ${describe(section)}, is SHT_NOBITS and has no bytes in the file`);
  const start = withinFile(section.offset, buf.length);
  const end = withinFile(section.offset + section.size, buf.length);
  if (start === undefined || end === undefined) {
    throw elfError(
      `${role}, ${describe(section)} (offset ${section.offset}, size ${section.size}), runs past the end of the file (${buf.length} bytes)`,
      { section: section.name, offset: Number(section.offset), size: Number(section.size), fileSize: buf.length },
    );
  }
  return buf.subarray(start, end);
}

/** The NUL-terminated string at `offset`, or undefined if it starts or runs outside `strings`. */
function readCString(strings: Buffer, offset: number): string | undefined {
  if (offset >= strings.length) return undefined;
  const nul = strings.indexOf(0, offset);
  return nul === -1 ? undefined : strings.toString('latin1', offset, nul);
}

/**
 * The defined symbols named `wanted` in one symbol table (first definition of each name wins).
 * Names are compared as bytes so a vmlinux's hundred thousand symbols cost no string decoding.
 */
function findSymbols(elf: ElfFile, table: Section, wanted: readonly string[]): Map<string, ElfSymbol> {
  const { buf, reader: r, bits, sections } = elf;
  const symSize = LAYOUT[bits].sym;
  const what = `symbol table ${describe(table)}`;
  // sh_entsize 0 is common in hand-made files; it means "the standard size".
  const entsize = table.entsize === 0n ? BigInt(symSize) : table.entsize;
  if (entsize < BigInt(symSize)) throw elfError(`${what} has sh_entsize ${entsize}, smaller than an ELF${bits} symbol (${symSize} bytes)`);
  const symbols = sectionData(buf, table, what);
  const symbolsStart = Number(table.offset);
  if (table.link >= sections.length) throw elfError(`${what} links to string table ${table.link}, but the file has only ${sections.length} sections`);
  const strings = sectionData(buf, sections[table.link]!, `the string table of ${what}`);
  const targets = wanted.map((name) => ({ name, bytes: Buffer.from(`${name}\0`, 'latin1') }));

  const found = new Map<string, ElfSymbol>();
  const count = Number(BigInt(symbols.length) / entsize);
  for (let i = 0; i < count && found.size < wanted.length; i++) {
    const off = symbolsStart + i * Number(entsize);
    const nameOffset = r.u32(off, what);
    if (nameOffset === 0 || nameOffset >= strings.length) continue;
    const target = targets.find((t) => !found.has(t.name) && strings.subarray(nameOffset, nameOffset + t.bytes.length).equals(t.bytes));
    if (target === undefined) continue;
    const value = r.word(off + (bits === 64 ? 8 : 4), what);
    const rawIndex = r.u16(off + (bits === 64 ? 6 : 14), what);
    if (rawIndex === SHN_UNDEF) continue; // a reference to the symbol, not its definition
    const shndx = rawIndex === SHN_XINDEX ? extendedSectionIndex(elf, table, i, target.name) : rawIndex;
    found.set(target.name, { name: target.name, value, shndx, reservedIndex: rawIndex >= SHN_LORESERVE && rawIndex !== SHN_XINDEX });
  }
  return found;
}

/** st_shndx SHN_XINDEX: the real index is entry `symbolIndex` of the table's SHT_SYMTAB_SHNDX. */
function extendedSectionIndex(elf: ElfFile, table: Section, symbolIndex: number, name: string): number {
  const shndxTable = elf.sections.find((s) => s.type === SHT_SYMTAB_SHNDX && s.link === table.index);
  if (shndxTable === undefined) {
    throw elfError(`symbol ${name} has st_shndx SHN_XINDEX, but no SHT_SYMTAB_SHNDX section belongs to ${describe(table)}`);
  }
  const data = sectionData(elf.buf, shndxTable, 'the extended section index table');
  const off = symbolIndex * 4;
  if (off + 4 > data.length) throw elfError(`symbol ${name} (index ${symbolIndex}) has no entry in the extended section index table`);
  return elf.reader.u32(Number(shndxTable.offset) + off, 'the extended section index table');
}

/**
 * Both archive symbols from the first symbol table that defines both (.symtab before .dynsym:
 * .symtab is the complete one). Undefined when no table has the pair — the file is stripped.
 */
function findArchiveSymbols(elf: ElfFile): { start: ElfSymbol; end: ElfSymbol } | undefined {
  const tables = [...elf.sections.filter((s) => s.type === SHT_SYMTAB), ...elf.sections.filter((s) => s.type === SHT_DYNSYM)];
  for (const table of tables) {
    const found = findSymbols(elf, table, [START_SYMBOL, END_SYMBOL]);
    const start = found.get(START_SYMBOL);
    const end = found.get(END_SYMBOL);
    if (start && end) return { start, end };
  }
  return undefined;
}

/**
 * Where a symbol sits in the file. In a relocatable file (.o, .ko) st_value is an offset inside
 * its section; in a linked one (vmlinux) it is a virtual address inside the section's sh_addr range.
 */
function symbolFileOffset(elf: ElfFile, sym: ElfSymbol): { offset: number; section: Section } {
  const { buf, sections } = elf;
  if (sym.reservedIndex) {
    throw elfError(`symbol ${sym.name} is not defined in a section (st_shndx ${hex(sym.shndx)}), so it has no place in the file`, {
      symbol: sym.name,
      shndx: sym.shndx,
    });
  }
  const section = sections[sym.shndx];
  if (section === undefined) {
    throw elfError(`symbol ${sym.name} refers to section ${sym.shndx}, but the file has only ${sections.length} sections`, {
      symbol: sym.name,
      shndx: sym.shndx,
    });
  }
  if (section.type === SHT_NOBITS) {
    throw elfError(`symbol ${sym.name} is in ${describe(section)}, which is SHT_NOBITS (it occupies no bytes in the file)`, {
      symbol: sym.name,
      section: section.name,
    });
  }
  let inSection: bigint;
  if (elf.type === ET_REL) inSection = sym.value;
  else if (elf.type === ET_EXEC || elf.type === ET_DYN) inSection = sym.value - section.addr;
  else throw elfError(`ELF type ${elf.type} is not ET_REL, ET_EXEC or ET_DYN: cannot map symbol ${sym.name} to a file offset`);

  // The end symbol legitimately sits one past the last byte, so `== size` is in range.
  if (inSection < 0n || inSection > section.size) {
    throw elfError(
      `symbol ${sym.name} (st_value ${hex(sym.value)}) lies outside ${describe(section)} (address ${hex(section.addr)}, size ${hex(section.size)})`,
      { symbol: sym.name, value: sym.value.toString(), section: section.name },
    );
  }
  const fileOffset = section.offset + inSection;
  const offset = withinFile(fileOffset, buf.length);
  if (offset === undefined) {
    throw elfError(`symbol ${sym.name} resolves to file offset ${fileOffset}, past the end of the file (${buf.length} bytes)`, {
      symbol: sym.name,
      fileOffset: fileOffset.toString(),
      fileSize: buf.length,
    });
  }
  return { offset, section };
}

/** The bytes between kernel_headers_data and kernel_headers_data_end, after checking the pair is coherent. */
function archiveFromSymbols(elf: ElfFile, start: ElfSymbol, end: ElfSymbol): Buffer {
  const from = symbolFileOffset(elf, start);
  const to = symbolFileOffset(elf, end);
  if (from.section !== to.section) {
    throw elfError(`${START_SYMBOL} is in ${describe(from.section)} but ${END_SYMBOL} is in ${describe(to.section)}; they must bracket one section's bytes`);
  }
  if (from.offset > to.offset) {
    throw elfError(
      `${END_SYMBOL} (file offset ${to.offset}, st_value ${hex(end.value)}) comes before ${START_SYMBOL} (file offset ${from.offset}, st_value ${hex(start.value)})`,
      { start: from.offset, end: to.offset },
    );
  }
  return elf.buf.subarray(from.offset, to.offset);
}

// ---------------------------------------------------------------------------------------------
// Stripped files: find a complete xz stream by its header and footer.
// ---------------------------------------------------------------------------------------------

interface XzFooter {
  /** Offset of the footer's first byte. */
  offset: number;
  flags: number;
  /** Size of the index that precedes the footer, in bytes. */
  indexSize: number;
}

/**
 * zlib's crc32, loaded when an embedded archive is looked for: zlib costs ~4 ms to load, and
 * most of this module's users (a vmlinux's release or build id, a module's .modinfo) need none.
 */
const crc32 = (): typeof import('node:zlib').crc32 => process.getBuiltinModule('node:zlib').crc32;

/** The 2 stream-flag bytes of a valid xz stream header at `at` (CRC32 checked), or undefined. */
function xzHeaderFlags(buf: Buffer, at: number): number | undefined {
  if (at + XZ_HEADER_SIZE > buf.length) return undefined;
  const flags = buf.subarray(at + 6, at + 8);
  // Byte 0 is reserved (0); byte 1 holds the check type in its low nibble, the high nibble is reserved.
  if (flags[0] !== 0 || (flags[1]! & 0xf0) !== 0) return undefined;
  if (crc32()(flags) !== buf.readUInt32LE(at + 8)) return undefined;
  return buf.readUInt16BE(at + 6);
}

/**
 * Every CRC-valid xz stream footer in the buffer, in file order. Collected once, so each candidate
 * header costs a walk over these few footers rather than another pass over the whole file.
 */
function collectXzFooters(buf: Buffer): XzFooter[] {
  const footers: XzFooter[] = [];
  const crc = crc32();
  for (let magic = buf.indexOf(XZ_FOOTER_MAGIC, 10); magic !== -1; magic = buf.indexOf(XZ_FOOTER_MAGIC, magic + 1)) {
    const offset = magic - 10;
    if (crc(buf.subarray(offset + 4, offset + 10)) !== buf.readUInt32LE(offset)) continue;
    footers.push({ offset, flags: buf.readUInt16BE(offset + 8), indexSize: (buf.readUInt32LE(offset + 4) + 1) * 4 });
  }
  return footers;
}

/** The first footer that can close the stream whose header is at `start` (flags `flags`). */
function matchingFooter(buf: Buffer, footers: XzFooter[], start: number, flags: number): XzFooter | undefined {
  const bodyStart = start + XZ_HEADER_SIZE;
  return footers.find((f) => {
    const indexStart = f.offset - f.indexSize;
    return (
      f.offset >= bodyStart &&
      (f.offset + XZ_FOOTER_SIZE - start) % 4 === 0 && // an xz stream is a multiple of 4 bytes
      f.flags === flags &&
      indexStart >= bodyStart &&
      buf[indexStart] === 0x00 // the index indicator byte
    );
  });
}

/**
 * The first complete xz stream in the buffer: a header with a valid CRC, closed by the first
 * valid footer after it. `orphanHeaders` lists valid headers that no footer closes (truncation).
 */
function scanForXzStream(buf: Buffer): { data?: Buffer; orphanHeaders: number[] } {
  const orphanHeaders: number[] = [];
  let footers: XzFooter[] | undefined;
  for (let at = buf.indexOf(XZ_HEADER_MAGIC); at !== -1; at = buf.indexOf(XZ_HEADER_MAGIC, at + 1)) {
    const flags = xzHeaderFlags(buf, at);
    if (flags === undefined) continue;
    footers ??= collectXzFooters(buf);
    const footer = matchingFooter(buf, footers, at, flags);
    if (footer) return { data: buf.subarray(at, footer.offset + XZ_FOOTER_SIZE), orphanHeaders };
    orphanHeaders.push(at);
  }
  return { orphanHeaders };
}

// ---------------------------------------------------------------------------------------------
// .modinfo and the kernel release
// ---------------------------------------------------------------------------------------------

/** The key=value strings of .modinfo (duplicate keys such as alias=: the first wins). */
function modinfoOf(elf: ElfFile): Map<string, string> {
  const info = new Map<string, string>();
  const section = elf.sections.find((s) => s.name === '.modinfo');
  if (section === undefined || section.type === SHT_NOBITS) return info;
  const data = sectionData(elf.buf, section, 'the .modinfo section');
  // Entries are NUL-terminated and may be separated by extra NULs of alignment padding.
  for (const entry of data.toString('utf8').split('\0')) {
    const eq = entry.indexOf('=');
    if (eq <= 0) continue;
    const key = entry.slice(0, eq);
    if (!info.has(key)) info.set(key, entry.slice(eq + 1));
  }
  return info;
}

export function readModinfo(elf: Buffer): Map<string, string> {
  return modinfoOf(parseElf(elf));
}

/**
 * A kernel release always starts with the version digits and uses a small alphabet; anything else
 * (say `../..`) must not reach the cache, which keys directories by release.
 */
const PLAUSIBLE_RELEASE = /^[0-9][A-Za-z0-9._+~-]{0,63}$/;

/**
 * The kernel release from a vermagic value ("6.1.0-18-amd64 SMP preempt mod_unload modversions",
 * with or without the leading `vermagic=`): its first word. '' when that word is not a plausible
 * release.
 */
export function releaseFromVermagic(vermagic: string): string {
  const value = vermagic.trim().replace(/^vermagic=/, '');
  const release = value.trim().split(/\s+/, 1)[0] ?? '';
  return PLAUSIBLE_RELEASE.test(release) ? release : '';
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

export function findEmbeddedArchive(elf: Buffer): EmbeddedArchive {
  const file = parseElf(elf);
  const vermagic = modinfoOf(file).get('vermagic');
  const release = vermagic === undefined ? '' : releaseFromVermagic(vermagic);
  const withRelease = (archive: EmbeddedArchive): EmbeddedArchive => (release ? { ...archive, release } : archive);

  const symbols = findArchiveSymbols(file);
  if (symbols) return withRelease({ data: archiveFromSymbols(file, symbols.start, symbols.end), method: 'symbols' });

  const scan = scanForXzStream(elf);
  if (scan.data) return withRelease({ data: scan.data, method: 'magic-scan' });

  const orphans = scan.orphanHeaders.length
    ? ` (an xz stream header at offset ${scan.orphanHeaders[0]} has no valid stream footer after it: is the file truncated?)`
    : '';
  throw new KheadersError(
    'E_ARCHIVE_NOT_FOUND',
    `no ${START_SYMBOL}/${END_SYMBOL} symbols and no complete xz stream in the file${orphans}`,
    { orphanXzHeaders: scan.orphanHeaders },
  );
}

// ---------------------------------------------------------------------------------------------
// Other facts a kernel ELF carries (for BTF given as a vmlinux or a .ko)
// ---------------------------------------------------------------------------------------------

/** The bytes of the first section called `name` (a subarray), or undefined when there is none. */
export function elfSection(elf: Buffer, name: string): Buffer | undefined {
  const file = parseElf(elf);
  const section = file.sections.find((s) => s.name === name && s.type !== SHT_NOBITS);
  return section === undefined ? undefined : sectionData(elf, section, `the ${name} section`);
}

/**
 * The kernel's GNU build id (hex) from a vmlinux's note sections, or null when it has none. A
 * module (ET_REL) has a build id of its own, which says nothing about the kernel: null for it.
 */
export function kernelBuildId(elf: Buffer): string | null {
  const file = parseElf(elf);
  if (file.type === ET_REL) return null;
  const { littleEndian } = readIdent(elf);
  for (const section of file.sections) {
    if (section.type !== SHT_NOTE) continue;
    const id = parseBuildId(sectionData(elf, section, 'a note section'), littleEndian);
    if (id !== null) return id;
  }
  return null;
}

/**
 * The kernel release an ELF names: a module's `vermagic`, or a vmlinux's `linux_banner`
 * ("Linux version 6.1.192 (builder@host) ..."). Undefined when it names none.
 */
export function elfKernelRelease(elf: Buffer): string | undefined {
  const file = parseElf(elf);
  const vermagic = modinfoOf(file).get('vermagic');
  if (vermagic !== undefined) return releaseFromVermagic(vermagic) || undefined;
  const rodata = file.sections.find((s) => s.name === '.rodata' && s.type !== SHT_NOBITS);
  if (rodata === undefined) return undefined;
  const data = sectionData(elf, rodata, 'the .rodata section');
  const at = data.indexOf('Linux version ');
  if (at < 0) return undefined;
  const m = /^Linux version (\S+) /.exec(data.toString('latin1', at, Math.min(data.length, at + 200)));
  return m && PLAUSIBLE_RELEASE.test(m[1]!) ? m[1] : undefined;
}

export type ModuleVerdict =
  | { use: true; archive: EmbeddedArchive; release: string }
  /** Never used and never loaded; `release` is what the module names, when it names one. */
  | { use: false; reason: string; release?: string };

/**
 * Is this (decompressed) module file the running kernel's kheaders module, and where is its
 * archive? Its .modinfo must name the module kheaders (when it names one) and carry a vermagic
 * whose release is the running one: the same check the kernel makes before loading it.
 */
export function judgeModule(elf: Buffer, runningRelease: string): ModuleVerdict {
  let info: Map<string, string>;
  try {
    info = readModinfo(elf);
  } catch (err) {
    return { use: false, reason: `not a readable ELF module (${(err as Error).message})` };
  }
  const name = info.get('name');
  if (name !== undefined && name !== 'kheaders') return { use: false, reason: `its .modinfo names the module ${JSON.stringify(name)}, not kheaders` };
  const vermagic = info.get('vermagic');
  if (vermagic === undefined) return { use: false, reason: 'no vermagic in its .modinfo, so it cannot be matched to a kernel' };
  const release = releaseFromVermagic(vermagic);
  if (release === '') return { use: false, reason: `its vermagic ${JSON.stringify(vermagic.slice(0, 80))} names no valid release` };
  if (release !== runningRelease) return { use: false, reason: `its vermagic names ${release}, not the running ${runningRelease}`, release };
  try {
    return { use: true, archive: findEmbeddedArchive(elf), release };
  } catch (err) {
    if (err instanceof KheadersError) return { use: false, reason: `no header archive in it (${err.message})`, release };
    throw err;
  }
}
