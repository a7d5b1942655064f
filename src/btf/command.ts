/**
 * `kheadersd btf [--btf FILE] [--out FILE]`: write the vmlinux.h for a BTF file (the running
 * kernel's by default) to stdout, or atomically to FILE.
 */
import { randomBytes } from 'node:crypto';
import { open, rename, unlink } from 'node:fs/promises';
import path from 'node:path';
import { errnoOf, KheadersError } from '../errors.js';
import { DEFAULT_BTF_PATH, generateVmlinuxHeaderBytes, readBtfFile } from './index.js';

export interface BtfCommandOptions {
  /** The BTF blob to read; default /sys/kernel/btf/vmlinux. */
  btf?: string;
  /** Write here (temp file + rename, so readers never see half a header) instead of to stdout. */
  out?: string;
}

export async function runBtfCommand(opts: BtfCommandOptions, stdout: NodeJS.WritableStream): Promise<void> {
  const header = generateVmlinuxHeaderBytes(await readBtfFile(opts.btf ?? DEFAULT_BTF_PATH));
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
    if (errno === 'ENOSPC' || errno === 'EDQUOT') {
      throw new KheadersError('E_NO_SPACE', `no space left to write ${target}`, { path: target }, { cause: err });
    }
    if (errno !== undefined) {
      throw new KheadersError('E_USAGE', `cannot write ${target}: ${errno}`, { path: target, errno }, { cause: err });
    }
    throw err;
  }
}
