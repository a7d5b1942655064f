/**
 * The default decoder writes the pack itself (an `xz -dc` child whose stdout is the staged pack)
 * while ingest follows the growing file: the reader must see every byte in order, however the
 * writer is paced and however its exit falls against a read; the file must stop at the size
 * limit whoever is reading (the child's RLIMIT_FSIZE, under each POSIX shell at hand); and
 * xz's failures must keep their meaning (corrupt, size limit, full disk).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { appendFile, mkdir, open, readFile, stat, symlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { KheadersError } from '../src/errors.js';
import { findShell, findXzBinary, startXzIntoFile } from '../src/store/decompress.js';
import { followFile, type FileWriter } from '../src/store/follow-file.js';
import { FIXTURE_ARCHIVE, fixtureMissing, randomBytes, sha256, tempDir, xz } from './helpers/archives.js';
import { mountTmpfs } from './helpers/tmpfs.js';

/** A writer the test drives by hand: append, then (maybe) declare the exit. */
function handWriter(): FileWriter & { exit(): void } {
  let exited = false;
  let release: () => void = () => {};
  const exit = new Promise<void>((resolve) => (release = resolve));
  return {
    get exited() {
      return exited;
    },
    whenExited: () => exit,
    exit: () => {
      exited = true;
      release();
    },
  };
}

async function readFollowing(file: string, writer: FileWriter, chunkBytes: number): Promise<{ bytes: Buffer; reads: number }> {
  const fh = await open(file, 'r');
  const parts: Buffer[] = [];
  try {
    await followFile(fh, writer, (chunk) => (parts.push(Buffer.from(chunk)), true), { chunkBytes, waitMs: 1 });
  } finally {
    await fh.close();
  }
  return { bytes: Buffer.concat(parts), reads: parts.length };
}

test('followFile reads a file a slow process writes, every byte in order, and ends at its exit', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'growing');
  const out = await open(file, 'w+');
  // 40 pieces of 3,000 bytes, 5 ms apart: the reader catches up and waits again and again.
  const child = spawn('sh', ['-c', 'i=0; while [ $i -lt 40 ]; do head -c 3000 /dev/urandom; sleep 0.005; i=$((i+1)); done'], { stdio: ['ignore', out.fd, 'inherit'] });
  let exited = false;
  const exit = new Promise<void>((resolve) => child.on('exit', () => ((exited = true), resolve())));
  const writer: FileWriter = { get exited() { return exited; }, whenExited: () => exit };
  const parts: Buffer[] = [];
  const total = await followFile(out, writer, (chunk) => (parts.push(Buffer.from(chunk)), true), { chunkBytes: 64 * 1024, waitMs: 1 });
  await out.close();
  const written = await readFile(file);
  assert.equal(total, 120_000);
  assert.equal(sha256(Buffer.concat(parts)), sha256(written), 'the bytes followed are the bytes in the file');
  assert.ok(parts.length > 5, `the reader caught up with the writer and waited (${parts.length} reads)`);
});

test('followFile misses nothing written just before the writer exits, nor a read-sized tail', async (t) => {
  const dir = await tempDir(t);
  for (let round = 0; round < 200; round++) {
    const file = path.join(dir, `f${round}`);
    await appendFile(file, '');
    const writer = handWriter();
    const expected = randomBytes(4096 * (1 + (round % 3)) + (round % 7), round);
    const reading = readFollowing(file, writer, 4096);
    // Write in pieces, yielding so reads interleave; the last piece and the exit land together.
    for (let at = 0; at < expected.length; at += 1500) {
      await appendFile(file, expected.subarray(at, at + 1500));
      if (at + 1500 >= expected.length) writer.exit();
      else await new Promise((r) => setImmediate(r));
    }
    const { bytes } = await reading;
    assert.equal(bytes.length, expected.length, `round ${round}: read ${bytes.length} of ${expected.length} bytes`);
    assert.ok(bytes.equals(expected), `round ${round}: the bytes differ`);
  }
});

test('followFile reads once more after a read that was in flight when the writer wrote its last bytes and exited', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'f');
  const head = randomBytes(3000, 1);
  const tail = randomBytes(500, 2);
  await appendFile(file, head);
  const writer = handWriter();
  const fh = await open(file, 'r');
  let reads = 0;
  // The second read finds nothing new; before it returns, the writer appends its last bytes and
  // exits. A reader that judged "finished" by the exit seen after that read would stop short.
  const racing = {
    read: async (buffer: Buffer, offset: number, length: number, position: number) => {
      const r = await fh.read(buffer, offset, length, position);
      if (++reads === 2) {
        await appendFile(file, tail);
        writer.exit();
      }
      return r;
    },
  } as unknown as FileHandle;
  const parts: Buffer[] = [];
  await followFile(racing, writer, (chunk) => (parts.push(Buffer.from(chunk)), true), { chunkBytes: 64 * 1024, waitMs: 1 });
  await fh.close();
  assert.ok(Buffer.concat(parts).equals(Buffer.concat([head, tail])), `read ${Buffer.concat(parts).length} of ${head.length + tail.length} bytes`);
});

