/**
 * Finding kheaders.ko the way a device can: in /lib/modules/<release> and Android's module
 * partitions, laid out in a temp directory standing for /. Module-like ELF files (the archive
 * between the kernel_headers_data symbols, a .modinfo with vermagic) are read, not loaded; one
 * for another release is never used or loaded; only what cannot be read is loaded, through
 * stand-in modprobe/insmod/rmmod scripts that record their calls and play the kernel's part
 * (making the archive appear in a fake sysfs, and go again).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readFile, stat, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, it, type TestContext } from 'node:test';
import * as zlib from 'node:zlib';
import { resolveConfig } from '../src/config.js';
import { KheadersError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { findModuleFiles, readBootTime, readModuleFile } from '../src/source/module-files.js';
import { defaultModuleDirs, kheadersInModulesDep, moduleCompression, moduleDirsProblem, moduleSearchDirs } from '../src/source/modules.js';
import { judgeModule } from '../src/source/elf.js';
import { locateArchive, type LocateOptions } from '../src/source/locate.js';
import { ingest } from '../src/store/ingest.js';
import { FIXTURE_ARCHIVE, FIXTURE_SHA256, fixtureMissing, sha256, tempDir, xz } from './helpers/archives.js';
import { buildKernelModule } from './helpers/elf-builder.js';

/** Node 22.15 and later decode zstd themselves (zlib.zstdDecompress); earlier ones need the binary. */
const NODE_HAS_ZSTD = typeof (zlib as Record<string, unknown>)['zstdDecompress'] === 'function';

const RELEASE = '6.1.192-android14-11';
const OTHER = '6.1.99-android14-11';
/** A real xz stream standing in for the kernel's archive. */
const ARCHIVE = xz(Buffer.from('#define UTS_RELEASE "6.1.192-android14-11"\n'.repeat(50)));
const log = createLogger('silent');

const hasBinary = (name: string): boolean => {
  try {
    execFileSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
};

interface FakeMachine {
  root: string;
  live: string;
  sysfsModule: string;
  /** Every call of the stand-in module tools, one line each. */
  calls(): Promise<string[]>;
  opts(extra?: Partial<LocateOptions>): LocateOptions;
  /** Write a module file under the root (a device path), returning its real path. */
  put(devicePath: string, bytes: Buffer): Promise<string>;
}

/**
 * A temp dir standing for /, with a fake sysfs and module tools. The tools behave like the
 * kernel for a module whose file holds ARCHIVE: loading makes the archive appear, unloading
 * removes it; `modprobe` fails like a system with no /lib/modules/<release>.
 */
async function machine(t: TestContext, tools: { modprobeWorks?: boolean } = {}): Promise<FakeMachine> {
  const root = await tempDir(t, 'kheadersd-modules-');
  const bin = path.join(root, 'fake-bin');
  const live = path.join(root, 'fake-sys', 'kheaders.tar.xz');
  const sysfsModule = path.join(root, 'fake-sys', 'module-kheaders');
  const callLog = path.join(root, 'calls.log');
  const archiveFile = path.join(root, 'archive.tar.xz');
  await mkdir(bin, { recursive: true });
  await mkdir(path.dirname(live), { recursive: true });
  await writeFile(archiveFile, ARCHIVE);
  await writeFile(callLog, '');
  const load = `cp '${archiveFile}' '${live}' && mkdir -p '${sysfsModule}'`;
  const unload = `rm -rf '${live}' '${sysfsModule}'`;
  const script = (body: string): string => `#!/bin/sh\necho "$(basename "$0") $*" >> '${callLog}'\n${body}\n`;
  await writeFile(path.join(bin, 'insmod'), script(load), { mode: 0o755 });
  await writeFile(path.join(bin, 'rmmod'), script(unload), { mode: 0o755 });
  await writeFile(
    path.join(bin, 'modprobe'),
    script(tools.modprobeWorks ? `if [ "$1" = -r ]; then ${unload}; else ${load}; fi` : `echo "modprobe: FATAL: Module kheaders not found in directory /lib/modules/${RELEASE}" >&2; exit 1`),
    { mode: 0o755 },
  );
  return {
    root,
    live,
    sysfsModule,
    calls: async () => (await readFile(callLog, 'utf8')).split('\n').filter(Boolean),
    opts: (extra = {}) => ({
      modprobe: true,
      unloadModule: true,
      maxArchiveBytes: 64 * 1024 * 1024,
      log,
      livePaths: [live, path.join(root, 'fake-proc', 'kheaders.tar.xz')],
      moduleDir: sysfsModule,
      notesPath: path.join(root, 'no-notes'),
      root,
      release: RELEASE,
      commands: { modprobe: path.join(bin, 'modprobe'), insmod: path.join(bin, 'insmod'), rmmod: path.join(bin, 'rmmod') },
      ...extra,
    }),
    put: async (devicePath, bytes) => {
      const file = path.join(root, devicePath);
      await mkdir(path.dirname(file), { recursive: true });
      await writeFile(file, bytes);
      return file;
    },
  };
}

const module = (vermagic: string | null = RELEASE, archive = ARCHIVE, name?: string): Buffer => buildKernelModule({ archive, vermagic, ...(name !== undefined ? { name } : {}) });

async function expectNotFound(p: Promise<unknown>): Promise<KheadersError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof KheadersError, String(err));
    assert.equal(err.code, 'E_ARCHIVE_NOT_FOUND', err.message);
    return err;
  }
  assert.fail('expected E_ARCHIVE_NOT_FOUND');
}

