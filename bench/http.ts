/**
 * HTTP bench: `wrk` against the daemon's HTTP server and against nginx serving the same tree
 * extracted to a directory (`tar -xJf`), in one run, on the same ~200 header paths (a wrk Lua
 * script cycles through them). Reports requests/s (and the ratio to nginx, per round, since the
 * machine's other load comes and goes), p50/p99 latency, and the daemon's RSS idle and under
 * load. A third target, a bare node:http server answering the same bodies from a Map, shows
 * how much of the gap to nginx is node:http itself.
 *
 * Fair fight on a small machine: the daemon is one Node process (one JS thread), so nginx runs
 * one worker; wrk runs one thread with the same connection count against both. Both serve from
 * the page cache after a warm-up run. Loopback only; every run is bounded (--duration).
 *
 * The daemon is a child process (this file with --serve) so its RSS is the server's alone.
 *
 * Verification side by side: a second daemon child serves the same cache with verification off
 * (bytes not proven against the index's chunk digests, no index checksum at load; an internal
 * switch only benchmarks use). Each round runs both; the report gives requests/s of each, and
 * their cold start: fork to listening, then the first pass over the paths (every chunk proven
 * then) against a second pass.
 *
 * Reproduce, from the checkout: npx tsc -p . && node dist/bench/http.js
 *   [--duration 10] [--connections 32] [--rounds 2] [--no-write]
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { chmod, readFile, writeFile, mkdir } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createLogger } from '../src/log.js';
import { startHttpServer } from '../src/serve/http/server.js';
import { DaemonState } from '../src/serve/state.js';
import { CacheStore } from '../src/store/cache.js';
import { setReadVerification } from '../src/store/reader.js';
import { FIXTURE, fixtureSkipReason, ingestFixture, removeDir, run, runOk, tempDir } from '../test/helpers/http-env.js';
import { machineLine, median, writeSection } from './report.js';

interface Args {
  duration: number;
  connections: number;
  rounds: number;
  write: boolean;
}

function parseArgs(argv: readonly string[]): Args {
  const a: Args = { duration: 10, connections: 32, rounds: 3, write: true };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i + 1];
    if (argv[i] === '--duration') {
      a.duration = Number(v);
      i++;
    } else if (argv[i] === '--connections') {
      a.connections = Number(v);
      i++;
    } else if (argv[i] === '--rounds') {
      a.rounds = Number(v);
      i++;
    } else if (argv[i] === '--no-write') {
      a.write = false;
    }
  }
  a.duration = Math.min(Math.max(1, a.duration), 30); // bounded, whatever is asked
  a.connections = Math.min(Math.max(1, a.connections), 256);
  a.rounds = Math.min(Math.max(1, a.rounds), 5);
  return a;
}

// ---- child: the daemon's half ---------------------------------------------------------------------

async function serve(cacheDir: string, verify: boolean): Promise<void> {
  setReadVerification(verify);
  const log = createLogger('warn', process.stderr);
  const store = await CacheStore.open(cacheDir);
  const state = new DaemonState();
  state.currentId = await store.currentId();
  state.ready = true;
  const server = await startHttpServer({ listen: { host: '127.0.0.1', port: 0 }, store, state, log });
  process.send!({ type: 'ready', port: server.port });
  process.on('message', (msg: { type: string }) => {
    if (msg.type === 'close') void server.close().then(() => process.exit(0));
  });
}

/**
 * The ceiling for any server on node:http here: the same bodies from a Map, three headers, no
 * routing, no validation. Reported beside nginx so the gap is attributable.
 */
async function serveBare(cacheDir: string): Promise<void> {
  const store = await CacheStore.open(cacheDir);
  const entry = await store.load((await store.currentId())!);
  const pack = await readFile(path.join(entry.dir, 'pack.tar'));
  const bodies = new Map<string, Buffer>();
  for (const n of entry.index.nodes) {
    if (n.kind === 'file' && n.offset !== undefined) bodies.set(`/${n.path.split('/').map(encodeURIComponent).join('/')}`, Buffer.from(pack.subarray(n.offset, n.offset + n.size)));
  }
  const server = http.createServer((req, res) => {
    const body = bodies.get(req.url ?? '');
    if (!body) {
      res.writeHead(404);
      res.end();
      return;
    }
    res.writeHead(200, { 'content-type': 'text/x-c; charset=utf-8', 'content-length': body.length, etag: '"x"' });
    res.end(body);
  });
  server.listen(0, '127.0.0.1', () => process.send!({ type: 'ready', port: (server.address() as net.AddressInfo).port }));
  process.on('message', (msg: { type: string }) => {
    if (msg.type === 'close') server.close(() => process.exit(0));
  });
}

