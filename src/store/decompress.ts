/**
 * xz decoding for ingest. Two decoders, chosen by measurement (BENCHMARKS.md, "ingest"):
 * an `xz -dc` child process, which decodes on the other core at the speed of the xz tool itself,
 * and lzma-native on the libuv threadpool, about twice as slow, used where no xz binary (or no
 * shell to start it under a file-size limit) exists.
 *
 * The xz child writes the decoded tar straight into the staged pack, under a file-size limit, and
 * ingest follows the file; lzma-native's output is *pulled*: it runs only as far ahead of its
 * reader as a small buffer allows, and the reader checks every limit before it writes a byte.
 * Either way an xz bomb costs neither memory nor disk past the limit. The size an archive
 * announces is never trusted for this: a second stream, stream padding or a forged index all
 * make it lie.
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';
import { access, constants, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { KheadersError, endedBySignal } from '../errors.js';
import type { FileWriter } from './follow-file.js';
import { totalBytesLimit } from './tar-indexer.js';

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

/**
 * Find an xz decoder binary on PATH: `xz`, or `xzcat` (toybox and busybox on Android have it).
 * Every candidate is checked at once (a dozen PATH directories one after the other cost a few
 * ms before xz can start); the first in PATH order wins, as a shell would choose.
 */
export async function findXzBinary(envPath = process.env.PATH ?? ''): Promise<{ file: string; args: string[] } | undefined> {
  const candidates = (
    [
      ['xz', ['-dc']],
      ['xzcat', []],
    ] as const
  ).flatMap(([name, args]) => envPath.split(path.delimiter).filter((dir) => dir !== '').map((dir) => ({ file: path.join(dir, name), args: [...args] })));
  const executable = await Promise.all(
    candidates.map((c) =>
      access(c.file, constants.X_OK).then(
        () => true,
        () => false,
      ),
    ),
  );
  return candidates.find((_, i) => executable[i]);
}

/**
 * The POSIX shells that can set xz's file-size limit, in the order tried. Where the node binary
 * was built decides nothing: a glibc or musl node on an Android device still finds no /bin there,
 * only /system/bin/sh.
 */
const SHELLS = ['/bin/sh', '/system/bin/sh'];

/** The first of `candidates` that can be executed, or undefined (then xz cannot run bounded). */
export async function findShell(candidates: readonly string[] = SHELLS): Promise<string | undefined> {
  for (const file of candidates) {
    try {
      await access(file, constants.X_OK);
      return file;
    } catch {
      // not here
    }
  }
  return undefined;
}

/**
 * A decoder that writes the decoded stream into a file itself (the xz child, its stdout being
 * the file): the reader follows the file as it grows (follow-file.ts).
 */
export interface FileDecoder extends FileWriter {
  readonly name: DecoderName;
  /** Resolves when the decoder has verified the whole stream; rejects with E_ARCHIVE_CORRUPT, E_LIMIT, or ENOSPC (an errno error). */
  readonly done: Promise<void>;
  abort(): void;
  /**
   * The decoder's process, when it is one (xz): for a process it decodes for to kill it when the
   * process that started it dies (remote-decoder.ts, decoderIdentity). Undefined if it did not start.
   */
  readonly pid?: number;
}

/** Where a decoder writes the decoded stream: `file`, opened for writing and reading at offset 0, holding at most `maxBytes`. */
export interface DecodeTarget {
  file: FileHandle;
  maxBytes: number;
}

/** The decoder startDecoder runs: an xz binary and the shell that bounds it, or lzma-native. */
export type DecoderPlan = { xz: { file: string; args: string[] }; shell: string } | { lzmaNative: true };

/**
 * Which decoder `choice` means on this machine (E_USAGE when it is xz and there is none). Apart
 * from the start, so that a caller can look it up (some twenty access() calls) while it makes
 * the file the decoder writes, not after.
 */
