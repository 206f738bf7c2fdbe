# syntax=docker/dockerfile:1.7
#
# SpargeServe CUDA image: sparge-server, sparge-cli and sparge-train (the distillation trainer),
# LibTorch from the pinned torch wheel, kernels built for Hopper (sm_90a, H100/H200).
#
# Build (BuildKit, the default builder since Docker 23; nothing else needs to be installed):
#   docker build -t sparge-serve:dev .
#   docker build -t sparge-serve:dev --build-arg CUDA_ARCHITECTURES="90a;100a" .   # more GPUs
# Run (needs the NVIDIA Container Toolkit on the host and a driver for CUDA 13.0, i.e. >= 580):
#   docker run --rm --gpus all -p 50051:50051 -p 9090:9090 sparge-serve:dev  # embedded tiny model
#   docker run --rm --gpus all -p 50051:50051 -p 9090:9090 -v /srv/models:/models:ro \
#     sparge-serve:dev --config /etc/sparge/server.yaml --device cuda --model /models/<dir>
#   docker run --rm --gpus all -p 50051:50051 -p 9090:9090 \
#     -v $PWD/my-server.yaml:/etc/sparge/server.yaml:ro sparge-serve:dev        # own config
#   docker run --rm --gpus all sparge-serve:dev --help                  # every server flag
#   docker run --rm --network host --user "$(id -u)" -v "$PWD:/out" --entrypoint sparge-cli \
#     sparge-serve:dev generate --server localhost:50051 --prompt "a red fox" --out /out/fox.mp4
# Train (distillation run on all GPUs; my-train.yaml names /models/<dir>, /runs/<run> as output_dir
# and a prompts file on a mounted path; config/trainer.yaml documents every field; the default
# /etc/sparge/trainer.yaml is config/trainer.yaml):
#   docker run --rm --gpus all --shm-size 16g -v /srv/models:/models:ro -v /srv/runs:/runs \
#     -v $PWD/my-train.yaml:/etc/sparge/trainer.yaml:ro --entrypoint /usr/bin/tini sparge-serve:dev \
#     -- sparge-train --config /etc/sparge/trainer.yaml --nproc-per-node 8
# Ports: 50051 gRPC (VideoService, grpc.health.v1, reflection), 9090 Prometheus /metrics.
# Health: HEALTHCHECK runs `sparge-cli health`, SERVING once the model is loaded and warmed up.
#
# Base image choice. NVIDIA publishes nvidia/cuda images only for Ubuntu, UBI/Rocky and Oracle
# Linux, not for Debian, yet every C++ dependency here comes from Debian 12 packages, and the
# project was checked on exactly that set (gRPC 1.51, protobuf 3.21, Abseil 20220623, FFmpeg 5.1,
# GCC 12; see scripts/setup.sh and the design's ARCHITECTURE.md). Ubuntu 24.04
# (nvidia/cuda:13.0.2-devel-ubuntu24.04) would bring other versions (FFmpeg 6.1, GCC 13, Python
# 3.12, ...) that nobody tests. So both stages are debian:12 (bookworm):
#  - build: the CUDA 13.0 toolkit from NVIDIA's official Debian 12 apt repository (the same
#    packages the nvidia/cuda devel images install), then scripts/setup.sh unchanged.
#  - runtime: debian:12-slim. The CUDA 13.0 runtime libraries (cudart, cuBLAS, cuDNN, NCCL, ...)
#    are the ones the torch==2.11.0 wheel ships in its nvidia-* dependencies, i.e. exactly what
#    libtorch_cuda was built against; the NVIDIA Container Toolkit mounts the driver (libcuda)
#    because of the NVIDIA_* variables below, as it does for nvidia/cuda runtime images.
#
# Not built in CI (no Docker engine there): keep the apt list in scripts/setup.sh and the flags of
# scripts/build.sh in step with this file.

ARG DEBIAN_RELEASE=bookworm
ARG CUDA_ARCHITECTURES=90a

###################################################################################################
FROM debian:${DEBIAN_RELEASE} AS build
ARG CUDA_ARCHITECTURES
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

# CUDA 13.0 toolkit: nvcc, cudart, CCCL and the dev libraries find_package(Torch) links (cuBLAS,
# cuFFT, cuRAND, cuFile, NVRTC, the driver stub). cuda-*-13-0 names pin the 13.0 series, matching
# the CUDA 13.0 build of the torch 2.11.0 wheel.
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    rm -f /etc/apt/apt.conf.d/docker-clean \
 && apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
 && curl -fsSLo /tmp/cuda-keyring.deb \
      https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb \
 && dpkg -i /tmp/cuda-keyring.deb && rm /tmp/cuda-keyring.deb \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      cuda-minimal-build-13-0 cuda-libraries-dev-13-0
ENV CUDA_HOME=/usr/local/cuda \
    CUDACXX=/usr/local/cuda/bin/nvcc \
    PATH=/usr/local/cuda/bin:${PATH}

# Debian packages and the project venv (.venv with torch==2.11.0) by the project's own script, so
# the image cannot drift from a developer machine. Only its inputs are copied first: this layer
# (several GB of wheels) is rebuilt only when the package lists change.
WORKDIR /opt/sparge
COPY scripts/setup.sh scripts/requirements.txt scripts/
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    --mount=type=cache,target=/root/.cache/pip \
    bash scripts/setup.sh

