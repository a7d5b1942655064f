import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { endianness, tmpdir } from 'node:os';
import path from 'node:path';
import { parseBuildId, parseNotes, readLiveBuildId } from '../src/source/notes.js';

const LIVE_NOTES = '/sys/kernel/notes';

/** One note record: three header words, then name and desc each padded to 4 bytes. */
function note(name: string, type: number, desc: Buffer, littleEndian: boolean): Buffer {
  const nameBytes = name === '' ? Buffer.alloc(0) : Buffer.from(`${name}\0`, 'latin1');
  const pad = (b: Buffer): Buffer => Buffer.concat([b, Buffer.alloc((4 - (b.length % 4)) % 4)]);
  const header = Buffer.alloc(12);
  const put = (v: number, off: number): number => (littleEndian ? header.writeUInt32LE(v, off) : header.writeUInt32BE(v, off));
  put(nameBytes.length, 0);
  put(desc.length, 4);
  put(type, 8);
  return Buffer.concat([header, pad(nameBytes), pad(desc)]);
}

const BUILD_ID = Buffer.from('48dc540c8b76393804ca8088dbfa7d42911a9444', 'hex');

test('the live kernel build id, from /sys/kernel/notes', async (t) => {
  if (!existsSync(LIVE_NOTES)) return t.skip(`${LIVE_NOTES} not present on this machine`);
  const id = await readLiveBuildId();
  if (id === null) return t.skip(`${LIVE_NOTES} exists but is unreadable or has no GNU build-id note`);
  assert.match(id, /^([0-9a-f]{2})+$/);
  assert.ok(id.length >= 16, `a build id of ${id.length / 2} bytes is too short`);
  assert.equal(await readLiveBuildId(LIVE_NOTES), id);
});

test('readLiveBuildId returns null for a missing file and for a directory', async () => {
  assert.equal(await readLiveBuildId('/nonexistent/kheadersd/notes'), null);
  const dir = mkdtempSync(path.join(tmpdir(), 'kheadersd-notes-'));
  try {
    assert.equal(await readLiveBuildId(dir), null);
    const file = path.join(dir, 'notes');
    // The live kernel writes its notes in the machine's own byte order.
    writeFileSync(file, note('GNU', 3, BUILD_ID, endianness() === 'LE'));
    assert.equal(await readLiveBuildId(file), BUILD_ID.toString('hex'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the GNU build id is found after other notes, in either byte order', () => {
  for (const le of [true, false]) {
    const notes = Buffer.concat([
      note('Linux', 0x101, Buffer.from([0, 0, 0, 0]), le), // Linux notes come first in /sys/kernel/notes
      note('Xen', 3, Buffer.from('not a build id'), le), // type 3 but not the GNU namespace
      note('GNU', 1, Buffer.from([0, 0, 0, 0, 2, 0, 0, 0, 6, 0, 0, 0, 1, 0, 0, 0]), le), // NT_GNU_ABI_TAG
      note('GNU', 3, BUILD_ID, le),
      note('GNU', 3, Buffer.from('ffff', 'hex'), le), // only the first counts
    ]);
    assert.equal(parseBuildId(notes, le), BUILD_ID.toString('hex'), le ? 'LE' : 'BE');
    assert.deepEqual(
      [...parseNotes(notes, le)].map((n) => n.name),
      ['Linux', 'Xen', 'GNU', 'GNU', 'GNU'],
    );
  }
});

test('the wrong byte order does not find the note', () => {
  assert.equal(parseBuildId(note('GNU', 3, BUILD_ID, false), true), null);
});

test('odd-length names and descriptors are padded to 4 bytes', () => {
  const notes = Buffer.concat([note('ABCDE', 7, Buffer.from([1, 2, 3]), true), note('GNU', 3, Buffer.from([0xab, 0xcd, 0xef]), true)]);
  assert.equal(parseBuildId(notes, true), 'abcdef');
});

test('malformed notes give null, never an exception', () => {
  const good = note('GNU', 3, BUILD_ID, true);
  assert.equal(parseBuildId(Buffer.alloc(0), true), null);
  assert.equal(parseBuildId(Buffer.alloc(11), true), null);
  assert.equal(parseBuildId(Buffer.from([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 3, 0, 0, 0]), true), null, 'namesz past the end');
  const hugeDesc = Buffer.from(good);
  hugeDesc.writeUInt32LE(0xffffffff, 4);
  assert.equal(parseBuildId(hugeDesc, true), null, 'descsz past the end');
  assert.equal(parseBuildId(good.subarray(0, good.length - 1), true), null, 'desc cut short');
  // A broken note before the build id hides it: we cannot know where the next record starts.
  const broken = note('Linux', 1, Buffer.alloc(4), true);
  broken.writeUInt32LE(1000, 4);
  assert.equal(parseBuildId(Buffer.concat([broken, good]), true), null);
  // An empty descriptor is not a build id.
  assert.equal(parseBuildId(note('GNU', 3, Buffer.alloc(0), true), true), null);
  // Every prefix of a valid list, and random bytes, parse without throwing.
  const list = Buffer.concat([note('Linux', 6, Buffer.from('6.1.0\0'), true), good]);
  for (let n = 0; n <= list.length; n++) {
    const id = parseBuildId(list.subarray(0, n), true);
    assert.equal(id, n === list.length ? BUILD_ID.toString('hex') : null);
  }
  let x = 12345;
  for (let i = 0; i < 2000; i++) {
    const junk = Buffer.alloc(12 + (i % 64));
    for (let k = 0; k < junk.length; k++) {
      x = (x * 1103515245 + 12345) >>> 0;
      junk[k] = i % 2 === 0 ? (x >>> 24) : (x >>> 24) & 0x0f; // small values make plausible sizes
    }
    assert.doesNotThrow(() => parseBuildId(junk, i % 4 < 2));
  }
});
