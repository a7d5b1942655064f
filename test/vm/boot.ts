/**
 * Boot a real test kernel by hand and try the daemon on it:
 *
 *   npm run vm                       # x86_64-6.1.192, a fresh cache
 *   npm run vm -- x86_64-6.1.192-b   # another kernel (a folder of ../shared/kernels, or a path)
 *   npm run vm -- x86_64-6.1.192 --cache /var/tmp/khcache   # a cache that persists across boots
 *
 * Inside: `kheadersd serve` as the systemd unit runs it (HTTP also on the VM's address, so the
 * host can reach it), then a root shell on the console; `kh` is the daemon's CLI. The host gets
 * the HTTP port forwarded (printed at start): `kheadersd pull --url http://127.0.0.1:PORT`.
 * Leave the shell (exit, or Ctrl-D) to power off; Ctrl-C kills the VM at once.
 */
import { mkdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { KERNELS_DIR, loadKernel, X86_KERNELS } from './kernels.js';
import { startVm, type VmCache } from './vm.js';

const SCENARIO = String.raw`
mkdir -p /etc/kheadersd
printf '{"http": "0.0.0.0:7711"}\n' >/etc/kheadersd/config.json
kh_start serve serve
echo "kheadersd is starting (log: $KH_OUT/serve.log); waiting until it serves..."
kh_wait_log serve '"msg":"mounted"' 600 && ls -l /run/kheaders && kh ls
cat <<EOF

  A root shell on $(uname -r). Try:  ls /run/kheaders/current/   kh ls   kh doctor
  BCC_KERNEL_SOURCE=/run/kheaders/current /usr/sbin/execsnoop-bpfcc     exit: power off
EOF
setsid -c sh -c 'kh() { "$KH_NODE" "$KH_CLI" "$@"; }; export PS1="vm:\$PWD# "; exec sh -i' </dev/console >/dev/console 2>&1
kh_stop serve >/dev/null
`;

async function main(argv: string[]): Promise<void> {
  let name: string = X86_KERNELS.a;
  let cacheDir: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--cache') cacheDir = argv[++i];
    else if (arg === '--help' || arg === '-h') {
      process.stdout.write(`usage: npm run vm -- [KERNEL] [--cache DIR]\n  KERNEL: a folder of ${KERNELS_DIR} (default ${name}), or a path to one\n`);
      return;
    } else name = arg;
  }
  const folder = name.includes('/') ? path.resolve(name) : path.join(KERNELS_DIR, name);
  const kernel = await loadKernel(path.basename(folder), undefined, path.dirname(folder));
  let cache: VmCache = { kind: 'tmpfs' };
  if (cacheDir !== undefined) {
    const dir = path.resolve(cacheDir);
    await mkdir(dir, { recursive: true, mode: 0o755 });
    if (!(await stat(dir)).isDirectory()) throw new Error(`${dir} is not a directory`);
    cache = { kind: 'host-dir', dir };
  }
  const vm = await startVm({ kernel, scenario: SCENARIO, cache, forwardHttp: true, interactive: true, timeoutMs: 24 * 3600_000 });
  process.stderr.write(`booting ${kernel.name} (${kernel.release}); the daemon's HTTP is at http://127.0.0.1:${vm.httpPort} on this host\n`);
  const result = await vm.result;
  await vm.dispose();
  process.exitCode = result.poweredOff ? 0 : 1;
}

main(process.argv.slice(2)).catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
});
