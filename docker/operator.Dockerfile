# syntax=docker/dockerfile:1
#
# The operator: distcache-operator (HTTP 8080: /metrics, /healthz, /readyz), as the Helm chart charts/distcache
# runs it. Build from the repository root (docker/README.md):
#
#   docker build -f docker/operator.Dockerfile -t REGISTRY/distcache-operator:TAG .
#
# See docker/node.Dockerfile for the build stage's cache mounts.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=distcache-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=distcache-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=distcache-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p distcache-operator --bin distcache-operator \
 && install -D -m 0755 target/release/distcache-operator /out/usr/local/bin/distcache-operator

# glibc, libgcc and CA certificates, no shell; user nonroot (65532). The operator writes no files.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="distcache-operator" \
      org.opencontainers.image.description="DistCache operator: runs the cache nodes of each DistCache resource" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://example.invalid/distcache" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="DistCache"
COPY --from=build /out/usr/local/bin/distcache-operator /usr/local/bin/distcache-operator
USER 65532:65532
# 8080: HTTP /metrics, /healthz, /readyz (--listen).
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/distcache-operator"]
# `docker run IMAGE crd` prints the CRD instead; the chart passes `run --listen ... --node-image ...`.
CMD ["run"]
