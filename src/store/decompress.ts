/**
 * xz decoding for ingest. Two decoders, chosen by measurement (BENCHMARKS.md, "ingest"):
 * an `xz -dc` child process, which decodes on the other core at the speed of the xz tool itself,
 * and lzma-native on the libuv threadpool, about twice as slow, used where no xz binary exists.
 *
 * Either way the decoded bytes are *pulled*: the decoder runs only as far ahead of its reader as
 * a small buffer allows, so an xz bomb costs neither memory nor disk beyond what the reader has
 * accepted. The reader (ingest) checks every limit before it writes a byte to the cache. The
 * size an archive announces is never trusted for this: a second stream, stream padding or a
 * forged index all make it lie.
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';
import { access, constants } from 'node:fs/promises';
import path from 'node:path';
import { KheadersError } from '../errors.js';

export type DecoderName = 'xz' | 'lzma-native';
export type DecoderChoice = DecoderName | 'auto';

export interface Decoder {
  readonly name: DecoderName;
  /** The decoded tar stream, in order. The decoder waits while its reader does. */
  readonly chunks: AsyncIterable<Buffer>;
  /** Resolves when the decoder has verified the whole stream; rejects with E_ARCHIVE_CORRUPT or E_LIMIT. */
  readonly done: Promise<void>;
  abort(): void;
}

/**
 * The most memory the decoder itself may use (its dictionary, mostly). The kernel's archive
 * needs 9 MiB (xz's default preset); `xz -9` needs 65 MiB. A larger dictionary is only useful to
 * a bomb: the dictionary fills with decoded bytes, so it would be resident memory up to its size.
 */
export const DECODER_MEMLIMIT_BYTES = 96 * 1024 * 1024;

/**
 * lzma-native decodes each buffer it is given in one go on the threadpool and hands over all of
 * its output at once: the input must reach it in slices small enough that even the densest
 * input (LZMA tops out near 7,000:1, a run of zeros) expands to a bounded amount. 2 KiB slices
 * bound that to ~14 MiB; on the real archive they cost no measurable time over one large write.
 */
const LZMA_NATIVE_SLICE_BYTES = 2 * 1024;

/** Find an xz decoder binary on PATH: `xz`, or `xzcat` (toybox and busybox on Android have it). */
export async function findXzBinary(envPath = process.env.PATH ?? ''): Promise<{ file: string; args: string[] } | undefined> {
  for (const [name, args] of [
    ['xz', ['-dc']],
    ['xzcat', []],
  ] as const) {
    for (const dir of envPath.split(path.delimiter)) {
      if (!dir) continue;
      const file = path.join(dir, name);
      try {
        await access(file, constants.X_OK);
        return { file, args: [...args] };
      } catch {
        // not here
      }
    }
  }
  return undefined;
}

/** Start decoding `input` (a whole .xz file). */
export async function startDecoder(input: Buffer, choice: DecoderChoice = 'auto'): Promise<Decoder> {
  if (choice !== 'lzma-native') {
    const xz = await findXzBinary();
    if (xz) return startXzChild(input, xz.file, xz.args);
    if (choice === 'xz') throw new KheadersError('E_USAGE', 'no xz or xzcat binary on PATH (--decoder xz); install xz-utils or use --decoder auto');
  }
  return startLzmaNative(input);
}

function corrupt(detail: string): KheadersError {
  return new KheadersError('E_ARCHIVE_CORRUPT', `corrupt archive: the xz stream does not decode (${detail})`, { decoderMessage: detail });
}

function memoryLimit(detail: string): KheadersError {
  return new KheadersError('E_LIMIT', `the archive needs more memory to decode than the ${DECODER_MEMLIMIT_BYTES / 1024 / 1024} MiB allowed (its xz dictionary is too large): ${detail}`, {
    limit: 'decoderMemory',
    value: DECODER_MEMLIMIT_BYTES,
    decoderMessage: detail,
  });
}

/**
 * xz decodes on the other core and writes into a pipe (a socket pair, as libuv makes them);
 * node stops reading while ingest is busy, the pipe fills, and xz blocks in write(2). Nothing
 * reaches the cache that ingest has not counted and checked.
 */
