#!/system/bin/sh
# shellcheck shell=sh
#
# kheadersd-ctl: the device side of kheadersd on Android (runs as root, under /system/bin/sh).
# android/install.sh pushes it in the bundle and drives it; you can use it yourself too:
#
#   su -c /data/local/kheadersd/app/bin/kheadersd-ctl status|start|stop|restart|log
#
# Layout (Android has no /tmp; /data/local is root's and survives reboots):
#   /data/local/kheadersd/              the cache (root, 0755: the daemon refuses one others can write)
#   /data/local/kheadersd/app/          the bundle: dist/app, node_modules, bin/ (this script, maybe node)
#   /data/local/kheadersd/mnt/          the FUSE mount point
#   /data/local/kheadersd/config.json   the configuration (same keys as /etc/kheadersd/config.json)
#   /data/local/kheadersd/kheadersd.log the daemon's log (JSON lines; one old copy kept as .log.1)
#
# Commands:
#   install SRC [NODE|-] [PORT]  copy the bundle SRC into app/, record which node runs it (-: the
#                              bundle's bin/node), write a default config.json if there is none,
#                              check that node runs
#   install-boot rc|service.d|none   how it starts at boot (see android/README.md)
#   start | stop | restart | status | log [N]
#   doctor | ls | export | gc | cat | ingest [ARGS]   that kheadersd command, with this configuration
#   run                        the daemon in the foreground (what init's service runs)
#   supervise                  run, restarted 5 s after each exit until `stop` (what start runs)
#   uninstall [--purge]        stop, remove the boot hooks and app/ (--purge: the cache too)
set -u

BASE=${KHEADERSD_BASE:-/data/local/kheadersd} # overridable for tests on a host
APP=$BASE/app
CONF=$BASE/config.json
LOG=$BASE/kheadersd.log
PIDF=$BASE/kheadersd.pid
SUPF=$BASE/supervisor.pid
STOPF=$BASE/stop-requested
RC_FILE=${KHEADERSD_RC_FILE:-/system/etc/init/kheadersd.rc}
SERVICE_D=${KHEADERSD_SERVICE_D:-/data/adb/service.d}
LOG_MAX=1048576
# The shell that runs this script again (supervise, run): /system/bin/sh on a device.
SH=${KHEADERSD_SH:-/system/bin/sh}

say() { echo "kheadersd-ctl: $*"; }
die() {
  echo "kheadersd-ctl: $*" >&2
  exit 1
}
# Mirror a line to logcat where the `log` tool exists (every Android since 4.x).
logcat() { if command -v log >/dev/null 2>&1; then log -t kheadersd "$*" 2>/dev/null || true; fi; }
need_root() { [ "$(id -u)" = 0 ] || die "run as root: su -c '$0 $*'"; }
has_prop() { command -v getprop >/dev/null 2>&1; }

# The pid in FILE, if that process is alive and is ours (its command line names kheadersd).
live_pid() {
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  case "$pid" in '' | *[!0-9]*) return 1 ;; esac
  [ -r "/proc/$pid/cmdline" ] || return 1
  case "$(tr '\000' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" in
    *kheadersd*) echo "$pid" ;;
    *) return 1 ;;
  esac
}

# init runs it when kheadersd.rc is installed and the device has booted with it.
init_managed() {
  has_prop && [ -n "$(getprop init.svc.kheadersd 2>/dev/null)" ]
}

node_path() {
  [ -f "$APP/node-path" ] || die "not installed: no $APP/node-path (run android/install.sh)"
  cat "$APP/node-path"
}

write_default_config() {
  port=$1
  # fuseBackend kernel: fuse-native has no Android build; the kernel backend speaks /dev/fuse
  # itself. If the mount fails (no FUSE, SELinux), serve keeps serving HTTP.
  # printf, not a here-document: a shell keeps here-documents in a temp file ($TMPDIR or /tmp),
  # and where it has none (Android has no /tmp; a mksh built without Android's default TMPDIR)
  # the file would be written empty without a word.
  printf '{\n  "cacheDir": "%s",\n  "mount": "%s",\n  "http": "127.0.0.1:%s",\n  "fuseBackend": "kernel",\n  "logLevel": "info"\n}\n' \
    "$BASE" "$BASE/mnt" "$port" > "$CONF.tmp" || return 1
  chmod 0644 "$CONF.tmp" && mv -f "$CONF.tmp" "$CONF"
}

