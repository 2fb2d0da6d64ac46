# syntax=docker/dockerfile:1
#
# The demo origin: distcache-origin, a small HTTP service that serves JSON files (GET /<prefix>/<key> answers
# <dir>/<prefix>/<key>.json, 404 when absent; GET /_stats counts requests). It stands in for "your backend" in
# examples/k8s; not meant for production. Build from the repository root (docker/README.md):
#
#   docker build -f docker/origin.Dockerfile -t REGISTRY/distcache-origin:TAG .
#
# The image carries examples/data in /data, so `docker run -p 8080:8080 IMAGE` serves /users/alice at once;
# examples/k8s/origin.yaml mounts its own documents from a ConfigMap instead.
# See docker/node.Dockerfile for the build stage's cache mounts.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=distcache-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=distcache-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=distcache-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p distcache-tests --bin distcache-origin \
 && install -D -m 0755 target/release/distcache-origin /out/usr/local/bin/distcache-origin

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="distcache-origin" \
      org.opencontainers.image.description="DistCache demo origin: serves JSON documents over HTTP for the examples" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://example.invalid/distcache" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="DistCache"
COPY examples/data /data
COPY --from=build /out/usr/local/bin/distcache-origin /usr/local/bin/distcache-origin
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/distcache-origin"]
# Its default listen address is 127.0.0.1:8080, unreachable from outside a container.
CMD ["--listen", "0.0.0.0:8080", "--dir", "/data"]
