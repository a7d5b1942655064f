/**
 * The one resolver: what `current`, a release, a digest (or prefix) and an id mean, used by
 * `cat`/`export`, HTTP and the FUSE model alike. Pure: manifests in, answers out.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { KheadersError } from '../src/errors.js';
import type { Manifest } from '../src/store/entry.js';
import { Resolver } from '../src/store/resolve.js';

const RUNNING = '6.18.0-running';

function manifest(release: string, digestByte: string, ingestedAt: string): Manifest {
  const digest = digestByte.repeat(64).slice(0, 64);
  return {
    formatVersion: 2,
    id: `${release}~${digest}`,
    release,
    digest,
    kind: 'headers',
    buildId: null,
    source: 'test',
    ingestedAt,
    files: 1,
    dirs: 1,
    symlinks: 0,
    bytes: 1,
    packBytes: 1024,
    archiveBytes: 100,
    btf: null,
  };
}

const old = manifest(RUNNING, 'a', '2024-01-01T00:00:00Z');
const rebuilt = manifest(RUNNING, 'b', '2024-02-01T00:00:00Z');
const other = manifest('5.10.0-other', 'c', '2024-03-01T00:00:00Z');
const sameArchive = manifest('5.10.0-alias', 'c', '2024-01-15T00:00:00Z');

test('current: the pointer, else the newest entry of the running release, else none', () => {
  assert.equal(new Resolver([old, rebuilt, other], old.id, RUNNING).currentId, old.id);
  // No pointer (or one naming nothing cached): the running kernel's newest build.
  assert.equal(new Resolver([old, rebuilt, other], null, RUNNING).currentId, rebuilt.id);
  assert.equal(new Resolver([old, rebuilt, other], 'gone~' + 'f'.repeat(64), RUNNING).currentId, rebuilt.id);
  assert.equal(new Resolver([other], null, RUNNING).currentId, null);
  assert.throws(
    () => new Resolver([other], null, RUNNING).resolve('current'),
    (err: unknown) =>
      err instanceof KheadersError &&
      err.code === 'E_NOT_FOUND' &&
      err.message.includes(`"current" is the running kernel, ${RUNNING}, and no entry for it is cached (cached: 5.10.0-other: name one of them instead of "current")`),
  );
});

test('a release means its current build if it is one, else its newest', () => {
  assert.equal(new Resolver([old, rebuilt], old.id, RUNNING).byRelease(RUNNING)?.id, old.id);
  assert.equal(new Resolver([old, rebuilt], other.id, RUNNING).byRelease(RUNNING)?.id, rebuilt.id);
  assert.equal(new Resolver([old, rebuilt], null, RUNNING).resolve(RUNNING).id, rebuilt.id);
});

test('digests, prefixes and ids', () => {
  const r = new Resolver([old, rebuilt, other, sameArchive], null, RUNNING);
  assert.equal(r.resolve(old.digest).id, old.id);
  assert.equal(r.resolve(old.digest.slice(0, 8)).id, old.id);
  assert.equal(r.resolve(sameArchive.id).id, sameArchive.id);
  // One archive under two release names: one digest, not an ambiguity; the newest is chosen.
  assert.equal(r.resolve(other.digest.slice(0, 10)).id, other.id);
  assert.equal(r.byDigest(other.digest)?.id, other.id);
  assert.equal(new Resolver([old, rebuilt, other, sameArchive], sameArchive.id, RUNNING).byDigest(other.digest)?.id, sameArchive.id, 'the current one wins');
  assert.equal(r.find('abcdefg'), undefined, 'seven hex digits are not a prefix');
  const twins = [manifest('1.0', '12345678' + 'd', '2024-01-01T00:00:00Z'), manifest('2.0', '12345678' + 'e', '2024-01-02T00:00:00Z')];
  assert.throws(() => new Resolver(twins, null, RUNNING).resolve('12345678'), /digest prefix 12345678 is ambiguous \(2 entries\)/);
  assert.throws(() => r.resolve('9.9.9'), /no cached entry matches "9\.9\.9"/);
});

test('the newest-first order does not depend on the order given', () => {
  assert.deepEqual(new Resolver([old, other, rebuilt], null, RUNNING).manifests.map((m) => m.id), [other.id, rebuilt.id, old.id]);
});
