/**
 * pino JSON logs on stdout. One logger per process; modules take a `Logger` so tests can pass
 * a silent one (`createLogger('silent')`).
 */
import { pino } from 'pino';

export type Logger = pino.Logger;
export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
export const LOG_LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export function createLogger(level: LogLevel = 'info', destination: NodeJS.WritableStream = process.stdout): Logger {
  return pino({ level, base: { name: 'kheadersd' }, timestamp: pino.stdTimeFunctions.isoTime }, destination as pino.DestinationStream);
}
