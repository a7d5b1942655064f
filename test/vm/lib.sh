# Helpers for scenario scripts, sourced (POSIX sh) by init.sh before the scenario runs.
#
# From the host (env.sh): KH_NODE (this machine's node), KH_CLI (the checkout's shipped CLI, dist/app/cli.js)
# and whatever the test passed. From init.sh: KH_OUT, a directory the host reads after the VM
# has powered off (or been killed); KH_FILES, the files the test gave; fd 3, the line channel
# to the host.

# kh_emit TAG [TEXT...]: one event line to the host ("TAG TEXT").
kh_emit() {
  kh_tag=$1
  shift
  printf '%s %s\n' "$kh_tag" "$*" >&3
}

# kh_wait_host LINE: block until the host sends exactly LINE (VmSession.send).
kh_wait_host() {
  while IFS= read -r kh_line <&3; do
    [ "$kh_line" = "$1" ] && return 0
  done
  return 1
}

# kh ARGS...: the daemon's CLI, as installed.
kh() {
  "$KH_NODE" "$KH_CLI" "$@"
}

# kh_start NAME ARGS...: `kheadersd ARGS` in the background. Its output (pino JSON lines, stdout
# and stderr) goes to $KH_OUT/NAME.log and, line by line and as it happens, to the host as events
# tagged NAME; a last line {"kh":"exit","status":N} says it ended. Its pid is in $KH_OUT/NAME.pid.
kh_start() {
  kh_name=$1
  shift
  : >"$KH_OUT/$kh_name.log"
  rm -f "$KH_OUT/$kh_name.pid"
  {
    "$KH_NODE" "$KH_CLI" "$@" 2>&1 3>&- &
    echo $! >"$KH_OUT/$kh_name.pid"
    wait $!
    echo "{\"kh\":\"exit\",\"status\":$?}"
  } | kh__forward "$kh_name" &
  while [ ! -s "$KH_OUT/$kh_name.pid" ]; do sleep 0.05; done
}

kh__forward() {
  while IFS= read -r kh_l; do
    printf '%s\n' "$kh_l" >>"$KH_OUT/$1.log"
    printf '%s %s\n' "$1" "$kh_l" >&3
  done
}

# kh_wait_file FILE ERE SECONDS [PID]: wait until FILE has a line matching ERE; fails (status 1)
# after SECONDS, or once process PID has ended without one. One tail and one grep for the whole
# wait: a loop of grep, date and sleep starts processes every tenth of a second, and under TCG
# each start costs a good part of a vCPU-second, taken from the process being waited for.
kh_wait_file() {
  kh_fifo=$(mktemp -u /tmp/kh-wait.XXXXXX)
  mkfifo "$kh_fifo" || return 1
  # tail polls (-s) where it cannot use inotify (the out directory is 9p): no process starts.
  timeout "$3" tail -s 0.2 ${4:+--pid="$4"} -n +1 -f "$1" >"$kh_fifo" 2>/dev/null &
  kh_tail=$!
  grep -m1 -qE -- "$2" <"$kh_fifo"
  kh_found=$?
  kill "$kh_tail" 2>/dev/null
  wait "$kh_tail" 2>/dev/null
  rm -f "$kh_fifo"
  return "$kh_found"
}

# kh_wait_log NAME ERE [SECONDS]: wait until NAME's log has a line matching ERE. Fails (status 1)
# if the process ends first or after SECONDS (default 120).
kh_wait_log() {
  # The exit line is the last one the process writes: it ends the wait too, and one more look settles it.
  kh_wait_file "$KH_OUT/$1.log" "($2)|^\{\"kh\":\"exit\"" "${3:-120}"
  grep -qE -- "$2" "$KH_OUT/$1.log" && return 0
  if grep -q '^{"kh":"exit"' "$KH_OUT/$1.log"; then
    kh_emit kh-fail "$1 ended before logging /$2/"
  else
    kh_emit kh-fail "timed out waiting for /$2/ in $1's log"
  fi
  return 1
}

# kh_stop NAME: SIGTERM, then wait for it to exit (up to 60 s); prints its exit status.
kh_stop() {
  kill -TERM "$(cat "$KH_OUT/$1.pid")" 2>/dev/null
  kh_wait_log "$1" '^\{"kh":"exit"' 60 || return 1
  sed -n 's/^{"kh":"exit","status":\([0-9]*\)}$/\1/p' "$KH_OUT/$1.log"
}

# kh_sampler_start [MOUNT]: until kh_sampler_stop, record what a reader of MOUNT/current
# (default /run/kheaders) finds, each time it changes, in $KH_OUT/samples: "<uptime> <link>
# <inode>", where <link> is the symlink's target and <inode> that of <link>/include, which
# names the entry served (the mount gives each entry its own inodes, the same under
# <release>/ and by-digest/<digest>/: see kh_digest_inodes). "-" when absent.
# One perl process (perl-base is on every Debian system) does the sampling: the same loop in sh
# is four process starts (readlink, stat, cut, sleep) every 50 ms, most of a vCPU under TCG,
# taken from what the test is timing. Returns once the first sample is written.
kh_sampler_start() {
  rm -f "$KH_OUT/sampler.stop" "$KH_OUT/sampler.done" "$KH_OUT/samples"
  # shellcheck disable=SC2016 # perl's variables, not the shell's
  perl -e '
    my ($mnt, $out) = @ARGV;
    open(my $log, ">>", "$out/samples") or die "samples: $!";
    $log->autoflush(1);
    my $last = "";
    until (-e "$out/sampler.stop") {
      my $link = readlink("$mnt/current") // "-";
      my @st = stat("$mnt/current/include");
      my $now = "$link " . (@st ? $st[1] : "-");
      if ($now ne $last) {
        open(my $up, "<", "/proc/uptime") or die "uptime: $!";
        my ($uptime) = split / /, scalar <$up>;
        close $up;
        print $log "$uptime $now\n";
        $last = $now;
      }
      select(undef, undef, undef, 0.05);
    }
    open(my $done, ">", "$out/sampler.done") or die "sampler.done: $!";
  ' "${1:-/run/kheaders}" "$KH_OUT" 3>&- &
  kh_sampler_pid=$!
  while [ ! -s "$KH_OUT/samples" ] && kill -0 "$kh_sampler_pid" 2>/dev/null; do sleep 0.05; done
}

kh_sampler_stop() {
  : >"$KH_OUT/sampler.stop"
  while [ ! -e "$KH_OUT/sampler.done" ] && kill -0 "$kh_sampler_pid" 2>/dev/null; do sleep 0.05; done
}

# kh_digest_inodes [MOUNT]: "<digest> <inode of by-digest/<digest>/include>" for every entry
# the mount shows, in $KH_OUT/digest-inodes (to turn the sampler's inodes into digests).
kh_digest_inodes() {
  for d in "${1:-/run/kheaders}"/by-digest/*; do
    echo "${d##*/} $(stat -c %i "$d/include" 2>/dev/null || echo -)"
  done >"$KH_OUT/digest-inodes"
}
