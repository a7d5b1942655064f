/**
 * vmlinux.h beside the headers: generated from the kernel's BTF once per BTF digest and kept in
 * the entry like any other content (a blob file named in the index).
 */
import { createHash } from 'node:crypto';
import { access, copyFile, readFile } from 'node:fs/promises';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { readBtf } from '../btf/index.js';
import { KheadersError, type ErrorCode } from '../errors.js';
import type { CacheEntry } from './entry.js';
import type { HeaderJob, HeaderJobResult } from './vmlinux-worker.js';

export const VMLINUX_H = 'vmlinux.h';
export const LIVE_BTF = '/sys/kernel/btf/vmlinux';

export interface BtfSource {
  path: string;
  /** sha256 of the BTF blob (of the .BTF section when the file is an ELF). */
  digest: string;
  bytes: Buffer;
  /** What an ELF file (vmlinux) says about its kernel; null/undefined for raw BTF. */
  buildId: string | null;
  release: string | undefined;
}

/** Read a BTF file (raw, or a vmlinux's .BTF section) and its digest; undefined when there is no such file. */
export async function btfSource(file: string): Promise<BtfSource | undefined> {
  try {
    await access(file);
  } catch {
    return undefined;
  }
  const btf = await readBtf(file);
  return { path: file, digest: createHash('sha256').update(btf.bytes).digest('hex'), bytes: btf.bytes, buildId: btf.buildId, release: btf.release };
}

/**
 * Put vmlinux.h for `btf` at `outFile`: copied from an entry that already has it for the same
 * BTF digest, else generated in a worker thread. Returns its size and sha256.
 */
export async function provideVmlinuxH(btf: BtfSource, outFile: string, existing: readonly CacheEntry[]): Promise<{ bytes: number; sha256: string }> {
  const donor = existing.find((e) => e.manifest.btf?.digest === btf.digest && e.index.get(VMLINUX_H)?.blob !== undefined);
  if (donor) {
    const record = donor.index.get(VMLINUX_H)!;
    await copyFile(path.join(donor.dir, record.blob!), outFile);
    return { bytes: donor.manifest.btf!.bytes, sha256: record.sha256 ?? createHash('sha256').update(await readFile(outFile)).digest('hex') };
  }
  return generateHeaderInWorker({ btf: btf.path, outFile }, `vmlinux.h from ${btf.path}`);
}

/** Run one header job (see vmlinux-worker.ts) on a worker thread; resolves with its size and sha256. */
export function generateHeaderInWorker(job: HeaderJob, what: string): Promise<{ bytes: number; sha256: string }> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(new URL('./vmlinux-worker.js', import.meta.url), { workerData: job });
    let settled = false;
    worker.once('message', (msg: HeaderJobResult) => {
      settled = true;
      if (msg.ok) resolve({ bytes: msg.bytes, sha256: msg.sha256 });
      // An errno (ENOSPC writing the file) stays one, so the caller can tell a full disk from bad BTF.
      else if (!msg.code.startsWith('E_')) reject(Object.assign(new Error(`cannot write ${job.outFile}: ${msg.message}`), { code: msg.code }));
      else reject(new KheadersError(msg.code as ErrorCode, `cannot make ${what}: ${msg.message}`, { what }));
    });
    worker.once('error', (err) => {
      settled = true;
      reject(new KheadersError('E_BTF', `cannot make ${what}: ${err.message}`, { what }));
    });
    worker.once('exit', (code) => {
      if (!settled) reject(new KheadersError('E_INTERNAL', `the header worker for ${what} exited with status ${code}`));
    });
  });
}
