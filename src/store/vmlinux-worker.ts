/**
 * Worker thread: BTF in (a file, or bytes already read; over a base file for a module's split
 * BTF), C header file out. Runs off the main thread because the emitter walks every type of the
 * kernel (about a second of CPU), and the daemon's event loop is the one that answers FUSE and HTTP.
 */
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { parentPort, workerData } from 'node:worker_threads';
import { generateVmlinuxHeaderBytes, readBtfFile } from '../btf/index.js';

export interface HeaderJob {
  /** The BTF file, or its bytes (a module's, read once by the caller, who hashed exactly those). */
  btf: string | Uint8Array;
  /** The base BTF file, for split BTF. */
  base?: string;
  outFile: string;
}

export type HeaderJobResult = { ok: true; bytes: number; sha256: string } | { ok: false; code: string; message: string };

/** The job (a function, not top-level code: the bundle is CommonJS). Every failure is posted back. */
async function run(): Promise<void> {
  const job = workerData as HeaderJob;
  try {
    const btf = typeof job.btf === 'string' ? await readBtfFile(job.btf) : job.btf;
    const base = job.base === undefined ? undefined : await readBtfFile(job.base);
    const header = generateVmlinuxHeaderBytes(btf, base === undefined ? {} : { base });
    const fh = await open(job.outFile, 'w', 0o644);
    try {
      await fh.writeFile(header);
      await fh.sync();
    } finally {
      await fh.close();
    }
    const result: HeaderJobResult = { ok: true, bytes: header.length, sha256: createHash('sha256').update(header).digest('hex') };
    parentPort!.postMessage(result);
  } catch (err) {
    const e = err as { code?: unknown; message?: unknown };
    const result: HeaderJobResult = { ok: false, code: typeof e.code === 'string' ? e.code : 'E_INTERNAL', message: String(e.message ?? err) };
    parentPort!.postMessage(result);
  }
}

void run();
