/**
 * `kheadersd btf`: write a C header generated from BTF to stdout, or atomically to --out FILE.
 *
 *   kheadersd btf                              vmlinux.h of the running kernel
 *   kheadersd btf --btf FILE                   of any BTF (raw, or a vmlinux's .BTF section)
 *   kheadersd btf --module NAME                of a loaded module: its split BTF over the kernel's
 *   kheadersd btf --base FILE --btf FILE       of any split BTF (e.g. a .ko) over its base
 */
import { randomBytes } from 'node:crypto';
import { open, readdir, rename, unlink } from 'node:fs/promises';
import path from 'node:path';
import { diskFullErrno, errnoOf, KheadersError } from '../errors.js';
import { DEFAULT_BTF_PATH, SYSFS_BTF_DIR, generateVmlinuxHeaderBytes, readBtf } from './index.js';

export interface BtfCommandOptions {
  /** The BTF blob to read; default /sys/kernel/btf/vmlinux (or the module's, with `module`). */
  btf?: string;
  /** The base BTF, when `btf` is split BTF (default for `module`: the kernel's). */
  base?: string;
  /** A loaded module: its BTF is `<btfDir>/<module>`, over `<btfDir>/vmlinux`. */
  module?: string;
  /** Write here (temp file + rename, so readers never see half a header) instead of to stdout. */
  out?: string;
  /** Where the running kernel's BTF files are (tests point it elsewhere). */
  btfDir?: string;
}

/** What the kernel accepts as a module name (MODULE_NAME_LEN is 56 with the NUL). */
const MODULE_NAME_RE = /^[A-Za-z0-9_-]{1,55}$/;

export function validModuleName(name: string): boolean {
  return MODULE_NAME_RE.test(name) && name !== 'vmlinux';
}

/** The files to read for the options: the BTF and, for split BTF, its base. */
export async function btfInputs(opts: BtfCommandOptions): Promise<{ btf: string; base: string | undefined }> {
  const dir = opts.btfDir ?? SYSFS_BTF_DIR;
  if (opts.module === undefined) {
    if (opts.base !== undefined && opts.btf === undefined) throw new KheadersError('E_USAGE', '--base needs --btf FILE (the split BTF to read over it) or --module NAME');
    return { btf: opts.btf ?? (opts.btfDir !== undefined ? path.join(dir, 'vmlinux') : DEFAULT_BTF_PATH), base: opts.base };
  }
  if (opts.btf !== undefined) throw new KheadersError('E_USAGE', '--module NAME reads the module\'s own BTF: give --module or --btf, not both');
  if (!validModuleName(opts.module)) throw new KheadersError('E_USAGE', `--module ${JSON.stringify(opts.module)} is not a kernel module name (letters, digits, "_" and "-")`);
  const btf = path.join(dir, opts.module);
  const names = await loadedModulesWithBtf(dir);
  if (!names.includes(opts.module)) {
    const known = names.length === 0 ? `no module has BTF in ${dir} now` : `modules with BTF now: ${names.slice(0, 40).join(', ')}${names.length > 40 ? `, … (${names.length})` : ''}`;
    throw new KheadersError('E_NOT_FOUND', `module ${opts.module} has no BTF at ${btf}: is it loaded (modprobe ${opts.module}), and built with CONFIG_DEBUG_INFO_BTF_MODULES? (${known})`, { module: opts.module, path: btf });
  }
  return { btf, base: opts.base ?? path.join(dir, 'vmlinux') };
}

/** Names of the loaded modules that have BTF (every file in the directory but `vmlinux`), sorted. */
export async function loadedModulesWithBtf(dir: string = SYSFS_BTF_DIR): Promise<string[]> {
  try {
    return (await readdir(dir)).filter(validModuleName).sort();
  } catch (err) {
    if (errnoOf(err) === 'ENOENT' || errnoOf(err) === 'ENOTDIR') return [];
    throw err;
  }
}

export async function runBtfCommand(opts: BtfCommandOptions, stdout: NodeJS.WritableStream): Promise<void> {
  const inputs = await btfInputs(opts);
  const [btf, base] = await Promise.all([readBtf(inputs.btf), inputs.base === undefined ? undefined : readBtf(inputs.base)]);
  const header = generateVmlinuxHeaderBytes(btf.bytes, base === undefined ? {} : { base: base.bytes });
  if (opts.out === undefined) {
    await writeStream(stdout, header);
    return;
  }
  await writeFileAtomic(opts.out, header);
}

function writeStream(stream: NodeJS.WritableStream, data: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    stream.write(data, (err?: Error | null) => (err ? reject(err) : resolve()));
  });
}

/** Write to a temp file beside `target`, fsync it, then rename over `target`. */
async function writeFileAtomic(target: string, data: Uint8Array): Promise<void> {
  const tmp = path.join(path.dirname(target), `.${path.basename(target)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  try {
    const fh = await open(tmp, 'wx', 0o644);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, target);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    const errno = errnoOf(err);
    if (diskFullErrno(err) !== undefined) {
      throw new KheadersError('E_NO_SPACE', `no space left to write ${target}`, { path: target }, { cause: err });
    }
    if (errno !== undefined) {
      throw new KheadersError('E_USAGE', `cannot write ${target}: ${errno}`, { path: target, errno }, { cause: err });
    }
    throw err;
  }
}