COPY . .
# A clean configure: a build/ or .venv from the build context must never leak in
# (.dockerignore excludes them; this is the belt to its braces).
RUN --mount=type=cache,target=/root/.cache/ccache \
    rm -rf build \
 && bash scripts/build.sh -DSPARGE_WITH_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
 && (ccache --show-stats || true)
RUN test -x build/server/sparge-server && test -x build/server/sparge-cli \
 && test -x build/trainer/sparge-train

# Stage everything the runtime needs under /dist, at the same absolute paths: the binaries keep
# their build RPATH into the venv's torch/lib, and libtorch_cuda finds the CUDA libraries through
# its own $ORIGIN/../../nvidia/... RPATH, so the site-packages layout must be preserved.
RUN <<'EOF'
#!/usr/bin/env bash
set -euo pipefail
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p /dist/usr/local/bin "/dist${site}/torch" "/dist${site}/nvidia"
cp build/server/sparge-server build/server/sparge-cli build/trainer/sparge-train /dist/usr/local/bin/
# The SentencePiece shim that the engine dlopen()s (engine/spm_shim/): found at <bin>/../lib/sparge.
mkdir -p /dist/usr/local/lib/sparge
cp build/engine/spm_shim/libsparge_spm.so /dist/usr/local/lib/sparge/
# torch/lib without the Python binding (it would need libpython).
cp -a "${site}/torch/lib" "/dist${site}/torch/"
rm -f "/dist${site}/torch/lib/libtorch_python.so"
# nvidia/*/lib only: headers and static archives are build-time material.
for d in "${site}"/nvidia/*/lib; do
  pkg=$(basename "$(dirname "$d")")
  mkdir -p "/dist${site}/nvidia/${pkg}"
  cp -a "$d" "/dist${site}/nvidia/${pkg}/"
done
find "/dist${site}/nvidia" -name '*.a' -delete
mkdir -p /dist/etc/sparge /dist/etc/ld.so.conf.d
cp config/server.yaml /dist/etc/sparge/server.yaml
cp config/trainer.yaml /dist/etc/sparge/trainer.yaml
# The binaries also link CUDA libraries directly (cudart, nvrtc, ...); at run time those come
# from the wheels, not /usr/local/cuda, so the loader gets the wheel directories system-wide.
libpath="${site}/torch/lib"
for d in "/dist${site}"/nvidia/*/lib; do libpath="${libpath}:${d#/dist}"; done
tr ':' '\n' <<< "${libpath}" > /dist/etc/ld.so.conf.d/sparge-torch.conf
# Debian packages that own the shared libraries the binaries load (resolved exactly as they will
# be at run time), so the runtime stage installs those and nothing else.
export LD_LIBRARY_PATH="${libpath}"
# The shim is no binary's link dependency, so its libraries (libsentencepiece) are listed here.
for bin in /dist/usr/local/bin/* /dist/usr/local/lib/sparge/*.so; do ldd "${bin}"; done \
  | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u \
  | while read -r lib; do
      case "${lib}" in /lib/*|/usr/lib/*) ;; *) continue ;; esac
      for candidate in "${lib}" "$(readlink -f "${lib}")" "/usr${lib}" "${lib#/usr}"; do
        if owner=$(dpkg-query -S "${candidate}" 2>/dev/null); then echo "${owner%%:*}"; break; fi
      done
    done | sort -u > /sparge-runtime-packages
echo "runtime packages: $(tr '\n' ' ' < /sparge-runtime-packages)"
test -s /sparge-runtime-packages
EOF

###################################################################################################
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

COPY --from=build /sparge-runtime-packages /tmp/
# tini as PID 1: forwards SIGTERM (docker stop, Kubernetes) to the server and reaps children.
RUN apt-get update \
 && xargs -a /tmp/sparge-runtime-packages apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* /tmp/sparge-runtime-packages

COPY --from=build /dist/ /
RUN ldconfig \
 && missing=$(for b in /usr/local/bin/sparge-* /usr/local/lib/sparge/*.so; do ldd "$b"; done \
              | grep 'not found' | grep -v 'libcuda\.so' | sort -u) \
 ; if [ -n "${missing}" ]; then echo "unresolved libraries:"; echo "${missing}"; exit 1; fi

# The NVIDIA Container Toolkit reads these: mount every GPU and the compute driver libraries, and
# refuse to start on a driver older than CUDA 13.0 needs (a clear error instead of a late one).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"

# Unprivileged user; /models is where model directories are mounted (--model /models/<dir>).
RUN groupadd --system --gid 10001 sparge \
 && useradd --system --uid 10001 --gid sparge --home-dir /home/sparge --create-home \
      --shell /usr/sbin/nologin sparge \
 && mkdir -p /models && chown sparge:sparge /models
VOLUME ["/models"]
USER sparge
WORKDIR /home/sparge

EXPOSE 50051 9090
# start-period covers model load and warm-up; the health service reports SERVING only after both.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
  CMD ["sparge-cli", "health", "--server", "localhost:50051"]
ENTRYPOINT ["/usr/bin/tini", "--", "sparge-server"]
# Arguments replace this list as a whole: keep --config when adding flags.
CMD ["--config", "/etc/sparge/server.yaml", "--device", "cuda", "--port", "50051", \
     "--metrics-port", "9090"]
