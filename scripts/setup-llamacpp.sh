#!/usr/bin/env bash
# Creates .venv-llamacpp: llama-cpp-python's OpenAI-compatible server, used only by the
# llama.cpp compatibility tests (tests/test_llamacpp.py, `make test-llamacpp`).
# Installed from lock/llamacpp.txt; llama-cpp-python ships no Linux wheel on PyPI, so uv builds
# llama.cpp from the locked sdist (~8 min on 2 cores) with the build tools of
# lock/llamacpp-build.txt and the CPU-only flags below, and keeps the built wheel in its cache:
# a later run (or a fresh venv) installs in seconds. Idempotent.
# Usage: scripts/setup-llamacpp.sh  (VENV=... to relocate)
set -euo pipefail
cd "$(dirname "$0")/.."
# CPU only; no BLAS, no CURL (no network at run time); tuned for this machine's CPU.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF"}
export UV_BUILD_CONSTRAINT=lock/llamacpp-build.txt
# shellcheck source=scripts/venv-lib.sh
source scripts/venv-lib.sh
VENV=${VENV:-.venv-llamacpp}
if ! venv_synced "$VENV" lock/llamacpp.txt; then
  echo "==> CMAKE_ARGS=$CMAKE_ARGS (the first build of llama.cpp takes ~8 min on 2 cores)"
  # A heartbeat through the long, otherwise silent compile.
  t0=$(date +%s)
  ( while sleep 30; do echo "    ... still installing ($(( $(date +%s) - t0 )) s)"; done ) &
  beat=$!
  trap 'kill $beat 2>/dev/null || true' EXIT
fi
venv_sync "$VENV" lock/llamacpp.txt 0 \
  'import llama_cpp, llama_cpp.server.app; print("    llama-cpp-python", llama_cpp.__version__)'
