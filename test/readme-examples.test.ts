/**
 * The README's examples, run as written. Every ```sh block the README introduces with "A test runs
 * this block as written" is cut into its snippets (separated by blank lines), `/run/kheaders` is
 * replaced by a real mount made here, and each snippet runs under bash in a directory holding the
 * `prog.bpf.c` it compiles. The mount serves a real kernel's files: the 6.1 test kernel's header
 * archive (from its kheaders.ko), a vmlinux.h from its vmlinux, its .config, and its efivarfs
 * module's header from the module's own BTF.
 *
 * The mount is served by this very process: every command runs as an asynchronous child.
 * Needs root, /dev/fuse, clang and the test kernel; BCC and bpftrace are used when installed and
 * allowed to load programs here (each skip says why).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { createLogger } from '../src/log.js';
import { IndexFsModel } from '../src/serve/fuse/index-model.js';
import { mountKernel, type KernelFuseMount } from '../src/serve/fuse/kernel/index.js';
import { CacheStore } from '../src/store/cache.js';
import { ingest } from '../src/store/ingest.js';
import { ModuleHeaders } from '../src/store/module-btf.js';
import { REPO_ROOT, tempDir } from './helpers/archives.js';
import { baseBtfOf, moduleBtfOf, testKernel, vmlinuxOf } from './helpers/kernels.js';

const log = createLogger('silent');
const KERNEL = testKernel('x86_64-6.1.192');
const MARK = 'A test runs this block as written';

/** The snippets of every marked ```sh block of the README, in order. */
async function readmeSnippets(): Promise<string[]> {
  const text = await readFile(path.join(REPO_ROOT, 'README.md'), 'utf8');
  const snippets: string[] = [];
  for (let at = text.indexOf(MARK); at >= 0; at = text.indexOf(MARK, at + 1)) {
    const open = text.indexOf('```sh\n', at);
    const close = text.indexOf('\n```', open + 6);
    assert.ok(open > at && close > open, 'a marked block follows the mark');
    for (const part of text.slice(open + 6, close).split(/\n\s*\n/)) if (part.trim() !== '') snippets.push(part.trim());
  }
  return snippets;
}

/** BCC style: kernel headers, parsed for the host, then compiled for BPF. */
const KERNEL_HEADERS_PROG = `#include <linux/sched.h>
#include <linux/ptrace.h>
#include <net/sock.h>

__attribute__((section("kprobe/tcp_v4_connect"), used))
int trace_connect(struct pt_regs *ctx)
{
	struct sock *sk = (struct sock *)ctx->di;
	return sk ? sk->__sk_common.skc_family + (int)sizeof(struct task_struct) : 0;
}

char _license[] __attribute__((section("license"), used)) = "GPL";
`;

/** libbpf CO-RE against vmlinux.h. */
const CORE_PROG = `#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

SEC("tracepoint/sched/sched_switch")
int on_switch(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	return BPF_CORE_READ(task, real_parent, tgid);
}
`;

/** CO-RE against a module's header: the kernel's types and the module's. */
const MODULE_PROG = `#include "efivarfs.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

SEC("kprobe/efivar_entry_size")
int on_size(struct pt_regs *ctx)
{
	struct efivar_entry *entry = (struct efivar_entry *)ctx->di;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	return BPF_CORE_READ(entry, var.DataSize) + BPF_CORE_READ(task, pid);
}
`;

function sh(script: string, cwd: string, timeoutMs = 300_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile('bash', ['-eo', 'pipefail', '-c', script], { cwd, timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : 1;
      resolve({ code, stdout, stderr });
    });
  });
}

function canLoad(stderr: string): boolean {
  return !/Operation not permitted|EPERM|Need super-user privileges|CAP_BPF/.test(stderr);
}

