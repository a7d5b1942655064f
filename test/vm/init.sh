#!/bin/sh
# PID 1 of a kheadersd test VM whose root is the host's / (read-only, over virtio-9p).
#
# It turns that root into a writable system the daemon can run on unchanged, runs one scenario
# script, and powers the VM off. The host side (test/vm/vm.ts) chooses everything through kernel
# arguments, which the kernel hands to PID 1 as environment variables:
#   kh_modules=DIR   a host directory holding lib/modules/<release>/ content: copied into
#                    /lib/modules/$(uname -r)/ so that a real `modprobe kheaders` finds the module
#   kh_cache=none|9p|disk   what /var/cache/kheadersd is: a fresh tmpfs; the host directory
#                    shared read-write as 9p tag "khcache"; or the ext4 disk /dev/vda
#   kh_net=1         bring up eth0 with slirp's fixed address (10.0.2.15) for port forwards
# The scenario, its environment and its output live in the host directory shared read-write as
# 9p tag "khshare" (mounted at /run/khvm): scenario.sh, env.sh, files/, out/. Its stdout and stderr go
# to the console; fd 3 is the virtio-serial port "kh.events", a line channel both ways
# (lib.sh's kh_emit and kh_wait_host).
#
# Why a chroot into an overlay: a read-only 9p root cannot take /lib/modules/<release>, and the
# daemon writes /run, /var/cache and /tmp. tmpfs holds the writes; the host's files stay as they are.
# The host's /tmp is hidden behind the VM's own tmpfs: nothing the scenario needs may live there.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
NEW=/run/khroot
SHARE=/run/khvm

say() { echo "kh-init: $*"; }

power_off() {
  # PID 1 must outlive the power-off request: the kernel panics if init exits first.
  sync
  echo o >/proc/sysrq-trigger
  while :; do sleep 1; done
}

die() {
  say "FAILED: $*"
  [ -e "$NEW/dev/console" ] && [ -n "${EVENTS:-}" ] && printf 'kh-init-failed %s\n' "$*" >"$NEW$EVENTS" 2>/dev/null
  power_off
}

mount -t proc proc /proc || die "mount /proc"
mount -t tmpfs -o mode=0755 tmpfs /run || die "tmpfs on /run"
mkdir -p /run/upper /run/work "$NEW"
mount -t overlay -o lowerdir=/,upperdir=/run/upper,workdir=/run/work overlay "$NEW" || die "overlay root"
mount -t proc proc "$NEW/proc"
mount -t sysfs sysfs "$NEW/sys"
mount -t devtmpfs devtmpfs "$NEW/dev"
mount -t tmpfs -o mode=0755 tmpfs "$NEW/run"
mount -t tmpfs -o mode=1777 tmpfs "$NEW/tmp"
mkdir -p "$NEW/dev/pts" "$NEW/dev/shm"
mount -t devpts devpts "$NEW/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$NEW/dev/shm"
mount -t tracefs tracefs "$NEW/sys/kernel/tracing" 2>/dev/null
mount -t debugfs debugfs "$NEW/sys/kernel/debug" 2>/dev/null
mount -t bpf bpf "$NEW/sys/fs/bpf" 2>/dev/null

mkdir -p "$NEW$SHARE"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 khshare "$NEW$SHARE" || die "mount the khshare 9p share"

# The events port: the virtio-serial port named kh.events (devtmpfs names it vportNpM).
EVENTS=
for p in "$NEW"/sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = kh.events ] && EVENTS=/dev/${p##*/}
done
[ -n "$EVENTS" ] || die "no kh.events virtio-serial port"

release=$(uname -r)
if [ -n "${kh_modules:-}" ]; then
  # /lib is a symlink to usr/lib on merged-/usr hosts; cp follows it inside the overlay.
  mkdir -p "$NEW/lib/modules/$release" || die "mkdir /lib/modules/$release"
  cp -a "$kh_modules/." "$NEW/lib/modules/$release/" || die "copy modules from $kh_modules"
fi

# The host's own configuration and cache are not this VM's: start from nothing.
rm -rf "$NEW/etc/kheadersd" "$NEW/var/cache/kheadersd"
mkdir -p "$NEW/var/cache/kheadersd"
case "${kh_cache:-none}" in
  none) mount -t tmpfs -o mode=0755 tmpfs "$NEW/var/cache/kheadersd" ;;
  9p) mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 khcache "$NEW/var/cache/kheadersd" || die "mount the khcache 9p share" ;;
  disk) mount -t ext4 /dev/vda "$NEW/var/cache/kheadersd" || die "mount /dev/vda (ext4)" ;;
  *) die "unknown kh_cache=$kh_cache" ;;
esac

ip link set lo up 2>/dev/null || say "no ip(8): loopback stays down"
if [ "${kh_net:-0}" = 1 ]; then
  { ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2; } || die "network"
fi

# The scenario: sh with lib.sh's helpers, env.sh's variables, fd 3 on the events port.
here=$(dirname "$0")
# shellcheck disable=SC2016 # expanded by the inner shell, from its arguments
chroot "$NEW" /bin/sh -c '
  exec 3<>"$1"
  cd /
  . "$2"
  . "$3/env.sh"
  KH_OUT=$3/out KH_FILES=$3/files
  mkdir -p "$KH_OUT"
  kh_emit kh-booted "$(uname -r)"
  ( . "$3/scenario.sh" )
  status=$?
  kh_emit kh-exit "$status"
' kh-scenario "$EVENTS" "$here/lib.sh" "$SHARE"

# Whatever the scenario left running is stopped, so the cache filesystem unmounts cleanly.
kill -TERM -1 2>/dev/null
sleep 1
kill -KILL -1 2>/dev/null
sync
umount "$NEW/var/cache/kheadersd" 2>/dev/null || umount -l "$NEW/var/cache/kheadersd" 2>/dev/null
umount "$NEW$SHARE" 2>/dev/null
power_off
