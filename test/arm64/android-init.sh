#!/system/bin/sh
# shellcheck shell=sh
# PID 1 of the Android-shaped arm64 test VM (an initramfs: test/arm64/userland.ts builds it).
#
# It speaks the VM harness's protocol (test/vm/init.sh does the same for the host-root VMs):
# kernel arguments arrive as environment variables (kh_net=1: eth0 gets slirp's 10.0.2.15 for a
# port forward); the host shares a directory as 9p tag "khshare" with scenario.sh, env.sh and
# out/; fd 3 of the scenario is the virtio-serial port "kh.events" (kh_emit, kh_wait_host in
# lib.sh). When the scenario ends, everything left is stopped and the VM powers off.
#
# Otherwise it sets up only what Android's init would have: /proc, /sys, /dev (with /dev/fuse),
# loopback. No /tmp, no /lib/modules: the daemon must cope.
PATH=/system/bin
export PATH
export HOME=/data ANDROID_ROOT=/system ANDROID_DATA=/data
SHARE=/mnt/khvm

say() { echo "kh-init: $*"; }

power_off() {
  # PID 1 must outlive the power-off request: the kernel panics if init exits first.
  sync
  echo o >/proc/sysrq-trigger
  while :; do sleep 1; done
}

die() {
  say "FAILED: $*"
  [ -n "${EVENTS:-}" ] && printf 'kh-init-failed %s\n' "$*" >"$EVENTS" 2>/dev/null
  power_off
}

mount -t proc proc /proc || die "mount /proc"
mount -t sysfs sysfs /sys || die "mount /sys"
mount -t devtmpfs devtmpfs /dev || die "mount /dev"
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null

mkdir -p "$SHARE"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 khshare "$SHARE" || die "mount the khshare 9p share"

EVENTS=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = kh.events ] && EVENTS=/dev/${p##*/}
done
[ -n "$EVENTS" ] || die "no kh.events virtio-serial port"

ifconfig lo 127.0.0.1 up || say "loopback stays down"
if [ "${kh_net:-0}" = 1 ]; then
  ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up || die "network"
fi

(
  exec 3<>"$EVENTS"
  cd /
  # shellcheck source=/dev/null # lib.sh is placed by userland.ts; env.sh and scenario.sh come from the host
  . /system/etc/khvm/lib.sh
  # shellcheck source=/dev/null
  . "$SHARE/env.sh"
  KH_OUT=$SHARE/out
  mkdir -p "$KH_OUT"
  kh_emit kh-booted "$(uname -r)"
  # shellcheck source=/dev/null
  ( . "$SHARE/scenario.sh" )
  kh_emit kh-exit "$?"
)

kill -TERM -1 2>/dev/null
sleep 1
kill -KILL -1 2>/dev/null
sync
umount "$SHARE" 2>/dev/null
power_off
