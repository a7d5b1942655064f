/**
 * The entry point of `serve`'s ingest process (cli.ts is the other entry point): the child side
 * of ingest-process.ts, one ingest of the configuration the daemon sends over the IPC channel (no
 * repair first: the daemon has just done it), JSON log lines on stdout, the outcome sent back,
 * then exit. It sits beside ingest-process.ts because that finds it by a relative URL, which must
 * name the same file in tsc's output and in the bundle, where every entry point is a file of one
 * flat directory (scripts/bundle.mjs).
 */
import { EXIT, KheadersError } from '../errors.js';
import { createDeferredLogger } from '../log.js';
import { optimizeForSize } from '../v8-flags.js';
import type { IngestOutcome, IngestRequest } from './ingest-process.js';
import { RemoteDecoder, isDecoderEvent, killDecoder, type DecoderAbort, type DecoderIdentity } from './remote-decoder.js';

if (!process.send) {
  process.stderr.write('this is the ingest process of `kheadersd serve`, started by it only; run `kheadersd ingest`\n');
  process.exit(2);
}

// Dies with the daemon: the channel closes when the daemon exits, however it exits (kill -9
// included), and neither this process nor the xz it started may go on writing into the cache. It
// leads its process group (spawned detached), so one signal ends them all; what they left in the
// cache's tmp/ is swept by the next ingest, and the lock they held is stale. (A staged build's
// xz is the daemon's, not in this group: it is killed here by its pid and start time, as the end
// of its input pipe would stop it only once it had decoded all it had buffered, hundreds of MiB
// for a bomb; the lock, the daemon's, is stale as well.)
/** The daemon's xz of a staged build: killed with this process (remote-decoder.ts, DecoderIdentity). */
let daemonDecoder: DecoderIdentity | undefined;
const dieWithParent = (): void => {
  // First: the kill of this process's group below ends this process too.
  if (daemonDecoder) killDecoder(daemonDecoder);
  try {
    process.kill(-process.pid, 'SIGKILL');
  } catch {
    process.exit(1);
  }
};
process.on('disconnect', dieWithParent);
// The daemon's end of this process's stdout and stderr closes with it too, and this process
// often logs before it reads the channel's end: the EPIPE of that write was an uncaught error
// (exit 1) that skipped the kills above, and the daemon's xz (or this process's own) decoded on.
// A write that fails here means the daemon is gone: die with it, the same way.
process.stdout.on('error', dieWithParent);
process.stderr.on('error', dieWithParent);
// Any other end of this process (a crash) still takes the daemon's xz with it: harmless while the
// daemon lives (it kills xz once this process has ended; one already exited is not the named one).
process.on('exit', () => {
  if (daemonDecoder) killDecoder(daemonDecoder);
});

// The daemon's decoder of a staged build: listened for from the start, as its events may come
// right behind the request, before main() has taken the request in (remote-decoder.ts).
const decoder = new RemoteDecoder(() => process.send?.({ abortDecoder: true } satisfies DecoderAbort, () => {}));
const request = new Promise<IngestRequest>((resolve) => {
  process.on('message', (msg: unknown) => {
    if (isDecoderEvent(msg)) decoder.deliver(msg);
    else {
      const req = msg as IngestRequest; // the first message; there is no other kind
      daemonDecoder = req.staged?.decoder;
      resolve(req);
    }
  });
});

/** One ingest, as the daemon asks (a function, not top-level code: the bundle is CommonJS). */
async function main(): Promise<void> {
  const { cfg, logLevel, staged } = await request;
  // pino loads once xz decodes (ingest warms it then), not before the archive is even looked at.
  const log = createDeferredLogger(logLevel, process.stdout);
  const [{ ingest }, { configuredIngest }] = await Promise.all([import('../store/ingest.js'), import('./store-commands.js')]);
  optimizeForSize();
  let outcome: IngestOutcome;
  try {
    const io = { stdout: process.stdout, stderr: process.stderr, log };
    // The daemon looked for the archive before starting this process, and logged what it found.
    // It asks for a build only after it has read the archive itself and found no entry for its
    // digest (a digest it recalled and found no entry for, it reads before asking): a recalled
    // digest here would find that same absence and be read anyway. So the archive is read and
    // hashed here at once, and that is what is built and committed. (Sending the daemon's bytes
    // over the IPC channel instead took 70–200 ms for 3.8 MiB, against ~25 ms to read and hash.)
    // A staged build: the daemon holds the cache lock for this process and started xz into
    // `staged.tmp`; this process builds from it (ingest.ts, StagedBuild).
    await ingest({ ...configuredIngest(cfg, io, { setCurrent: true }), locatedBefore: true, recall: false, ...(staged ? { staged: { ...staged, decoder } } : {}) });
    outcome = { ok: true };
  } catch (err) {
    if (err instanceof KheadersError) outcome = { ok: false, code: err.code, message: err.message, details: err.details };
    else {
      log.error({ err }, 'internal error');
      outcome = { ok: false, code: 'E_INTERNAL', message: `internal error in the ingest process: ${err instanceof Error ? err.message : String(err)}`, details: {} };
    }
  }
  process.off('disconnect', dieWithParent);
  // Then gone at once (process.exit), not through node's teardown of the heap the build grew
  // (~45 ms of CPU): the daemon goes on at this answer. Its log lines are written (stdout is a
  // pipe: synchronous on Linux).
  process.send?.(outcome, () => {
    process.disconnect();
    process.exit();
  }); // defined: checked at the top
}

main().catch((err: unknown) => {
  process.stderr.write(`kheadersd ingest process: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(EXIT.internal);
});