describe('module places and verdicts (pure)', () => {
  it('default: /lib/modules/<release>, then each Android partition with and without the release', () => {
    assert.deepEqual(defaultModuleDirs('R'), [
      '/lib/modules/R',
      '/system_dlkm/lib/modules/R',
      '/system_dlkm/lib/modules',
      '/vendor_dlkm/lib/modules/R',
      '/vendor_dlkm/lib/modules',
      '/vendor/lib/modules/R',
      '/vendor/lib/modules',
      '/odm/lib/modules/R',
      '/odm/lib/modules',
    ]);
  });

  it('a moduleDirs list replaces the places, or adds to them with "default"; {release} is substituted; repeats go', () => {
    assert.deepEqual(moduleSearchDirs(['/opt/mods/{release}/'], 'R'), ['/opt/mods/R']);
    assert.deepEqual(moduleSearchDirs(['/opt//mods', 'default'], 'R').slice(0, 2), ['/opt/mods', '/lib/modules/R']);
    assert.equal(moduleSearchDirs(['default', '/lib/modules/R'], 'R').length, 9);
    assert.equal(moduleDirsProblem(['default']), undefined);
    assert.match(moduleDirsProblem([]) ?? '', /empty/);
    assert.match(moduleDirsProblem(['/ok', 'relative/dir']) ?? '', /"relative\/dir" is neither an absolute directory nor "default"/);
  });

  it('modules.dep: kheaders entries, relative or absolute, compressed or not; other modules ignored', () => {
    const dep = 'kernel/fs/fuse/fuse.ko:\nkernel/kernel/kheaders.ko.zst:\n/system_dlkm/lib/modules/kheaders.ko: \nextra/kheaders.ko.bak:\n\nnot a line\n';
    assert.deepEqual(kheadersInModulesDep(dep), ['kernel/kernel/kheaders.ko.zst', '/system_dlkm/lib/modules/kheaders.ko']);
  });

  it('compression from the magic bytes', () => {
    assert.equal(moduleCompression(module()), 'none');
    assert.equal(moduleCompression(xz(module())), 'xz');
    assert.equal(moduleCompression(zlib.gzipSync(module())), 'gzip');
    assert.equal(moduleCompression(Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0])), 'zstd');
    assert.equal(moduleCompression(Buffer.from('hello')), undefined);
  });

  it('judgeModule: the running release is used; another release, no vermagic, another module name or no archive are not', () => {
    const ok = judgeModule(module(), RELEASE);
    assert.ok(ok.use);
    assert.ok(ok.archive.data.equals(ARCHIVE));
    const other = judgeModule(module(OTHER), RELEASE);
    assert.ok(!other.use);
    assert.equal(other.release, OTHER);
    assert.match(other.reason, new RegExp(`vermagic names ${OTHER}, not the running ${RELEASE}`));
    const none = judgeModule(module(null), RELEASE);
    assert.ok(!none.use && /no vermagic/.test(none.reason));
    const named = judgeModule(module(RELEASE, ARCHIVE, 'fuse'), RELEASE);
    assert.ok(!named.use && /names the module "fuse", not kheaders/.test(named.reason));
    const notElf = judgeModule(Buffer.from('not an elf at all'), RELEASE);
    assert.ok(!notElf.use && /not a readable ELF module/.test(notElf.reason));
  });
});

