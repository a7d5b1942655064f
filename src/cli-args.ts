/**
 * The command line's grammar: commands declared as data (flags, positional arguments), parsed
 * with node's own util.parseArgs, and their help pages. Pure: it returns what was asked for or a
 * usage error's text, and never writes or exits (src/cli.ts does).
 *
 * parseArgs splits the words (`--flag value`, `--flag=value`, `--`); what it lacks is added here:
 * subcommands, `--no-X` switches, choices, counted positional arguments, messages that name the
 * flag as help shows it, and help pages.
 */
import { parseArgs } from 'node:util';

export interface Flag {
  /** The long name without dashes; its value is stored under the camelCase (cache-dir: cacheDir). */
  name: string;
  /** The value's placeholder in help (`--out <dir>`); absent for a switch. */
  value?: string;
  help: string;
  choices?: readonly string[];
  /** A value used when the flag is not given, shown in help. */
  default?: string;
  /** For `--no-X`: the switch X it turns off (X is then false). */
  negates?: string;
}

export type FlagValues = Record<string, string | boolean | undefined>;

export interface CommandSpec<Run> {
  name: string;
  description: string;
  /** Required positional arguments, in order. */
  args?: ReadonlyArray<{ name: string; help: string }>;
  flags: readonly Flag[];
  run: Run;
}

export interface ProgramSpec<Run> {
  name: string;
  version: string;
  description: string;
  /** Flags every command takes as well (before or after its name). */
  globalFlags: readonly Flag[];
  commands: ReadonlyArray<CommandSpec<Run>>;
  /** Text at the end of every help page. */
  footer: string;
}

export type Parsed<Run> =
  | { kind: 'run'; command: CommandSpec<Run>; flags: FlagValues; args: string[] }
  | { kind: 'help'; text: string }
  | { kind: 'version'; text: string }
  /** A usage error: `text` is the message, a hint, and the help of what was being parsed. */
  | { kind: 'usage'; text: string };

const HELP: Flag = { name: 'help', help: 'display help for command' };
const VERSION: Flag = { name: 'version', help: 'output the version number' };
const SHORT: Record<string, string> = { h: 'help', V: 'version' };

export const camelCase = (name: string): string => name.replace(/-([a-z])/g, (_m, c: string) => c.toUpperCase());

/** `--decoder <value>`, as help and messages show a flag. */
const term = (f: Flag): string => (f.value === undefined ? `--${f.name}` : `--${f.name} <${f.value}>`);

/** Parse `argv` (without node and the script) against the program's commands. */
export function parseCommandLine<Run>(program: ProgramSpec<Run>, argv: readonly string[]): Parsed<Run> {
  // First the words before the command's name: only the global flags may stand there.
  const top = lex(argv, program.globalFlags);
  const nameToken = top.tokens.find((t) => t.kind === 'positional');
  const before = nameToken === undefined ? top.tokens : top.tokens.filter((t) => t.index < nameToken.index);
  const programError = (message: string): Parsed<Run> => ({ kind: 'usage', text: `error: ${message}\n\n${programHelp(program)}` });
  for (const t of before) {
    if (t.kind !== 'option') continue;
    const problem = flagProblem(t, [...program.globalFlags, HELP, VERSION]);
    if (problem) return programError(problem);
  }
  if (hasFlag(top.tokens, 'version')) return { kind: 'version', text: `${program.version}\n` };
  if (nameToken === undefined || nameToken.kind !== 'positional') {
    if (hasFlag(before, 'help')) return { kind: 'help', text: programHelp(program) };
    return { kind: 'usage', text: programHelp(program) };
  }
  const rest = [...argv.slice(0, nameToken.index), ...argv.slice(nameToken.index + 1)];

  if (nameToken.value === 'help') {
    const topic = rest.find((w) => !w.startsWith('-'));
    if (topic === undefined) return { kind: 'help', text: programHelp(program) };
    const command = program.commands.find((c) => c.name === topic);
    return command ? { kind: 'help', text: commandHelp(program, command) } : programError(`unknown command '${topic}'`);
  }
  const command = program.commands.find((c) => c.name === nameToken.value);
  if (!command) return programError(`unknown command '${nameToken.value}'${didYouMean(nameToken.value, program.commands.map((c) => c.name))}`);

  const known = [...command.flags, ...program.globalFlags, HELP, VERSION];
  const { tokens } = lex(rest, known);
  const usage = (message: string): Parsed<Run> => ({ kind: 'usage', text: `error: ${message}\n\n${commandHelp(program, command)}` });
  if (hasFlag(tokens, 'help')) return { kind: 'help', text: commandHelp(program, command) };

  const flags: FlagValues = {};
  for (const f of known) if (f.default !== undefined) flags[camelCase(f.name)] = f.default;
  const args: string[] = [];
  for (const t of tokens) {
    if (t.kind === 'positional') args.push(t.value);
    if (t.kind !== 'option') continue;
    const problem = flagProblem(t, known);
    if (problem) return usage(problem);
    const flag = known.find((f) => f.name === t.name)!;
    if (flag.negates !== undefined) flags[camelCase(flag.negates)] = false;
    else flags[camelCase(flag.name)] = flag.value === undefined ? true : t.value;
  }
  const wanted = command.args ?? [];
  if (args.length < wanted.length) return usage(`missing required argument '${wanted[args.length]!.name}'`);
  if (args.length > wanted.length) return usage(`too many arguments for '${command.name}'. Expected ${wanted.length} argument${wanted.length === 1 ? '' : 's'} but got ${args.length}.`);
  return { kind: 'run', command, flags, args };
}

