"""Prefix KV-cache store: a node's key/value tensors and next-token logits, reused by all its children.

Entries are per tree node (an opaque hashable key chosen by the policy). Each holds, per layer, the keys and
values of the node's whole prefix ([heads, T, head_dim] each) and the logits after its last token ([V]), so a
child's first token is sampled without any forward pass. The store has a byte budget and evicts least recently
used entries; on a miss the caller recomputes the prefix (and counts it in its `TokenCounters`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch


@dataclass
class PrefixState:
    """KV of a prefix: `kv[l] = (keys [H, T, D], values [H, T, D])`; `logits` [V] after its last token."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    length: int

    @property
    def nbytes(self) -> int:
        total = self.logits.numel() * self.logits.element_size()
        for k, v in self.kv:
            total += k.numel() * k.element_size() + v.numel() * v.element_size()
        return total


class KVStore:
    """LRU store of `PrefixState`s under a memory budget (bytes; None = unbounded)."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[Hashable, PrefixState] = OrderedDict()
        self.nbytes = 0
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
            self.nbytes -= old.nbytes
        self._items[key] = state
        self.nbytes += state.nbytes
        while self.budget is not None and self.nbytes > self.budget and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= dropped.nbytes
            self.evictions += 1

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0
