/**
 * An `xz` to put first on PATH: it decodes with the real one until hang() is called, and from then
 * on hangs instead (a `sleep` that takes xz's place, in its process group, as a hung xz would be).
 * For tests of a stop that comes while an entry is decoded.
 */
import { chmod, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

export interface HangableXz {
  /** PATH with the wrapper's directory first: give it to what should find this xz. */
  PATH: string;
  hang(): Promise<void>;
  /** Decode again (with the real xz). */
  unhang(): Promise<void>;
  /** The processes (zombies aside) started with this PATH that are still running: a hung xz left behind. */
  leftRunning(): Promise<number[]>;
}

/** The wrapper, made in `dir` (a test's temp dir); `hung`: hang from the start. */
export async function hangableXz(dir: string, hung = false): Promise<HangableXz> {
  const bin = path.join(dir, 'bin');
  const flag = path.join(dir, 'hang-xz');
  await mkdir(bin, { recursive: true });
  const realXz = (process.env.PATH ?? '').split(path.delimiter).filter((d) => d !== '' && d !== bin).map((d) => path.join(d, 'xz'));
  await writeFile(path.join(bin, 'xz'), `#!/bin/sh\n[ -e '${flag}' ] && exec sleep 600\nfor x in ${realXz.map((x) => `'${x}'`).join(' ')}; do [ -x "$x" ] && exec "$x" "$@"; done\nexit 127\n`);
  await chmod(path.join(bin, 'xz'), 0o755);
  const PATH = `${bin}${path.delimiter}${process.env.PATH ?? ''}`;
  const xz: HangableXz = {
    PATH,
    hang: () => writeFile(flag, ''),
    unhang: () => rm(flag, { force: true }),
    leftRunning: () => processesWithEnv(`PATH=${PATH}`),
  };
  if (hung) await xz.hang();
  return xz;
}

/** The processes (zombies aside) whose environment holds `entry` exactly. */
async function processesWithEnv(entry: string): Promise<number[]> {
  const out: number[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    const env = await readFile(`/proc/${pid}/environ`, 'latin1').catch(() => '');
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
    if (env.split('\0').includes(entry) && stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z') out.push(Number(pid));
  }
  return out;
}