describe('reading kheaders.ko from disk (a fake root laid out like Android)', () => {
  it('GKI: /system_dlkm/lib/modules/kheaders.ko is read, not loaded; the manifest facts are its mtime and the boot time', async (t) => {
    const m = await machine(t);
    const file = await m.put('/system_dlkm/lib/modules/kheaders.ko', module());
    const mtime = new Date('2024-05-01T10:00:00Z');
    await utimes(file, mtime, mtime);
    const found = await locateArchive(m.opts());
    assert.equal(found.obtained, 'module-file');
    assert.equal(found.source, 'module:/system_dlkm/lib/modules/kheaders.ko');
    assert.ok(found.bytes.equals(ARCHIVE));
    assert.equal(found.release, RELEASE);
    assert.equal(found.live, true);
    assert.equal(found.module?.file, '/system_dlkm/lib/modules/kheaders.ko');
    assert.equal(found.module?.mtime, mtime.toISOString());
    assert.equal(found.module?.bootTime, (await readBootTime()).toISOString());
    assert.deepEqual(await m.calls(), [], 'nothing was loaded');
  });

  it('a module for another release is passed over (and logged) for the running one further on', async (t) => {
    const m = await machine(t);
    await m.put('/system_dlkm/lib/modules/kheaders.ko', module(OTHER, xz(Buffer.from('other kernel'))));
    await m.put(`/vendor_dlkm/lib/modules/${RELEASE}/kheaders.ko`, module());
    const lines: string[] = [];
    const recording = createLogger('info', { write: (l: string) => lines.push(l) } as unknown as NodeJS.WritableStream);
    const found = await locateArchive(m.opts({ log: recording }));
    assert.equal(found.source, `module:/vendor_dlkm/lib/modules/${RELEASE}/kheaders.ko`);
    assert.ok(found.bytes.equals(ARCHIVE));
    const warning = lines.map((l) => JSON.parse(l) as { level: number; msg: string; module?: string }).find((l) => l.level === 40);
    assert.equal(warning?.module, '/system_dlkm/lib/modules/kheaders.ko');
    assert.match(warning?.msg ?? '', new RegExp(`vermagic names ${OTHER}, not the running ${RELEASE}`));
  });

  it('a distribution layout: /lib/modules/<release>/kernel/kernel/kheaders.ko.xz, and .gz', async (t) => {
    const m = await machine(t);
    await m.put(`/lib/modules/${RELEASE}/kernel/kernel/kheaders.ko.xz`, xz(module()));
    const viaXz = await locateArchive(m.opts());
    assert.equal(viaXz.source, `module:/lib/modules/${RELEASE}/kernel/kernel/kheaders.ko.xz`);
    assert.ok(viaXz.bytes.equals(ARCHIVE));

    const g = await machine(t);
    await g.put(`/lib/modules/${RELEASE}/kernel/kernel/kheaders.ko.gz`, zlib.gzipSync(module()));
    assert.ok((await locateArchive(g.opts())).bytes.equals(ARCHIVE));
  });

  it('.ko.zst: read with the zstd binary; without a decoder, skipped with the reason and loaded with insmod instead', async (t) => {
    if (!hasBinary('zstd')) return t.skip('no zstd binary on this machine');
    const m = await machine(t);
    const raw = await m.put('/tmp-src/kheaders.ko', module());
    const zst = await m.put('/vendor/lib/modules/kheaders.ko.zst', execFileSync('zstd', ['-q', '-c', raw]));
    const read = await locateArchive(m.opts());
    assert.equal(read.obtained, 'module-file');
    assert.ok(read.bytes.equals(ARCHIVE));

    const bare = await locateArchive(m.opts({ searchPath: '' })); // no zstd binary: only a Node with its own zstd reads it
    if (NODE_HAS_ZSTD) {
      assert.equal(bare.obtained, 'module-file', `Node ${process.version} decodes zstd itself`);
      assert.ok(bare.bytes.equals(ARCHIVE));
      assert.deepEqual(await m.calls(), [], 'nothing loaded');
      return;
    }
    assert.equal(bare.obtained, 'module-loaded');
    assert.equal(bare.source, `${m.live} (after insmod /vendor/lib/modules/kheaders.ko.zst)`);
    assert.ok(bare.bytes.equals(ARCHIVE));
    assert.equal(bare.module?.file, '/vendor/lib/modules/kheaders.ko.zst');
    assert.deepEqual(await m.calls(), ['modprobe kheaders', `insmod ${zst}`, 'rmmod kheaders']);
    assert.equal(existsSync(m.live), false, 'unloaded afterwards');
  });

  it('modules.dep leads to the file, relative (updates/) or absolute (as the device mounts it)', async (t) => {
    const m = await machine(t);
    await m.put(`/lib/modules/${RELEASE}/modules.dep`, Buffer.from('kernel/fs/fuse/fuse.ko:\nupdates/kheaders.ko:\n'));
    await m.put(`/lib/modules/${RELEASE}/updates/kheaders.ko`, module());
    assert.equal((await locateArchive(m.opts())).source, `module:/lib/modules/${RELEASE}/updates/kheaders.ko`);

    const a = await machine(t);
    await a.put('/system_dlkm/lib/modules/modules.dep', Buffer.from('/system_dlkm/lib/modules/gki/kheaders.ko:\n'));
    await a.put('/system_dlkm/lib/modules/gki/kheaders.ko', module());
    assert.equal((await locateArchive(a.opts())).source, 'module:/system_dlkm/lib/modules/gki/kheaders.ko');
  });

  it('moduleDirs replaces the places ({release} substituted) or adds to them', async (t) => {
    const m = await machine(t);
    await m.put(`/data/local/modules/${RELEASE}/kheaders.ko`, module());
    await m.put('/system_dlkm/lib/modules/kheaders.ko', module(RELEASE, xz(Buffer.from('the partition copy'))));
    const replaced = await locateArchive(m.opts({ moduleDirs: ['/data/local/modules/{release}'] }));
    assert.equal(replaced.source, `module:/data/local/modules/${RELEASE}/kheaders.ko`);
    const dflt = await locateArchive(m.opts({ moduleDirs: ['default', '/data/local/modules/{release}'] }));
    assert.equal(dflt.source, 'module:/system_dlkm/lib/modules/kheaders.ko');
  });

  it('the kernel exposing the archive wins over any file', async (t) => {
    const m = await machine(t);
    await m.put('/system_dlkm/lib/modules/kheaders.ko', module(RELEASE, xz(Buffer.from('file copy'))));
    await writeFile(m.live, ARCHIVE);
    const found = await locateArchive(m.opts());
    assert.equal(found.obtained, 'exposed');
    assert.equal(found.source, m.live);
  });
});

