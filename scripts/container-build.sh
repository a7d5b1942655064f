#!/usr/bin/env bash
# Run the Dockerfile's steps without Docker, in a clean temporary directory, then start the result
# the way the image starts it and poll the image's own HEALTHCHECK until it passes.
#
#   scripts/container-build.sh [--archive FILE] [--release R] [--keep]
#
#   1. context   copy the tree, minus .dockerignore's patterns (like `COPY . .`)
#   2. build     npm ci (all dependencies), npm run build            (the "build" stage)
#   3. runtime   npm ci --omit=dev into a fresh directory, copy dist/app in  (the "runtime" stage)
#   4. serve     kheadersd serve --mount off --archive A --http 127.0.0.1:PORT, with the image's ENV
#   5. health    the Dockerfile's HEALTHCHECK command, verbatim, until it passes (60 s at most)
#   6. stop      SIGTERM, expect a clean exit 0; `kheadersd ls` shows the entry it cached
#
# Exit 0 when all pass; 1 with "step N (name) failed: why" otherwise; 77 when this tree's CLI has
# no `serve` command yet (a test treats that as a skip). The archive defaults to the shared
# fixture (../shared/fixtures/kheaders-6.1-x86_64.tar.xz) or, if absent, a small one made here.
# The apt-get step of the image (libfuse2, fuse, xz-utils) is not repeated: it is host state.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARCHIVE=""
RELEASE=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --archive) ARCHIVE=${2:?--archive needs a file}; shift 2 ;;
    --release) RELEASE=${2:?--release needs a value}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "container-build: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kheadersd-container-build.XXXXXX")
SERVE_PID=""
STEP_NO=0
STEP_NAME=""

cleanup() {
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -KILL "$SERVE_PID" 2>/dev/null || true
  fi
  if [ "$KEEP" = 1 ]; then echo "container-build: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

step() {
  STEP_NO=$((STEP_NO + 1))
  STEP_NAME=$1
  echo "==> step $STEP_NO ($STEP_NAME)"
}

fail() {
  echo "container-build: step $STEP_NO ($STEP_NAME) failed: $*" >&2
  exit 1
}

command -v node >/dev/null || { echo "container-build: node is not installed" >&2; exit 1; }
command -v npm >/dev/null || { echo "container-build: npm is not installed" >&2; exit 1; }

# ---- 1. context ------------------------------------------------------------------------------
step "context"
PATTERNS=()
if [ -f "$REPO/.dockerignore" ]; then
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}
    line=${line%"${line##*[![:space:]]}"}
    [ -n "$line" ] && PATTERNS+=("$line")
  done < "$REPO/.dockerignore"
fi
ignored() {
  local p
  for p in "${PATTERNS[@]}"; do
    # Top-level patterns, as Docker reads them; `*` may also match inside a name.
    # shellcheck disable=SC2053 # the pattern is meant to glob
    if [[ $1 == $p || $1 == $p/* || ${1##*/} == $p ]]; then return 0; fi
  done
  return 1
}
mkdir -p "$WORK/context"
LIST="$WORK/context-files"
: > "$LIST"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked and new files (what the next commit will have), not what .gitignore leaves out.
  while IFS= read -r -d '' f; do
    [ -e "$REPO/$f" ] || continue # deleted in the work tree
    ignored "$f" || printf '%s\0' "$f" >> "$LIST"
  done < <(git -C "$REPO" ls-files -z --cached --others --exclude-standard)
