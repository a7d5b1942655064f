/**
 * The real test kernels in ../shared/kernels (see its README): paths, and the BTF inside them.
 *
 * The x86_64 kernels ship a gzip-compressed bzImage; the ELF vmlinux inside it carries the base
 * BTF (`.BTF`) and the build id, and each module under lib/modules carries its split BTF in its
 * own `.BTF` section: what /sys/kernel/btf/vmlinux and /sys/kernel/btf/<module> hold once that
 * kernel runs and the module is loaded.
 */
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import { elfSection } from '../../src/source/elf.js';
import { REPO_ROOT } from './archives.js';

export const KERNELS_DIR = path.resolve(REPO_ROOT, '../shared/kernels');

export interface TestKernel {
  dir: string;
  release: string;
  /** The kernel's GNU build id (hex). */
  buildId: string;
  /** sha256 of the archive its kheaders.ko embeds. */
  kheadersSha256: string;
  /** The kernel's .config as built. */
  config: string;
  /** Module name → path of the .ko. */
  modules: Map<string, string>;
}

/** A test kernel by folder name (`x86_64-6.1.192`), or the reason to skip without it. */
export function testKernel(name: string): TestKernel | string {
  const dir = path.join(KERNELS_DIR, name);
  if (!existsSync(path.join(dir, 'build-id'))) return `test kernel ${dir} not present`;
  const modules = new Map<string, string>();
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ko')) modules.set(e.name.slice(0, -3).replace(/-/g, '_'), p);
    }
  };
  const libModules = path.join(dir, 'lib/modules');
  const release = existsSync(libModules) ? (readdirSync(libModules)[0] ?? '') : '';
  if (release !== '') walk(path.join(libModules, release));
  return {
    dir,
    release,
    buildId: readFileSync(path.join(dir, 'build-id'), 'utf8').trim(),
    kheadersSha256: readFileSync(path.join(dir, 'kheaders.sha256'), 'utf8').split(/\s/)[0] ?? '',
    config: existsSync(path.join(dir, 'config')) ? readFileSync(path.join(dir, 'config'), 'utf8') : '',
    modules,
  };
}

const vmlinuxCache = new Map<string, Buffer>();

/** The ELF vmlinux inside an x86 bzImage (its payload is one gzip member; trailing bytes are ignored). */
export function vmlinuxOf(kernel: TestKernel): Buffer {
  const hit = vmlinuxCache.get(kernel.dir);
  if (hit) return hit;
  const image = readFileSync(path.join(kernel.dir, 'bzImage'));
  const at = image.indexOf(Buffer.from([0x1f, 0x8b, 0x08, 0x00]));
  if (at < 0) throw new Error(`${kernel.dir}/bzImage holds no gzip payload`);
  const elf = gunzipSync(image.subarray(at));
  vmlinuxCache.set(kernel.dir, elf);
  return elf;
}

/** The kernel's base BTF (what its /sys/kernel/btf/vmlinux holds). */
export function baseBtfOf(kernel: TestKernel): Buffer {
  const btf = elfSection(vmlinuxOf(kernel), '.BTF');
  if (!btf) throw new Error(`the vmlinux of ${kernel.dir} has no .BTF section`);
  return Buffer.from(btf);
}

/** A module's split BTF (what /sys/kernel/btf/<module> holds while it is loaded). */
export function moduleBtfOf(kernel: TestKernel, module: string): Buffer {
  const ko = kernel.modules.get(module);
  if (ko === undefined) throw new Error(`no module ${module} in ${kernel.dir}`);
  const btf = elfSection(readFileSync(ko), '.BTF');
  if (!btf) throw new Error(`${ko} has no .BTF section`);
  return Buffer.from(btf);
}

/** /sys/kernel/notes as the kernel writes it (little-endian): one GNU NT_GNU_BUILD_ID note. */
export function buildIdNotes(buildId: string): Buffer {
  const desc = Buffer.from(buildId, 'hex');
  const note = Buffer.alloc(16 + desc.length);
  note.writeUInt32LE(4, 0);
  note.writeUInt32LE(desc.length, 4);
  note.writeUInt32LE(3, 8);
  note.write('GNU\0', 12, 'latin1');
  desc.copy(note, 16);
  return note;
}
