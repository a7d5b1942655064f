/**
 * The one table of errors: every code has an exit status and an HTTP status, HTTP answers
 * through it, and a worker thread's errno becomes a code (a full disk exits 5, not 1).
 */
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { ERRORS, EXIT, KheadersError, diskFullErrno, errnoOf, httpAnswer, isErrorCode, type ErrorCode } from '../src/errors.js';
import { errnoFor } from '../src/serve/fuse/errno.js';
import { within } from '../src/serve/fuse/within.js';
import { generateHeaderInWorker } from '../src/store/vmlinux-h.js';
import { BtfBuilder } from './helpers/btf-builder.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'kheaders-errors-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

test('every code has an exit status of its class and an HTTP error status', () => {
  const statuses = new Set<number>(Object.values(EXIT));
  for (const [code, kind] of Object.entries(ERRORS)) {
    assert.ok(statuses.has(kind.exit) && Number(kind.exit) !== EXIT.ok, `${code}: exit ${kind.exit}`);
    assert.ok(kind.http >= 400 && kind.http < 600, `${code}: HTTP ${kind.http}`);
    assert.ok(kind.what.length > 0, `${code} says what it means`);
  }
  const exits: Array<[ErrorCode, number]> = [
    ['E_USAGE', 2],
    ['E_ARCHIVE_NOT_FOUND', 3],
    ['E_ARCHIVE_CORRUPT', 4],
    ['E_NO_SPACE', 5],
    ['E_NOT_FOUND', 6],
    ['E_INTERNAL', 1],
  ];
  for (const [code, exit] of exits) assert.equal(new KheadersError(code, 'x').exitCode, exit, code);
});

test('the wire codes are codes', () => {
  for (const code of ['E_BAD_PATH', 'E_UNAUTHORIZED', 'E_RANGE', 'E_BAD_REQUEST', 'E_NOT_FOUND']) assert.ok(isErrorCode(code), code);
  assert.equal(isErrorCode('ENOSPC'), false);
  assert.equal(isErrorCode('toString'), false, 'only own keys of the table');
  assert.equal(ERRORS.E_BAD_PATH.http, 400);
  assert.equal(ERRORS.E_UNAUTHORIZED.http, 401);
  assert.equal(ERRORS.E_RANGE.http, 416);
});

test('httpAnswer: the status from the table; a message only when it is about the request', () => {
  assert.deepEqual(httpAnswer(new KheadersError('E_NOT_FOUND', 'no cached entry for release "x"')), {
    status: 404,
    error: { code: 'E_NOT_FOUND', message: 'no cached entry for release "x"' },
  });
  const damaged = httpAnswer(new KheadersError('E_ENTRY_DAMAGED', 'include/a.h in entry 1234 does not match its digest'));
  assert.equal(damaged.status, 500);
  assert.equal(damaged.error.message, 'include/a.h in entry 1234 does not match its digest');
  // A host's paths stay in the log.
  const full = httpAnswer(new KheadersError('E_NO_SPACE', 'the cache filesystem /data/secret is full'));
  assert.equal(full.status, 507);
  assert.equal(full.error.code, 'E_NO_SPACE');
  assert.doesNotMatch(full.error.message, /secret/);
  const bug = httpAnswer(new TypeError('cannot read properties of undefined (reading /etc/x)'));
  assert.equal(bug.status, 500);
  assert.equal(bug.error.code, 'E_INTERNAL');
  assert.doesNotMatch(bug.error.message, /etc/);
});

test('diskFullErrno: a system error or an E_NO_SPACE that carries its errno; errnoOf is never a code', () => {
  assert.equal(diskFullErrno(Object.assign(new Error('x'), { code: 'ENOSPC' })), 'ENOSPC');
  assert.equal(diskFullErrno(Object.assign(new Error('x'), { code: 'EDQUOT' })), 'EDQUOT');
  assert.equal(diskFullErrno(Object.assign(new Error('x'), { code: 'EIO' })), undefined);
  assert.equal(diskFullErrno(new KheadersError('E_NO_SPACE', 'x', { errno: 'ENOSPC' })), 'ENOSPC');
  assert.equal(diskFullErrno(new KheadersError('E_IO', 'x', { errno: 'ENOSPC' })), undefined);
  assert.equal(errnoOf(new KheadersError('E_IO', 'x')), undefined);
});

function smallBtf(): string {
  const b = new BtfBuilder();
  b.struct('task_struct', 4, [{ name: 'pid', type: b.int('int', 4, { signed: true }), bitOffset: 0 }]);
  const file = path.join(tmp, 'small.btf');
  writeFileSync(file, b.build());
  return file;
}

test('the vmlinux.h worker: a full disk is E_NO_SPACE (exit 5) keeping its errno', async (t) => {
  // /dev/full answers every write with ENOSPC: a real full disk without filling one.
  if (!existsSync('/dev/full')) return t.skip('no /dev/full on this machine');
  const err = await generateHeaderInWorker({ btf: smallBtf(), outFile: '/dev/full' }, 'vmlinux.h for the test').then(
    () => assert.fail('writing to /dev/full succeeded'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof KheadersError, String(err));
  assert.equal(err.code, 'E_NO_SPACE');
  assert.equal(err.exitCode, EXIT.environment);
  assert.equal(err.details.errno, 'ENOSPC');
  assert.equal(diskFullErrno(err), 'ENOSPC');
});

test('the vmlinux.h worker: bad BTF stays E_BTF, a missing directory is an errno mapped, not cast', async () => {
  const junk = path.join(tmp, 'junk.btf');
  writeFileSync(junk, 'not btf');
  await assert.rejects(generateHeaderInWorker({ btf: junk, outFile: path.join(tmp, 'out.h') }, 'junk'), (e: unknown) => e instanceof KheadersError && e.code === 'E_BTF');
  await assert.rejects(
    generateHeaderInWorker({ btf: smallBtf(), outFile: path.join(tmp, 'no-such-dir', 'out.h') }, 'nowhere'),
    (e: unknown) => e instanceof KheadersError && isErrorCode(e.code) && e.details.errno === 'ENOENT',
  );
});

test('errnoFor: what a failure reaches a reader of either FUSE backend as', () => {
  const E = os.constants.errno;
  assert.equal(errnoFor(new KheadersError('E_NOT_FOUND', 'x', { errno: 'EISDIR' })), E.EISDIR);
  assert.equal(errnoFor(new KheadersError('E_NOT_FOUND', 'x')), E.ENOENT);
  assert.equal(errnoFor(new KheadersError('E_ENTRY_DAMAGED', 'x')), E.EIO);
  assert.equal(errnoFor(new KheadersError('E_NO_SPACE', 'x', { errno: 'ENOSPC' })), E.ENOSPC);
  assert.equal(errnoFor(new KheadersError('E_IO', 'x', { errno: 'ENOTANERRNO' })), E.EIO);
  assert.equal(errnoFor(Object.assign(new Error('x'), { code: 'EACCES' })), E.EACCES);
  assert.equal(errnoFor(new TypeError('a bug')), E.EIO);
});

test('within: the value in time, else a rejection naming what did not happen; no timer left behind', async () => {
  assert.equal(await within(Promise.resolve(7), 1000, 'seven'), 7);
  await assert.rejects(within(new Promise(() => {}), 20, 'the kernel did not start the FUSE session'), /the kernel did not start the FUSE session within 20 ms/);
});