cmd_install() {
  need_root install
  src=${1:-}
  node=${2:-}
  port=${3:-7711}
  [ "$node" != - ] || node="" # "-": the bundle's own bin/node
  [ -n "$src" ] || die "usage: install SRC [NODE] [PORT]"
  [ -f "$src/dist/app/cli.js" ] || die "$src is not a kheadersd bundle (no dist/app/cli.js)"
  mkdir -p "$BASE" || die "cannot create $BASE"
  { chown 0:0 "$BASE" && chmod 0755 "$BASE"; } || die "cannot make $BASE root-owned 0755"
  rm -rf "$APP.new" "$APP.old"
  cp -R "$src" "$APP.new" || die "cannot copy $src to $APP.new (space? df -h /data)"
  # adb push leaves the files owned by shell: the cache must be root's and not writable by others.
  { chown -R 0:0 "$APP.new" && chmod -R go-w "$APP.new"; } || die "cannot chown $APP.new to root"
  chmod 0755 "$APP.new/bin/kheadersd-ctl" "$APP.new/dist/app/cli.js" || die "cannot make the bundle's scripts executable"
  if [ -z "$node" ]; then
    [ -f "$APP.new/bin/node" ] || die "no node: the bundle has no bin/node and none was named"
    chmod 0755 "$APP.new/bin/node"
    node=$APP/bin/node
    probe=$APP.new/bin/node
  else
    probe=$node
  fi
  [ -x "$probe" ] || die "node $probe is not there or not executable"
  version=$("$probe" --version 2>&1) || die "node ($probe) does not run on this device: $(echo "$version" | head -n 1)"
  echo "$node" > "$APP.new/node-path"
  if [ -d "$APP" ]; then mv "$APP" "$APP.old" || die "cannot move the old $APP aside"; fi
  mv "$APP.new" "$APP" || die "cannot move $APP.new into place"
  rm -rf "$APP.old"
  if [ -f "$CONF" ]; then
    say "kept $CONF"
  else
    write_default_config "$port" || die "cannot write $CONF"
    say "wrote $CONF"
  fi
  say "installed in $APP (node $node $version)"
}

cmd_install_boot() {
  need_root install-boot
  mode=${1:-none}
  case "$mode" in
    rc)
      # init reads /system/etc/init/*.rc at boot only; /system must be writable (adb root;
      # adb remount on a userdebug or eng build).
      cp "$APP/etc/kheadersd.rc" "$RC_FILE" 2>/dev/null || die "cannot write $RC_FILE: /system is read-only (on a userdebug/eng build: adb root && adb remount, then retry)"
      { chmod 0644 "$RC_FILE" && chown 0:0 "$RC_FILE"; } || die "cannot set the mode of $RC_FILE"
      say "installed $RC_FILE: init starts kheadersd after the next boot (sys.boot_completed=1)"
      ;;
    service.d)
      [ -d "$SERVICE_D" ] || die "$SERVICE_D does not exist (it is Magisk's and KernelSU's boot-script directory)"
      # printf, not a here-document (see write_default_config). The boot script expands $(getprop).
      # shellcheck disable=SC2016
      printf '#!/system/bin/sh\n# kheadersd: started at boot by Magisk/KernelSU (late_start service). Written by kheadersd-ctl.\nuntil [ "$(getprop sys.boot_completed)" = 1 ]; do sleep 2; done\nexec /system/bin/sh %s/bin/kheadersd-ctl start\n' \
        "$APP" > "$SERVICE_D/kheadersd.sh" || die "cannot write $SERVICE_D/kheadersd.sh"
      chmod 0755 "$SERVICE_D/kheadersd.sh" || die "cannot make $SERVICE_D/kheadersd.sh executable"
      say "installed $SERVICE_D/kheadersd.sh: kheadersd starts at every boot"
      ;;
    none) say "no boot hook: start it after each boot with: su -c $APP/bin/kheadersd-ctl start" ;;
    *) die "install-boot: rc, service.d or none, not $mode" ;;
  esac
}

# The daemon's environment: what every kheadersd command run from here needs.
daemon_env() {
  export ANDROID_ROOT="${ANDROID_ROOT:-/system}" # how kheadersd knows it is on Android
  export KHEADERSD_CONFIG="$CONF"
  # Termux's bin (xz, if installed) after the system's toybox (mount, xzcat).
  case "$1" in */com.termux/files/usr/bin/node) PATH="$PATH:${1%/node}" ;; esac
  export PATH
}

cmd_run() {
  need_root run
  node=$(node_path) || exit 1
  if [ -f "$LOG" ] && [ "$(wc -c < "$LOG")" -gt "$LOG_MAX" ]; then mv -f "$LOG" "$LOG.1"; fi
  daemon_env "$node"
  echo "$$" > "$PIDF"
  logcat "starting: $node $APP/dist/app/cli.js serve (log: $LOG)"
  # V8's memory flags for an all-day daemon: the same as systemd/kheadersd.service's NODE_OPTIONS.
  exec "$node" --v8-pool-size=1 "$APP/dist/app/cli.js" serve >> "$LOG" 2>&1
}

# Any other kheadersd command with the daemon's configuration: doctor, ls, export, gc, cat.
cmd_cli() {
  need_root "$1"
  node=$(node_path) || exit 1
  daemon_env "$node"
  exec "$node" "$APP/dist/app/cli.js" "$@"
}

