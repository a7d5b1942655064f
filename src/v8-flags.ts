/**
 * V8 settings for the command line, applied before any other module loads (cli.ts imports this
 * first). The one-shot commands (ingest above all, with its index of up to 200,000 entries) let
 * V8 trade a little speed for memory: a 200,000-entry ingest peaks at ~120 MiB instead of
 * ~155 MiB, in the same time (test/memory-200k.test.ts). `serve` keeps V8's defaults: its
 * request paths are the hot ones, and its start is measured against node's own.
 */
import { createRequire } from 'node:module';
import type * as V8 from 'node:v8';

// node:v8 is loaded only when a flag is set: loading it costs a few ms of CPU that a `serve`
// start, which keeps V8's defaults, would pay for nothing. require() keeps it synchronous, so the
// flag is still set before cli.ts loads anything else.
const v8 = (): typeof V8 => createRequire(import.meta.url)('node:v8') as typeof V8;

if (!process.argv.slice(2).includes('serve')) v8().setFlagsFromString('--optimize-for-size');

/**
 * For `serve`, once it is ready: keep V8's young generation at the size it has then, for a
 * process that idles all day. Left to grow, a burst of requests takes it towards 2 × 16 MiB, and
 * that memory stays dirty after the burst (measured: 22.6 instead of 18.7 MiB anonymous, idle
 * after 3,000 requests).
 *
 * Set at run time, once ready, and not as `--max-semi-space-size=1` on node's command line: any
 * V8 flag off its default when a node builtin module loads makes node refuse the compiled code it
 * ships for that builtin (V8's flags are part of the code cache's key), and a start loads ~110 of
 * them (http, net, crypto, streams, ...): compiling those from source was ~16% of the
 * instructions of a start with the entry cached.
 */
export function holdYoungGeneration(): void {
  v8().setFlagsFromString('--semi-space-growth-factor=1');
}
