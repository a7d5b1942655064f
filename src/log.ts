/**
 * pino JSON logs on stdout. One logger per process; modules take a `Logger` so tests can pass
 * a silent one (`createLogger('silent')`).
 */
import { createRequire } from 'node:module';
import type { pino as Pino } from 'pino';

export type Logger = Pino.Logger;
export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
export const LOG_LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/** pino's own level numbers: a line is written when its level's is at least the logger's. */
const LEVEL_VALUES: Record<LogLevel, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: Infinity };

let loaded: typeof Pino | undefined;
/**
 * pino, loaded on first use: require(), not `import`, since importing a CommonJS package from
 * ESM makes node lex its source (and every file it re-exports) for named exports; and on first
 * use, since loading it costs ~40 ms of CPU that a deferred logger moves off an ingest's start.
 */
function pinoModule(): typeof Pino {
  return (loaded ??= (createRequire(import.meta.url)('pino') as { pino: typeof Pino }).pino);
}

export function createLogger(level: LogLevel = 'info', destination: NodeJS.WritableStream = process.stdout): Logger {
  const pino = pinoModule();
  return pino({ level, base: { name: 'kheadersd' }, timestamp: pino.stdTimeFunctions.isoTime }, destination as Pino.DestinationStream);
}

const WARM = Symbol('warm');
const nothing = (): void => {};

/**
 * The logger createLogger would make, made (and pino loaded) only when a line at or above
 * `level` is logged, or when warmLogger is called: a one-shot command whose start logs nothing
 * (ingest: xz is spawned before anything is logged) does not wait for pino to load first.
 * Anything else asked of it (child, bindings, ...) makes the real logger and is answered by it.
 */
export function createDeferredLogger(level: LogLevel = 'info', destination: NodeJS.WritableStream = process.stdout): Logger {
  let real: Logger | undefined;
  const make = (): Logger => (real ??= createLogger(level, destination));
  const threshold = LEVEL_VALUES[level];
  return new Proxy({} as Logger, {
    get(_target, prop) {
      if (prop === WARM) return make;
      if (real === undefined) {
        if (prop === 'level') return level;
        // A line below the level writes nothing: no need for pino to say so.
        if (typeof prop === 'string' && prop !== 'silent' && Object.hasOwn(LEVEL_VALUES, prop) && LEVEL_VALUES[prop as LogLevel] < threshold) return nothing;
      }
      const logger = make();
      const value: unknown = Reflect.get(logger, prop, logger);
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(logger) : value;
    },
    set(_target, prop, value) {
      return Reflect.set(make(), prop, value);
    },
    has(_target, prop) {
      return Reflect.has(make(), prop);
    },
  });
}

/**
 * Make a deferred logger's pino now (nothing for any other logger): for a moment when the process
 * waits anyway (ingest: while xz decodes on another core), so that the line logged at the end
 * does not wait for pino to load.
 */
export function warmLogger(log: Logger | undefined): void {
  (log as unknown as Record<symbol, (() => Logger) | undefined> | undefined)?.[WARM]?.();
}
