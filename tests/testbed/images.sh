#!/usr/bin/env bash
# The project's container images, built with no registry: the base images docker/*.Dockerfile name are made here
# from Debian packages, then the images are built from the Dockerfiles (or from binaries already built) and, for the
# bed's real node, imported into its containerd.
#
#   tests/testbed/images.sh bases       build (once, cached) the two base images into buildah's local storage:
#                                         rust:1.95-bookworm  a debootstrap'd bookworm (gcc, libc6-dev, make,
#                                                             pkg-config, ca-certificates, git) with the toolchain
#                                                             rust-toolchain.toml pins, installed as rustup installs
#                                                             it (RUSTUP_HOME=/usr/local/rustup,
#                                                             CARGO_HOME=/usr/local/cargo), copied from this machine
#                                         gcr.io/distroless/cc-debian12:nonroot  glibc, libgcc, libstdc++, libgomp,
#                                                             libssl3, tzdata, netbase and the CA bundle, no shell,
#                                                             user nonroot (65532), home /home/nonroot
#   tests/testbed/images.sh dockerfiles TAG   `buildah bud --pull=never` of docker/{node,operator,origin}.Dockerfile
#                                         as they are (cargo builds inside; crates come from the registry through
#                                         the host's network), tagged localhost/distcache-{node,operator,origin}:TAG;
#                                         prints each build's time
#   tests/testbed/images.sh prebuilt TAG DIR  the same runtime stage (base, user, ports, entrypoint, labels, hook
#                                         cache dir) with the binaries DIR/distcache-{node,operator,origin} copied in
#                                         instead of compiled: for CI, where the workspace is already built
#   tests/testbed/images.sh import TAG  the three images into the running real-node bed's containerd (k8s.io), and
#                                         the node image once more as TAG-next (a new version, for a rolling update)
#
# Caches: IMAGES_CACHE (default $TESTBED_CACHE/images) keeps the root file systems as tarballs; buildah keeps the
# images (/var/lib/containers/storage) and the Dockerfiles' cargo cache mounts between builds.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TESTBED_DIR=${TESTBED_DIR:-$ROOT/target/testbed}
TESTBED_CACHE=${TESTBED_CACHE:-/var/cache/distcache/testbed}
IMAGES_CACHE=${IMAGES_CACHE:-$TESTBED_CACHE/images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILD_BASE=docker.io/library/rust:1.95-bookworm
RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot
IMAGES=(node operator origin)

log() { printf '==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

need_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if ((${#missing[@]})); then
    log "installing ${missing[*]} (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null ||
      die "cannot install ${missing[*]} with apt-get"
  fi
}

have_image() { buildah images -q "$1" >/dev/null 2>&1 && [[ -n $(buildah images -q "$1" 2>/dev/null) ]]; }

# image_id NAME: its ID, or nothing.
image_id() { buildah images -q --no-trunc "$1" 2>/dev/null | head -n 1 || true; }

# drop_replaced ID: removes the image ID that a build just took the name of, once nothing names it (each build
# with new binaries would otherwise leave half a gigabyte behind).
drop_replaced() {
  local id=$1
  [[ -n $id ]] || return 0
  buildah images -q --no-trunc --filter dangling=true 2>/dev/null | grep -qx "$id" || return 0
  buildah rmi "$id" >/dev/null 2>&1 || true
}

# The bookworm root file system both bases come from, as debootstrap leaves it (its .debs stay in
# var/cache/apt/archives for the runtime base).
bootstrap() {
  local dir=$IMAGES_CACHE/bookworm
  [[ -f $dir/.complete ]] && return 0
  rm -rf "$dir"
  mkdir -p "$dir"
  log "debootstrap bookworm from $MIRROR (a minute or two, once)"
  debootstrap --variant=minbase \
    --include=ca-certificates,gcc,libc6-dev,make,pkg-config,git,netbase,tzdata,libssl3,libgomp1 \
    bookworm "$dir" "$MIRROR" >"$IMAGES_CACHE/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $IMAGES_CACHE/debootstrap.log"
  touch "$dir/.complete"
}

# rust:1.95-bookworm: the bookworm root plus the pinned toolchain, laid out as the official image lays it out, so
# `cargo` in a Dockerfile's RUN finds it without a download (rust-toolchain.toml names exactly this toolchain, with
# its components and the wasm32-wasip2 target).
build_base() {
  have_image "$BUILD_BASE" && return 0
  local sysroot channel tar=$IMAGES_CACHE/rust-1.95-bookworm.tar stage=$IMAGES_CACHE/rust-stage
  sysroot=$(cd "$ROOT" && rustc --print sysroot) || die "no Rust toolchain here (rustup, rust-toolchain.toml)"
  channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")
  [[ -n $channel ]] || die "cannot read the channel of rust-toolchain.toml"
  log "image $BUILD_BASE: bookworm + Rust $channel from $sysroot"
  rm -rf "$stage"
  local toolchain=$stage/usr/local/rustup/toolchains/$channel-x86_64-unknown-linux-gnu
  mkdir -p "$toolchain" "$stage/usr/local/cargo/bin"
  # The toolchain without its offline documentation (the official image installs the minimal profile).
  tar -C "$sysroot" --exclude=./share/doc -cf - . | tar -C "$toolchain" -xf -
  sed -i '/^rust-docs-/d' "$toolchain/lib/rustlib/components"
  rm -f "$toolchain"/lib/rustlib/manifest-rust-docs-*
  cp "$(command -v rustup)" "$stage/usr/local/cargo/bin/rustup"
  local proxy
  for proxy in cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt rust-gdb rust-lldb; do
    ln -sf rustup "$stage/usr/local/cargo/bin/$proxy"
  done
  printf 'version = "12"\ndefault_toolchain = "%s-x86_64-unknown-linux-gnu"\nprofile = "minimal"\n' "$channel" \
    >"$stage/usr/local/rustup/settings.toml"
  tar --numeric-owner -C "$IMAGES_CACHE/bookworm" --exclude=./.complete --exclude=./var/cache/apt/archives \
    -cf "$tar" .
  tar --numeric-owner -C "$stage" -rf "$tar" ./usr/local
  rm -rf "$stage"
  local c
  c=$(buildah from scratch)
  buildah add --quiet "$c" "$tar" / >/dev/null
  buildah config --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$channel" --cmd /bin/bash "$c"
  buildah commit --quiet --rm "$c" "$BUILD_BASE" >/dev/null
  rm -f "$tar"
}

# gcr.io/distroless/cc-debian12:nonroot, rebuilt from the same packages distroless takes (its "cc" flavour): files
# of the .debs unpacked (no package database, no shell), the CA bundle update-ca-certificates made in the bookworm
# root, and the nonroot user.
runtime_base() {
  have_image "$RUNTIME_BASE" && return 0
  log "image $RUNTIME_BASE: glibc, libgcc, libstdc++, libgomp, libssl3, tzdata, netbase, CA certificates; user 65532"
  local root=$IMAGES_CACHE/runtime-root archives=$IMAGES_CACHE/bookworm/var/cache/apt/archives pkg deb
  rm -rf "$root"
  mkdir -p "$root"
  for pkg in base-files netbase tzdata libc6 libgcc-s1 libstdc++6 libgomp1 libssl3; do
    deb=$(find "$archives" -maxdepth 1 -name "${pkg}_*_*.deb" | head -n 1)
    [[ -n $deb ]] || die "debootstrap left no $pkg package in $archives"
    dpkg-deb -x "$deb" "$root"
  done
  rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/lintian" \
    "$root/usr/share/common-licenses"
  install -D -m 0644 "$IMAGES_CACHE/bookworm/etc/ssl/certs/ca-certificates.crt" \
    "$root/etc/ssl/certs/ca-certificates.crt"
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
  install -d -m 0700 "$root/root"
  install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
  install -d -m 1777 "$root/tmp"
  local tar=$IMAGES_CACHE/runtime.tar c
  tar --numeric-owner -C "$root" -cf "$tar" .
  c=$(buildah from scratch)
  buildah add --quiet "$c" "$tar" / >/dev/null
  buildah config --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$c"
  buildah commit --quiet --rm "$c" "$RUNTIME_BASE" >/dev/null
  rm -rf "$root" "$tar"
}

bases() {
  need_tools
  mkdir -p "$IMAGES_CACHE"
  bootstrap
  build_base
  runtime_base
  log "bases ready: $BUILD_BASE, $RUNTIME_BASE"
}

# The runtime base only: all `prebuilt` needs.
runtime_only() {
  need_tools
  mkdir -p "$IMAGES_CACHE"
  bootstrap
  runtime_base
}

revision() { git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown; }

dockerfiles() {
  local tag=${1:?usage: images.sh dockerfiles TAG}
  bases
  local image start
  for image in "${IMAGES[@]}"; do
    start=$(date +%s)
    log "buildah bud docker/$image.Dockerfile -> localhost/distcache-$image:$tag"
    local replaced
    replaced=$(image_id "localhost/distcache-$image:$tag")
    # --network=host: the build stage's cargo fetches crates from the registry; --pull=never: the bases are local.
    # The machine's CA bundle is mounted over the base's for the RUN steps only (a machine behind a TLS-inspecting
    # proxy reaches the registry with it); no image keeps it.
    buildah bud --pull=never --network=host --layers \
      --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
      --build-arg REVISION="$(revision)" -f "$ROOT/docker/$image.Dockerfile" -t "localhost/distcache-$image:$tag" \
      "$ROOT" >"$IMAGES_CACHE/bud-$image.log" 2>&1 || {
      tail -n 30 "$IMAGES_CACHE/bud-$image.log" >&2
      die "building docker/$image.Dockerfile failed; see $IMAGES_CACHE/bud-$image.log"
    }
    drop_replaced "$replaced"
    log "docker/$image.Dockerfile built in $(($(date +%s) - start)) s"
  done
}

# The runtime stage of docker/<image>.Dockerfile with a binary from DIR instead of the build stage's. Reads the
# stage's USER, EXPOSE, ENTRYPOINT, CMD and COPY of examples/data from the Dockerfile itself, so the two stay one.
prebuilt() {
  local tag=${1:?usage: images.sh prebuilt TAG DIR} dir=${2:?usage: images.sh prebuilt TAG DIR}
  runtime_only
  local image bin c dockerfile
  for image in "${IMAGES[@]}"; do
    bin=$dir/distcache-$image
    [[ -x $bin ]] || die "no executable $bin (build it first: cargo build -p ...)"
    dockerfile=$ROOT/docker/$image.Dockerfile
    c=$(buildah from --pull=never "$RUNTIME_BASE")
    buildah copy --quiet --chmod 0755 "$c" "$bin" "/usr/local/bin/distcache-$image" >/dev/null
    if grep -q '^COPY --from=build --chown=65532:65532 /out/var/cache/distcache' "$dockerfile"; then
      local mnt
      mnt=$(buildah mount "$c")
      install -d -m 0755 -o 65532 -g 65532 "$mnt/var/cache/distcache"
      buildah umount "$c" >/dev/null
    fi
    if grep -q '^COPY examples/data /data' "$dockerfile"; then
      buildah copy --quiet "$c" "$ROOT/examples/data" /data >/dev/null
    fi
    local args=() line
    while read -r line; do
      case $line in
        "USER "*) args+=(--user "${line#USER }") ;;
        "EXPOSE "*) for p in ${line#EXPOSE }; do args+=(--port "$p"); done ;;
        "ENTRYPOINT "*) args+=(--entrypoint "${line#ENTRYPOINT }") ;;
        "CMD "*) args+=(--cmd "${line#CMD }") ;;
      esac
    done < <(sed -n '/^FROM gcr.io/,$p' "$dockerfile")
    buildah config "${args[@]}" --label org.opencontainers.image.title="distcache-$image" \
      --label org.opencontainers.image.revision="$(revision)" --label org.opencontainers.image.version=prebuilt \
      "$c"
    local replaced
    replaced=$(image_id "localhost/distcache-$image:$tag")
    buildah commit --quiet --rm "$c" "localhost/distcache-$image:$tag" >/dev/null
    drop_replaced "$replaced"
    log "localhost/distcache-$image:$tag from $bin"
  done
}

import() {
  local tag=${1:?usage: images.sh import TAG}
  local sock=$TESTBED_DIR/containerd/containerd.sock image archive
  [[ -S $sock ]] || die "no real-node bed runs (no $sock); start one: make testbed-up KUBELET=real"
  for image in "${IMAGES[@]}"; do
    archive=$IMAGES_CACHE/distcache-$image-$tag.tar
    rm -f "$archive"
    # A docker-archive names the image in its manifest (RepoTags), which `ctr images import` keeps.
    buildah push --quiet "localhost/distcache-$image:$tag" \
      "docker-archive:$archive:localhost/distcache-$image:$tag" >/dev/null
    nsenter --net=/run/netns/distcache-bed ctr --address "$sock" -n k8s.io images import "$archive" >/dev/null
    rm -f "$archive"
    log "imported localhost/distcache-$image:$tag into the bed's containerd"
  done
  # The node image a second time, as `<tag>-next`: what a new release looks like to a rolling update.
  nsenter --net=/run/netns/distcache-bed ctr --address "$sock" -n k8s.io images tag --force \
    "localhost/distcache-node:$tag" "localhost/distcache-node:$tag-next" >/dev/null
  log "tagged localhost/distcache-node:$tag-next (for a rolling update)"
}

# buildah creates its CNI configuration directory /etc/cni/net.d (with a lock file) on first use, even for builds
# on the host network; when this run made it and nothing else was put there, it is removed again, so that the host
# keeps no trace beyond the caches above.
drop_cni_dir() {
  [[ -d /etc/cni/net.d ]] || return 0
  [[ -z $(find /etc/cni -mindepth 1 ! -path /etc/cni/net.d ! -path /etc/cni/net.d/cni.lock) ]] || return 0
  rm -rf /etc/cni
}
if [[ ! -e /etc/cni ]]; then
  trap drop_cni_dir EXIT
fi

case ${1:-} in
  bases) bases ;;
  dockerfiles) dockerfiles "${2:-}" ;;
  prebuilt) prebuilt "${2:-}" "${3:-}" ;;
  import) import "${2:-}" ;;
  *) die "usage: $0 bases | dockerfiles TAG | prebuilt TAG DIR | import TAG" ;;
esac