export async function planDecoder(choice: DecoderChoice): Promise<DecoderPlan> {
  if (choice !== 'lzma-native') {
    const [xz, shell] = await Promise.all([findXzBinary(), findShell()]);
    if (xz && shell) return { xz, shell };
    if (choice === 'xz') {
      throw new KheadersError('E_USAGE', xz ? `no shell (${SHELLS.join(' or ')}) to run ${xz.file} under a file-size limit (--decoder xz); use --decoder auto` : 'no xz or xzcat binary on PATH (--decoder xz); install xz-utils or use --decoder auto');
    }
  }
  return { lzmaNative: true };
}

/**
 * Start decoding `input` (a whole .xz file) with the decoder `plan` names: with an xz binary,
 * straight into `target.file`; with lzma-native, as a stream the caller reads and writes to the
 * file itself. `onInputTaken`: xz only (XzChildOptions); lzma-native reads `input` to the end.
 */
export async function startDecoder(input: Buffer, plan: DecoderPlan, target: DecodeTarget, onInputTaken?: () => void): Promise<{ intoFile: FileDecoder } | { stream: Decoder }> {
  if ('xz' in plan) return { intoFile: startXzIntoFile(input, plan.xz, target, { shell: plan.shell, ...(onInputTaken ? { onInputTaken } : {}) }) };
  return { stream: await startLzmaNative(input) };
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

/** How the xz child is started: its shell (which sets the file-size limit, then execs xz). */
export interface XzChildOptions {
  /** A POSIX shell. Default: /bin/sh (findShell() picks the one that exists). */
  shell?: string;
  /**
   * Called once xz has taken the whole input (its stdin finished), or can take no more of it
   * (closed early): the caller may give the input's memory back then, not at the decode's end.
   */
  onInputTaken?: () => void;
}

/** How long after xz's exit its stderr may stay open (held by a process it left behind) before it is closed. */
const STDERR_GRACE_MS = 1_000;

/** The unit of `ulimit -f` in a POSIX shell (dash, mksh, bash as `sh`); bash's own mode counts 1 KiB. */
const ULIMIT_BLOCK_BYTES = 512;

/**
 * xz decodes on the other core and writes the pack itself: its stdout is the pack file, and node
 * only reads it back from the page cache (follow-file.ts), where reading xz's output through a
 * pipe cost more CPU than indexing and hashing it.
 *
 * The bound on disk: xz runs under RLIMIT_FSIZE (`ulimit -f`, set by a shell that then execs
 * it), so a bomb's pack stops at `maxBytes` rounded up to the next 512 bytes, whatever node is
 * doing; xz's write past it fails with EFBIG ("File too large": SIGXFSZ is ignored, so no core
 * dump), reported as the same E_LIMIT the reader gives. The reader also stops and kills xz as
 * soon as it has read past a limit. If the daemon dies, xz reads the end of its input pipe
 * soon after (node feeds the archive as xz takes it) and exits; the pack it leaves is in the
 * staging directory, which the next start sweeps.
 */
export function startXzIntoFile(input: Buffer, xz: { file: string; args: string[] }, target: DecodeTarget, opts: XzChildOptions = {}): FileDecoder {
  // The memory limit goes in XZ_DEFAULTS, which XZ Utils reads and other xz tools ignore, where
  // a flag they do not know would stop them. toybox's xzcat has its own: a 64 MiB dictionary.
  // --no-sparse: writing to a regular file, XZ Utils would seek over runs of zeros instead of
  // writing them, so a bomb of zeros would neither grow the file (where the reader and the size
  // limit see it) nor be stopped before xz had decoded all of it, however long that takes.
  // XZ_OPT goes: xz reads it after XZ_DEFAULTS, so a user's --single-stream would end the pack
  // after the first stream with status 0 (a short pack taken for a whole one), and
  // --memlimit-decompress=max would lift the memory limit. Nothing xz -dc needs comes from it.
  // LC_ALL=C: xz's messages are matched in English below (xzFailure), and xz then loads no locale.
  const env: NodeJS.ProcessEnv = { ...process.env, XZ_DEFAULTS: `--memlimit-decompress=${DECODER_MEMLIMIT_BYTES} --no-sparse`, LC_ALL: 'C' };
  delete env.XZ_OPT;
  const blocks = Math.ceil(target.maxBytes / ULIMIT_BLOCK_BYTES);
  // A shell that cannot set the limit must not run xz without it: status 125, reported below.
  const script = `trap '' XFSZ; ulimit -f ${blocks} || exit 125; exec "$0" "$@"`;
  const shell = opts.shell ?? '/bin/sh';
  const child = spawn(shell, ['-c', script, xz.file, ...xz.args], { stdio: ['pipe', target.file.fd, 'pipe'], env }) as ChildProcessByStdio<Writable, null, Readable>;
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => {
    if (stderr.length < 4096) stderr += s;
  });
  // xz exits early on bad input (or is killed); the EPIPE that follows on a pipe is expected.
  child.stdin.on('error', () => {});
  if (opts.onInputTaken) {
    let taken = false;
    const given = (): void => {
      if (taken) return;
      taken = true;
      opts.onInputTaken!();
    };
    // 'close' covers an xz that exited (or was killed) before it took everything: no write is pending then either.
    child.stdin.once('finish', given).once('close', given);
  }
  child.stdin.end(input);
  let exited = false;
  const exit = new Promise<void>((resolve) => {
    child.on('exit', () => {
      exited = true;
      resolve();
      // Its stderr is read to the end at 'close'; a process it left behind holding stderr open
      // (an xz that is a script, say) must not hold the ingest until that process ends.
      const late = setTimeout(() => child.stderr.destroy(), STDERR_GRACE_MS);
      child.once('close', () => clearTimeout(late));
    });
    child.on('error', () => {
      exited = true;
      resolve();
    });
  });
  const done = new Promise<void>((resolve, reject) => {
    child.on('error', (err) => reject(new KheadersError('E_INTERNAL', `could not run ${shell} for ${xz.file}: ${err.message}`, {}, { cause: err })));
    child.on('close', (code, signal) => {
      const message = stderr.replace(/^.*?\((?:stdin|stdout)\):\s*/s, '').trim();
      if (code === 0) resolve();
      else if (code === 125) reject(new KheadersError('E_INTERNAL', `${shell} could not limit the decoder's output to ${target.maxBytes} bytes (ulimit -f): ${message}`));
      else reject(xzFailure(message, code, signal, xz.file, target.maxBytes));
    });
  });
  done.catch(() => {}); // observed by the caller later; a rejection before then is not "unhandled"
  return {
    name: 'xz',
    ...(child.pid !== undefined ? { pid: child.pid } : {}),
    get exited() {
      return exited;
    },
    whenExited: () => exit,
    done,
    abort: () => {
      child.kill('SIGKILL');
    },
  };
}

