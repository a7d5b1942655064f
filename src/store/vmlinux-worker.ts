/**
 * Worker thread: BTF file in, vmlinux.h file out. Runs off the main thread because the emitter
 * walks every type of the kernel (about a second of CPU), and the daemon's event loop is the
 * one that answers FUSE and HTTP.
 */
import { open } from 'node:fs/promises';
import { parentPort, workerData } from 'node:worker_threads';
import { generateVmlinuxHeader, readBtfFile } from '../btf/index.js';

interface Job {
  btfPath: string;
  outFile: string;
}

const { btfPath, outFile } = workerData as Job;
try {
  const text = generateVmlinuxHeader(await readBtfFile(btfPath));
  const fh = await open(outFile, 'w', 0o644);
  try {
    await fh.writeFile(text);
    await fh.sync();
  } finally {
    await fh.close();
  }
  parentPort!.postMessage({ ok: true, bytes: Buffer.byteLength(text) });
} catch (err) {
  const e = err as { code?: unknown; message?: unknown };
  parentPort!.postMessage({ ok: false, code: typeof e.code === 'string' ? e.code : 'E_INTERNAL', message: String(e.message ?? err) });
}
