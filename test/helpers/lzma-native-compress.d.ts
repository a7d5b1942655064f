// The compressing half of lzma-native, which only the tests use (src/types declares the decoder).
declare module 'lzma-native' {
  import type { Transform } from 'node:stream';
  export function createCompressor(options?: { preset?: number; check?: number; threads?: number; synchronous?: boolean }): Transform;
  export const CHECK_CRC64: number;
}
