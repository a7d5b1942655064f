/**
 * vmlinux.h from BTF: the entry points the CLI, the cache and the HTTP server use.
 *
 * `generateVmlinuxHeader` is pure (bytes in, text out); `readBtfFile` is the only I/O.
 */
import { readFile } from 'node:fs/promises';
import { errnoOf, KheadersError } from '../errors.js';
import { emitCHeaderBytes, type EmitOptions } from './c-emitter.js';
import { parseBtf } from './reader.js';

export { emitCHeader, emitCHeaderBytes, type EmitOptions } from './c-emitter.js';
export * from './reader.js';

export const DEFAULT_BTF_PATH = '/sys/kernel/btf/vmlinux';

/**
 * The C header (`vmlinux.h`) for a BTF blob, equivalent to `bpftool btf dump file X format c`.
 * Throws KheadersError('E_BTF') for malformed BTF.
 */
export function generateVmlinuxHeader(btf: Buffer, opts: EmitOptions = {}): string {
  return generateVmlinuxHeaderBytes(btf, opts).toString('latin1');
}

/** generateVmlinuxHeader as ASCII bytes, for writing to a file or socket without re-encoding. */
export function generateVmlinuxHeaderBytes(btf: Buffer, opts: EmitOptions = {}): Buffer {
  try {
    return emitCHeaderBytes(parseBtf(btf), opts);
  } catch (err) {
    // The emitter bounds its own recursion and output, so this is a last resort: a stack or
    // string-length overflow from crafted input is still a malformed blob, not a crash.
    if (err instanceof RangeError) {
      throw new KheadersError('E_BTF', `malformed BTF: ${err.message}`, {}, { cause: err });
    }
    throw err;
  }
}

/** Read a BTF blob (the running kernel's by default). ENOENT → E_NOT_FOUND, other failures → E_BTF. */
export async function readBtfFile(path: string = DEFAULT_BTF_PATH): Promise<Buffer> {
  try {
    return await readFile(path);
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
}
