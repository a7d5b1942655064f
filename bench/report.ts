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
