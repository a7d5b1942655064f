/**
 * vmlinux.h beside the headers: generated from the kernel's BTF once per BTF digest and kept in
 * the entry like any other content (a blob file named in the index).
 */
import { createHash } from 'node:crypto';
import { copyFile, readFile, access } from 'node:fs/promises';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { KheadersError, type ErrorCode } from '../errors.js';
import type { CacheEntry } from './entry.js';

export const VMLINUX_H = 'vmlinux.h';
export const LIVE_BTF = '/sys/kernel/btf/vmlinux';

export interface BtfSource {
  path: string;
  digest: string;
}

/** Read a BTF file's digest; undefined when there is no such file. */
export async function btfSource(file: string): Promise<BtfSource | undefined> {
  try {
    await access(file);
  } catch {
    return undefined;
  }
  const bytes = await readFile(file);
  return { path: file, digest: createHash('sha256').update(bytes).digest('hex') };
}

/**
 * Put vmlinux.h for `btf` at `outFile`: copied from an entry that already has it for the same
 * BTF digest, else generated in a worker thread. Returns its size.
 */
export async function provideVmlinuxH(btf: BtfSource, outFile: string, existing: readonly CacheEntry[]): Promise<number> {
  const donor = existing.find((e) => e.manifest.btf?.digest === btf.digest && e.index.get(VMLINUX_H)?.blob !== undefined);
  if (donor) {
    await copyFile(path.join(donor.dir, donor.index.get(VMLINUX_H)!.blob!), outFile);
    return donor.manifest.btf!.bytes;
  }
  return generateInWorker(btf.path, outFile);
}

function generateInWorker(btfPath: string, outFile: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(new URL('./vmlinux-worker.js', import.meta.url), { workerData: { btfPath, outFile } });
    let settled = false;
    worker.once('message', (msg: { ok: true; bytes: number } | { ok: false; code: string; message: string }) => {
      settled = true;
      if (msg.ok) resolve(msg.bytes);
      // An errno (ENOSPC writing the file) stays one, so the caller can tell a full disk from bad BTF.
      else if (!msg.code.startsWith('E_')) reject(Object.assign(new Error(`cannot write ${outFile}: ${msg.message}`), { code: msg.code }));
      else reject(new KheadersError(msg.code as ErrorCode, `cannot make vmlinux.h from ${btfPath}: ${msg.message}`, { btf: btfPath }));
    });
    worker.once('error', (err) => {
      settled = true;
      reject(new KheadersError('E_BTF', `cannot make vmlinux.h from ${btfPath}: ${err.message}`, { btf: btfPath }));
    });
    worker.once('exit', (code) => {
      if (!settled) reject(new KheadersError('E_INTERNAL', `the vmlinux.h worker exited with status ${code}`));
    });
  });
}
