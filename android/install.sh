#!/usr/bin/env bash
# Install kheadersd on a rooted Android device over adb, from this checkout (or an installed
# kheadersd package), and make its HTTP port reachable from this host.
#
#   android/install.sh [options]
#
#   --device-node PATH  a node already on the device (default: Termux's,
#                       /data/data/com.termux/files/usr/bin/node, when installed: pkg install nodejs)
#   --node FILE         a Node.js binary on this host to push with the bundle. It must be built for
#                       Android (bionic) and the device's ABI: nodejs.org's linux-arm64 build links
#                       glibc and does not run on Android. --force skips that check.
#   --boot MODE         how it starts at boot: auto (default: service.d when Magisk/KernelSU's
#                       /data/adb/service.d exists, else none), rc (an init .rc in /system/etc/init:
#                       userdebug/eng builds after `adb root && adb remount`), service.d, none
#   --port N            the host side of `adb forward` (default 7711)
#   --device-port N     the device's HTTP port, for a new config.json (default 7711)
#   --serial S          which device (default: the only one; or $ANDROID_SERIAL)
#   --bundle DIR        push this prebuilt bundle instead of building one
#   --bundle-only DIR   build the bundle into DIR and stop (no device needed)
#   --no-start          install, but do not start it now
#   --uninstall         stop it, remove the boot hook and the bundle (keeps the cache)
#   --purge             with --uninstall: remove the cache, configuration and log as well
#   --force             push a --node that looks wrong for the device (glibc build, other ABI)
#   -h, --help
#
# Every step says what it does; a failure names the step and how to fix it. Nothing is fetched
# from the internet except by npm (the bundle's production dependencies).
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$SELF_DIR/.." && pwd)
DEVICE_BASE=/data/local/kheadersd
DEVICE_APP=$DEVICE_BASE/app
STAGING=/data/local/tmp/kheadersd-bundle
TERMUX_NODE=/data/data/com.termux/files/usr/bin/node
WAIT_SECONDS=${KHEADERSD_INSTALL_WAIT:-90} # ingest and vmlinux.h on a phone can take a while

NODE_FILE=""
DEVICE_NODE=""
BOOT=auto
PORT=7711
DEVICE_PORT=7711
SERIAL=${ANDROID_SERIAL:-}
BUNDLE=""
BUNDLE_ONLY=""
START=1
UNINSTALL=0
PURGE=0
FORCE=0

STEP_NO=0
STEP_NAME=""
step() {
  STEP_NO=$((STEP_NO + 1))
  STEP_NAME=$1
  echo "[$STEP_NO] $1"
}
# fail WHAT [FIX]
fail() {
  echo "install.sh: step $STEP_NO ($STEP_NAME) failed: $1" >&2
  if [ $# -gt 1 ]; then echo "  to fix: $2" >&2; fi
  exit 1
}
# Print each line of $1 indented under its step.
indent() { printf '%s\n' "$1" | sed 's/^/    /'; }
usage_error() {
  echo "install.sh: $1 (see --help)" >&2
  exit 2
}
need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi; }
is_port() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }
# Device paths go inside single-quoted su -c '...': no quotes, blanks or shell specials.
safe_device_path() { [[ $1 =~ ^/[A-Za-z0-9._/+-]+$ ]]; }

while [ $# -gt 0 ]; do
  case "$1" in
    --node) need_value "$@"; NODE_FILE=$2; shift 2 ;;
    --device-node) need_value "$@"; DEVICE_NODE=$2; shift 2 ;;
    --boot) need_value "$@"; BOOT=$2; shift 2 ;;
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --device-port) need_value "$@"; DEVICE_PORT=$2; shift 2 ;;
    --serial) need_value "$@"; SERIAL=$2; shift 2 ;;
    --bundle) need_value "$@"; BUNDLE=$2; shift 2 ;;
    --bundle-only) need_value "$@"; BUNDLE_ONLY=$2; shift 2 ;;
    --no-start) START=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    --force) FORCE=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done

