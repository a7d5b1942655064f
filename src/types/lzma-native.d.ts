// lzma-native ships no types; this is the part kheadersd uses.
declare module 'lzma-native' {
  import type { Transform } from 'node:stream';
  export function createDecompressor(options?: { synchronous?: boolean; memlimit?: number; bufsize?: number }): Transform;
}
