/**
 * Real BPF on a real kernel, compiled against the headers the daemon serves for it. Inside the
 * VM, with `kheadersd serve` running as shipped and BCC_KERNEL_SOURCE=/run/kheaders/current:
 *
 * - a BPF program built by BCC's Python front end (which does what BCC tools do: clang for the
 *   host target with the kernel's include flags, -emit-llvm, then the BPF backend) and attached
 *   to the clock_nanosleep syscall's kprobe. It reads task->tgid, task->pid, task->comm and
 *   task->real_parent->tgid at the offsets the served headers give, next to what the kernel's
 *   helpers say (bpf_get_current_pid_tgid, bpf_get_current_comm), for `sleep` processes whose
 *   pids the test knows. With another kernel's headers the offsets are wrong and so are the values.
 * - one real tool, unmodified: Debian's exitsnoop-bpfcc (BCC), which reads task->real_parent->tgid,
 *   task->start_time and task->exit_code; `sh -c 'sleep 0.3; exit 7'` must show up with its own
 *   pid, its parent's pid, an age near 0.3 s and code 7.
 *
 * Both compile at once (two vCPUs); they are the slow part (tens of seconds each under TCG).
 * No other header source exists in the VM (no /lib/modules/<release>/build); BCC's own fallback
 * (modprobe kheaders, unpack into /tmp/kheaders-<release>) must not have run.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { exitWhenDone } from './vm/exit-guard.js';
import { loadKernel, X86_KERNELS } from './vm/kernels.js';
import { context, elapsed, readOut, vmSkipReason, VM_TEST_TIMEOUT_MS } from './vm/support.js';
import { startVm } from './vm/vm.js';

const PROGRAM = String.raw`
import json, os, subprocess, sys, time
from bcc import BPF

b = BPF(text=r"""
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

struct sample {
    u32 helper_tgid, helper_pid, task_tgid, task_pid, parent_tgid;
    char helper_comm[TASK_COMM_LEN], task_comm[TASK_COMM_LEN];
};
BPF_HASH(samples, u32, struct sample);

int on_nanosleep(struct pt_regs *ctx)
{
    struct sample s = {};
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    struct task_struct *parent = NULL;
    u64 id = bpf_get_current_pid_tgid();
    s.helper_tgid = id >> 32;
    s.helper_pid = (u32)id;
    bpf_get_current_comm(&s.helper_comm, sizeof(s.helper_comm));
    bpf_probe_read_kernel(&s.task_tgid, sizeof(s.task_tgid), &task->tgid);
    bpf_probe_read_kernel(&s.task_pid, sizeof(s.task_pid), &task->pid);
    bpf_probe_read_kernel(&s.task_comm, sizeof(s.task_comm), &task->comm);
    bpf_probe_read_kernel(&parent, sizeof(parent), &task->real_parent);
    bpf_probe_read_kernel(&s.parent_tgid, sizeof(s.parent_tgid), &parent->tgid);
    samples.update(&s.helper_tgid, &s);
    return 0;
}
""")
b.attach_kprobe(event=b.get_syscall_fnname("clock_nanosleep"), fn_name="on_nanosleep")
print("attached", flush=True)
sleepers = [subprocess.Popen(["sleep", "0.2"]) for _ in range(3)]
for p in sleepers:
    p.wait()
table = b["samples"]
out = {"parent": os.getpid(), "sleepers": []}
for p in sleepers:
    key = table.Key(p.pid)
    s = table[key] if key in table else None
    out["sleepers"].append({"pid": p.pid, "sample": None if s is None else {
        "helper_tgid": s.helper_tgid, "helper_pid": s.helper_pid, "task_tgid": s.task_tgid,
        "task_pid": s.task_pid, "parent_tgid": s.parent_tgid,
        "helper_comm": s.helper_comm.decode(), "task_comm": s.task_comm.decode()}})
print(json.dumps(out), flush=True)
`;

const SCENARIO = String.raw`
set -u
kh_start serve serve
kh_wait_log serve '"msg":"mounted"' 600 || exit 11
export BCC_KERNEL_SOURCE=/run/kheaders/current PYTHONUNBUFFERED=1
t0=$(cut -d' ' -f1 /proc/uptime)
# A background job of a non-interactive shell starts with SIGINT ignored, and Python then never
# turns it into KeyboardInterrupt: give the tool the default back, so Ctrl-C (kill -INT) stops it.
env --default-signal=INT /usr/sbin/exitsnoop-bpfcc >"$KH_OUT/exitsnoop.out" 2>"$KH_OUT/exitsnoop.err" 3>&- &
tool=$!
python3 "$KH_FILES/program.py" >"$KH_OUT/program.out" 2>"$KH_OUT/program.err" 3>&- &
program=$!
# The tool is ready once it prints its header (it compiled, loaded and attached).
# (status 12: the tool ended first; 13: it took more than 10 minutes)
kh_wait_file "$KH_OUT/exitsnoop.out" PCOMM 600 "$tool" || { kill -0 "$tool" 2>/dev/null && exit 13; exit 12; }
since() { awk -v now="$(cut -d' ' -f1 /proc/uptime)" -v t0="$t0" 'BEGIN { printf "%.1f", now - t0 }'; }
echo "exitsnoop ready after $(since) s" >"$KH_OUT/timing"
for n in 1 2 3; do
  sh -c 'sleep 0.3; exit 7' &
  # Its parent as procfs tells it ($$ would name the outer shell, not this subshell).
  echo "$! $(cut -d' ' -f4 "/proc/$!/stat")" >>"$KH_OUT/triggers"
done
wait $program
echo $? >"$KH_OUT/program.status"
echo "program done after $(since) s" >>"$KH_OUT/timing"
sleep 1
# A SIGINT that lands while Python runs BCC's perf-buffer callback is swallowed there ("Exception
# ignored on calling ctypes callback"), and the tool runs on: repeat it until the tool has ended.
for _ in 1 2 3 4 5 6 7 8 9 10; do
  kill -INT $tool 2>/dev/null || break
  sleep 2
  kill -0 $tool 2>/dev/null || break
done
wait $tool
echo $? >"$KH_OUT/exitsnoop.status"
lsmod >"$KH_OUT/lsmod"
ls -d /tmp/kheaders-* >"$KH_OUT/bcc-fallback" 2>/dev/null
kh_stop serve >/dev/null
`;

interface Sample {
  helper_tgid: number;
  helper_pid: number;
  task_tgid: number;
  task_pid: number;
  parent_tgid: number;
  helper_comm: string;
  task_comm: string;
}

exitWhenDone(test('real kernel: a BCC-built kprobe program and exitsnoop-bpfcc, compiled from the mount, read the right task_struct fields', { timeout: VM_TEST_TIMEOUT_MS }, async (t) => {
  const skip = await vmSkipReason([X86_KERNELS.a]);
  if (skip) return t.skip(skip);
  const started = performance.now();
  const kernel = await loadKernel(X86_KERNELS.a);
  const vm = await startVm({ kernel, scenario: SCENARIO, files: { 'program.py': PROGRAM }, memoryMiB: 2048, timeoutMs: 840_000, ...(process.env['KHEADERSD_VM_CONSOLE'] ? { consoleTo: process.stderr } : {}) });
  t.after(() => vm.dispose());
  const r = await vm.result;
  assert.equal(r.status, 0, `the scenario failed (status ${r.status})${context(r)}`);
  t.diagnostic((await readOut(r, 'timing')).trim().replace(/\n/g, '; '));

  // The program: the helpers and the struct fields read at the served offsets agree.
  assert.equal((await readOut(r, 'program.status')).trim(), '0', `the BCC program failed:\n${await readOut(r, 'program.err')}`);
  const lines = (await readOut(r, 'program.out')).trim().split('\n');
  const report = JSON.parse(lines.at(-1)!) as { parent: number; sleepers: Array<{ pid: number; sample: Sample | null }> };
  for (const { pid, sample } of report.sleepers) {
    assert.ok(sample, `no sample for sleep ${pid}: the kprobe did not fire for it`);
    assert.equal(sample.helper_tgid, pid, 'bpf_get_current_pid_tgid() names the sleeper');
    assert.equal(sample.task_tgid, sample.helper_tgid, 'task->tgid (served headers) equals bpf_get_current_pid_tgid() >> 32');
    assert.equal(sample.task_pid, sample.helper_pid, 'task->pid equals the low half');
    assert.equal(sample.task_comm, 'sleep');
    assert.equal(sample.task_comm, sample.helper_comm, 'task->comm equals bpf_get_current_comm()');
    assert.equal(sample.parent_tgid, report.parent, 'task->real_parent->tgid is the Python process that started it');
  }

  // The tool: each `sh -c 'sleep 0.3; exit 7'` with its pid, parent, age and exit code.
  assert.equal((await readOut(r, 'exitsnoop.status')).trim(), '0', `exitsnoop-bpfcc failed:\n${await readOut(r, 'exitsnoop.err')}`);
  const out = await readOut(r, 'exitsnoop.out');
  const rows = out
    .split('\n')
    .map((l) => /^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(.*)$/.exec(l.trim()))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ comm: m[1]!, pid: Number(m[2]), ppid: Number(m[3]), tid: Number(m[4]), age: Number(m[5]), exit: m[6]!.trim() }));
  const triggers = (await readOut(r, 'triggers'))
    .trim()
    .split('\n')
    .map((l) => l.split(' ').map(Number) as [number, number]);
  for (const [pid, ppid] of triggers) {
    const row = rows.find((x) => x.pid === pid);
    assert.ok(row, `exitsnoop did not show pid ${pid}:\n${out}`);
    assert.equal(row.comm, 'sh');
    assert.equal(row.ppid, ppid, `exitsnoop's PPID for ${pid} (task->real_parent->tgid)`);
    assert.equal(row.tid, pid);
    assert.equal(row.exit, 'code 7', `exitsnoop's exit code for ${pid} (task->exit_code)`);
    assert.ok(row.age >= 0.25 && row.age < 60, `exitsnoop's age for ${pid} is ${row.age} s (task->start_time), expected about 0.3 s`);
  }

  assert.equal((await readOut(r, 'bcc-fallback').catch(() => '')).trim(), '', 'BCC did not unpack headers of its own into /tmp');
  assert.doesNotMatch(await readOut(r, 'lsmod'), /^kheaders\s/m, 'nothing left kheaders loaded');
  t.diagnostic(`BPF test took ${elapsed(started)}`);
}));
