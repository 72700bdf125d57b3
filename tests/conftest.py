"""Shared fixtures. Keep this small: one fixture per shared, expensive thing."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (transformers folder + tokenizer), built once per session."""
    from exporter.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))
