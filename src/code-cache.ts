/**
 * Run a CommonJS file of the shipped bundle with V8's compiled code for it, kept in the cache
 * directory: the daemon's start after every boot then skips parsing the file and compiling the
 * functions a start runs. Node 20 has no compile cache of its own (22's `module.enableCompileCache`
 * is not in 20), so this is V8's code cache through `vm.Script`'s `cachedData`.
 *
 *   <cache>/code/<file>-<sha256 of the file, 16 hex>-<node version>-<arch>-<node build, 8 hex>.v8
 *     8 bytes magic, 32 bytes sha256 of the rest, then V8's data
 *
 * A start that finds none there (the first boot, the first start of a new bundle, every command
 * but serve, which alone keeps its code) takes the code compiled when the bundle was built, in
 * the same form beside it (`<dir of the file>/code/`, shipCompiledCode): only what V8 compiles
 * before running anything, but that is the file's parse, ~16 ms of a first boot and of an
 * ingest here (19 against 2.7 ms for commands.js). It is used only by the node that made it
 * (the name says which), and held to the same rule as the cache directory's.
 *
 * What V8 is given is executable code, so it is held to the cache directory's rule and more:
 * - It is used only from a trusted place: the cache directory and code/ pass cacheDirProblem
 *   (a directory writable by its owner only, owned by this user or root), and the file is a
 *   regular file (not followed through a symlink), owned by this user or root, writable by its
 *   owner only.
 * - It belongs to one exact file: the name holds the file's digest, because V8 checks only the
 *   source's length, its own version and its flags, and would run the code of an older file of
 *   the same length.
 * - It is whole: the digest inside is checked before V8 sees it, because V8 checks no checksum
 *   of its data in a release build, and a torn or damaged file must cost a compile, not a crash.
 * Whatever fails, the file is compiled from its source, as without a cache: what is on disk
 * never stops a start.
 *
 * The file must not use import(): node 20 cannot import from code compiled with a code cache
 * (ERR_VM_DYNAMIC_IMPORT_CALLBACK_MISSING); the bundle turns every import() into require().
 */