describe('loading only what cannot be read, never another release', () => {
  it('only a module for another release: nothing is used or loaded, and the error lists every place tried', async (t) => {
    const m = await machine(t, { modprobeWorks: true });
    await m.put(`/lib/modules/${RELEASE}/kernel/kernel/kheaders.ko`, module(OTHER));
    await m.put('/system_dlkm/lib/modules/kheaders.ko', module(OTHER));
    const err = await expectNotFound(locateArchive(m.opts()));
    assert.deepEqual(await m.calls(), [], 'neither modprobe nor insmod ran');
    for (const place of [m.live, ...defaultModuleDirs(RELEASE).filter((d) => d !== `/lib/modules/${RELEASE}` && d !== '/system_dlkm/lib/modules')]) {
      assert.ok(err.message.includes(place), `the error names ${place}:\n${err.message}`);
    }
    assert.match(err.message, new RegExp(`/system_dlkm/lib/modules/kheaders.ko \\(its vermagic names ${OTHER}, not the running ${RELEASE}: not used\\)`));
    assert.match(err.message, /modprobe kheaders \(not tried: the module in \/lib\/modules\/\S+ is for another release\)/);
    assert.match(err.message, /built for another release: install the one built for/);
  });

  it('nothing on disk: modprobe is still tried (its own configuration may know more), and the error names it all', async (t) => {
    const m = await machine(t);
    const err = await expectNotFound(locateArchive(m.opts()));
    assert.deepEqual(await m.calls(), ['modprobe kheaders']);
    for (const dir of defaultModuleDirs(RELEASE)) assert.ok(err.message.includes(`${dir} (absent)`), dir);
    assert.match(err.message, /modprobe kheaders \(modprobe: FATAL: Module kheaders not found/);
    const off = await expectNotFound(locateArchive(m.opts({ modprobe: false })));
    assert.match(off.message, /loading kheaders \(not tried: --no-modprobe\)/);
  });

  it('modprobe works: the archive it exposes is used, and the module unloaded; left loaded with unloadModule off', async (t) => {
    const m = await machine(t, { modprobeWorks: true });
    const found = await locateArchive(m.opts());
    assert.equal(found.obtained, 'module-loaded');
    assert.equal(found.source, `${m.live} (after modprobe kheaders)`);
    assert.deepEqual(await m.calls(), ['modprobe kheaders', 'modprobe -r kheaders']);
    await locateArchive(m.opts({ unloadModule: false }));
    assert.equal(existsSync(m.live), true, 'still loaded');
  });

  it('readModuleFiles off loads the matching file with insmod (the loading path, on purpose)', async (t) => {
    const m = await machine(t);
    const file = await m.put('/system_dlkm/lib/modules/kheaders.ko', module());
    const found = await locateArchive(m.opts({ readModuleFiles: false }));
    assert.equal(found.obtained, 'module-loaded');
    assert.equal(found.module?.file, '/system_dlkm/lib/modules/kheaders.ko');
    assert.deepEqual(await m.calls(), ['modprobe kheaders', `insmod ${file}`, 'rmmod kheaders']);
  });

  it('an unreadable file is loaded (the kernel checks it); a corrupt or foreign one is not', async (t) => {
    if (process.getuid?.() === 0) {
      // root reads a 0000 file anyway: use a file we cannot decode instead (no zstd decoder).
      const m = await machine(t);
      const file = await m.put('/odm/lib/modules/kheaders.ko.zst', Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3]));
      await m.put('/vendor/lib/modules/kheaders.ko', Buffer.from('garbage, not an ELF file'));
      await m.put('/vendor_dlkm/lib/modules/kheaders.ko', module(RELEASE, ARCHIVE, 'not_kheaders'));
      if (NODE_HAS_ZSTD) {
        // This Node decodes zstd itself, so the cut-short file is corrupt, not unreadable: nothing here may be loaded.
        await assert.rejects(locateArchive(m.opts({ searchPath: '' })), (err: unknown) => err instanceof KheadersError && err.code === 'E_ARCHIVE_NOT_FOUND' && /does not decode/.test(err.message) && /not_kheaders/.test(err.message));
        assert.ok(!(await m.calls()).some((c) => c.startsWith('insmod')), `no insmod: ${(await m.calls()).join(', ')}`);
        return t.skip(`as root, with Node ${process.version}'s own zstd, no file here is unreadable: the load-an-unreadable-file half is not tried`);
      }
      const found = await locateArchive(m.opts({ searchPath: '' }));
      assert.equal(found.obtained, 'module-loaded');
      assert.deepEqual(await m.calls(), ['modprobe kheaders', `insmod ${file}`, 'rmmod kheaders']);
      return;
    }
    const m = await machine(t);
    const file = await m.put('/odm/lib/modules/kheaders.ko', module());
    await chmod(file, 0o000);
    const found = await locateArchive(m.opts());
    assert.equal(found.obtained, 'module-loaded');
    assert.deepEqual(await m.calls(), ['modprobe kheaders', `insmod ${file}`, 'rmmod kheaders']);
  });
});

