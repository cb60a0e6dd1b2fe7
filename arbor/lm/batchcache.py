"""A decoding batch's KV cache in buffers sized once for the whole batch (issue #9, #8's memory bound).

transformers' `DynamicCache` grows each layer by `torch.cat` at every step: a new, slightly larger tensor per
layer per step and the old one freed. On CPU that pattern fragments the allocator's heap (freed blocks are
always one position too small for the next request), so resident memory grows well past what the batch holds.
Here each layer's keys and values live in one buffer [2, R, H, capacity, D] allocated when the batch is
assembled (the gather writes the prefixes straight into it); a step writes its position in place and the layer
exposes views of the filled part, so the model sees exactly what a `DynamicCache` would give it. Selecting rows
(finished rows leave, split rows repeat) copies the filled part into a new buffer of the same capacity.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` over a preallocated buffer `buf` [2, R, H, capacity, D] whose first `length` positions are
    filled."""

    def __init__(self, buf: torch.Tensor, length: int) -> None:
        super().__init__()
        self.buf, self.length = buf, length
        self.device, self.dtype, self.is_initialized = buf.device, buf.dtype, True
        self._views()

    def _views(self) -> None:
        self.keys = self.buf[0, :, :, : self.length]
        self.values = self.buf[1, :, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        t = key_states.shape[-2]
        if self.length + t > self.buf.shape[3]:  # past the reserved capacity: grow (never expected)
            bigger = self.buf.new_empty((*self.buf.shape[:3], 2 * (self.length + t), self.buf.shape[4]))
            bigger[:, :, :, : self.length] = self.buf[:, :, :, : self.length]
            self.buf = bigger
        self.buf[0, :, :, self.length : self.length + t] = key_states
        self.buf[1, :, :, self.length : self.length + t] = value_states
        self.length += t
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        new = self.buf.new_empty((2, len(indices), *self.buf.shape[2:]))
        new[:, :, :, : self.length] = self.buf[:, indices, :, : self.length]
        self.buf = new
        self._views()


def reserved_cache(bufs: list[torch.Tensor], length: int) -> DynamicCache:
    """A cache over per-layer buffers [2, R, H, capacity, D] whose first `length` positions hold the prefixes."""
    cache = DynamicCache()
    cache.layers = [ReservedLayer(b, length) for b in bufs]
    return cache


def reserve(cache: DynamicCache, extra: int) -> DynamicCache:
    """`cache` (a prefilled `DynamicCache`) copied into buffers with `extra` positions reserved."""
    bufs = []
    for layer in cache.layers:
        k = layer.keys
        buf = k.new_empty((2, k.shape[0], k.shape[1], k.shape[2] + extra, k.shape[3]))
        buf[0, :, :, : k.shape[2]] = k
        buf[1, :, :, : k.shape[2]] = layer.values
        bufs.append(buf)
    return reserved_cache(bufs, cache.layers[0].keys.shape[2])