test('the README examples run as written against a real mount', async (t) => {
  if (process.getuid?.() !== 0 || !existsSync('/dev/fuse')) return t.skip('needs root and /dev/fuse');
  if (typeof KERNEL === 'string') return t.skip(KERNEL);
  const clang = await sh('command -v clang', '/');
  if (clang.code !== 0) return t.skip('clang is not installed');

  const work = await tempDir(t, 'kheaders-readme-');
  const cacheDir = path.join(work, 'cache');
  // The test kernel's own files, as they would be on that kernel: archive, vmlinux, config.
  const vmlinux = path.join(work, 'vmlinux');
  await writeFile(vmlinux, vmlinuxOf(KERNEL));
  await mkdir(path.join(work, 'boot'));
  await writeFile(path.join(work, 'boot', `config-${KERNEL.release}`), KERNEL.config);
  const ko = KERNEL.modules.get('kheaders');
  assert.ok(ko);
  const { entry } = await ingest({ cacheDir, archive: ko, btf: vmlinux, bootDir: path.join(work, 'boot'), liveBtf: path.join(work, 'none'), liveConfig: path.join(work, 'none'), setCurrent: true, log });
  assert.ok(entry.index.get('vmlinux.h') && entry.index.get('.config'), JSON.stringify(entry.manifest.notes));
  // Its efivarfs module, "loaded": the BTF directory holds its split BTF over the kernel's.
  const btfDir = path.join(work, 'sys-kernel-btf');
  await mkdir(btfDir);
  await writeFile(path.join(btfDir, 'vmlinux'), baseBtfOf(KERNEL));
  await writeFile(path.join(btfDir, 'efivarfs'), moduleBtfOf(KERNEL, 'efivarfs'));

  const store = await CacheStore.open(cacheDir);
  const modules = await ModuleHeaders.open({ dir: path.join(cacheDir, 'module-btf'), btfDir, log });
  const model = new IndexFsModel({ log, modules });
  model.setEntries([await store.load(entry.manifest.id)], entry.manifest.id, entry.manifest.id);
  const mnt = path.join(work, 'mnt');
  let mount: KernelFuseMount | undefined;
  try {
    mount = await mountKernel({ mountpoint: mnt, model, log });
    const snippets = await readmeSnippets();
    assert.ok(snippets.length >= 5, `${snippets.length} snippets`);
    let ran = 0;
    for (const [i, written] of snippets.entries()) {
      const label = written.split('\n')[0]!;
      // One subtest per snippet, so that a snippet skipped here is counted with its reason.
      await t.test(label, async (st) => {
        const script = written.replaceAll('/run/kheaders', mnt).replace(/^sudo /gm, '');
        const dir = path.join(work, `snippet-${i}`);
        await mkdir(dir);
        const prog = /-emit-llvm/.test(script) ? KERNEL_HEADERS_PROG : /\/btf -c prog\.bpf\.c/.test(script) ? MODULE_PROG : /-target bpf .*-c prog\.bpf\.c/.test(script) ? CORE_PROG : undefined;
        if (prog !== undefined) await writeFile(path.join(dir, 'prog.bpf.c'), prog);
        // BCC's tools run under the system python (their #! line), which has the bcc module.
        if (/-bpfcc\b/.test(script) && (await sh('/usr/bin/python3 -c "import bcc"', dir)).code !== 0) return st.skip('python3-bpfcc is not importable');
        if (/\bbpftrace\b/.test(script) && (await sh('command -v bpftrace', dir)).code !== 0) return st.skip('bpftrace is not installed');
        const lookupsBefore = mount!.opCounts?.()['lookup'] ?? 0;
        const r = await sh(script, dir);
        if (r.code !== 0 && /-bpfcc\b|\bbpftrace\b/.test(script) && !canLoad(r.stderr)) {
          return st.skip(`compiled, but BPF programs cannot be loaded here: ${r.stderr.trim().split('\n').pop() ?? ''}`);
        }
        assert.equal(r.code, 0, `${label}\n${r.stderr.slice(-3000)}`);
        ran++;
        if (prog !== undefined) assert.ok((await stat(path.join(dir, 'prog.bpf.o'))).size > 0, `${label}: made prog.bpf.o`);
        if (/^ls .*\/btf\/$/m.test(script)) assert.match(r.stdout, /^efivarfs\.h$/m, 'the loaded module has a header');
        if (/\bbpftrace\b/.test(script)) assert.match(r.stdout, /^\d+$/m, 'bpftrace printed sizeof(struct task_struct)');
        if (/-bpfcc\b/.test(script)) assert.ok((mount!.opCounts?.()['lookup'] ?? 0) > lookupsBefore, 'BCC read its headers through the mount');
        return undefined;
      });
    }
    assert.ok(ran >= 3, 'at least the clang examples ran');
  } finally {
    await mount?.unmount();
    await model.close();
    await modules.close();
  }
});
