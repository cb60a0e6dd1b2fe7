"""Prefix KV-cache store: a node's key/value tensors and next-token logits, reused by all its children.

Entries are keyed by content: `prefix_key(ids)` is a hash of the prefix's token ids, so two tree nodes (or two
chain batches) with the same tokens share one entry, and no key depends on an object id, a counter or a seed.
Each entry holds, per layer, the keys and values of the whole prefix ([heads, T, head_dim] each) and the logits
after its last token ([V]), so a child's first token is sampled without any forward pass. The store has a byte
budget, counted in the real bytes of the tensors' storages, and evicts least recently used entries; on a miss
the caller recomputes the prefix (and counts it in its `TokenCounters`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def prefix_key(ids: Sequence[int] | np.ndarray) -> bytes:
    """The cache key of a token prefix: blake2b-128 of its ids as int32 bytes (content, nothing else)."""
    return hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=16).digest()


@dataclass
class PrefixState:
    """KV of a prefix: `kv[l] = (keys [H, T, D], values [H, T, D])`; `logits` [V] after its last token."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    length: int

    @property
    def nbytes(self) -> int:
        """Bytes of memory this state keeps alive: every distinct storage its tensors view, counted whole (a
        view into a larger buffer holds the whole buffer)."""
        storages = {}
        for t in (self.logits, *(x for kv in self.kv for x in kv)):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())


class KVStore:
    """LRU store of `PrefixState`s under a memory budget (bytes; None = unbounded)."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[Hashable, PrefixState] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self.nbytes = 0
        self.peak_nbytes = 0  # most bytes held at once (after eviction; one entry may exceed the budget)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> PrefixState | None:
        """The state under `key` (marked most recently used), or None."""
        state = self._items.get(key)
        if state is not None:
            self._items.move_to_end(key)
        return state

    def put(self, key: Hashable, state: PrefixState) -> None:
        """Insert (or replace) and evict least recently used entries until within budget."""
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= self._sizes.pop(key)
        self._items[key] = state
        self._sizes[key] = state.nbytes
        self.nbytes += self._sizes[key]
        while self.budget is not None and self.nbytes > self.budget and len(self._items) > 1:
            dropped, _ = self._items.popitem(last=False)
            self.nbytes -= self._sizes.pop(dropped)
            self.evictions += 1
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()
        self.nbytes = 0