describe('readModuleFile limits', () => {
  it('a file over the size limit, or one that decompresses beyond it, is rejected', async (t) => {
    const m = await machine(t);
    const big = await m.put('/system_dlkm/lib/modules/kheaders.ko.gz', zlib.gzipSync(Buffer.alloc(4 * 1024 * 1024)));
    const { found } = await findModuleFiles(['/system_dlkm/lib/modules'], m.root);
    const first = found[0];
    assert.ok(first);
    assert.equal(first.location, big);
    const over = await readModuleFile(first, { release: RELEASE, maxBytes: 1024 * 1024 });
    assert.equal(over.outcome, 'rejected');
    assert.match(over.outcome === 'rejected' ? over.reason : '', /decompresses to more than 1048576 bytes/);
    const tooBig = await readModuleFile(first, { release: RELEASE, maxBytes: 100 });
    assert.match(tooBig.outcome === 'rejected' ? tooBig.reason : '', /over the limit of 100/);
  });
});

describe('the moduleDirs setting', () => {
  const base = { flags: {}, env: {}, file: {}, fileName: 'config.json' };
  it('flag and variable take DIR:DIR, the file a JSON array; default is the built-in places; a relative entry is refused', () => {
    assert.deepEqual(resolveConfig(base).moduleDirs, ['default']);
    assert.deepEqual(resolveConfig({ ...base, flags: { moduleDirs: '/a:default' } }).moduleDirs, ['/a', 'default']);
    assert.deepEqual(resolveConfig({ ...base, env: { KHEADERSD_MODULE_DIRS: '/b/{release}' } }).moduleDirs, ['/b/{release}']);
    assert.deepEqual(resolveConfig({ ...base, file: { moduleDirs: ['/c', 'default'] } }).moduleDirs, ['/c', 'default']);
    assert.throws(() => resolveConfig({ ...base, flags: { moduleDirs: 'lib/modules' } }), /--module-dirs: "lib\/modules" is not a list of absolute directories and "default"/);
    assert.throws(() => resolveConfig({ ...base, file: { moduleDirs: [1] } }), /config.json: moduleDirs/);
  });
});