import { isAscii } from 'node:buffer';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, constants, fstatSync, lstatSync, openSync, readFileSync, statSync, unlinkSync, type Stats } from 'node:fs';
import { chmod, lstat, mkdir, open, readdir, rename, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { Script } from 'node:vm';
import { cacheDirProblem } from './store/cache-dir.js';

const MAGIC = Buffer.from('KHV8CODE', 'latin1');
const HEAD_BYTES = MAGIC.length + 32;
/** Far above what V8 writes for the bundle (~0.4 MiB): a bigger file is not ours. */
const MAX_CACHE_BYTES = 64 << 20;
export const CODE_DIR = 'code';
/**
 * A temporary file of a save older than this is one a crash left: a save writes and renames it
 * within milliseconds. A younger one may be another process's save under way (another daemon on
 * the same cache volume), which its sweep must not take from under it.
 */
const STALE_TMP_MS = 10 * 60_000;
/** `.<cache file>.<pid>-<random>.tmp` (and `.<pid>.tmp`, as saves before the random suffix named it). */
const TMP_SUFFIX = /\.\d+(?:-[0-9a-f]{12})?\.tmp$/;

/** What became of the cache for one compile. */
export type CodeCacheState =
  | 'used' // V8 took the code kept in the cache directory
  | 'shipped' // none kept there yet: V8 took the code compiled when the bundle was built
  | 'rejected' // V8 refused it (another node, V8 flags that differ): compiled from source
  | 'absent' // none yet for this file and this node, kept or shipped
  | 'untrusted' // not in a trusted place, or not trusted itself: ignored
  | 'damaged' // its digest or magic is wrong: ignored
  | 'off'; // no cache directory was given

export interface RunBundleResult {
  /** The file's `module.exports`. */
  exports: unknown;
  state: CodeCacheState;
  /** The cache file's path (undefined when `off`). */
  cacheFile: string | undefined;
  /** Why the cache was not used, for a log line (undefined when used or absent). */
  why: string | undefined;
  /**
   * Keep the code compiled so far for the next start; call it once the work whose functions the
   * next start should find compiled is done. V8's data is taken synchronously, before this
   * returns its promise: call it before any V8 flag changes, since V8 refuses code made under
   * other flags. Resolves to false when nothing was written because the cache was used (or off).
   * A start that ran with the shipped code keeps its own: it holds the functions the start ran.
   */
  save(): Promise<boolean>;
}

/** Compile and run `file` (CommonJS), with its compiled code from `<cacheDir>/code/`, else the code shipped beside it, when that can be trusted. */
export async function runBundle(file: string, cacheDir: string | undefined): Promise<RunBundleResult> {
  // Synchronous reads, on purpose: this runs once per process, before the command has made any
  // mount, on a file of the installation and files of the cache directory; asynchronous, its
  // seven calls cost a start ~1.5 ms more here (thread-pool round trips; marks, six starts each).
  const source = readFileSync(file);
  const name = cacheFileName(file, source, nodeBuild());
  const cacheFile = cacheDir === undefined ? undefined : path.join(cacheDir, CODE_DIR, name);
  const kept: Found = cacheFile === undefined ? { state: 'off' } : readTrusted(cacheFile);
  const shipped: Found | undefined = kept.data === undefined ? readTrusted(path.join(path.dirname(file), CODE_DIR, name)) : undefined;
  const data = kept.data ?? shipped?.data;
  const script = compile(file, source, data);
  const state: CodeCacheState = data ? (script.cachedDataRejected === true ? 'rejected' : kept.data ? 'used' : 'shipped') : kept.state;
  const module = { exports: {} as unknown, filename: file, id: file, loaded: false };
  const run = script.runInThisContext() as (exports: unknown, require: NodeJS.Require, module: unknown, filename: string, dirname: string) => void;
  run.call(module.exports, module.exports, createRequire(file), module, file, path.dirname(file));
  module.loaded = true;
  const why = state === 'rejected' ? 'V8 refused it (another node or other V8 flags)' : (kept.why ?? shipped?.why);
  /** The save under way: the next waits for it (one exit listener at a time; two writes of the same file at once gain nothing). */
  let saving: Promise<unknown> = Promise.resolve();
  return {
    exports: module.exports,
    state,
    cacheFile,
    why,
    save: () => {
      if (cacheFile === undefined || state === 'used') return Promise.resolve(false);
      const data = script.createCachedData(); // now, whatever the flags are by the time it is written
      const saved = saving.then(() => writeCodeCache(cacheFile, data, path.basename(file, '.js'))).then(() => true);
      saving = saved.catch(() => undefined);
      return saved;
    },
  };
}

/**
 * Compile the bundle `file` as it was built, and keep V8's code for it beside it (in `code/`),
 * where runBundle looks when the cache directory has none: the build's last step
 * (scripts/bundle.mjs), run by the node that will run the bundle. Resolves to the file written.
 */
export async function shipCompiledCode(file: string): Promise<string> {
  const source = readFileSync(file);
  const shipped = path.join(path.dirname(file), CODE_DIR, cacheFileName(file, source, nodeBuild()));
  await writeCodeCache(shipped, compile(file, source, undefined).createCachedData(), path.basename(file, '.js'));
  return shipped;
}

/** The bundle as V8 is given it, with the code cached for it if any: one way, so that shipped code fits what runs. */
function compile(file: string, source: Buffer, cachedData: Buffer | undefined): Script {
  // The bundle is ASCII (scripts/bundle.mjs), which latin1 copies as it is; utf8 would scan it first.
  const text = isAscii(source) ? source.toString('latin1') : source.toString('utf8');
  return new Script(text.startsWith(BUNDLE_WRAPPER.head) ? text : wrapped(text), { filename: file, ...(cachedData ? { cachedData } : {}) });
}

/**
 * node's CommonJS function wrapper, which commands.js is built in (scripts/bundle.mjs): its text
 * then goes to V8 as it is, where wrapping it here would copy its 0.6 MB once more at every start.
 * The head ends with a space and no newline, so that stack traces keep the file's line numbers.
 */
export const BUNDLE_WRAPPER = { head: '(function (exports, require, module, __filename, __dirname) { ', tail: '\n})' } as const;

/** Any other CommonJS file, wrapped as node's loader would. */
function wrapped(text: string): string {
  // A shebang is a comment to the shell only: inside the function wrapper it must be one to V8 too.
  const body = text.startsWith('#!') ? `//${text.slice(2)}` : text;
  return `${BUNDLE_WRAPPER.head}${body}${BUNDLE_WRAPPER.tail}`;
}

/** The cache's file name: the file's base name, its digest, and the node that compiled it (its version, arch and nodeBuild). */
export function cacheFileName(file: string, source: Buffer, build: string): string {
  const digest = createHash('sha256').update(source).digest('hex').slice(0, 16);
  return `${path.basename(file, '.js')}-${digest}-${process.version}-${process.arch}-${build}.v8`;
}

/**
 * Which build of node this is, beyond its version: V8 checks its own version and flags, but a
 * distribution's rebuild of the same version (a patched V8) would pass that check. The binary's
 * path, size and mtime tell builds apart for the price of one stat.
 */
export function nodeBuild(): string {
  let st: Stats | undefined;
  try {
    st = statSync(process.execPath);
  } catch {
    st = undefined;
  }
  const id = `${process.versions.v8}|${process.execPath}|${st?.size ?? '?'}|${st?.mtimeMs ?? '?'}`;
  return createHash('sha256').update(id).digest('hex').slice(0, 8);
}

/** Whether `name` is a cache file of the bundle file `base` (of any version of it, any node). */
function isCacheOf(base: string, name: string): boolean {
  return name.startsWith(`${base}-`) && /^[0-9a-f]{16}-/.test(name.slice(base.length + 1)) && name.endsWith('.v8');
}

interface Found {
  state: CodeCacheState;
  data?: Buffer;
  why?: string;
}

/** The cached code, if its place, its file and its digest can be trusted. */
function readTrusted(cacheFile: string): Found {
  const uid = process.getuid?.() ?? 0;
  const codeDir = path.dirname(cacheFile);
  const cacheDir = path.dirname(codeDir);
  let fd;
  try {
    // One after the other: a cache directory that is not trusted is said to be so even when it
    // has no code/ (which would otherwise answer ENOENT, 'absent', first).
    for (const [dir, statOf] of [
      [cacheDir, statSync],
      [codeDir, lstatSync],
    ] as const) {
      const problem = cacheDirProblem(dir, statOf(dir), uid, false);
      if (problem) return { state: 'untrusted', why: problem.what };
    }
    // O_NONBLOCK: a FIFO put in its place must not hang the start (it is refused below).
    fd = openSync(cacheFile, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return { state: 'absent' };
    return { state: 'untrusted', why: `${cacheFile} cannot be opened safely (${code ?? String(err)})` };
  }
  try {
    // Checked on the open file: what is read is what was checked.
    const st = fstatSync(fd);
    if (!st.isFile()) return { state: 'untrusted', why: `${cacheFile} is not a regular file` };
    if (st.uid !== uid && st.uid !== 0) return { state: 'untrusted', why: `${cacheFile} is owned by uid ${st.uid}, not by this user or root` };
    if ((st.mode & 0o022) !== 0) return { state: 'untrusted', why: `${cacheFile} is writable by others (mode ${(st.mode & 0o7777).toString(8)})` };
    if (st.size > MAX_CACHE_BYTES) return { state: 'damaged', why: `${cacheFile} is ${st.size} bytes, more than compiled code for one file` };
    const bytes = readFileSync(fd);
    if (bytes.length < HEAD_BYTES || !bytes.subarray(0, MAGIC.length).equals(MAGIC)) return { state: 'damaged', why: `${cacheFile} does not start with the code cache's magic` };
    const data = bytes.subarray(HEAD_BYTES);
    const digest = createHash('sha256').update(data).digest();
    if (!digest.equals(bytes.subarray(MAGIC.length, HEAD_BYTES))) return { state: 'damaged', why: `${cacheFile} does not match its digest (torn or damaged)` };
    return { state: 'absent', data };
  } catch (err) {
    return { state: 'damaged', why: `${cacheFile} cannot be read (${(err as NodeJS.ErrnoException).code ?? String(err)})` };
  } finally {
    closeSync(fd);
  }
}

/**
 * Write the compiled code so that a crash or a power cut leaves the old file, the new one or
 * none, never a torn one that is trusted (the digest would refuse it anyway), and remove what an
 * older bundle or another node left for the same file.
 */
async function writeCodeCache(cacheFile: string, data: Buffer, base: string): Promise<void> {
  const codeDir = path.dirname(cacheFile);
  await mkdir(codeDir, { mode: 0o755 }).then(
    // Not the umask's choice either: the users who are not root read root's code (ls, cat).
    () => chmod(codeDir, 0o755),
    (err: NodeJS.ErrnoException) => {
      if (err.code !== 'EEXIST') throw err;
    },
  );
  const problem = cacheDirProblem(codeDir, await lstat(codeDir), process.getuid?.() ?? 0, true);
  if (problem) throw new Error(problem.what);
  // Not the pid alone: two daemons in two containers can have the same pid and share the cache
  // volume; each would write into, rename or remove (at exit) the other's file.
  const tmp = path.join(codeDir, `.${path.basename(cacheFile)}.${process.pid}-${randomBytes(6).toString('hex')}.tmp`);
  // A process that exits before the rename (serve stopped just after ready, as it saves) leaves
  // no half-written file behind: nothing else would remove it, since a start that finds its
  // code cached never saves (nor sweeps) again.
  const removeOnExit = (): void => {
    try {
      unlinkSync(tmp);
    } catch {
      // already renamed, or never made
    }
  };
  process.once('exit', removeOnExit);
  try {
    // O_EXCL: a name that is somehow taken is another's file, never written into.
    const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o644);
    try {
      // writeFile, not writev: a full disk or a file-size limit makes write() short before it
      // fails, and writev takes the short count as done, which would rename a torn file in.
      await fh.writeFile(Buffer.concat([MAGIC, createHash('sha256').update(data).digest(), data]));
      await fh.chmod(0o644); // not the umask's choice: readers refuse a group-writable file
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, cacheFile);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  } finally {
    process.off('exit', removeOnExit);
  }
  // What an older bundle or another node wrote for this file, and what a crash left half-written.
  for (const name of await readdir(codeDir)) {
    const stale = isCacheOf(base, name) && name !== path.basename(cacheFile);
    const torn = name.startsWith('.') && TMP_SUFFIX.test(name) && isCacheOf(base, name.slice(1).replace(TMP_SUFFIX, '')) && (await leftLongAgo(path.join(codeDir, name)));
    if (stale || torn) await rm(path.join(codeDir, name), { force: true });
  }
  const dir = await open(codeDir, 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

/** Whether a temporary file was last written longer ago than any save takes (see STALE_TMP_MS). */
async function leftLongAgo(file: string): Promise<boolean> {
  const st = await lstat(file).catch(() => undefined);
  return st !== undefined && Date.now() - st.mtimeMs > STALE_TMP_MS;
}