/** What xz's failure means: a full disk (an errno error, named by the caller's step), the size or memory limit, or a corrupt archive. */
function xzFailure(message: string, code: number | null, signal: NodeJS.Signals | null, file: string, maxBytes: number): Error {
  if (/memory usage limit|of memory is required/i.test(message)) return memoryLimit(message);
  // An xz that is not XZ Utils' (or an old one) refusing what XZ_DEFAULTS asks: not the archive's fault.
  if (/unrecognized option|invalid option|unknown option|^usage:/im.test(message)) {
    return new KheadersError('E_INTERNAL', `${file} cannot decode as asked (${message}): install XZ Utils' xz, or use --decoder lzma-native`, { decoderMessage: message });
  }
  if (/File too large/i.test(message) || signal === 'SIGXFSZ') return totalBytesLimit(maxBytes);
  for (const [errno, text] of WRITE_ERRNOS) {
    if (message.includes(text)) return Object.assign(new Error(`${path.basename(file)}: ${message}`), { code: errno });
  }
  if (signal) return endedBySignal(`the decoder ${file}`, signal);
  return corrupt(message || `${path.basename(file)} exited with status ${code}`);
}

/** Errors of xz writing the pack, by the text of strerror(3) in its message. */
const WRITE_ERRNOS: ReadonlyArray<[errno: string, text: string]> = [
  ['ENOSPC', 'No space left on device'],
  ['EDQUOT', 'Disk quota exceeded'],
  ['EIO', 'Input/output error'],
];

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
      // A stream that failed before its reader came (a memory limit fails on the first slice)
      // never ends: iterating it would wait forever.
      if (failure) throw failure;
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
