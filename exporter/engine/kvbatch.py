"""A running batch's KV cache and attention mask, kept left-padded so rows can join and leave.

Every row is left-padded to one common length ``T``: the 2-D mask marks each row's pads, and a
row's next position id is its count of real tokens, so RoPE sees what the row would see alone.
Pads only ever sit left of a row's first real token, so the distance between any two real
tokens (all a causal or sliding-window mask looks at, in padded cache indices) never changes:
merging pads the shorter side on the left, and when rows leave, columns that are padding in
every remaining row are dropped, so ``T`` follows the longest live row, not the batch's history.

transformers' cache layers are handled by type: ``DynamicLayer`` holds all ``T`` columns;
``DynamicSlidingWindowLayer`` holds the last ``min(T, window - 1)`` and counts ``T`` in
``cumulative_length``, from which the mask offsets are derived. Anything else (static, quantised,
linear-attention, KV-shared layers) is named by :func:`unmergeable` and not merged.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

_MERGEABLE = (DynamicLayer, DynamicSlidingWindowLayer)


def unmergeable(cache: Any) -> str | None:
    """Why ``cache`` (after a forward) cannot be merged along the batch, or None if it can."""
    if type(cache) is not DynamicCache:
        return f"cache type {type(cache).__name__}"
    if getattr(cache, "offloading", False):
        return "offloaded cache"
    for i, layer in enumerate(cache.layers):
        if type(layer) not in _MERGEABLE:
            return f"cache layer {i} is a {type(layer).__name__}"
        if not layer.is_initialized:
            return f"cache layer {i} is not filled by the model (shared KV?)"
        if getattr(layer, "record_past", False):
            return f"cache layer {i} records its past"
    return None


def cache_argument(model: Any) -> str:
    """The name under which ``model.forward`` takes its KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is deprecated, to be
    removed in 5.40); earlier 5.x releases know only ``past_key_values``. The signature tells
    (``inspect`` follows the deprecation decorator to the real ``forward``), so the engine passes
    the current name on every release the range admits and never the deprecated one.
    """
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{type(model).__name__}.forward takes neither 'cache' nor "
                    "'past_key_values': the engine cannot pass it a KV cache")


class KVBatch:
    """Cache and mask of the rows decoding together; row ``b`` is batch index ``b``."""

    def __init__(self, cache: Any, mask: torch.Tensor) -> None:
        self.cache, self.mask = cache, mask  # mask: [rows, T], 1 = real token

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and position ids for one more token per row (the mask grows by one column)."""
        pos = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        return self.mask, pos

    def merge(self, other: KVBatch) -> None:
        """Append ``other``'s rows after ours, left-padding whichever side is shorter."""
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            _left_pad(mine, width - self.width, width)
            _left_pad(theirs, width - other.width, width)
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(other.mask, width)], dim=0)

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (batch indices, in order) and drop all-padding columns."""
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        k = int(self.mask.any(0).int().argmax())  # leading columns that are pads in every row
        if k == 0:
            return
        self.mask = self.mask[:, k:]
        width = self.width
        for layer in self.cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = width
                held = min(width, layer.sliding_window - 1)
                layer.keys, layer.values = layer.keys[:, :, -held:], layer.values[:, :, -held:]
            else:
                layer.keys, layer.values = layer.keys[:, :, k:], layer.values[:, :, k:]


def _left_pad(layer: Any, n: int, width: int) -> None:
    """Prepend ``n`` pad columns to a layer whose rows become ``width`` long."""
    if n <= 0:
        return
    if isinstance(layer, DynamicSlidingWindowLayer):
        n = min(width, layer.sliding_window - 1) - layer.keys.shape[-2]
        layer.cumulative_length = width
        if n <= 0:
            return
    b, h, _, d = layer.keys.shape
    layer.keys = torch.cat([layer.keys.new_zeros((b, h, n, d)), layer.keys], dim=-2)
    layer.values = torch.cat([layer.values.new_zeros((b, h, n, layer.values.shape[-1])),
                              layer.values], dim=-2)


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    n = width - mask.shape[1]
    return torch.cat([mask.new_zeros((mask.shape[0], n)), mask], dim=-1) if n > 0 else mask
