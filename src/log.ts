/**
 * pino JSON logs on stdout. One logger per process; modules take a `Logger` so tests can pass
 * a silent one (`createLogger('silent')`).
 */
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
 * use, since loading it costs ~40 ms of CPU that a deferred logger moves off an ingest's start
 * (node:module with it: ~3 ms more).
 */
function pinoModule(): typeof Pino {
  return (loaded ??= (process.getBuiltinModule('node:module').createRequire(import.meta.url)('pino') as { pino: typeof Pino }).pino);
}

/** Set while held lines are written: each keeps the time it was logged at, not the time it is written. */
let heldLineTime: number | undefined;
/** pino's isoTime, but for a held line its own time. */
const isoTime = (): string => `,"time":"${new Date(heldLineTime ?? Date.now()).toISOString()}"`;

export function createLogger(level: LogLevel = 'info', destination: NodeJS.WritableStream = process.stdout): Logger {
  const pino = pinoModule();
  return pino({ level, base: { name: 'kheadersd' }, timestamp: isoTime }, destination as Pino.DestinationStream);
}

const WARM = Symbol('warm');
const RELEASE = Symbol('release');
const nothing = (): void => {};
/** The names of the line-writing methods (a level's name but `silent`). */
const isLineMethod = (prop: string | symbol): prop is Exclude<LogLevel, 'silent'> => typeof prop === 'string' && prop !== 'silent' && Object.hasOwn(LEVEL_VALUES, prop);

/**
 * The logger createLogger would make, made (and pino loaded) only when a line at or above
 * `level` is logged, or when warmLogger is called: a one-shot command whose start logs nothing
 * (ingest: xz is spawned before anything is logged) does not wait for pino to load first.
 * Anything else asked of it (child, bindings, ...) makes the real logger and is answered by it.
 */
export function createDeferredLogger(level: LogLevel = 'info', destination: NodeJS.WritableStream = process.stdout): Logger {
  return lazyLogger(level, destination, false);
}

/**
 * A logger that keeps its lines (and its children's) until releaseLogger, then writes them through
 * pino, in order, each with the time it was logged; afterwards it writes at once. For serve's
 * start: it logs a few lines before it is ready, and loading pino for them (~25 ms of CPU, a
 * tenth of the start) would only delay the moment it can answer. An error or fatal line is
 * written at once, with everything held before it (it may be the last line before an exit), and
 * anything else asked of it (bindings, fastify's use of it, ...) releases it too.
 */
export function createHeldLogger(level: LogLevel = 'info', destination: NodeJS.WritableStream = process.stdout): Logger {
  return lazyLogger(level, destination, true);
}

/** Write a held logger's lines now, and every later one at once (nothing for any other logger). */
export function releaseLogger(log: Logger | undefined): void {
  (log as unknown as Record<symbol, (() => void) | undefined> | undefined)?.[RELEASE]?.();
}

interface HeldLine {
  /** The child bindings, outermost first, of the logger it was logged on. */
  readonly bindings: ReadonlyArray<Record<string, unknown>>;
  readonly method: Exclude<LogLevel, 'silent'>;
  readonly args: unknown[];
  readonly time: number;
}

function lazyLogger(level: LogLevel, destination: NodeJS.WritableStream, hold: boolean): Logger {
  let real: Logger | undefined;
  const threshold = LEVEL_VALUES[level];
  const held: HeldLine[] = [];
  let holding = hold;
  const make = (): Logger => {
    if (real) return real;
    real = createLogger(level, destination);
    holding = false;
    for (const line of held.splice(0)) {
      const target = line.bindings.reduce((log: Logger, b) => log.child(b), real);
      heldLineTime = line.time;
      try {
        target[line.method](...(line.args as [unknown]));
      } finally {
        heldLineTime = undefined;
      }
    }
    return real;
  };
  const view = (bindings: ReadonlyArray<Record<string, unknown>>): Logger => {
    // The real logger this view stands for, once there is one (a child made once, then reused).
    let mine: Logger | undefined;
    const resolved = (): Logger => (mine ??= bindings.reduce((log: Logger, b) => log.child(b), make()));
    return new Proxy({} as Logger, {
      get(_target, prop) {
        if (prop === WARM) {
          return (at?: Exclude<LogLevel, 'silent'>): void => {
            if (at === undefined || LEVEL_VALUES[at] >= threshold) make();
          };
        }
        if (prop === RELEASE) return make;
        if (real === undefined) {
          if (prop === 'level') return level;
          // A line below the level writes nothing: no need for pino to say so.
          if (isLineMethod(prop) && LEVEL_VALUES[prop] < threshold) return nothing;
          if (holding && isLineMethod(prop) && LEVEL_VALUES[prop] < LEVEL_VALUES.error) {
            return (...args: unknown[]): void => void held.push({ bindings, method: prop, args, time: Date.now() });
          }
          if (holding && prop === 'child') {
            return (b: Record<string, unknown>, options?: unknown): Logger => (options === undefined ? view([...bindings, b]) : resolved().child(b, options as Pino.ChildLoggerOptions));
          }
        }
        const logger = resolved();
        const value: unknown = Reflect.get(logger, prop, logger);
        return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(logger) : value;
      },
      set(_target, prop, value) {
        return Reflect.set(resolved(), prop, value);
      },
      has(_target, prop) {
        return Reflect.has(resolved(), prop);
      },
    });
  };
  return view([]);
}

/**
 * Make a deferred logger's pino now (nothing for any other logger): for a moment when the process
 * waits anyway (ingest: while xz decodes on another core), so that the line logged at the end
 * does not wait for pino to load. `forLevel`: only if a line at that level would be written (the
 * lines the caller will log): a logger that drops them all would load pino for nothing.
 */
export function warmLogger(log: Logger | undefined, forLevel?: Exclude<LogLevel, 'silent'>): void {
  (log as unknown as Record<symbol, ((at?: Exclude<LogLevel, 'silent'>) => void) | undefined> | undefined)?.[WARM]?.(forLevel);
}
