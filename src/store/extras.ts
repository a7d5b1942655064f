/**
 * What an entry holds beside its archive, and only when it belongs to that entry's kernel:
 *
 *   vmlinux.h   generated from BTF: the running kernel's (/sys/kernel/btf/vmlinux), or a file
 *               given with --btf (raw BTF, or a vmlinux whose .BTF section is read)
 *   .config     the kernel configuration: /proc/config.gz (the running kernel's, with
 *               CONFIG_IKCONFIG_PROC) or /boot/config-<release>
 *
 * The running kernel's own files go only into the running kernel's entry. Anything else is
 * checked against what the headers say about their kernel (kconfig.ts: a configuration against
 * autoconf.h, option by option; btf/headers-check.ts: BTF against bounds.h and asm-offsets.h;
 * and a vmlinux's release and build id against the entry's): a file that is shown to be another
 * kernel's is left out, and what was checked, refused, or could not be checked is logged and
 * recorded in the manifest's `notes`. A 6.18 vmlinux.h in a 6.12 tree is how a tracer prints
 * garbage with no error anywhere.
 */
import path from 'node:path';
import { gunzip } from 'node:zlib';
import { promisify } from 'node:util';
import { checkBtfAgainstHeaders } from '../btf/headers-check.js';
import { parseBtf } from '../btf/reader.js';
import { errnoOf } from '../errors.js';
import { readBounded } from '../source/locate.js';
import { compareConfig, parseAutoconf, parseKconfig } from './kconfig.js';
import type { LiveKernel } from './kernel-match.js';
import type { BtfSource } from './vmlinux-h.js';

const gunzipAsync = promisify(gunzip);

export const AUTOCONF_H = 'include/generated/autoconf.h';
export const ASM_OFFSETS_H = 'include/generated/asm-offsets.h';
export const BOUNDS_H = 'include/generated/bounds.h';
/** The generated headers ingest keeps in memory for these checks (a few KiB each). */
export const FACT_FILES: readonly string[] = [AUTOCONF_H, ASM_OFFSETS_H, BOUNDS_H];

export const LIVE_CONFIG = '/proc/config.gz';
export const BOOT_DIR = '/boot';
/** A kernel configuration is ~200 KiB; anything far larger is not one. */
const MAX_CONFIG_BYTES = 16 * 1024 * 1024;

/** What is known about the entry being built once its archive is decoded. */
export interface EntryFacts {
  release: string;
  /** The archive was read from the running kernel itself. */
  live: boolean;
  buildId: string | null;
  /** The generated headers of the tree, by path (FACT_FILES), when it has them. */
  files: ReadonlyMap<string, Buffer>;
}

/** What was checked or refused, in words, for the log and the manifest; `warn` when something was left out or is unverified. */
export interface Note {
  text: string;
  warn: boolean;
}

export interface Verdict {
  keep: boolean;
  notes: Note[];
}

const warn = (text: string): Note => ({ text, warn: true });
const info = (text: string): Note => ({ text, warn: false });

/** Whether the entry is the running kernel's, as far as an ingest can tell. */
function isRunningKernels(facts: EntryFacts, live: LiveKernel): boolean {
  if (facts.live) return true;
  if (facts.release !== live.release) return false;
  return facts.buildId === null || live.buildId === null || facts.buildId === live.buildId;
}

/**
 * Keep the vmlinux.h made from `btf` in this entry? `given` is true for a file named with --btf,
 * false for the running kernel's BTF chosen automatically.
 */
