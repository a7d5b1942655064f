/**
 * The one token-file rule (src/token.ts): each rule on its own, then each broken file given to
 * each command as a user runs it (`serve`, `doctor`, `pull`, real processes): all three refuse
 * it, with the same words, before doing anything else; a good file works in all three.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmod, chown, mkdir, readdir, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { after, before, test } from 'node:test';
import { pull } from '../src/commands/pull.js';
import { KheadersError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { TOKEN_MIN_CHARS, readTokenFile, type TokenRule } from '../src/token.js';
import { goodArchive, runCli, tempDir } from './helpers/archives.js';
import { removeDir, request, tempDir as tempWork } from './helpers/http-env.js';
import { serveUntilListening } from './helpers/serve-process.js';

const GOOD = 'k3y-0123456789abcdef-0123456789abcdef';
const isRoot = process.getuid?.() === 0;

interface Case {
  label: string;
  rule: TokenRule;
  /** Make the file at `file` (which does not exist yet). */
  make(file: string): Promise<void>;
  problem: RegExp;
  needsRoot?: boolean;
}

const CASES: Case[] = [
  { label: 'missing', rule: 'readable', make: async () => {}, problem: /cannot be read \(ENOENT\)/ },
  { label: 'a directory', rule: 'regular-file', make: (f) => mkdir(f), problem: /is not a regular file/ },
  { label: 'a FIFO (must not block)', rule: 'regular-file', make: async (f) => void execFileSync('mkfifo', ['-m', '600', f]), problem: /is not a regular file/ },
  {
    label: "another user's",
    rule: 'owner',
    make: async (f) => {
      await writeFile(f, GOOD, { mode: 0o600 });
      await chown(f, 4242, 4242);
    },
    problem: /is owned by uid 4242, not by you \(uid \d+\) or root/,
    needsRoot: true,
  },
  { label: 'readable by others', rule: 'mode', make: (f) => writeAndChmod(f, GOOD, 0o644), problem: /readable or writable by others \(mode 644, must be 600 or stricter\)/ },
  { label: 'readable by the group', rule: 'mode', make: (f) => writeAndChmod(f, GOOD, 0o640), problem: /mode 640/ },
  { label: 'writable by others only', rule: 'mode', make: (f) => writeAndChmod(f, GOOD, 0o602), problem: /mode 602/ },
  { label: 'two lines', rule: 'one-line', make: (f) => writeAndChmod(f, `${GOOD}\n${GOOD}\n`, 0o600), problem: /holds more than one line/ },
  { label: 'huge', rule: 'one-line', make: (f) => writeAndChmod(f, 'x'.repeat(10_000), 0o600), problem: /10000 bytes, too big for a token/ },
  { label: 'short', rule: 'length', make: (f) => writeAndChmod(f, 'tok-123\n', 0o600), problem: new RegExp(`holds fewer than ${TOKEN_MIN_CHARS} characters`) },
  { label: 'empty', rule: 'length', make: (f) => writeAndChmod(f, '\n', 0o600), problem: /fewer than/ },
  { label: 'a space inside', rule: 'printable', make: (f) => writeAndChmod(f, 'abcdefgh ijklmnopqrs\n', 0o600), problem: /a space or a character that is not printable ASCII/ },
  { label: 'a control character', rule: 'printable', make: (f) => writeAndChmod(f, 'abcdefgh\u0007ijklmnopqrs', 0o600), problem: /not printable/ },
  { label: 'non-ASCII', rule: 'printable', make: (f) => writeAndChmod(f, 'abcdefghé-ijklmnopqrs', 0o600), problem: /not printable/ },
];

async function writeAndChmod(file: string, text: string, mode: number): Promise<void> {
  await writeFile(file, text, { mode });
  await chmod(file, mode); // whatever the umask
}

let work: string;
let archive: string;
let pullUrl: string;
/** Connections the listener pull is pointed at has seen: pull must not even connect with a broken file. */
let connections = 0;
let listener: net.Server | undefined;
before(async () => {
  work = await tempWork('token');
  archive = path.join(work, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive('6.99.4-token'));
  listener = net.createServer((s) => {
    connections++;
    s.destroy();
  });
  await new Promise<void>((r) => listener!.listen(0, '127.0.0.1', r));
  pullUrl = `http://127.0.0.1:${(listener.address() as net.AddressInfo).port}`;
});
after(async () => {
  listener?.close();
  await removeDir(work);
});

let made = 0;
async function fileFor(c: Case): Promise<string> {
  const file = path.join(work, `token-${made++}`);
  await c.make(file);
  return file;
}

for (const c of CASES) {
  test(`readTokenFile refuses a token file that is ${c.label}: E_CONFIG naming the rule (${c.rule}) and the fix`, { skip: c.needsRoot && !isRoot ? 'needs root to chown the file' : false }, async () => {
    const file = await fileFor(c);
    await assert.rejects(readTokenFile(file), (err: unknown) => {
      assert.ok(err instanceof KheadersError, String(err));
      assert.equal(err.code, 'E_CONFIG');
      assert.equal(err.details.rule, c.rule);
      assert.match(err.message, c.problem);
      assert.ok(err.message.startsWith(`the token file ${file} `), `names the file: ${err.message}`);
      assert.match(err.message, /; fix with: \S/, 'says what to do');
      return true;
    });
  });
}

