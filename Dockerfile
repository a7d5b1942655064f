# syntax=docker/dockerfile:1
#
# kheadersd in a container: serves the HOST kernel's headers (a container shares the host's
# kernel, so /sys/kernel/kheaders.tar.xz and uname -r inside are the host's).
#
#   docker build -t kheadersd .
#
# Default: HTTP only, as the unprivileged user `node`. /sys/kernel/kheaders.tar.xz and
# /sys/kernel/btf/vmlinux are world-readable (0444) and Docker mounts /sys read-only in every
# container, so no root and no capability is needed to read them. Load the module on the host
# first if the kernel has CONFIG_IKHEADERS=m (a container cannot modprobe): sudo modprobe kheaders
#
#   docker run -d --name kheadersd --init -p 127.0.0.1:7711:7711 \
#     -v kheadersd-cache:/var/cache/kheadersd kheadersd
#   curl -s http://127.0.0.1:7711/healthz; kheadersd pull ... (see README)
#
# With the FUSE mount, shown on the host at /run/kheadersd/mnt. Mounting needs root, CAP_SYS_ADMIN
# and /dev/fuse; AppArmor's docker-default profile denies mount(2), hence apparmor=unconfined where
# AppArmor is on. The mount is made on a directory *inside* a shared bind of the host's
# /run/kheadersd (bind-propagation=rshared), so it propagates back to the host; the bind target
# itself cannot be the mount point (serve refuses a directory that is already a mount point).
# Use a separate cache volume: the default one belongs to uid 1000, and the cache must be owned by
# the user who writes it.
#
#   sudo mkdir -p /run/kheadersd
#   docker run -d --name kheadersd --init --user 0 \
#     --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined \
#     --mount type=bind,source=/run/kheadersd,target=/run/kheadersd,bind-propagation=rshared \
#     -e KHEADERSD_MOUNT=/run/kheadersd/mnt \
#     -v kheadersd-cache-root:/var/cache/kheadersd -p 127.0.0.1:7711:7711 kheadersd
#   ls /run/kheadersd/mnt/current/include/linux/sched.h
#
# /sys/kernel is already visible read-only; `-v /sys/kernel:/sys/kernel:ro` changes nothing unless
# your runtime hides it. `--init` reaps the helpers serve spawns (xz, mount). Stop with
# `docker stop` (SIGTERM: serve unmounts; allow it the default 10 s). If the container is killed
# instead, the host keeps a dead mount: sudo umount -l /run/kheadersd/mnt
#
# scripts/container-build.sh runs the same steps as this file without Docker (and a test runs it).

ARG NODE_IMAGE=node:22-bookworm-slim

# ---- build: compile TypeScript, bundle it (esbuild) --------------------------------------------
FROM ${NODE_IMAGE} AS build
WORKDIR /src
COPY package.json package-lock.json ./
# --ignore-scripts: fuse-native and lzma-native load bundled prebuilds; their install scripts
# would try to compile on architectures without one (arm64) and fail the build.
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY . .
RUN npm run build

# ---- runtime: production dependencies and the bundled JavaScript only --------------------------
FROM ${NODE_IMAGE} AS runtime
# libfuse2 + fuse: fuse-native (the native FUSE backend) links libfuse.so.2; fusermount clears
# stale mounts. xz-utils: ingest decodes with the xz binary, twice as fast as lzma-native.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libfuse2 fuse xz-utils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/kheadersd
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund && npm cache clean --force
COPY --from=build /src/dist/app ./dist/app
RUN chmod 0755 dist/app/cli.js \
 && ln -s /opt/kheadersd/dist/app/cli.js /usr/local/bin/kheadersd \
 && mkdir -p /var/cache/kheadersd \
 && chown node:node /var/cache/kheadersd \
 && chmod 0755 /var/cache/kheadersd

# Variables, not flags, so `docker run IMAGE ls`, `... doctor` and `-e KHEADERSD_MOUNT=...` all
# work with the default CMD. Inside a container HTTP must listen beyond loopback to be published.
# NODE_OPTIONS: V8's memory flags for an all-day daemon, as in systemd/kheadersd.service.
ENV NODE_ENV=production \
    NODE_OPTIONS="--v8-pool-size=1" \
    KHEADERSD_CACHE_DIR=/var/cache/kheadersd \
    KHEADERSD_MOUNT=off \
    KHEADERSD_HTTP=0.0.0.0:7711
VOLUME /var/cache/kheadersd
EXPOSE 7711
USER node
# No curl in the slim image: node's fetch. Follows the port in KHEADERSD_HTTP.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["node", "-e", "const p = (process.env.KHEADERSD_HTTP || '').split(':').pop() || '7711'; fetch('http://127.0.0.1:' + p + '/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["kheadersd"]
CMD ["serve"]