describe('ingest through the module file', () => {
  it('the real archive inside a module on an Android-like path: cached with its digest, the manifest says how', async (t) => {
    const missing = fixtureMissing();
    if (missing) return t.skip(missing);
    const dir = await tempDir(t, 'kheadersd-module-ingest-');
    const modules = path.join(dir, 'system_dlkm', 'lib', 'modules');
    await mkdir(modules, { recursive: true });
    const archive = await readFile(FIXTURE_ARCHIVE);
    const { release } = await import('node:os');
    await writeFile(path.join(modules, 'kheaders.ko'), buildKernelModule({ archive, vermagic: release() }));
    const result = await ingest({
      cacheDir: path.join(dir, 'cache'),
      moduleDirs: [modules],
      modprobe: false,
      btf: 'off',
      livePaths: [path.join(dir, 'no-such-sysfs')],
      log,
    });
    const m = result.entry.manifest;
    assert.equal(m.digest, FIXTURE_SHA256);
    assert.equal(sha256(await readFile(path.join(result.entry.dir, 'archive.tar.xz'))), FIXTURE_SHA256);
    assert.equal(m.obtained, 'module-file');
    assert.equal(m.source, `module:${path.join(modules, 'kheaders.ko')}`);
    assert.equal(m.module?.mtime, (await stat(path.join(modules, 'kheaders.ko'))).mtime.toISOString());
    assert.equal(m.release, release());
  });
});
