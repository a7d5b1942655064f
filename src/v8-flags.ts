/**
 * V8 settings, set at run time at the moment they start to pay, never on node's command line and
 * never before a command's modules are loaded: any V8 flag off its default when a node builtin
 * module loads makes node refuse the compiled code it ships for that builtin (V8's flags are part
 * of the code cache's key). A `serve` start loads ~115 builtins (http, net, crypto, streams, ...):
 * compiling them from source was ~16% of the instructions of a start with the entry cached, and
 * ~21% of a `kheadersd ls`.
 */
// node:v8 only when a flag is set: the commands that set none never load it.
const setV8Flag = (flag: string): void => process.getBuiltinModule('node:v8').setFlagsFromString(flag);

/**
 * For the one-shot commands, once their modules are loaded: trade a little speed for memory. A
 * 200,000-entry ingest peaks at ~120 MiB instead of ~155 MiB, in the same time
 * (test/memory-200k.test.ts). `serve` keeps V8's defaults: its request paths are the hot ones.
 */
export function optimizeForSize(): void {
  setV8Flag('--optimize-for-size');
}

/**
 * For `serve`, once it is ready: keep V8's young generation at the size it has then, for a
 * process that idles all day. Left to grow, a burst of requests takes it towards 2 × 16 MiB, and
 * that memory stays dirty after the burst (measured: 16.7 instead of 22.6 MiB anonymous, idle
 * after 3,000 requests). This is what `--max-semi-space-size=1` in NODE_OPTIONS did, at the cost
 * of every builtin compiled from source.
 */
export function holdYoungGeneration(): void {
  setV8Flag('--semi-space-growth-factor=1');
}
