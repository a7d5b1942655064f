/**
 * pino JSON logs on stdout. One logger per process; modules take a `Logger` so tests can pass
 * a silent one (`createLogger('silent')`).
 */
import { createRequire } from 'node:module';
import type { pino as Pino } from 'pino';

// require(), not `import`: importing a CommonJS package from ESM makes node lex its source (and
// every file it re-exports) for named exports, a cost paid at every daemon start for nothing.
const { pino } = createRequire(import.meta.url)('pino') as { pino: typeof Pino };

export type Logger = Pino.Logger;
export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
export const LOG_LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export function createLogger(level: LogLevel = 'info', destination: NodeJS.WritableStream = process.stdout): Logger {
  return pino({ level, base: { name: 'kheadersd' }, timestamp: pino.stdTimeFunctions.isoTime }, destination as Pino.DestinationStream);
}