cmd_supervise() {
  need_root supervise
  echo "$$" > "$SUPF"
  while [ ! -f "$STOPF" ]; do
    "$SH" "$0" run
    status=$?
    [ -f "$STOPF" ] && break
    logcat "exited with status $status; restarting in 5 s"
    echo "kheadersd-ctl: exited with status $status; restarting in 5 s" >> "$LOG"
    sleep 5
  done
  rm -f "$SUPF"
}

cmd_start() {
  need_root start
  rm -f "$STOPF"
  if init_managed; then
    setprop ctl.start kheadersd
  elif pid=$(live_pid "$PIDF"); then
    say "already running (pid $pid)"
    return 0
  else
    node_path > /dev/null || exit 1
    # A new session, so closing the adb shell does not take it down.
    if command -v setsid >/dev/null 2>&1; then
      setsid "$SH" "$0" supervise < /dev/null > /dev/null 2>&1 &
    else
      nohup "$SH" "$0" supervise < /dev/null > /dev/null 2>&1 &
    fi
  fi
  i=0
  while [ $i -lt 20 ]; do
    if pid=$(live_pid "$PIDF"); then
      say "started (pid $pid); log: $LOG"
      return 0
    fi
    sleep 0.5
    i=$((i + 1))
  done
  tail -n 5 "$LOG" 2>/dev/null >&2
  die "did not start within 10 s (log above: $LOG)"
}

cmd_stop() {
  need_root stop
  touch "$STOPF"
  if sup=$(live_pid "$SUPF"); then kill "$sup" 2>/dev/null; fi
  if pid=$(live_pid "$PIDF"); then
    # SIGTERM: the daemon stops HTTP and unmounts, then exits 0.
    kill -TERM "$pid" 2>/dev/null
    i=0
    while [ $i -lt 30 ] && live_pid "$PIDF" > /dev/null; do
      sleep 0.5
      i=$((i + 1))
    done
    if pid=$(live_pid "$PIDF"); then
      say "still running 15 s after SIGTERM: killing it"
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  # init would restart an rc service that exited: tell it to stop (after the clean SIGTERM stop,
  # because init's own stop is a SIGKILL, which leaves a dead mount).
  if init_managed; then setprop ctl.stop kheadersd; fi
  rm -f "$PIDF" "$SUPF"
  if grep -q " $BASE/mnt " /proc/mounts 2>/dev/null; then
    umount -l "$BASE/mnt" 2>/dev/null || umount "$BASE/mnt" 2>/dev/null || say "a mount is left at $BASE/mnt: umount -l $BASE/mnt"
  fi
  say "stopped"
}

cmd_status() {
  if pid=$(live_pid "$PIDF"); then say "running (pid $pid)"; else say "not running"; fi
  if init_managed; then say "init service: $(getprop init.svc.kheadersd)"; fi
  [ -f "$RC_FILE" ] && say "boot: $RC_FILE"
  [ -f "$SERVICE_D/kheadersd.sh" ] && say "boot: $SERVICE_D/kheadersd.sh"
  if grep -q " $BASE/mnt " /proc/mounts 2>/dev/null; then say "mounted at $BASE/mnt"; else say "no mount at $BASE/mnt"; fi
  [ -f "$APP/node-path" ] && say "node: $(cat "$APP/node-path")"
  if [ -f "$LOG" ]; then
    say "last lines of $LOG:"
    tail -n 5 "$LOG"
  fi
}

cmd_uninstall() {
  need_root uninstall
  cmd_stop
  rm -f "$SERVICE_D/kheadersd.sh"
  if [ -f "$RC_FILE" ]; then rm -f "$RC_FILE" 2>/dev/null || say "cannot remove $RC_FILE (/system is read-only): adb root && adb remount, then rm $RC_FILE"; fi
  # Copy this script out of app/ before removing it? Not needed: sh has read it already.
  rm -rf "$APP" "$APP.new" "$APP.old" "$CONF.tmp"
  if [ "${1:-}" = --purge ]; then
    rm -rf "$BASE"
    say "removed $BASE (cache, configuration, log)"
  else
    say "removed $APP; kept the cache, $CONF and the log in $BASE (uninstall --purge removes them)"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  install) cmd_install "$@" ;;
  install-boot) cmd_install_boot "$@" ;;
  run) cmd_run ;;
  supervise) cmd_supervise ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart)
    cmd_stop
    cmd_start
    ;;
  status) cmd_status ;;
  log) tail -n "${1:-50}" "$LOG" ;;
  doctor | ls | export | gc | cat | ingest) cmd_cli "$cmd" "$@" ;;
  uninstall) cmd_uninstall "$@" ;;
  *) die "usage: $0 install SRC [NODE] [PORT] | install-boot rc|service.d|none | start | stop | restart | status | log [N] | doctor|ls|export|gc|cat|ingest [ARGS] | run | supervise | uninstall [--purge]" ;;
esac
