"""Token counting when the response carries no ``usage``: a local tokenizer (transformers,
a folder or a GGUF file; never a hub download). Loaded once at start-up; counting runs in a
worker thread, off the event loop."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class TokenCounter(Protocol):
    def count(self, text: str) -> int: ...
    def count_prompt(self, body: dict[str, Any]) -> int | None: ...


class HFTokenCounter:
    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False)) if text else 0

    def count_prompt(self, body: dict[str, Any]) -> int | None:
        """Prompt tokens as the engine would see them: the chat template when the tokenizer
        has one, else the concatenated message contents; ``prompt`` for text completions."""
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return len(self._tok.encode(prompt))
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        if getattr(self._tok, "chat_template", None):
            try:
                ids = self._tok.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=True)
                if isinstance(ids, dict):  # transformers 5 may return a BatchEncoding
                    ids = ids["input_ids"]
                return len(ids)
            except Exception:  # a template that rejects these messages: fall through
                log.debug("chat template failed; counting message contents", exc_info=True)
        texts = [m.get("content") for m in messages if isinstance(m, dict)]
        return len(self._tok.encode("\n".join(t for t in texts if isinstance(t, str))))


def load(path: str) -> HFTokenCounter:
    """Load a tokenizer from a local folder or a ``.gguf`` file, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--tokenizer {path}: no such file or folder")
    if p.is_file() and p.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name,
                                            local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return HFTokenCounter(tok)