type Token = NonNullable<ReturnType<typeof parseArgs>['tokens']>[number];
type OptionToken = Extract<Token, { kind: 'option' }>;

/**
 * parseArgs in its lenient mode, for its tokens: each flag with its value as given, in order
 * (a repeated flag: the last wins), checked by flagProblem rather than thrown as parseArgs'
 * own errors, which do not know the flags' placeholders, choices or `--no-` pairs.
 */
function lex(argv: readonly string[], flags: readonly Flag[]): { tokens: Token[] } {
  const options: Record<string, { type: 'string' | 'boolean'; short?: string }> = {};
  for (const f of flags) options[f.name] = { type: f.value === undefined ? 'boolean' : 'string' };
  for (const [short, name] of Object.entries(SHORT)) options[name] = { type: 'boolean', short };
  const { tokens } = parseArgs({ args: [...argv], options, strict: false, allowPositionals: true, tokens: true });
  // parseArgs reads `-dash.h` as the short flags -d -a -s -h …; there are no such groups here
  // (the only short flags are -h and -V), so the word is one unknown option, not a request for help.
  return {
    tokens: tokens.flatMap((t, i): Token[] => {
      const word = argv[t.index] ?? '';
      if (t.kind !== 'option' || t.rawName.startsWith('--') || word === t.rawName) return [t];
      return tokens[i - 1]?.index === t.index ? [] : [{ ...t, name: word.slice(1), rawName: word, value: undefined, inlineValue: undefined }];
    }),
  };
}

const hasFlag = (tokens: readonly Token[], name: string): boolean => tokens.some((t) => t.kind === 'option' && t.name === name);

/** What is wrong with one flag as given, or undefined. */
function flagProblem(t: OptionToken, known: readonly Flag[]): string | undefined {
  const flag = known.find((f) => f.name === t.name && (t.rawName.startsWith('--') || SHORT[t.rawName.slice(1)] === f.name));
  if (!flag) {
    const names = known.map((f) => `--${f.name}`);
    // `--no-json` for a switch that has no `--no-` form: the switch is what was meant.
    return `unknown option '${t.rawName}'${didYouMean(t.rawName, names) || didYouMean(t.rawName.replace(/^--no-/, '--'), names)}`;
  }
  if (flag.value === undefined) return t.inlineValue ? `option '${term(flag)}' takes no value (given '${t.rawName}=${t.value ?? ''}')` : undefined;
  if (t.value === undefined) return `option '${term(flag)}' argument missing`;
  if (flag.choices && !flag.choices.includes(t.value)) return `option '${term(flag)}' argument '${t.value}' is invalid. Allowed choices are ${flag.choices.join(', ')}.`;
  return undefined;
}

/** "(Did you mean --cache-dir?)" for a word within two edits of a known one (and not mostly different). */
function didYouMean(word: string, candidates: readonly string[]): string {
  let best: string | undefined;
  let bestDistance = 3;
  for (const c of candidates) {
    const d = editDistance(word, c);
    if (d < bestDistance && d * 2 <= c.length) [best, bestDistance] = [c, d];
  }
  return best === undefined ? '' : `\n(Did you mean ${best}?)`;
}

function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_v, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) row[j] = Math.min(prev[j]! + 1, row[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = row;
  }
  return prev[b.length]!;
}

// --- help pages ---

const WIDTH = 80;

function flagLine(f: Flag): [string, string] {
  let help = f.help;
  if (f.choices) help += ` (choices: ${f.choices.map((c) => JSON.stringify(c)).join(', ')})`;
  if (f.default !== undefined) help += ` (default: ${JSON.stringify(f.default)})`;
  return [term(f), help];
}

const usageOf = (c: CommandSpec<unknown>): string => [c.name, '[options]', ...(c.args ?? []).map((a) => `<${a.name}>`)].join(' ');

export function programHelp<Run>(program: ProgramSpec<Run>): string {
  return page(`Usage: ${program.name} [options] [command]`, program.description, [
    ['Options:', [['-V, --version', VERSION.help], ...program.globalFlags.map(flagLine), ['-h, --help', HELP.help]]],
    ['Commands:', [...program.commands.map((c): [string, string] => [usageOf(c), c.description]), ['help [command]', HELP.help]]],
  ], program.footer);
}

export function commandHelp<Run>(program: ProgramSpec<Run>, command: CommandSpec<Run>): string {
  return page(`Usage: ${program.name} ${usageOf(command)}`, command.description, [
    ['Arguments:', (command.args ?? []).map((a): [string, string] => [a.name, a.help])],
    ['Options:', [...command.flags.map(flagLine), ['-h, --help', HELP.help]]],
  ], program.footer);
}

/** Sections of two columns; the second wrapped at word boundaries to the page's width (at least 40 wide). */
function page(usage: string, description: string, sections: Array<[string, Array<[string, string]>]>, footer: string): string {
  const rows = sections.flatMap(([, r]) => r);
  const column = Math.max(...rows.map(([t]) => t.length)) + 2;
  const textWidth = Math.max(40, WIDTH - 2 - column);
  const out = [usage, '', wrap(description, WIDTH).join('\n')];
  for (const [title, sectionRows] of sections) {
    if (sectionRows.length === 0) continue;
    out.push('', title);
    for (const [t, text] of sectionRows) out.push(wrap(text, textWidth).map((line, i) => `  ${(i === 0 ? t : '').padEnd(column)}${line}`).join('\n'));
  }
  out.push('', footer);
  return out.join('\n') + '\n';
}

function wrap(text: string, width: number): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of text.split(' ')) {
    if (line !== '' && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else line = line === '' ? word : `${line} ${word}`;
  }
  lines.push(line);
  return lines;
}