test('followFile stops when the reader says so', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'f');
  await appendFile(file, randomBytes(10_000, 1));
  const writer = handWriter(); // never exits: only the reader's "stop" can end this
  const fh = await open(file, 'r');
  let calls = 0;
  const read = await followFile(fh, writer, () => ++calls < 2, { chunkBytes: 1000 });
  await fh.close();
  assert.equal(calls, 2);
  assert.equal(read, 2000);
});

/** The POSIX shells here that the daemon may meet: dash (Debian's sh), mksh (Android's), bash as sh. */
async function shells(): Promise<Array<{ name: string; file?: string; skip?: string }>> {
  const out: Array<{ name: string; file?: string; skip?: string }> = [{ name: 'the default /bin/sh' }];
  for (const name of ['mksh', 'bash']) {
    const found = (process.env.PATH ?? '').split(':').map((d) => path.join(d, name));
    let file: string | undefined;
    for (const f of found) if (await stat(f).then(() => true, () => false)) file ??= f;
    out.push(file ? { name, file } : { name, skip: `no ${name} on PATH` });
  }
  return out;
}

test('a bomb nobody reads stops at the size limit on disk, under every shell at hand (xz under RLIMIT_FSIZE)', async (t) => {
  const xzBin = await findXzBinary();
  if (!xzBin) return t.skip('no xz binary');
  const dir = await tempDir(t);
  const bomb = xz(Buffer.alloc(64 * 1024 * 1024), 0); // 64 MiB of zeros: ~10 KB of xz
  for (const shell of await shells()) {
    await t.test(shell.name, async (st) => {
      if (shell.skip) return st.skip(shell.skip);
      // Bash named `bash` counts `ulimit -f` in KiB; named sh (the only way the daemon runs a
      // shell) it counts 512-byte blocks, as dash and mksh do.
      let shellFile = shell.file;
      if (shell.name === 'bash' && shell.file) {
        shellFile = path.join(dir, 'bash-as', 'sh');
        await mkdir(path.dirname(shellFile), { recursive: true });
        await symlink(shell.file, shellFile);
      }
      for (const maxBytes of [1024 * 1024, 1024 * 1024 + 100]) {
        const pack = await open(path.join(dir, `pack-${shell.name.replace(/\W/g, '')}-${maxBytes}`), 'w+');
        const decoder = startXzIntoFile(bomb, xzBin, { file: pack, maxBytes }, shellFile ? { shell: shellFile } : {});
        const failure = await decoder.done.then(() => undefined, (err: unknown) => err);
        const size = (await pack.stat()).size;
        await pack.close();
        assert.ok(failure instanceof KheadersError, `${shell.name}: xz decoded the whole bomb (${String(failure)}), ${size} bytes on disk`);
        assert.equal(failure.code, 'E_LIMIT', failure.message);
        assert.match(failure.message, new RegExp(`expands past the limit of ${maxBytes} bytes \\(--max-total-bytes\\)`));
        assert.ok(size <= Math.ceil(maxBytes / 512) * 512, `${shell.name}: ${size} bytes on disk, over the ${maxBytes}-byte limit`);
        assert.ok(size >= maxBytes - 512, `${shell.name}: xz stopped at ${size} bytes, well short of the limit`);
      }
    });
  }
});

test('xzcat alone (no xz on PATH) decodes into the file as xz -dc does', async (t) => {
  const missing = fixtureMissing();
  if (missing) return t.skip(missing);
  const real = await findXzBinary();
  if (!real || path.basename(real.file) !== 'xz') return t.skip('no xz binary to make an xzcat of');
  const dir = await tempDir(t);
  const bin = path.join(dir, 'bin');
  await mkdir(bin);
  await symlink(real.file, path.join(bin, 'xzcat')); // xz-utils' xzcat is xz under that name
  const xzcat = await findXzBinary(bin);
  assert.deepEqual(xzcat, { file: path.join(bin, 'xzcat'), args: [] });
  const input = await readFile(FIXTURE_ARCHIVE);
  const pack = await open(path.join(dir, 'pack'), 'w+');
  const decoder = startXzIntoFile(input, xzcat, { file: pack, maxBytes: 1024 ** 3 });
  await decoder.done;
  assert.ok(decoder.exited);
  await pack.close();
  const viaXz = await new Promise<Buffer>((resolve, reject) => {
    const c = spawn(real.file, ['-dc', FIXTURE_ARCHIVE], { stdio: ['ignore', 'pipe', 'inherit'] });
    const parts: Buffer[] = [];
    c.stdout.on('data', (b: Buffer) => parts.push(b));
    c.on('error', reject).on('close', () => resolve(Buffer.concat(parts)));
  });
  assert.equal(sha256(await readFile(path.join(dir, 'pack'))), sha256(viaXz));
});

