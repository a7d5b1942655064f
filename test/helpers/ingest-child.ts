/**
 * An ingest in a process of its own, for the crash test to kill -9 in the middle:
 *
 *   node dist/test/helpers/ingest-child.js CACHE_DIR ARCHIVE DECODER [MAX_TOTAL_BYTES]
 *
 * Prints one JSON line per event on stdout: {"event":"start","pid":N}, progress lines, and
 * {"event":"done",...} or {"event":"error",...} if it lives that long; those two carry the
 * process's peak resident memory (peakRssBytes, the kernel's VmHWM).
 */
import { readFile } from 'node:fs/promises';
import { ingest } from '../../src/store/ingest.js';
import type { DecoderChoice } from '../../src/store/decompress.js';
import { isKheadersError } from '../../src/errors.js';

const [cacheDir, archive, decoder = 'auto', maxTotalBytes] = process.argv.slice(2);
if (!cacheDir || !archive) {
  process.stderr.write('usage: ingest-child CACHE_DIR ARCHIVE [DECODER [MAX_TOTAL_BYTES]]\n');
  process.exit(2);
}

const say = (o: Record<string, unknown>): void => void process.stdout.write(JSON.stringify(o) + '\n');
const peakRssBytes = async (): Promise<number> => Number(/^VmHWM:\s+(\d+) kB$/m.exec(await readFile('/proc/self/status', 'utf8'))?.[1] ?? NaN) * 1024;
say({ event: 'start', pid: process.pid });
try {
  const r = await ingest({
    cacheDir,
    archive,
    decoder: decoder as DecoderChoice,
    btf: 'off',
    keep: 100,
    ...(maxTotalBytes !== undefined ? { limits: { maxTotalBytes: Number(maxTotalBytes) } } : {}),
    onProgress: (p) => say({ event: 'progress', bytes: p.bytes, entries: p.entries }),
  });
  say({ event: 'done', id: r.entry.manifest.id, reused: r.reused, peakRssBytes: await peakRssBytes() });
} catch (err) {
  say({ event: 'error', code: isKheadersError(err) ? err.code : 'internal', message: (err as Error).message, peakRssBytes: await peakRssBytes() });
  process.exitCode = 1;
}