test('readTokenFile: what the rule accepts', async () => {
  const accepted: Array<[string, string, number]> = [
    ['trailing newline', `${GOOD}\n`, 0o600],
    ['CRLF and spaces around', `  ${GOOD} \r\n`, 0o600],
    ['read-only for the owner', GOOD, 0o400],
    ['exactly the minimum', 'x'.repeat(TOKEN_MIN_CHARS), 0o600],
    ['every printable ASCII character', Array.from({ length: 94 }, (_, i) => String.fromCharCode(0x21 + i)).join(''), 0o600],
  ];
  for (const [label, text, mode] of accepted) {
    const file = path.join(work, `ok-${made++}`);
    await writeAndChmod(file, text, mode);
    assert.equal(await readTokenFile(file), text.trim(), label);
  }
});

for (const c of CASES) {
  test(`serve, doctor and pull all refuse a token file that is ${c.label}, with the same words, before doing anything else`, { timeout: 180_000, skip: c.needsRoot && !isRoot ? 'needs root to chown the file' : false }, async (t) => {
    const dir = await tempDir(t);
    const file = await fileFor(c);
    const cacheDir = path.join(dir, 'cache');
    const problem = await readTokenFile(file).then(
      () => assert.fail('accepted'),
      (err: KheadersError) => String(err.details.problem),
    );

    const serve = await runCli(['serve', '--token-file', file, '--archive', archive, '--cache-dir', cacheDir, '--mount', 'off', '--http', '127.0.0.1:0', '--btf', 'off'], { timeoutMs: 60_000 });
    assert.equal(serve.code, 2, `serve: exit 2; stderr: ${serve.stderr}`);
    assert.ok(serve.stderr.includes(problem), `serve: ${serve.stderr}`);
    assert.deepEqual(await readdir(dir), [], 'serve refused before touching the cache');

    const doctor = await runCli(['doctor', '--json', '--token-file', file, '--cache-dir', cacheDir, '--mount', 'off', '--http', 'off'], { timeoutMs: 60_000 });
    const check = (JSON.parse(doctor.stdout) as { checks: Array<{ id: string; status: string; what: string; fix?: string }> }).checks.find((x) => x.id === 'token');
    assert.equal(check?.status, 'fail', `doctor: ${doctor.stdout}`);
    assert.equal(check.what, problem, 'doctor');
    assert.ok(check.fix !== undefined && check.fix !== '', 'doctor says what to do');
    assert.equal(doctor.code, 5, 'doctor: a FAIL is exit 5');

    const before = connections;
    const pulled = await runCli(['pull', '--url', pullUrl, '--token-file', file, '--cache-dir', path.join(dir, 'host')], { timeoutMs: 60_000 });
    assert.equal(pulled.code, 2, `pull: exit 2; stderr: ${pulled.stderr}`);
    assert.ok(pulled.stderr.includes(problem), `pull: ${pulled.stderr}`);
    assert.equal(connections, before, 'pull did not connect');
  });
}

test('a good token file works in serve, doctor and pull', { timeout: 300_000 }, async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'token');
  await writeAndChmod(file, `${GOOD}\n`, 0o600);

  const doctor = await runCli(['doctor', '--json', '--token-file', file, '--cache-dir', path.join(dir, 'cache'), '--mount', 'off', '--http', 'off'], { timeoutMs: 60_000 });
  const check = (JSON.parse(doctor.stdout) as { checks: Array<{ id: string; status: string; what: string }> }).checks.find((x) => x.id === 'token');
  assert.equal(check?.status, 'ok', doctor.stdout);

  const archive = path.join(dir, 'kernel.tar.xz');
  await writeFile(archive, await goodArchive('6.99.5-token'));
  const served = await serveUntilListening(t, ['--token-file', file, '--archive', archive, '--cache-dir', path.join(dir, 'cache'), '--mount', 'off', '--http', '127.0.0.1:0', '--btf', 'off']);
  assert.ok(served.listening, JSON.stringify(served));
  const port = Number(new URL(served.url).port);
  assert.equal((await request(port, '/v1/kernels')).status, 401);
  assert.equal((await request(port, '/v1/kernels', { headers: { authorization: `Bearer ${GOOD}` } })).status, 200);

  const pulled = await runCli(['pull', '--url', served.url, '--token-file', file, '--cache-dir', path.join(dir, 'host')], { timeoutMs: 120_000 });
  assert.equal(pulled.code, 0, pulled.stderr);
  assert.match(pulled.stdout, /^export BCC_KERNEL_SOURCE=/m);
});

test('pull: a token and a token file are exclusive', async () => {
  const quiet = new PassThrough();
  await assert.rejects(pull({ url: 'http://127.0.0.1:1', token: GOOD, tokenFile: path.join(work, 'any') }, { stdout: quiet, stderr: quiet, log: createLogger('silent') }), (err: unknown) => {
    assert.ok(err instanceof KheadersError);
    assert.equal(err.code, 'E_USAGE');
    return true;
  });
});
