/**
 * Each benchmark owns one section of BENCHMARKS.md, between markers, so benches can be re-run
 * one at a time without losing the others' figures.
 */
import { readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export const BENCHMARKS_MD = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../BENCHMARKS.md');

export function machineLine(): string {
  const cpu = os.cpus()[0]?.model ?? 'unknown cpu';
  return `${os.cpus().length} × ${cpu}, ${Math.round(os.totalmem() / 2 ** 30)} GiB, Linux ${os.release()}, Node ${process.version}`;
}

/**
 * Drop what this build machine puts in every process's environment and a device never has, so
 * that node's own start-up (the reference every start-up ratio divides by) is measured as a
 * device would see it. NODE_EXTRA_CA_CERTS makes Node 20 parse a whole CA bundle at start:
 * measured here, `node -e 0` takes ~160 ms with it and ~100 ms without, which would flatter every
 * "× node -e 0" figure. Call it before spawning anything; children inherit process.env.
 */
export function useDeviceLikeEnvironment(): string[] {
  const dropped = ['NODE_EXTRA_CA_CERTS'].filter((name) => process.env[name] !== undefined);
  for (const name of dropped) delete process.env[name];
  return dropped;
}

/** The sentence a report adds when useDeviceLikeEnvironment() removed something. */
export function envNote(dropped: readonly string[]): string {
  return dropped.length === 0 ? '' : ` Every process measured ran without ${dropped.map((n) => `\`${n}\``).join(', ')}, which this machine sets for all processes and a device does not (it costs node itself ~60 ms at each start).`;
}

/** Replace (or append) the section `name` of BENCHMARKS.md with `markdown`. */
export async function writeSection(name: string, markdown: string, file = BENCHMARKS_MD): Promise<void> {
  const begin = `<!-- bench:${name} -->`;
  const end = `<!-- /bench:${name} -->`;
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch {
    text = '# Benchmarks\n\nEvery figure is a ratio against a reference measured in the same run on the same machine.\nRe-run with the command shown in each section.\n';
  }
  const block = `${begin}\n${markdown.trim()}\n${end}`;
  const a = text.indexOf(begin);
  const b = text.indexOf(end);
  text = a >= 0 && b > a ? text.slice(0, a) + block + text.slice(b + end.length) : `${text.trimEnd()}\n\n${block}\n`;
  await writeFile(file, text);
}

/** Median of a list of numbers (benchmarks report medians of several runs). */
export function median(xs: readonly number[]): number {
  const s = [...xs].sort((p, q) => p - q);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
