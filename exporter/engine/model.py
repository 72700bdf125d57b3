"""Resolve ``--model`` to a loaded model and tokenizer, never touching a hub.

``""`` means the default Gemma (converted once, see :mod:`exporter.engine.gemma`); a directory
is a transformers folder; a ``.gguf`` file is loaded through transformers' GGUF reader (slow:
it dequantises every tensor at each start; the default model avoids that by caching a folder).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    device: str
    stop_ids: frozenset[int]
    load_seconds: float


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


def load(model: str, device: str = "auto", log: TextIO = sys.stderr) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.engine import gemma

    t0 = time.monotonic()
    dev = pick_device(device)
    kw: dict[str, Any] = {"local_files_only": True}
    if not model:
        folder = gemma.default_model_dir(log)
        name = "gemma-3-270m"
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--model {model}: no such file or folder")
        if path.is_file() and path.suffix == ".gguf":
            folder, kw["gguf_file"] = path.parent, path.name
            name = path.stem
        elif path.is_dir():
            folder, name = path, path.name
        else:
            raise ValueError(f"--model {model}: expected a transformers folder or a .gguf file")
    print(f"llm-exporter engine: loading {folder} on {dev}", file=log, flush=True)
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    # bf16 on CUDA; on CPU keep the saved dtype (the cached Gemma folder is bf16).
    dtype: Any = torch.bfloat16 if dev == "cuda" else "auto"
    if "gguf_file" in kw:
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).to(dev).eval()
    if not tok.chat_template:
        is_gemma = getattr(lm.config, "model_type", "").startswith("gemma")
        tok.chat_template = gemma.CHAT_TEMPLATE if is_gemma else _PLAIN_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    stop = _as_set(lm.generation_config.eos_token_id) | _as_set(tok.eos_token_id)
    end_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_turn, int) and end_turn != tok.unk_token_id and end_turn >= 0:
        stop.add(end_turn)
    return LoadedModel(lm, tok, name, dev, frozenset(stop), time.monotonic() - t0)


_PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _as_set(v: Any) -> set[int]:
    if v is None:
        return set()
    if isinstance(v, int):
        return {v}
    return {int(x) for x in v}