function startXzChild(input: Buffer, file: string, args: string[]): Decoder {
  // The memory limit goes in XZ_DEFAULTS, which XZ Utils reads and other xz tools ignore, where
  // a flag they do not know would stop them. toybox's xzcat has its own: a 64 MiB dictionary.
  const env = { ...process.env, XZ_DEFAULTS: `--memlimit-decompress=${DECODER_MEMLIMIT_BYTES}` };
  const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'], env }) as ChildProcessByStdio<Writable, Readable, Readable>;
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => {
    if (stderr.length < 4096) stderr += s;
  });
  // xz exits early on bad input (or is killed); the EPIPE that follows on a pipe is expected.
  child.stdin.on('error', () => {});
  child.stdout.on('error', () => {});
  child.stdin.end(input);
  const done = new Promise<void>((resolve, reject) => {
    child.on('error', (err) => reject(new KheadersError('E_INTERNAL', `could not run ${file}: ${err.message}`, {}, { cause: err })));
    child.on('close', (code, signal) => {
      const message = stderr.replace(/^.*?\((?:stdin|stdout)\):\s*/s, '').trim();
      if (code === 0) resolve();
      else if (/memory usage limit|of memory is required/i.test(message)) reject(memoryLimit(message));
      else if (signal) reject(new KheadersError('E_INTERNAL', `${file} was stopped by ${signal}`));
      else reject(corrupt(message || `${path.basename(file)} exited with status ${code}`));
    });
  });
  done.catch(() => {}); // observed by the caller later; a rejection before then is not "unhandled"
  return {
    name: 'xz',
    chunks: child.stdout,
    done,
    abort: () => {
      child.stdout.destroy();
      child.kill('SIGKILL');
    },
  };
}

async function startLzmaNative(input: Buffer): Promise<Decoder> {
  const lzma = await import('lzma-native');
  const decompressor = lzma.createDecompressor({ memlimit: DECODER_MEMLIMIT_BYTES });
  let stopped = false;
  const stoppedError = new KheadersError('E_INTERNAL', 'the lzma-native decoder was stopped');
  let failure: KheadersError | undefined;
  /** The decoder's own error, typed; after abort() only "stopped" (a write refused by the destroyed stream says nothing about the archive). */
  const typed = (err: unknown): KheadersError => {
    if (stopped) return failure ?? stoppedError;
    failure ??= (err as { name?: unknown }).name === 'LZMA_MEMLIMIT_ERROR' ? memoryLimit((err as Error).message) : corrupt((err as Error).message);
    return failure;
  };
  const done = new Promise<void>((resolve, reject) => {
    decompressor.on('error', (err: Error) => reject(typed(err)));
    decompressor.on('end', resolve);
    // abort() destroys the stream: settle `done` so whoever waits for the decoder is released.
    decompressor.on('close', () => reject(failure ?? stoppedError));
  });
  done.catch(() => {}); // observed by the caller later; a rejection before then is not "unhandled"

  // One slice at a time: the next is written only once the last is decoded, and the stream
  // decodes it only once its reader has taken the output below the stream's buffer size.
  const writeSlice = (slice: Buffer): Promise<void> =>
    new Promise((resolve, reject) => {
      decompressor.write(slice, (err?: Error | null) => (err ? reject(err) : resolve()));
    });
  void (async () => {
    for (let at = 0; at < input.length && !stopped; at += LZMA_NATIVE_SLICE_BYTES) {
      await writeSlice(input.subarray(at, at + LZMA_NATIVE_SLICE_BYTES));
    }
    if (!stopped) decompressor.end();
  })().catch(() => {}); // a failed write is also the stream's 'error', reported through `done` and `chunks`

  async function* chunks(): AsyncGenerator<Buffer> {
    try {
      for await (const chunk of decompressor) yield chunk as Buffer;
    } catch (err) {
      throw typed(err); // the reader sees the typed error, not ERR_STREAM_PREMATURE_CLOSE
    }
  }
  return {
    name: 'lzma-native',
    chunks: chunks(),
    done,
    abort: () => {
      stopped = true;
      decompressor.destroy();
    },
  };
}
