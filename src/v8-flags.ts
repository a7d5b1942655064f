/**
 * V8 settings for the command line, applied before any other module loads (cli.ts imports this
 * first). The one-shot commands (ingest above all, with its index of up to 200,000 entries) let
 * V8 trade a little speed for memory: a 200,000-entry ingest peaks at ~120 MiB instead of
 * ~155 MiB, in the same time (test/memory-200k.test.ts). `serve` keeps V8's defaults: its
 * request paths are the hot ones.
 */
import { createRequire } from 'node:module';
import type * as V8 from 'node:v8';

// node:v8 is loaded only when a flag is set: loading it costs a few ms of CPU that a `serve`
// start, which keeps V8's defaults, would pay for nothing. require() keeps it synchronous, so the
// flag is still set before cli.ts loads anything else.
if (!process.argv.slice(2).includes('serve')) (createRequire(import.meta.url)('node:v8') as typeof V8).setFlagsFromString('--optimize-for-size');
