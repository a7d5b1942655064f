/**
 * One reader of the swap-storm test (a child process, as a compiler is): until `stopFile`
 * exists, open each path, fstat it, read it to EOF, close it, and check that what it read is
 * one whole version of the file (its sha256 is one of those given) with the size fstat gave.
 * Prints one JSON line: reads, wrong (bytes of no version, or a size that does not match the
 * bytes), and errors by code (ESTALE, EIO, ...).
 *
 *   node storm-reader.js STOP_FILE PATH=SHA256,SHA256 [PATH=...]
 */
import { createHash } from 'node:crypto';
import { closeSync, existsSync, fstatSync, openSync, readSync } from 'node:fs';

const [stopFile, ...specs] = process.argv.slice(2);
const files = specs.map((s) => {
  const eq = s.lastIndexOf('=');
  return { path: s.slice(0, eq), digests: new Set(s.slice(eq + 1).split(',')) };
});
const result = { reads: 0, wrong: 0, errors: {} as Record<string, number>, examples: [] as string[] };
const buf = Buffer.alloc(1 << 20);

while (!existsSync(stopFile!)) {
  for (const f of files) {
    let fd: number | undefined;
    try {
      fd = openSync(f.path, 'r');
      const size = fstatSync(fd).size;
      const hash = createHash('sha256');
      let got = 0;
      for (;;) {
        const n = readSync(fd, buf, 0, buf.length, got);
        if (n === 0) break;
        hash.update(buf.subarray(0, n));
        got += n;
      }
      result.reads++;
      const digest = hash.digest('hex');
      if (!f.digests.has(digest) || got !== size) {
        result.wrong++;
        if (result.examples.length < 5) result.examples.push(`${f.path}: ${got} bytes read, fstat said ${size}, sha256 ${digest.slice(0, 12)}`);
      }
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? String(err);
      result.errors[code] = (result.errors[code] ?? 0) + 1;
    } finally {
      if (fd !== undefined) closeSync(fd);
    }
  }
}
process.stdout.write(JSON.stringify(result) + '\n');