// ---- parent ---------------------------------------------------------------------------------------

interface WrkResult {
  requests: number;
  durationUs: number;
  errors: number;
  non2xx: number;
  p50Us: number;
  p99Us: number;
  maxUs: number;
  bytes: number;
  rps: number;
}

function luaScript(prefix: string, paths: readonly string[]): string {
  const list = paths.map((p) => `"${prefix}${p}"`).join(',\n  ');
  return `-- generated by bench/http.ts: cycle through header paths
local paths = {
  ${list}
}
local i = 0
request = function()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests":%d,"durationUs":%d,"errors":%d,"non2xx":%d,"p50Us":%d,"p99Us":%d,"maxUs":%d,"bytes":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max, summary.bytes))
end
`;
}

async function wrk(port: number, script: string, seconds: number, connections: number): Promise<WrkResult> {
  const r = await runOk('wrk', ['-t1', `-c${connections}`, `-d${seconds}s`, '--timeout', '5s', '-s', script, `http://127.0.0.1:${port}`]);
  const m = /^RESULT (\{.*\})$/m.exec(r.stdout);
  if (!m) throw new Error(`no result from wrk:\n${r.stdout}\n${r.stderr}`);
  const res = JSON.parse(m[1]!) as Omit<WrkResult, 'rps'>;
  return { ...res, rps: res.requests / (res.durationUs / 1e6) };
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** CPU time (user + system) a process has used, in µs (clock ticks of 10 ms). */
async function cpuUs(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10_000;
}

async function rssKiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/^VmRSS:\s+(\d+)/m.exec(status)?.[1] ?? 0);
}

