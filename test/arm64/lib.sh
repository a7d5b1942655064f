# shellcheck shell=sh
# Scenario helpers for the arm64 VM, used only while the VM harness's own test/vm/lib.sh is not in
# the tree (userland.ts prefers that one). The same two calls, the same meaning:
#   kh_emit TAG [TEXT...]   one event line "TAG TEXT" to the host (fd 3)
#   kh_wait_host LINE       block until the host sends exactly LINE

kh_emit() {
  kh_tag=$1
  shift
  printf '%s %s\n' "$kh_tag" "$*" >&3
}

kh_wait_host() {
  while IFS= read -r kh_line <&3; do
    [ "$kh_line" = "$1" ] && return 0
  done
  return 1
}
