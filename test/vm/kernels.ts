/**
 * The real test kernels in ../shared/kernels (KHEADERSD_KERNELS to look elsewhere): each folder
 * holds the image, lib/modules/<release>/ with kheaders.ko, `build-id` (what /sys/kernel/notes
 * holds) and `kheaders.sha256` (the digest of the archive kheaders.ko exposes).
 */
import { access, readdir, readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { findEmbeddedArchive } from '../../src/source/elf.js';
import { REPO_ROOT, X86_64, type VmArch, type VmKernel } from './vm.js';

export const KERNELS_DIR = process.env['KHEADERSD_KERNELS'] ?? path.resolve(REPO_ROOT, '../shared/kernels');

export interface TestKernel extends VmKernel {
  /** The folder name, e.g. x86_64-6.1.192-rebuilt. */
  name: string;
  release: string;
  buildId: string;
  /** sha256 of the kheaders archive its kheaders.ko carries. */
  archiveSha256: string;
  /** lib/modules/<release>/kernel/kernel/kheaders.ko */
  kheadersKo: string;
  modulesDir: string;
}

/** The x86_64 kernels the VM tests boot: the base one, the same release rebuilt, another release. */
export const X86_KERNELS = { a: 'x86_64-6.1.192', rebuilt: 'x86_64-6.1.192-rebuilt', b: 'x86_64-6.1.192-b' } as const;

export async function loadKernel(name: string, arch: VmArch = X86_64, kernelsDir: string = KERNELS_DIR): Promise<TestKernel> {
  const dir = path.join(kernelsDir, name);
  const image = await followLinkFile(path.join(dir, arch.name === 'x86_64' ? 'bzImage' : 'Image.gz'));
  const releases = await readdir(path.join(dir, 'lib/modules'));
  const release = releases[0];
  if (releases.length !== 1 || release === undefined) throw new Error(`${dir}/lib/modules holds ${releases.length} releases, expected one`);
  const modulesDir = path.join(dir, 'lib/modules', release);
  const buildId = (await readFile(path.join(dir, 'build-id'), 'utf8')).trim();
  const archiveSha256 = (await readFile(path.join(dir, 'kheaders.sha256'), 'utf8')).trim().split(/\s+/)[0] ?? '';
  return { name, arch, image, release, buildId, archiveSha256, modulesDir, kheadersKo: path.join(modulesDir, 'kernel/kernel/kheaders.ko') };
}

/**
 * A kernel folder that shares another's image holds a small text file naming it (e.g. the
 * rebuilt kernel's bzImage says ../x86_64-6.1.192/bzImage): the image is the file named.
 */
async function followLinkFile(file: string): Promise<string> {
  if ((await stat(file)).size > 4096) return file;
  const target = path.resolve(path.dirname(file), (await readFile(file, 'utf8')).trim());
  await access(target);
  return target;
}

/** Why the named kernels cannot be booted here (absent), or undefined. */
export async function kernelsSkipReason(names: readonly string[]): Promise<string | undefined> {
  for (const name of names) {
    try {
      await access(path.join(KERNELS_DIR, name, 'build-id'));
    } catch {
      return `the test kernel ${name} is not in ${KERNELS_DIR} (set KHEADERSD_KERNELS)`;
    }
  }
  return undefined;
}

/** The xz archive inside a kernel's kheaders.ko, found by the project's own ELF reader. */
export async function archiveFromModule(kernel: TestKernel): Promise<Buffer> {
  return findEmbeddedArchive(await readFile(kernel.kheadersKo)).data;
}