case "$BOOT" in auto | rc | service.d | none) ;; *) usage_error "--boot takes auto, rc, service.d or none, not '$BOOT'" ;; esac
is_port "$PORT" || usage_error "--port takes a port number (1-65535), not '$PORT'"
is_port "$DEVICE_PORT" || usage_error "--device-port takes a port number (1-65535), not '$DEVICE_PORT'"
[ -z "$NODE_FILE" ] || [ -z "$DEVICE_NODE" ] || usage_error "--node and --device-node exclude each other"
[ -z "$BUNDLE" ] || [ -z "$BUNDLE_ONLY" ] || usage_error "--bundle and --bundle-only exclude each other"
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || usage_error "--purge goes with --uninstall"
[ -z "$DEVICE_NODE" ] || safe_device_path "$DEVICE_NODE" || usage_error "--device-node must be an absolute path of letters, digits and ._/+-"

ADB=(adb)
[ -z "$SERIAL" ] || ADB=(adb -s "$SERIAL")

# ---- device helpers ------------------------------------------------------------------------------
ROOT_MODE=""
OUT=""
# dev_run user|root CMD: run CMD on the device; its output in OUT, its exit status returned.
# The status travels in-band (adb before Android 7 always exits 0); 255 means adb itself failed.
dev_run() {
  local who=$1 cmd=$2 wrapped raw rc
  wrapped=$cmd
  if [ "$who" = root ]; then
    case "$ROOT_MODE" in
      adbd) wrapped=$cmd ;;
      su-c) wrapped="su -c '$cmd'" ;;
      su0) wrapped="su 0 sh -c '$cmd'" ;;
      *) OUT="no root"; return 255 ;;
    esac
  fi
  if ! raw=$("${ADB[@]}" shell "$wrapped; echo __KHEADERSD_RC=\$?" 2>&1); then
    OUT=$raw
    return 255
  fi
  raw=${raw//$'\r'/}
  if [[ $raw != *__KHEADERSD_RC=* ]]; then
    OUT=$raw
    return 255
  fi
  rc=${raw##*__KHEADERSD_RC=}
  rc=${rc%%[!0-9]*}
  OUT=${raw%__KHEADERSD_RC=*}
  OUT=${OUT%$'\n'}
  return "${rc:-255}"
}

check_device() {
  step "device"
  command -v adb >/dev/null 2>&1 || fail "adb is not installed" "install Android platform-tools (Debian: apt install adb) and put adb on PATH"
  local list state
  list=$("${ADB[@]}" devices 2>&1) || fail "adb devices: $list" "restart the adb server: adb kill-server; adb start-server"
  list=$(printf '%s\n' "$list" | sed '1d' | awk 'NF >= 2 { print $1 " " $2 }')
  if [ -n "$SERIAL" ]; then
    state=$(printf '%s\n' "$list" | awk -v s="$SERIAL" '$1 == s { print $2 }')
    [ -n "$state" ] || fail "no device $SERIAL (adb devices lists: ${list:-none})" "check --serial / ANDROID_SERIAL"
  else
    local n
    n=$(printf '%s\n' "$list" | grep -c . || true)
    [ "$n" -gt 0 ] || fail "no device attached" "connect the device by USB, enable USB debugging (Developer options) and accept the prompt on the device"
    [ "$n" -eq 1 ] || fail "$n devices attached ($(printf '%s\n' "$list" | awk '{ print $1 }' | paste -sd, -))" "choose one with --serial SERIAL"
    SERIAL=$(printf '%s\n' "$list" | awk '{ print $1 }')
    state=$(printf '%s\n' "$list" | awk '{ print $2 }')
    ADB=(adb -s "$SERIAL")
  fi
  case "$state" in
    device) ;;
    unauthorized) fail "device $SERIAL is unauthorized" "unlock it and accept the USB debugging prompt" ;;
    *) fail "device $SERIAL is $state" "reconnect it (adb reconnect)" ;;
  esac
  dev_run user "getprop ro.product.cpu.abi" || fail "cannot run a command on $SERIAL: $OUT" "adb reconnect"
  DEVICE_ABI=$OUT
  dev_run user "getprop ro.build.version.release" || true
  echo "    $SERIAL: $DEVICE_ABI, Android ${OUT:-?}"
}

