/**
 * C headers from BTF: the entry points the CLI, the cache and the HTTP server use.
 *
 * `generateVmlinuxHeader` is pure (bytes in, text out): a kernel's BTF gives its `vmlinux.h`, a
 * module's split BTF with the kernel's as `base` gives the header for that module (the kernel's
 * types and the module's, as bpftool writes it). `readBtf` is the only I/O.
 */
import { readFile } from 'node:fs/promises';
import { errnoOf, KheadersError } from '../errors.js';
import { elfKernelRelease, elfSection, isElf, kernelBuildId } from '../source/elf.js';
import { emitCHeaderBytes, type EmitOptions } from './c-emitter.js';
import { looksSplit, parseBtf } from './reader.js';

export { emitCHeader, emitCHeaderBytes, type EmitOptions } from './c-emitter.js';
export * from './reader.js';

/** Where the running kernel publishes its BTF, and each loaded module's (split) BTF beside it. */
export const SYSFS_BTF_DIR = '/sys/kernel/btf';
export const DEFAULT_BTF_PATH = `${SYSFS_BTF_DIR}/vmlinux`;

export interface HeaderOptions extends EmitOptions {
  /** The base BTF when `btf` is split BTF (a module's over the kernel's). */
  base?: Uint8Array;
}

/**
 * The C header (`vmlinux.h`) for a BTF blob, equivalent to `bpftool btf dump file X format c`
 * (with `base`: `bpftool -B BASE btf dump file X format c`). Throws KheadersError('E_BTF') for
 * malformed BTF.
 */
export function generateVmlinuxHeader(btf: Uint8Array, opts: HeaderOptions = {}): string {
  return generateVmlinuxHeaderBytes(btf, opts).toString('latin1');
}

/** generateVmlinuxHeader as ASCII bytes, for writing to a file or socket without re-encoding. */
export function generateVmlinuxHeaderBytes(btf: Uint8Array, opts: HeaderOptions = {}): Buffer {
  const { base, ...emit } = opts;
  try {
    const baseBtf = base === undefined ? undefined : parseBtf(base);
    return emitCHeaderBytes(parseBtf(btf, baseBtf === undefined ? {} : { base: baseBtf }), emit);
  } catch (err) {
    if (base === undefined && looksSplit(btf) && err instanceof KheadersError) {
      throw new KheadersError('E_BTF', `${err.message} (this looks like a module's split BTF: read it over its base, the kernel's BTF)`, err.details, { cause: err });
    }
    // The emitter bounds its own recursion and output, so this is a last resort: a stack or
    // string-length overflow from crafted input is still a malformed blob, not a crash.
    if (err instanceof RangeError) {
      throw new KheadersError('E_BTF', `malformed BTF: ${err.message}`, {}, { cause: err });
    }
    throw err;
  }
}

/** A BTF blob and what its file says about the kernel it came from. */
export interface BtfFile {
  path: string;
  /** The raw BTF: the file itself, or the `.BTF` section of an ELF (a vmlinux or a .ko). */
  bytes: Buffer;
  /** The file was an ELF, so the facts below could be read from it. */
  elf: boolean;
  /** The kernel's GNU build id, when the file is a vmlinux that has one. */
  buildId: string | null;
  /** The kernel release it names (a module's vermagic, a vmlinux's banner), when it names one. */
  release: string | undefined;
}

/**
 * Read BTF from a raw file (`/sys/kernel/btf/*`, a `.btf` dump) or from the `.BTF` section of a
 * vmlinux or a kernel module. ENOENT → E_NOT_FOUND, anything else unreadable → E_BTF.
 */
export async function readBtf(path: string = DEFAULT_BTF_PATH): Promise<BtfFile> {
  let data: Buffer;
  try {
    data = await readFile(path);
  } catch (err) {
    const errno = errnoOf(err);
    if (errno === 'ENOENT' || errno === 'ENOTDIR') {
      throw new KheadersError(
        'E_NOT_FOUND',
        path === DEFAULT_BTF_PATH ? `no kernel BTF at ${path} (is CONFIG_DEBUG_INFO_BTF set?)` : `no BTF file at ${path}`,
        { path },
        { cause: err },
      );
    }
    throw new KheadersError('E_BTF', `cannot read BTF from ${path}: ${errno ?? String(err)}`, { path, errno }, { cause: err });
  }
  if (!isElf(data)) return { path, bytes: data, elf: false, buildId: null, release: undefined };
  try {
    const section = elfSection(data, '.BTF');
    if (section === undefined) throw new KheadersError('E_BTF', `${path} is an ELF file without a .BTF section (built without CONFIG_DEBUG_INFO_BTF?)`, { path });
    return { path, bytes: Buffer.from(section), elf: true, buildId: kernelBuildId(data), release: elfKernelRelease(data) };
  } catch (err) {
    if (err instanceof KheadersError && err.code === 'E_ELF') throw new KheadersError('E_BTF', `cannot read BTF from ${path}: ${err.message}`, { path }, { cause: err });
    throw err;
  }
}

/** The raw BTF blob of a file (see readBtf). */
export async function readBtfFile(path: string = DEFAULT_BTF_PATH): Promise<Buffer> {
  return (await readBtf(path)).bytes;
}
