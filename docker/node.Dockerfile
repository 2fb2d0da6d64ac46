# syntax=docker/dockerfile:1
#
# The cache node: distcache-node (gRPC 7420, admin HTTP 7421), as the distcache-operator runs it in each DistCache's
# StatefulSet. Build from the repository root (docker/README.md):
#
#   docker build -f docker/node.Dockerfile -t REGISTRY/distcache-node:TAG .
#
# The builder compiles with the toolchain pinned in rust-toolchain.toml (rustup fetches it if the image's differs).
# Cache mounts keep the cargo registry and the target directory between builds; the binary is copied out of the
# cached target directory in the same step, since a cache mount is not part of the image.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# /var/cache/distcache is the node's hook cache directory (compiled modules, url downloads), writable by its user
# here; in Kubernetes the operator mounts an emptyDir there, so the root file system stays read-only.
RUN --mount=type=cache,id=distcache-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=distcache-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=distcache-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p distcache-node --bin distcache-node \
 && install -D -m 0755 target/release/distcache-node /out/usr/local/bin/distcache-node \
 && install -d -m 0755 -o 65532 -g 65532 /out/var/cache/distcache

# glibc, libgcc and CA certificates, no shell; user nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="distcache-node" \
      org.opencontainers.image.description="DistCache cache node: sharded read-through cache with WebAssembly data-source hooks, served over gRPC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://example.invalid/distcache" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="DistCache"
COPY --from=build --chown=65532:65532 /out/var/cache/distcache /var/cache/distcache
COPY --from=build /out/usr/local/bin/distcache-node /usr/local/bin/distcache-node
USER 65532:65532
# 7420: gRPC (distcache.v1.Cache, distcache.v1.Peer, grpc.health.v1, reflection); 7421: admin HTTP (/healthz,
# /readyz, /metrics, /admin/peers, /admin/keyspaces).
EXPOSE 7420 7421
# Configuration: DISTCACHE_* environment variables (as the operator sets them), or --config FILE.
ENTRYPOINT ["/usr/local/bin/distcache-node"]