check_root() {
  step "root"
  if dev_run user "id -u" && [ "$OUT" = 0 ]; then
    ROOT_MODE=adbd
  else
    ROOT_MODE=su-c
    if ! { dev_run root "id -u" && [ "$OUT" = 0 ]; }; then
      ROOT_MODE=su0
      if ! { dev_run root "id -u" && [ "$OUT" = 0 ]; }; then
        ROOT_MODE=""
        fail "no root on $SERIAL (adbd is not root and su did not give uid 0)" "root the device (Magisk) and allow Shell in the Magisk app, or on a userdebug/eng build run: adb root"
      fi
    fi
  fi
  echo "    root via $ROOT_MODE"
}

# ---- uninstall ---------------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
  check_device
  check_root
  step "uninstall"
  dev_run root "test -x $DEVICE_APP/bin/kheadersd-ctl" || fail "kheadersd is not installed on $SERIAL (no $DEVICE_APP)" "nothing to do"
  args=""
  [ "$PURGE" = 0 ] || args=--purge
  dev_run root "/system/bin/sh $DEVICE_APP/bin/kheadersd-ctl uninstall $args" || fail "$OUT"
  indent "$OUT"
  step "forward"
  "${ADB[@]}" forward --remove "tcp:$PORT" >/dev/null 2>&1 || true
  echo "    removed adb forward tcp:$PORT (if it was there)"
  echo "kheadersd is uninstalled from $SERIAL."
  exit 0
fi

# ---- 1. host tools -----------------------------------------------------------------------------
step "host tools"
for tool in node tar od; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed on this host" "install it (node >= 22: https://nodejs.org or your distribution)"
done
if [ -z "$BUNDLE_ONLY" ]; then
  command -v adb >/dev/null 2>&1 || fail "adb is not installed" "install Android platform-tools (Debian: apt install adb) and put adb on PATH"
fi

# ---- 2. node binary for the device (when pushed from this host) ----------------------------------
# e_machine (ELF offset 18, little-endian) for each Android ABI.
abi_machine() {
  case "$1" in
    arm64-v8a) echo b700 ;;
    x86_64) echo 3e00 ;;
    armeabi-v7a | armeabi) echo 2800 ;;
    x86) echo 0300 ;;
    *) echo unknown ;;
  esac
}
check_node_file() {
  step "node binary"
  [ -f "$NODE_FILE" ] || fail "--node $NODE_FILE: no such file"
  local magic machine
  magic=$(od -An -tx1 -N4 "$NODE_FILE" | tr -d ' \n')
  [ "$magic" = 7f454c46 ] || fail "--node $NODE_FILE is not an ELF executable" "pass the node binary itself, not a script or an archive"
  machine=$(od -An -tx1 -j18 -N2 "$NODE_FILE" | tr -d ' \n')
  NODE_MACHINE=$machine
  if grep -qa '/lib/ld-linux' "$NODE_FILE" || grep -qa '/lib64/ld-linux' "$NODE_FILE"; then
    [ "$FORCE" = 1 ] || fail "--node $NODE_FILE is a glibc build (like nodejs.org's linux binaries): it cannot run on Android's bionic libc" "use Termux's node on the device (pkg install nodejs; then --device-node $TERMUX_NODE) or an Android build of node; --force to try anyway"
  fi
  echo "    $NODE_FILE: ELF, machine $machine"
}
[ -z "$NODE_FILE" ] || check_node_file

