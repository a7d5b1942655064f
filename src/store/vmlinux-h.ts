/**
 * vmlinux.h beside the headers: generated from the kernel's BTF once per BTF digest and kept in
 * the entry like any other content (a blob file named in the index).
 */
import { createHash } from 'node:crypto';
import { access, writeFile } from 'node:fs/promises';
import { KheadersError, codeForErrno, isErrorCode } from '../errors.js';
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
  // The BTF code is loaded only when a BTF is read (not at every serve start).
  const { readBtf } = await import('../btf/index.js');
  const btf = await readBtf(file);
  return { path: file, digest: createHash('sha256').update(btf.bytes).digest('hex'), bytes: btf.bytes, buildId: btf.buildId, release: btf.release };
}

/**
 * Put vmlinux.h for `btf` at `outFile`: copied from an entry that already has it for the same
 * BTF digest (read through its reader, so a damaged copy is never passed on), else generated in
 * a worker thread. Returns its size and sha256.
 */
export async function provideVmlinuxH(btf: BtfSource, outFile: string, existing: readonly CacheEntry[], signal?: AbortSignal): Promise<{ bytes: number; sha256: string }> {
  for (const donor of existing) {
    if (donor.manifest.btf?.digest !== btf.digest) continue;
    const id = donor.index.idOf(VMLINUX_H);
    const blob = id < 0 ? undefined : donor.index.dataOf(id).blob;
    if (blob === undefined) continue;
    const bytes = await donor.reader.readWhole(id).catch(() => undefined);
    if (!bytes) continue;
    await writeFile(outFile, bytes);
    return { bytes: bytes.length, sha256: donor.index.blob(blob).sha256.toString('hex') };
  }
  return generateHeaderInWorker({ btf: btf.path, outFile }, `vmlinux.h from ${btf.path}`, signal);
}

/**
 * Run one header job (see vmlinux-worker.ts) on a worker thread; resolves with its size and
 * sha256. `signal` (a stop) ends the worker at once and rejects with its reason: a stop does not
 * wait for a whole kernel's header to be generated. What it wrote of `outFile` is the caller's to remove.
 */
export function generateHeaderInWorker(job: HeaderJob, what: string, signal?: AbortSignal): Promise<{ bytes: number; sha256: string }> {
  if (signal?.aborted) return Promise.reject(signal.reason as Error);
  return new Promise((resolve, reject) => {
    // worker_threads (~4 ms to load) only when a header is made: serve's start loads this module.
    const { Worker } = process.getBuiltinModule('node:worker_threads');
    const worker = new Worker(new URL('./vmlinux-worker.js', import.meta.url), { workerData: job });
    let settled = false;
    const stop = (): void => {
      settled = true;
      void worker.terminate();
      reject(signal!.reason as Error);
    };
    signal?.addEventListener('abort', stop, { once: true });
    worker.once('exit', () => signal?.removeEventListener('abort', stop));
    worker.once('message', (msg: HeaderJobResult) => {
      settled = true;
      if (msg.ok) resolve({ bytes: msg.bytes, sha256: msg.sha256 });
      else if (isErrorCode(msg.code)) reject(new KheadersError(msg.code, `cannot make ${what}: ${msg.message}`, { what }));
      // Any other code is the errno of a system call (ENOSPC writing the file): mapped, keeping
      // the errno, so a full disk is told from bad BTF and exits as the environment's fault.
      else reject(new KheadersError(codeForErrno(msg.code), `cannot write ${job.outFile}: ${msg.message}`, { what, errno: msg.code }));
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