async function startNginx(prefix: string, root: string, port: number): Promise<ChildProcess> {
  await mkdir(path.join(prefix, 'logs'), { recursive: true });
  const conf = path.join(prefix, 'nginx.conf');
  await writeFile(
    conf,
    `# generated by bench/http.ts: one worker, like the one JS thread it is compared with
worker_processes 1;
daemon off;
pid ${path.join(prefix, 'nginx.pid')};
error_log stderr warn;
${process.getuid?.() === 0 ? 'user root;' : ''}
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 30s;
  types { text/x-c h; }
  default_type application/octet-stream;
  etag on;
  server {
    listen 127.0.0.1:${port};
    root ${root};
    location / { }
  }
}
`,
  );
  const child = spawn('nginx', ['-p', prefix, '-c', conf, '-e', 'stderr'], { stdio: ['ignore', 'inherit', 'inherit'] });
  // Ready when it answers.
  for (let i = 0; i < 100; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (ok) return child;
    if (child.exitCode !== null) throw new Error(`nginx exited ${child.exitCode}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  child.kill('SIGTERM');
  throw new Error('nginx did not start');
}

function fmtMs(us: number): string {
  return (us / 1000).toFixed(2);
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  for (const tool of ['wrk', 'nginx', 'tar']) {
    const r = await run('sh', ['-c', `command -v ${tool}`]);
    if (r.code !== 0) {
      console.log(`http bench skipped: ${tool} is not installed`);
      return;
    }
  }
  const skip = await fixtureSkipReason();
  if (skip) {
    console.log(`http bench skipped: ${skip}`);
    return;
  }

  const work = await tempDir('bench-http');
  await chmod(work, 0o755); // nginx's worker may run as another user
  const tree = path.join(work, 'tree');
  const cacheDir = path.join(work, 'cache');
  const children: ChildProcess[] = [];
  let nginx: ChildProcess | undefined;
  try {
    await mkdir(tree);
    const [entry] = await Promise.all([ingestFixture(cacheDir), runOk('tar', ['-xJf', FIXTURE, '-C', tree])]);
    const headers = entry.index.nodes.filter((n) => n.kind === 'file' && n.name.endsWith('.h'));
    const step = Math.max(1, Math.floor(headers.length / 200));
    const paths = headers.filter((_, i) => i % step === 0).slice(0, 200).map((n) => n.path.split('/').map(encodeURIComponent).join('/'));
    const avgBytes = Math.round(paths.reduce((s, p) => s + entry.index.get(decodeURIComponent(p))!.size, 0) / paths.length);

    const daemonScript = path.join(work, 'daemon.lua');
    const nginxScript = path.join(work, 'nginx.lua');
    await writeFile(daemonScript, luaScript('/v1/kernels/current/files/', paths));
    await writeFile(nginxScript, luaScript('/', paths));

    const child = async (mode: string): Promise<{ proc: ChildProcess; port: number; startMs: number }> => {
      const t0 = performance.now();
      const proc = fork(fileURLToPath(import.meta.url), [mode, cacheDir], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      children.push(proc);
      const port = await new Promise<number>((resolve, reject) => {
        proc.once('message', (m: { type: string; port: number }) => (m.type === 'ready' ? resolve(m.port) : reject(new Error(`${mode} failed`))));
        proc.once('exit', (code) => reject(new Error(`${mode} exited ${code}`)));
      });
      return { proc, port, startMs: performance.now() - t0 };
    };
    /** Fetch every path once, in order: the first pass after start proves every chunk it reads. */
    const pass = async (port: number): Promise<number> => {
      const t0 = performance.now();
      for (const p of paths) {
        const r = await fetch(`http://127.0.0.1:${port}/v1/kernels/current/files/${p}`);
        if (r.status !== 200) throw new Error(`${p}: ${r.status}`);
        await r.arrayBuffer();
      }
      return performance.now() - t0;
    };
    const daemon = await child('--serve');
    const coldVerified = { start: daemon.startMs, first: await pass(daemon.port), second: await pass(daemon.port) };
    const unverified = await child('--serve-unverified');
    const coldUnverified = { start: unverified.startMs, first: await pass(unverified.port), second: await pass(unverified.port) };
    const bare = await child('--serve-bare');
    const nginxPort = await freePort();
    nginx = await startNginx(path.join(work, 'nginx'), tree, nginxPort);

    // Same bytes from all three (spot check), then warm them up.
    const probe = paths[0]!;
    const bodies = await Promise.all(
      [`http://127.0.0.1:${daemon.port}/v1/kernels/current/files/${probe}`, `http://127.0.0.1:${nginxPort}/${probe}`, `http://127.0.0.1:${bare.port}/${probe}`].map((u) =>
        fetch(u).then(async (r) => Buffer.from(await r.arrayBuffer())),
      ),
    );
    if (!bodies.every((b) => b.equals(bodies[0]!))) throw new Error(`the servers disagree on ${probe}`);
    const rssIdle = await rssKiB(daemon.proc.pid!);
    await wrk(daemon.port, daemonScript, 2, args.connections);
    await wrk(unverified.port, daemonScript, 2, args.connections);
    await wrk(nginxPort, nginxScript, 2, args.connections);
    await wrk(bare.port, nginxScript, 2, args.connections);

    const loadBefore = os.loadavg()[0]!;
    const runs = { daemon: [] as WrkResult[], unverified: [] as WrkResult[], nginx: [] as WrkResult[], bare: [] as WrkResult[] };
    const ratios: number[] = [];
    /** CPU µs the server process spent per request: less swayed by the machine's other load than requests/s. */
    const cpuPerRequest = { daemon: [] as number[], bare: [] as number[] };
    let rssPeak = 0;
    for (let round = 0; round < args.rounds; round++) {
      // Back to back, so both sides of a ratio saw the same machine (other load comes and goes).
      const sampler = setInterval(() => {
        void rssKiB(daemon.proc.pid!).then((kib) => (rssPeak = Math.max(rssPeak, kib)), () => {});
      }, 200);
      try {
        const cpu0 = await cpuUs(daemon.proc.pid!);
        runs.daemon.push(await wrk(daemon.port, daemonScript, args.duration, args.connections));
        cpuPerRequest.daemon.push(((await cpuUs(daemon.proc.pid!)) - cpu0) / runs.daemon.at(-1)!.requests);
      } finally {
        clearInterval(sampler);
      }
      runs.unverified.push(await wrk(unverified.port, daemonScript, args.duration, args.connections));
      runs.nginx.push(await wrk(nginxPort, nginxScript, args.duration, args.connections));
      const cpu0 = await cpuUs(bare.proc.pid!);
      runs.bare.push(await wrk(bare.port, nginxScript, args.duration, args.connections));
      cpuPerRequest.bare.push(((await cpuUs(bare.proc.pid!)) - cpu0) / runs.bare.at(-1)!.requests);
      ratios.push(runs.daemon.at(-1)!.rps / runs.nginx.at(-1)!.rps);
      console.log(`round ${round + 1}: daemon ${Math.round(runs.daemon.at(-1)!.rps)} req/s (verification off: ${Math.round(runs.unverified.at(-1)!.rps)}), nginx ${Math.round(runs.nginx.at(-1)!.rps)}, bare node:http ${Math.round(runs.bare.at(-1)!.rps)}`);
    }
    const rssAfter = await rssKiB(daemon.proc.pid!);

    const sum = (rs: WrkResult[]) => ({ rps: median(rs.map((r) => r.rps)), p50: median(rs.map((r) => r.p50Us)), p99: median(rs.map((r) => r.p99Us)), errors: rs.reduce((s, r) => s + r.errors + r.non2xx, 0) });
    const d = sum(runs.daemon);
    const u = sum(runs.unverified);
    const verifiedRatio = median(runs.daemon.map((r, i) => r.rps / runs.unverified[i]!.rps));
    const n = sum(runs.nginx);
    const b = sum(runs.bare);
    const ratio = median(ratios);
    const bareRatio = median(runs.bare.map((r, i) => r.rps / runs.nginx[i]!.rps));
    const ofBare = median(runs.daemon.map((r, i) => r.rps / runs.bare[i]!.rps));
    const errors = d.errors + u.errors + n.errors + b.errors;
    const row = (name: string, x: ReturnType<typeof sum>): string => `| ${name} | ${Math.round(x.rps)} | ${fmtMs(x.p50)} | ${fmtMs(x.p99)} | ${x.errors} |`;
    const md = `## HTTP: daemon vs nginx on the same tree

${machineLine()}. Fixture 6.1.192; ${paths.length} header paths cycled by a wrk Lua script (mean ${avgBytes} bytes); \`wrk -t1 -c${args.connections} -d${args.duration}s\` per target, ${args.rounds} rounds with the targets back to back, medians shown, after a 2 s warm-up each. nginx 1.22 with one worker (\`sendfile on\`, access log off) serving \`tar -xJf\` of the archive; the daemon is one Node ${process.version} process serving the cache entry (identity encoding: wrk sends no Accept-Encoding). "bare node:http" is the same bodies from a Map with no routing or checks: the ceiling of any server built on node:http on this machine.

| target | requests/s | p50 ms | p99 ms | errors |
| --- | ---: | ---: | ---: | ---: |
${row('kheadersd (`/v1/kernels/current/files/…`)', d)}
${row('kheadersd, verification off', u)}
${row('nginx (`/…`)', n)}
${row('bare node:http (`/…`)', b)}

Verification (bytes proven against the index's chunk digests before first served): requests/s with it on are **${verifiedRatio.toFixed(2)}×** those with it off (median of per-round ratios). Cold start, on / off: fork to listening ${coldVerified.start.toFixed(0)} / ${coldUnverified.start.toFixed(0)} ms; first pass over the ${paths.length} paths (every chunk read is proven) ${coldVerified.first.toFixed(0)} / ${coldUnverified.first.toFixed(0)} ms; second pass ${coldVerified.second.toFixed(0)} / ${coldUnverified.second.toFixed(0)} ms.

**Ratio daemon/nginx: ${ratio.toFixed(2)}** (median of per-round ratios ${ratios.map((r) => r.toFixed(2)).join(', ')}; target ≥ 0.8). Bare node:http/nginx: ${bareRatio.toFixed(2)}; daemon/bare node:http: ${ofBare.toFixed(2)}. CPU per request (user + system, median of rounds): daemon ${median(cpuPerRequest.daemon).toFixed(1)} µs, bare node:http ${median(cpuPerRequest.bare).toFixed(1)} µs. Daemon RSS: ${Math.round(rssIdle / 1024)} MiB idle, ${Math.round(rssPeak / 1024)} MiB peak under load, ${Math.round(rssAfter / 1024)} MiB after. ${errors === 0 ? 'No errors or non-2xx answers.' : `${errors} errors/non-2xx answers.`}

Machine load average (1 min) ${loadBefore.toFixed(1)} before the runs, ${os.loadavg()[0]!.toFixed(1)} after: on a shared machine the absolute figures and the ratio to nginx swing with other load (a busy machine slows nginx more than node), so compare runs by their load; daemon/bare node:http is the steadier figure.

Reproduce, from the checkout: \`npx tsc -p . && node dist/bench/http.js\` (options: \`--duration S --connections N --rounds R --no-write\`).
`;
    console.log(md);
    if (args.write) await writeSection('http', md);
  } finally {
    for (const c of children) {
      if (c.exitCode !== null) continue;
      c.send({ type: 'close' });
      await new Promise((r) => c.once('exit', r));
    }
    if (nginx && nginx.exitCode === null) {
      nginx.kill('SIGQUIT'); // graceful stop
      await new Promise((r) => nginx!.once('exit', r));
    }
    await removeDir(work);
  }
}

if (process.argv[2] === '--serve') await serve(process.argv[3]!, true);
else if (process.argv[2] === '--serve-unverified') await serve(process.argv[3]!, false);
else if (process.argv[2] === '--serve-bare') await serveBare(process.argv[3]!);
else await main();