# ---- 3. bundle ---------------------------------------------------------------------------------
build_bundle() {
  local out=$1
  step "bundle"
  [ -f "$SRC/dist/app/cli.js" ] || fail "$SRC/dist/app/cli.js is missing" "build first: (cd $SRC && npm ci && npm run build)"
  [ -f "$SELF_DIR/kheadersd-ctl.sh" ] || fail "$SELF_DIR/kheadersd-ctl.sh is missing" "reinstall kheadersd"
  rm -rf "$out"
  mkdir -p "$out/dist" "$out/bin" "$out/etc" || fail "cannot create $out"
  cp "$SRC/package.json" "$out/" || fail "cannot copy package.json"
  if [ -f "$SRC/package-lock.json" ]; then
    # A checkout: its node_modules has dev dependencies; install the production ones afresh.
    command -v npm >/dev/null 2>&1 || fail "npm is not installed" "install node and npm"
    cp "$SRC/package-lock.json" "$out/"
    (cd "$out" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund >/dev/null) || fail "npm ci --omit=dev in $out" "check the network to the npm registry, and $SRC/package-lock.json"
  else
    # An installed package (npm install -g): its node_modules holds production dependencies only.
    [ -d "$SRC/node_modules" ] || fail "$SRC has neither package-lock.json nor node_modules" "run from a checkout or an npm-installed kheadersd"
    cp -R "$SRC/node_modules" "$out/" || fail "cannot copy node_modules"
  fi
  cp -R "$SRC/dist/app" "$out/dist/app" || fail "cannot copy dist/app"
  cp "$SELF_DIR/kheadersd-ctl.sh" "$out/bin/kheadersd-ctl"
  cp "$SELF_DIR/kheadersd.rc" "$out/etc/kheadersd.rc"
  chmod 0755 "$out/bin/kheadersd-ctl" "$out/dist/app/cli.js"
  echo "    $out: $(du -sh "$out" | cut -f1)"
}

if [ -n "$BUNDLE_ONLY" ]; then
  build_bundle "$BUNDLE_ONLY"
  [ -z "$NODE_FILE" ] || cp "$NODE_FILE" "$BUNDLE_ONLY/bin/node"
  echo "bundle ready in $BUNDLE_ONLY (push it with: android/install.sh --bundle $BUNDLE_ONLY)"
  exit 0
fi

WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/kheadersd-android.XXXXXX")
trap 'rm -rf "$WORKDIR"' EXIT
if [ -n "$BUNDLE" ]; then
  step "bundle"
  { [ -f "$BUNDLE/dist/app/cli.js" ] && [ -f "$BUNDLE/bin/kheadersd-ctl" ]; } || fail "$BUNDLE is not a kheadersd bundle (needs dist/app/cli.js and bin/kheadersd-ctl)" "make one with --bundle-only DIR"
  cp -R "$BUNDLE" "$WORKDIR/bundle" || fail "cannot copy $BUNDLE"
  echo "    using $BUNDLE"
else
  build_bundle "$WORKDIR/bundle"
fi
[ -z "$NODE_FILE" ] || cp "$NODE_FILE" "$WORKDIR/bundle/bin/node" || fail "cannot copy $NODE_FILE into the bundle"

# ---- 4-5. device and root ----------------------------------------------------------------------
check_device
if [ -n "$NODE_FILE" ]; then
  want=$(abi_machine "$DEVICE_ABI")
  if [ "$want" != unknown ] && [ "$want" != "$NODE_MACHINE" ] && [ "$FORCE" = 0 ]; then
    fail "--node $NODE_FILE is built for ELF machine $NODE_MACHINE, the device is $DEVICE_ABI (machine $want)" "pass a node built for $DEVICE_ABI"
  fi
fi
check_root

# ---- 6. which node runs it ----------------------------------------------------------------------
step "node on the device"
if [ -n "$NODE_FILE" ]; then
  DEVICE_NODE=""
  echo "    pushing $NODE_FILE with the bundle"
else
  if [ -z "$DEVICE_NODE" ]; then
    dev_run root "test -x $TERMUX_NODE" || fail "no Node.js for the device: Termux's node ($TERMUX_NODE) is not installed and neither --node nor --device-node was given" "install Termux, run 'pkg install nodejs' in it, then retry; or pass --node FILE (an Android build for $DEVICE_ABI)"
    DEVICE_NODE=$TERMUX_NODE
  fi
  dev_run root "$DEVICE_NODE --version" || fail "$DEVICE_NODE does not run on the device: $OUT" "reinstall it (Termux: pkg install nodejs), or pass --node FILE"
  echo "    $DEVICE_NODE $OUT"