test('the shell that bounds xz is the first one that exists: an Android device has /system/bin/sh and no /bin', async (t) => {
  const dir = await tempDir(t);
  const androidSh = path.join(dir, 'system/bin/sh');
  await mkdir(path.dirname(androidSh), { recursive: true });
  await symlink('/bin/sh', androidSh);
  assert.equal(await findShell([path.join(dir, 'bin/sh'), androidSh]), androidSh);
  assert.equal(await findShell([path.join(dir, 'bin/sh')]), undefined);
  assert.equal(await findShell(), '/bin/sh'); // this machine
});

test('xz failing to write the pack on a full filesystem is ENOSPC (named by the ingest step), not a corrupt archive', async (t) => {
  const xzBin = await findXzBinary();
  if (!xzBin) return t.skip('no xz binary');
  const mounted = await mountTmpfs(t, '1m');
  if ('skip' in mounted) return t.skip(mounted.skip);
  const pack = await open(path.join(mounted.dir, 'pack'), 'w+');
  const decoder = startXzIntoFile(xz(randomBytes(4 * 1024 * 1024, 7), 0), xzBin, { file: pack, maxBytes: 1024 ** 3 });
  const failure = await decoder.done.then(() => undefined, (err: unknown) => err);
  await pack.close();
  assert.ok(failure instanceof Error && !(failure instanceof KheadersError), `not an errno error: ${String(failure)}`);
  assert.equal((failure as NodeJS.ErrnoException).code, 'ENOSPC', failure.message);
  assert.match(failure.message, /No space left on device/);
});

test('a truncated archive is E_ARCHIVE_CORRUPT with xz\'s own words', async (t) => {
  const xzBin = await findXzBinary();
  if (!xzBin) return t.skip('no xz binary');
  const dir = await tempDir(t);
  const whole = xz(randomBytes(256 * 1024, 3), 6);
  const pack = await open(path.join(dir, 'pack'), 'w+');
  const decoder = startXzIntoFile(whole.subarray(0, whole.length - 100), xzBin, { file: pack, maxBytes: 1024 ** 3 });
  const failure = await decoder.done.then(() => undefined, (err: unknown) => err);
  await pack.close();
  assert.ok(failure instanceof KheadersError, String(failure));
  assert.equal(failure.code, 'E_ARCHIVE_CORRUPT');
  assert.match(failure.message, /Unexpected end of input/);
});

test('XZ_OPT in the environment cannot end the pack early nor lift the memory limit (a user\'s xz options are for their own use of xz)', async (t) => {
  const xzBin = await findXzBinary();
  if (!xzBin) return t.skip('no xz binary');
  const dir = await tempDir(t);
  const saved = process.env.XZ_OPT;
  t.after(() => {
    if (saved === undefined) delete process.env.XZ_OPT;
    else process.env.XZ_OPT = saved;
  });
  const decode = async (name: string, archive: Buffer): Promise<{ failure: unknown; bytes: Buffer }> => {
    const file = path.join(dir, name);
    const pack = await open(file, 'w+');
    const decoder = startXzIntoFile(archive, xzBin, { file: pack, maxBytes: 1024 ** 3 });
    const failure = await decoder.done.then(() => undefined, (err: unknown) => err);
    await pack.close();
    return { failure, bytes: await readFile(file) };
  };
  // Two streams: --single-stream would stop after the first and exit 0, a pack missing its tail.
  const first = randomBytes(64 * 1024, 11);
  const second = randomBytes(64 * 1024, 12);
  process.env.XZ_OPT = '--single-stream';
  const twoStreams = await decode('two-streams', Buffer.concat([xz(first, 0), xz(second, 0)]));
  assert.equal(twoStreams.failure, undefined, String(twoStreams.failure));
  assert.equal(sha256(twoStreams.bytes), sha256(Buffer.concat([first, second])), `the pack holds ${twoStreams.bytes.length} of 131072 bytes`);
  // A dictionary past the decoder's memory limit stays E_LIMIT whatever XZ_OPT asks for.
  process.env.XZ_OPT = '--memlimit-decompress=max';
  const { execFileSync } = await import('node:child_process');
  const bigDictionary = execFileSync('xz', ['--format=xz', '--check=crc64', '--lzma2=dict=256MiB', '-T1', '-c'], { input: first });
  const dict = await decode('big-dictionary', bigDictionary);
  assert.ok(dict.failure instanceof KheadersError, `decoded with a 256 MiB dictionary: ${String(dict.failure)}`);
  assert.equal(dict.failure.code, 'E_LIMIT', dict.failure.message);
});
