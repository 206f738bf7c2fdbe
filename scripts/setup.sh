#!/usr/bin/env bash
# Installs everything SpargeServe needs on Debian 12: the Debian packages (gRPC, protobuf, Abseil,
# prometheus-cpp, yaml-cpp, GoogleTest, sentencepiece, FFmpeg, ...) and the project venv (.venv)
# with the pinned torch wheel used as LibTorch. Idempotent and quick when everything is there.
# Usage: scripts/setup.sh            (CUDA is optional: kernels build when nvcc is on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config ccache git ca-certificates
  python3 python3-venv python3-pip
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev libyaml-cpp-dev libgtest-dev libgmock-dev
  libsentencepiece-dev sentencepiece
  libavcodec-dev libavformat-dev libswscale-dev libavutil-dev ffmpeg
  nlohmann-json3-dev libcpp-httplib-dev
  prometheus
)

log() { printf '[setup] %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages: all present"
fi

# Project venv with pinned Python packages; a stamp of requirements.txt skips pip when unchanged.
REQ=scripts/requirements.txt
STAMP=.venv/.requirements.sha256
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  # torch and its CUDA wheels take ~5 GB installed plus ~3.5 GB of downloads while pip works.
  # Downloads go to a folder beside the venv (same filesystem; /tmp may be a small tmpfs) and no
  # second copy is kept in pip's cache, so ~9 GB free where the checkout is is enough.
  need_kb=$((9 * 1024 * 1024))
  have_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
  if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" = "" ] && [ "$have_kb" -lt "$need_kb" ]; then
    log "ERROR: the Python packages need ~9 GB free on the checkout's filesystem; $((have_kb / 1024)) MB free here ($(df -P . | awk 'NR == 2 { print $6 }'))"
    exit 1
  fi
  log "installing Python packages from $REQ (torch is large: a few minutes the first time)"
  PIP_TMP="$PWD/.venv/.pip-tmp"
  rm -rf "$PIP_TMP" && mkdir -p "$PIP_TMP"
  trap 'rm -rf "$PIP_TMP"' EXIT
  export TMPDIR="$PIP_TMP"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir -r "$REQ"
  rm -rf "$PIP_TMP"; unset TMPDIR; trap - EXIT
  echo "$want" > "$STAMP"
else
  log "Python venv: up to date"
fi