fi
if ! dev_run user "command -v xzcat || command -v xz"; then
  echo "    warn: no xzcat/xz on the device; ingest needs one (toybox has xzcat on recent Android; Termux: pkg install xz-utils)"
fi

# ---- 7. push -----------------------------------------------------------------------------------
step "push"
dev_run user "rm -rf $STAGING" || fail "cannot clear $STAGING on the device: $OUT"
push_out=$("${ADB[@]}" push "$WORKDIR/bundle" "$STAGING" 2>&1) || fail "adb push to $STAGING: $(printf '%s\n' "$push_out" | tail -n 1)" "check free space on the device (adb shell df -h /data)"
echo "    $(printf '%s\n' "$push_out" | tail -n 1)"

# ---- 8. install --------------------------------------------------------------------------------
step "install"
dev_run root "/system/bin/sh $STAGING/bin/kheadersd-ctl install $STAGING ${DEVICE_NODE:--} $DEVICE_PORT" || fail "${OUT:-kheadersd-ctl install failed}"
indent "$OUT"
dev_run user "rm -rf $STAGING" || true

# ---- 9. boot -----------------------------------------------------------------------------------
step "boot"
if [ "$BOOT" = auto ]; then
  if dev_run root "test -d /data/adb/service.d"; then BOOT=service.d; else BOOT=none; fi
fi
if [ "$BOOT" = rc ] && [ "$ROOT_MODE" != adbd ]; then
  fail "--boot rc writes /system/etc/init, which needs adbd running as root" "on a userdebug/eng build: adb root && adb remount; on a Magisk device use --boot service.d"
fi
dev_run root "/system/bin/sh $DEVICE_APP/bin/kheadersd-ctl install-boot $BOOT" || fail "$OUT"
indent "$OUT"

# ---- 10. start ---------------------------------------------------------------------------------
if [ "$START" = 1 ]; then
  step "start"
  dev_run root "/system/bin/sh $DEVICE_APP/bin/kheadersd-ctl restart" || fail "$OUT" "see the log: adb shell su -c '$DEVICE_APP/bin/kheadersd-ctl log'"
  indent "$OUT"
fi

# ---- 11. forward -------------------------------------------------------------------------------
step "forward"
fwd=$("${ADB[@]}" forward "tcp:$PORT" "tcp:$DEVICE_PORT" 2>&1) || fail "adb forward tcp:$PORT tcp:$DEVICE_PORT: $fwd" "is port $PORT free on this host? choose another with --port"
echo "    127.0.0.1:$PORT on this host -> 127.0.0.1:$DEVICE_PORT on the device"

# ---- 12. health --------------------------------------------------------------------------------
if [ "$START" = 1 ]; then
  step "health"
  ok=0
  for _ in $(seq 1 "$((WAIT_SECONDS * 2))"); do
    if node -e "fetch('http://127.0.0.1:$PORT/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))" 2>/dev/null; then
      ok=1
      break
    fi
    sleep 0.5
  done
  if [ "$ok" != 1 ]; then
    dev_run root "/system/bin/sh $DEVICE_APP/bin/kheadersd-ctl status" || true
    indent "$OUT" >&2
    fail "http://127.0.0.1:$PORT/healthz did not answer within $WAIT_SECONDS s (device status above)" "read the log: adb shell su -c '$DEVICE_APP/bin/kheadersd-ctl log'"
  fi
  echo "    http://127.0.0.1:$PORT/healthz ok"
fi

cat <<EOF

kheadersd is installed on $SERIAL (boot: $BOOT).

From this host, through the forward:
  curl -s http://127.0.0.1:$PORT/healthz
  kheadersd pull --url http://127.0.0.1:$PORT     the device kernel's headers, as a directory here
  kheadersd pull --adb --serial $SERIAL           the same, with a forward of its own
On the device (as root):
  $DEVICE_APP/bin/kheadersd-ctl status|stop|start|log
  ls $DEVICE_BASE/mnt/current/  the FUSE mount, where the kernel allows it (android/README.md)
The forward lasts until adb restarts: adb forward tcp:$PORT tcp:$DEVICE_PORT
Uninstall: android/install.sh --uninstall [--purge]
EOF
