/**
 * The deferred logger (the ingest command's): pino is loaded only when a line is written or the
 * logger is warmed, and what it writes is what createLogger's logger writes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { Writable } from 'node:stream';
import { createDeferredLogger, createLogger, warmLogger, type LogLevel } from '../src/log.js';

function capture(): { stream: Writable; lines: () => Array<Record<string, unknown>> } {
  const chunks: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, done) {
      chunks.push(chunk.toString());
      done();
    },
  });
  return { stream, lines: () => chunks.join('').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>) };
}

test('a deferred logger writes what createLogger writes, at every level, and through child()', () => {
  for (const level of ['debug', 'info', 'warn', 'silent'] as LogLevel[]) {
    const a = capture();
    const b = capture();
    for (const [log, out] of [[createLogger(level, a.stream), a], [createDeferredLogger(level, b.stream), b]] as const) {
      assert.equal(log.level, level);
      log.trace('t');
      log.debug({ n: 1 }, 'd');
      log.info({ n: 2 }, 'i');
      log.warn('w');
      log.child({ component: 'x' }).error('e');
      void out;
    }
    const strip = (l: Record<string, unknown>): Record<string, unknown> => ({ ...l, time: 0 });
    assert.deepEqual(b.lines().map(strip), a.lines().map(strip), level);
  }
  warmLogger(createLogger('silent')); // a logger that is not deferred: nothing to do
});

test('a deferred logger loads pino only for a line at or above its level, or when warmed', () => {
  const probe = (calls: string): boolean => {
    const script = `
      const { createDeferredLogger, warmLogger } = await import(${JSON.stringify(new URL('../src/log.js', import.meta.url).href)});
      const { createRequire } = await import('node:module');
      const log = createDeferredLogger('info', process.stderr);
      ${calls}
      const loaded = Object.keys(createRequire(import.meta.url).cache).some((f) => /[\\\\/]pino[\\\\/]pino\\.js$/.test(f));
      process.stdout.write(String(loaded));`;
    return execFileSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }) === 'true';
  };
  assert.equal(probe(`log.debug('below'); log.trace('below'); void log.level;`), false, 'lines below the level and the level itself: pino not loaded');
  assert.equal(probe(`log.info('at')`), true, 'a line at the level loads it');
  assert.equal(probe(`warmLogger(log)`), true, 'warmLogger loads it');
});