else
  while IFS= read -r -d '' f; do
    f=${f#./}
    ignored "$f" || printf '%s\0' "$f" >> "$LIST"
  done < <(cd "$REPO" && find . -type f -print0)
fi
tar -C "$REPO" --null -T "$LIST" -cf - | tar -C "$WORK/context" -xf - || fail "copying the tree"
[ -f "$WORK/context/package-lock.json" ] || fail "no package-lock.json in the context (npm ci needs it)"
echo "    $(tr -cd '\0' < "$LIST" | wc -c) files in $WORK/context"

# ---- 2. build stage ----------------------------------------------------------------------------
step "build"
mkdir -p "$WORK/build"
cp "$WORK/context/package.json" "$WORK/context/package-lock.json" "$WORK/build/"
(cd "$WORK/build" && npm ci --ignore-scripts --no-audit --no-fund) || fail "npm ci (all dependencies)"
(cd "$WORK/context" && tar -cf - .) | (cd "$WORK/build" && tar -xf -) || fail "COPY . ."
(cd "$WORK/build" && npm run build) || fail "npm run build"
[ -f "$WORK/build/dist/app/cli.js" ] || fail "npm run build made no dist/app/cli.js"

# ---- 3. runtime stage --------------------------------------------------------------------------
step "runtime"
RT="$WORK/runtime"
mkdir -p "$RT/dist" "$RT/bin"
cp "$WORK/context/package.json" "$WORK/context/package-lock.json" "$RT/"
# (The image also runs `npm cache clean --force` to keep the layer small; here that would wipe
# this user's npm cache and changes nothing in the result.)
(cd "$RT" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund) || fail "npm ci --omit=dev"
cp -R "$WORK/build/dist/app" "$RT/dist/app"
chmod 0755 "$RT/dist/app/cli.js"
ln -s "$RT/dist/app/cli.js" "$RT/bin/kheadersd" # the image's /usr/local/bin/kheadersd
[ ! -e "$RT/node_modules/typescript" ] || fail "a dev dependency (typescript) is in the runtime's node_modules"
KHEADERSD="$RT/bin/kheadersd"
if ! "$KHEADERSD" serve --help >/dev/null 2>&1; then
  echo "container-build: this tree's CLI has no 'serve' command yet: skipping the run" >&2
  exit 77
fi

# ---- 4. serve ------------------------------------------------------------------------------------
step "serve"
if [ -z "$ARCHIVE" ]; then
  FIXTURE="$REPO/../shared/fixtures/kheaders-6.1-x86_64.tar.xz"
  if [ -f "$FIXTURE" ]; then
    ARCHIVE=$FIXTURE
  else
    # A small archive shaped like the kernel's: ./-prefixed names, the release in utsrelease.h.
    T="$WORK/synthetic"
    mkdir -p "$T/include/generated" "$T/include/linux"
    echo '#define UTS_RELEASE "0.0.0-kheadersd-smoke"' > "$T/include/generated/utsrelease.h"
    printf '#ifndef _KHEADERSD_SMOKE_H\n#define _KHEADERSD_SMOKE_H\nstruct kheadersd_smoke { int x; };\n#endif\n' > "$T/include/linux/kheadersd-smoke.h"
    tar -C "$T" -cJf "$WORK/synthetic.tar.xz" . || fail "making a synthetic archive (needs tar and xz)"
    ARCHIVE="$WORK/synthetic.tar.xz"
  fi
fi
[ -r "$ARCHIVE" ] || fail "cannot read the archive $ARCHIVE"
PORT=$(node -e "const s = require('net').createServer(); s.listen(0, '127.0.0.1', () => { console.log(s.address().port); s.close(); })")
echo '{}' > "$WORK/config.json" # no /etc/kheadersd/config.json of this host leaks in
mkdir -p "$WORK/cache"
chmod 0755 "$WORK/cache"
RELEASE_ARGS=()
if [ -n "$RELEASE" ]; then RELEASE_ARGS=(--release "$RELEASE"); fi
echo "    archive $ARCHIVE, http 127.0.0.1:$PORT"
# The image's ENV, then the flags of this smoke run (flags win over variables).
env NODE_ENV=production KHEADERSD_CACHE_DIR="$WORK/cache" KHEADERSD_MOUNT=off KHEADERSD_HTTP=0.0.0.0:7711 \
  KHEADERSD_CONFIG="$WORK/config.json" \
  "$KHEADERSD" serve --mount off --archive "$ARCHIVE" "${RELEASE_ARGS[@]}" --http "127.0.0.1:$PORT" \
  > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!

# ---- 5. health ---------------------------------------------------------------------------------
step "health"
# The HEALTHCHECK's command, taken from the Dockerfile so the two cannot drift apart.
HEALTH_SCRIPT=$(node -e '
  const text = require("fs").readFileSync(process.argv[1], "utf8").replace(/\\\n\s*/g, "");
  const m = /^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$/m.exec(text);
  if (!m) process.exit(1);
  const argv = JSON.parse(m[1]);
  if (argv[0] !== "node" || argv[1] !== "-e") process.exit(1);
  process.stdout.write(argv[2]);' "$REPO/Dockerfile") || fail "cannot read the HEALTHCHECK command from the Dockerfile"
healthy=0
for _ in $(seq 1 120); do
  if ! kill -0 "$SERVE_PID" 2>/dev/null; then
    wait "$SERVE_PID" && status=0 || status=$?
    SERVE_PID=""
    tail -n 20 "$WORK/serve.log" >&2
    fail "serve exited with status $status before /healthz answered (log above)"
  fi
  if KHEADERSD_HTTP="127.0.0.1:$PORT" node -e "$HEALTH_SCRIPT" 2>/dev/null; then healthy=1; break; fi
  sleep 0.5
done
if [ "$healthy" != 1 ]; then
  tail -n 20 "$WORK/serve.log" >&2
  fail "GET http://127.0.0.1:$PORT/healthz did not succeed within 60 s (log above)"
fi
echo "    /healthz ok"

# ---- 6. stop -----------------------------------------------------------------------------------
step "stop"
kill -TERM "$SERVE_PID"
status=0
for _ in $(seq 1 60); do
  kill -0 "$SERVE_PID" 2>/dev/null || break
  sleep 0.25
done
if kill -0 "$SERVE_PID" 2>/dev/null; then
  tail -n 20 "$WORK/serve.log" >&2
  fail "serve still running 15 s after SIGTERM"
fi
wait "$SERVE_PID" || status=$?
SERVE_PID=""
if [ "$status" != 0 ]; then
  tail -n 20 "$WORK/serve.log" >&2
  fail "serve exited with status $status after SIGTERM (expected 0)"
fi
LS=$(KHEADERSD_CONFIG="$WORK/config.json" "$KHEADERSD" ls --json --cache-dir "$WORK/cache" 2>/dev/null) || fail "kheadersd ls after the run"
case "$LS" in
  *'"release"'*) ;;
  *) fail "the cache has no entry after serve: $LS" ;;
esac
echo "container-build: ok (build, runtime with production dependencies only, serve, healthcheck, clean stop)"
