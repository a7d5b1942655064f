/**
 * V8 settings for the command line, applied before any other module loads (cli.ts imports this
 * first). The one-shot commands (ingest above all, with its index of up to 200,000 entries) let
 * V8 trade a little speed for memory: a 200,000-entry ingest peaks at ~120 MiB instead of
 * ~155 MiB, in the same time (test/memory-200k.test.ts). `serve` keeps V8's defaults: its
 * request paths are the hot ones.
 */
import v8 from 'node:v8';

if (!process.argv.slice(2).includes('serve')) v8.setFlagsFromString('--optimize-for-size');
