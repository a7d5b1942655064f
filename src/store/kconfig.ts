/**
 * The kernel configuration (`.config`) and the header generated from it at build time
 * (`include/generated/autoconf.h`, which every kheaders archive carries): parsing both, and
 * checking that a configuration belongs to a tree of headers. Pure: text in, facts out.
 *
 * Kconfig writes one line per set option into each, from the same values:
 *
 *   .config                      autoconf.h
 *   CONFIG_FOO=y                 #define CONFIG_FOO 1
 *   CONFIG_BAR=m                 #define CONFIG_BAR_MODULE 1
 *   CONFIG_HZ=250                #define CONFIG_HZ 250
 *   CONFIG_NAME="x"              #define CONFIG_NAME "x"
 *   # CONFIG_BAZ is not set      (nothing)
 *
 * so the two describe the same kernel exactly when they define the same options with the same
 * values. That is what lets a `.config` found on the machine (/proc/config.gz, /boot/config-R)
 * be put beside headers only when it is theirs.
 */

/** Set options of a `.config`, in autoconf.h's terms: `CONFIG_X` → `1`, `CONFIG_X_MODULE` → `1`, or the value. */
export function parseKconfig(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split('\n')) {
    const m = /^(CONFIG_[A-Za-z0-9_]+)=(.*)$/.exec(line.trim());
    if (!m) continue;
    const [, name, value] = m as unknown as [string, string, string];
    if (value === 'y') out.set(name, '1');
    else if (value === 'm') out.set(`${name}_MODULE`, '1');
    else if (value !== 'n') out.set(name, value);
  }
  return out;
}

/** The `#define CONFIG_…` lines of autoconf.h. */
export function parseAutoconf(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split('\n')) {
    const m = /^#define\s+(CONFIG_[A-Za-z0-9_]+)\s+(.*?)\s*$/.exec(line);
    if (m) out.set(m[1]!, m[2]!);
  }
  return out;
}

export interface ConfigCheck {
  /** Options compared. */
  checked: number;
  /** Options that differ, in words (at most a few). */
  mismatches: string[];
}

/** Compare a configuration with a tree's autoconf.h (both parsed above). */
export function compareConfig(config: ReadonlyMap<string, string>, autoconf: ReadonlyMap<string, string>, limit = 5): ConfigCheck {
  const mismatches: string[] = [];
  let differing = 0;
  const note = (s: string): void => {
    differing++;
    if (mismatches.length < limit) mismatches.push(s);
  };
  for (const [name, value] of config) {
    const there = autoconf.get(name);
    if (there === undefined) note(`${name} is ${value} in the configuration, unset in the headers`);
    else if (there !== value) note(`${name} is ${value} in the configuration, ${there} in the headers`);
  }
  for (const [name, value] of autoconf) if (!config.has(name)) note(`${name} is ${value} in the headers, unset in the configuration`);
  if (differing > mismatches.length) mismatches.push(`… ${differing - mismatches.length} more`);
  return { checked: new Set([...config.keys(), ...autoconf.keys()]).size, mismatches };
}
