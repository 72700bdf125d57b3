#!/usr/bin/env bash
# Creates .venv-llamacpp: llama-cpp-python's OpenAI-compatible server, used only by the
# llama.cpp compatibility tests (tests/test_llamacpp.py, `make test-llamacpp`).
# llama-cpp-python ships no Linux wheel on PyPI: pip builds llama.cpp from source (~8 min on
# 2 cores) with the CPU-only flags below, and keeps the built wheel in pip's wheel cache, so a
# later run (or a fresh venv) installs in seconds. Idempotent: a stamp file records a finished
# install. Usage: scripts/setup-llamacpp.sh  (VENV=... to relocate)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-llamacpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
# CPU only; no BLAS, no CURL (no network at run time); tuned for this machine's CPU.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF"}
stamp="$VENV/.installed-llama-cpp-python-$VERSION"

# shellcheck source=scripts/venv-lib.sh
source scripts/venv-lib.sh
venv_begin "$VENV" "$stamp" "llama-cpp-python $VERSION"

venv_create "$VENV" 1/3
t0=$(date +%s)
echo "==> [2/3] pip install llama-cpp-python[server]==$VERSION"
echo "    CMAKE_ARGS=$CMAKE_ARGS"
echo "    (first time: builds llama.cpp from source, ~8 min on 2 cores; then cached by pip)"
# Show pip's own progress lines; the long compile step prints a heartbeat every 30 s.
( while sleep 30; do echo "    ... still building ($(( $(date +%s) - t0 )) s)"; done ) &
beat=$!
trap 'kill $beat 2>/dev/null || true' EXIT
"$VENV/bin/pip" install --disable-pip-version-check --progress-bar off \
  "llama-cpp-python[server]==$VERSION" 2>&1 \
  | grep --line-buffered -E '^(Collecting|Building|Created wheel|Installing|Successfully|ERROR|error)' || true
kill $beat 2>/dev/null || true
echo "==> [3/3] checking: import llama_cpp.server"
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server.app; print('    llama-cpp-python', llama_cpp.__version__)"
touch "$stamp"
echo "==> ready: $VENV ($(( $(date +%s) - t0 )) s)"
