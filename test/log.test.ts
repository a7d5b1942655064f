/**
 * The deferred logger (the ingest command's): pino is loaded only when a line is written or the
 * logger is warmed, and what it writes is what createLogger's logger writes. The held logger
 * (serve's start): its lines wait for releaseLogger, an error line or a stop, and are then written
 * as createLogger's logger would have written them, with the time they were logged.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { Writable } from 'node:stream';
import { createDeferredLogger, createHeldLogger, createLogger, releaseLogger, warmLogger, type LogLevel } from '../src/log.js';

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

/**
 * Run `calls` on a fresh logger from `factory` (at info, writing to stderr) in a node of its own:
 * whether pino was loaded by then, and what the logger wrote.
 */
function probePino(factory: 'createDeferredLogger' | 'createHeldLogger', calls: string): { loaded: boolean; out: string } {
  const script = `
    const { ${factory}, warmLogger, releaseLogger } = await import(${JSON.stringify(new URL('../src/log.js', import.meta.url).href)});
    const { createRequire } = await import('node:module');
    const log = ${factory}('info', process.stderr);
    ${calls}
    const loaded = Object.keys(createRequire(import.meta.url).cache).some((f) => /[\\\\/]pino[\\\\/]pino\\.js$/.test(f));
    process.stdout.write(String(loaded));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
  return { loaded: r.stdout === 'true', out: r.stderr };
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
  const probe = (calls: string): boolean => probePino('createDeferredLogger', calls).loaded;
  assert.equal(probe(`log.debug('below'); log.trace('below'); void log.level;`), false, 'lines below the level and the level itself: pino not loaded');
  assert.equal(probe(`log.info('at')`), true, 'a line at the level loads it');
  assert.equal(probe(`warmLogger(log)`), true, 'warmLogger loads it');
  assert.equal(probe(`warmLogger(log, 'debug')`), false, 'warmed for lines below its level: not loaded');
  assert.equal(probe(`warmLogger(log, 'info')`), true, 'warmed for lines at its level: loaded');
});

test('a held logger writes nothing until released, then what createLogger writes, in order, each line with the time it was logged', async () => {
  for (const level of ['debug', 'info', 'warn', 'silent'] as LogLevel[]) {
    const a = capture();
    const b = capture();
    const direct = createLogger(level, a.stream);
    const held = createHeldLogger(level, b.stream);
    for (const log of [direct, held]) {
      assert.equal(log.level, level);
      log.trace('t');
      log.debug({ n: 1 }, 'd');
      const http = log.child({ component: 'http' });
      log.info({ n: 2 }, 'i %s', 'formatted');
      http.warn({ url: '/x' }, 'w');
      http.child({ request: 7 }).info('nested');
      log.warn('w2');
    }
    const loggedBy = Date.now();
    await new Promise((r) => setTimeout(r, 30));
    assert.deepEqual(b.lines(), [], `${level}: nothing written before the release`);
    releaseLogger(held);
    held.info('after');
    direct.info('after');
    const strip = (l: Record<string, unknown>): Record<string, unknown> => ({ ...l, time: 0 });
    assert.deepEqual(b.lines().map(strip), a.lines().map(strip), level);
    const times = b.lines().slice(0, -1).map((l) => Date.parse(l.time as string));
    assert.ok(times.every((t) => t <= loggedBy), `${level}: held lines keep the time they were logged (${times.join(', ')} <= ${loggedBy})`);
  }
  releaseLogger(createLogger('silent')); // a logger that is not held: nothing to do
});

test('an error line on a held logger is written at once, after every line held before it', () => {
  const out = capture();
  const log = createHeldLogger('info', out.stream);
  log.info('first');
  log.child({ component: 'store' }).warn('second');
  assert.deepEqual(out.lines(), []);
  log.error({ code: 'E_X' }, 'third');
  assert.deepEqual(out.lines().map((l) => [l.msg, l.component, l.level]), [['first', undefined, 30], ['second', 'store', 40], ['third', undefined, 50]]);
  log.info('fourth'); // released: at once
  assert.equal(out.lines().at(-1)!.msg, 'fourth');
});

test('a held logger loads pino only when released, or for an error line', () => {
  const probe = (calls: string): { loaded: boolean; out: string } => probePino('createHeldLogger', calls);
  const held = probe(`log.info('held'); log.warn('held too'); log.child({ c: 1 }).info('child'); void log.level;`);
  assert.deepEqual(held, { loaded: false, out: '' }, 'lines at and above the level (below error), children, the level: held, pino not loaded');
  assert.equal(probe(`log.info('x'); releaseLogger(log)`).loaded, true, 'released: loaded');
  const failed = probe(`log.info('x'); log.error('failed')`);
  assert.equal(failed.loaded, true, 'an error line loads it');
  assert.deepEqual(failed.out.split('\n').filter(Boolean).map((l) => (JSON.parse(l) as { msg: string }).msg), ['x', 'failed']);
});