export function judgeBtf(btf: BtfSource, given: boolean, facts: EntryFacts, live: LiveKernel): Verdict {
  const what = given ? `--btf ${btf.path}` : `the running kernel's BTF (${btf.path})`;
  const running = isRunningKernels(facts, live);
  const isLiveBtf = live.btfDigest !== null && btf.digest === live.btfDigest;
  if (isLiveBtf && !running) {
    return refuse(`${what} is the running kernel's BTF (${live.release}), not ${facts.release}'s: no vmlinux.h in this entry`);
  }
  if (btf.release !== undefined && btf.release !== facts.release) {
    return refuse(`${what} is from a ${btf.release} kernel, not ${facts.release}: no vmlinux.h in this entry`);
  }
  if (btf.buildId !== null && facts.buildId !== null && btf.buildId !== facts.buildId) {
    return refuse(`${what} is from build ${btf.buildId.slice(0, 12)}, this entry is build ${facts.buildId.slice(0, 12)}: no vmlinux.h in this entry`);
  }
  // The live archive and the live BTF are one kernel's by construction.
  if (facts.live && isLiveBtf) return { keep: true, notes: [] };
  const asmOffsets = facts.files.get(ASM_OFFSETS_H);
  const bounds = facts.files.get(BOUNDS_H);
  if (asmOffsets === undefined && bounds === undefined) {
    if (isLiveBtf && facts.live) return { keep: true, notes: [] }; // a vmlinux.h-only entry of the running kernel
    return { keep: true, notes: [warn(`${what} could not be checked against this entry (no generated headers to compare with): kept, unverified`)] };
  }
  const check = checkBtfAgainstHeaders(parseBtf(btf.bytes), {
    ...(asmOffsets !== undefined ? { asmOffsets: asmOffsets.toString('latin1') } : {}),
    ...(bounds !== undefined ? { bounds: bounds.toString('latin1') } : {}),
  });
  if (check.mismatches.length > 0) {
    return refuse(`${what} does not match these headers (${check.mismatches.slice(0, 3).join('; ')}): it is another kernel's; no vmlinux.h in this entry`);
  }
  if (check.checked.length === 0) return { keep: true, notes: [warn(`${what} could not be checked against these headers (no layout facts in common): kept, unverified`)] };
  return { keep: true, notes: [info(`${what} matches these headers in ${check.checked.length} layout facts (asm-offsets.h, bounds.h)`)] };
}

function refuse(text: string): Verdict {
  return { keep: false, notes: [warn(text)] };
}

export interface ConfigChoice {
  text: Buffer;
  source: string;
}

export interface ConfigPaths {
  liveConfig?: string;
  bootDir?: string;
}

/**
 * The configuration for this entry: the running kernel's (/proc/config.gz, then
 * /boot/config-<release>) for its own entry, /boot/config-<release> for another release; each
 * kept only if it matches the tree's autoconf.h (or, for an entry without headers, if it is the
 * running kernel's own). Undefined when none qualifies; notes say why.
 */
export async function chooseConfig(facts: EntryFacts, live: LiveKernel, paths: ConfigPaths = {}): Promise<{ config: ConfigChoice | undefined; notes: Note[] }> {
  const notes: Note[] = [];
  const running = isRunningKernels(facts, live);
  const liveConfig = paths.liveConfig ?? LIVE_CONFIG;
  const candidates = [...(running ? [liveConfig] : []), path.join(paths.bootDir ?? BOOT_DIR, `config-${facts.release}`)];
  const autoconfBytes = facts.files.get(AUTOCONF_H);
  const autoconf = autoconfBytes === undefined ? undefined : parseAutoconf(autoconfBytes.toString('latin1'));
  for (const file of candidates) {
    const text = await readConfig(file).catch((err: unknown) => {
      notes.push(warn(`cannot read ${file}: ${errnoOf(err) ?? (err instanceof Error ? err.message : String(err))}`));
      return undefined;
    });
    if (text === undefined) continue;
    if (autoconf === undefined) {
      // Nothing to compare with (a vmlinux.h-only entry): only the running kernel's own, for
      // an entry that is the running kernel's by construction, will do.
      if (facts.live && file === liveConfig) return { config: { text, source: file }, notes };
      notes.push(warn(`${file} could not be checked (no autoconf.h in this entry): left out`));
      continue;
    }
    const check = compareConfig(parseKconfig(text.toString('latin1')), autoconf);
    if (check.mismatches.length === 0) {
      notes.push(info(`.config from ${file} matches these headers' autoconf.h in ${check.checked} options`));
      return { config: { text, source: file }, notes };
    }
    notes.push(warn(`${file} is another kernel's configuration (${check.mismatches.slice(0, 2).join('; ')}): left out`));
  }
  return { config: undefined, notes };
}

/** A configuration file's text: gunzipped when it is .gz; undefined when it does not exist. */
async function readConfig(file: string): Promise<Buffer | undefined> {
  let raw: Buffer;
  try {
    // procfs reports size 0: read to the end, within the bound.
    raw = await readBounded(file, MAX_CONFIG_BYTES);
  } catch (err) {
    if (errnoOf(err) === 'ENOENT' || errnoOf(err) === 'ENOTDIR') return undefined;
    throw err;
  }
  const text = file.endsWith('.gz') ? await gunzipAsync(raw, { maxOutputLength: MAX_CONFIG_BYTES }) : raw;
  if (!/^CONFIG_[A-Za-z0-9_]+=/m.test(text.toString('latin1', 0, Math.min(text.length, 64 * 1024)))) throw new Error('not a kernel configuration');
  return text;
}
