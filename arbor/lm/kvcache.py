"""Radix KV store: every distinct token prefix's KV is held once, as chunks of a token trie (issue #9).

A chunk is one edge of a radix tree over token ids (SGLang's RadixAttention, arXiv 2312.07104 §3): it holds only
its own tokens' keys/values, `kv` [L, 2, H_kv, n, D] (one allocation), and the model's final hidden state after
each of them, `hidden` [n, E], so the next-token logits at *any* stored position are the LM head applied to it
(no forward pass). It references its parent chunk (the tokens before it); a prefix's KV is its chain of chunks
from a root. A tree node's state is therefore its own step's tokens on top of its parent's, and siblings that
begin with the same tokens share those tokens' chunk: memory is proportional to the distinct token prefixes.

Names: a prefix may carry content keys (`prefix_key(ids)`, blake2b of the ids: equal prefixes share one entry,
nothing depends on an object id or a seed), always at a chunk's end; a position inside a chunk is made a chunk end
by splitting the chunk (`split_at`). A chunk object always keeps its end position across splits (the new head
is inserted above it), so a chunk held as an anchor stays valid.

Memory: a byte budget over the real bytes of every chunk's tensors (and its token ids), plus `working` bytes that
a caller reserves for a batch in flight (`reserve`), so the budget bounds the store *and* the working set.
Eviction is least recently used among leaves only (a chunk with children is a prefix of something still held)
and never touches a pinned chunk (an anchor in use). `put`/`get` also keep whole-prefix `PrefixState`s as
detached entries (no token ids, no trie): the critics' stores use them (arbor/critics/scorer.py).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


def prefix_key(ids: Sequence[int] | np.ndarray) -> bytes:
    """The cache key of a token prefix: blake2b-128 of its ids as int32 bytes (content, nothing else)."""
    return hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=16).digest()


@dataclass
class PrefixState:
    """KV of a whole prefix: `kv[l] = (keys [H, T, D], values [H, T, D])`; `logits` [V] after its last token (a
    critic store keeps its last hidden state [H] there)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    length: int

    @property
    def nbytes(self) -> int:
        """Bytes of memory this state keeps alive: every distinct storage its tensors view, counted whole (a
        view into a larger buffer holds the whole buffer)."""
        return _storage_bytes(self.logits, *(x for kv in self.kv for x in kv))


def _storage_bytes(*tensors: torch.Tensor | None) -> int:
    storages = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


@dataclass(eq=False)
class KVChunk:
    """One radix edge: `tokens` [n] at positions `start .. start+n-1` of every prefix through it, their `kv`
    [L, 2, H_kv, n, D] and final `hidden` states [n, E]; `children` by first token. A detached entry (`put`)
    has no tokens and holds a whole-prefix `state` instead."""

    tokens: np.ndarray
    kv: torch.Tensor | None
    hidden: torch.Tensor | None
    parent: KVChunk | None = None
    start: int = 0
    children: dict[int, KVChunk] = field(default_factory=dict)
    keys: set = field(default_factory=set)
    pins: int = 0
    state: PrefixState | None = None
    nbytes: int = 0

    @property
    def n(self) -> int:
        return len(self.tokens) if self.state is None else self.state.length

    @property
    def end(self) -> int:
        """Length of the prefix that ends with this chunk."""
        return self.start + self.n

    def chain(self) -> list[KVChunk]:
        """Chunks from the root down to this one."""
        out, c = [], self
        while c is not None:
            out.append(c)
            c = c.parent
        return out[::-1]

    def measure(self) -> int:
        self.nbytes = (self.state.nbytes if self.state is not None
                       else _storage_bytes(self.kv, self.hidden) + self.tokens.nbytes)
        return self.nbytes


Cursor = tuple[KVChunk, int]
"""A stored prefix: the chain to `chunk` whose last `chunk.n - offset` tokens are cut (1 <= offset <= n)."""


class KVStore:
    """Radix KV store under a byte budget (None = unbounded); see the module docstring."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget = budget_bytes
        self._lru: OrderedDict[int, KVChunk] = OrderedDict()  # id -> chunk, least recently used first
        self._keys: dict[Hashable, KVChunk] = {}
        self._roots: dict[int, KVChunk] = {}
        self.nbytes = 0  # bytes held by chunks
        self.working = 0  # bytes reserved for a batch in flight
        self.peak_nbytes = 0  # most chunk bytes held at once (after eviction)
        self.peak_total = 0  # most chunk + working bytes at once
        self.evictions = 0
        self.kv_token_bytes = 0  # bytes of one token's KV (set by the first chunk)

    def __len__(self) -> int:
        """Named prefixes held."""
        return len(self._keys)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    @property
    def chunks(self) -> int:
        return len(self._lru)

    @property
    def stored_tokens(self) -> int:
        """Token positions whose KV is held in trie chunks."""
        return sum(len(c.tokens) for c in self._lru.values())

    # -- lookup ------------------------------------------------------------------------------------------------
    def find(self, key: Hashable) -> KVChunk | None:
        """The chunk ending the prefix named `key` (marked recently used), or None."""
        c = self._keys.get(key)
        if c is not None:
            self._touch(c)
        return c

    def match(self, ids: Sequence[int] | np.ndarray, below: KVChunk | None = None) -> tuple[Cursor | None, int]:
        """Longest stored continuation of `below` (None: from the roots) along `ids`: (cursor, tokens matched);
        the cursor is None when nothing matched (then `below` itself is the longest)."""
        ids = np.asarray(ids, np.int32)
        kids = self._roots if below is None else below.children
        cur: Cursor | None = None
        pos = 0
        while pos < len(ids):
            c = kids.get(int(ids[pos]))
            if c is None:
                break
            seg = ids[pos : pos + c.n]
            diff = np.flatnonzero(c.tokens[: len(seg)] != seg)
            m = int(diff[0]) if diff.size else len(seg)
            cur, pos = (c, m), pos + m
            if m < c.n:
                break
            kids = c.children
        return cur, pos

    @staticmethod
    def walk(cur: Cursor, token: int) -> Cursor | None:
        """The cursor one token further along `token`, or None if that prefix is not stored."""
        c, o = cur
        if o < c.n:
            return (c, o + 1) if int(c.tokens[o]) == token else None
        nxt = c.children.get(token)
        return (nxt, 1) if nxt is not None else None

    @staticmethod
    def hidden_at(cur: Cursor) -> torch.Tensor:
        """[E] final hidden state after the cursor's last token."""
        c, o = cur
        return c.hidden[o - 1]  # type: ignore[index]

    # -- structure ---------------------------------------------------------------------------------------------
    def split_at(self, cursors: Sequence[Cursor]) -> list[KVChunk]:
        """Make every cursor's position a chunk end (splitting chunks as needed); returns those chunks."""
        out: list[KVChunk | None] = [None] * len(cursors)
        by_chunk: dict[int, list[int]] = {}
        for i, (c, o) in enumerate(cursors):
            if o == c.n:
                out[i] = c
            else:
                by_chunk.setdefault(id(c), []).append(i)
        for idx in by_chunk.values():
            c = cursors[idx[0]][0]
            # deepest first: the head split off each time contains every shallower position
            for i in sorted(idx, key=lambda i: -cursors[i][1]):
                o = cursors[i][1]
                out[i] = c if o == c.n else self._split(c, o)
                c = out[i]  # type: ignore[assignment]
        return out  # type: ignore[return-value]

    def _split(self, c: KVChunk, o: int) -> KVChunk:
        """Cut `c` after its first `o` tokens: a new head chunk takes them and `c` keeps the rest (its end, keys,
        children and pins stay). Returns the head."""
        head = KVChunk(c.tokens[:o].copy(), c.kv[..., :o, :].clone(), c.hidden[:o].clone(),  # type: ignore[index]
                       parent=c.parent, start=c.start, children={int(c.tokens[o]): c})
        (self._roots if c.parent is None else c.parent.children)[int(c.tokens[0])] = head
        old = c.nbytes
        c.tokens, c.kv, c.hidden = c.tokens[o:].copy(), c.kv[..., o:, :].clone(), c.hidden[o:].clone()  # type: ignore[index]
        c.parent, c.start = head, c.start + o
        self.nbytes += head.measure() + c.measure() - old
        self._lru[id(head)] = head
        self._peak()
        return head

    def name(self, chunk: KVChunk, key: Hashable) -> None:
        """Let `key` name the prefix ending with `chunk`."""
        old = self._keys.get(key)
        if old is not None and old is not chunk:
            old.keys.discard(key)
        chunk.keys.add(key)
        self._keys[key] = chunk

    def insert(self, below: KVChunk | None, tokens: Sequence[int] | np.ndarray, kv: torch.Tensor,
               hidden: torch.Tensor, key: Hashable | None = None) -> KVChunk:
        """Store `tokens` (their kv [L, 2, H, n, D] and hidden [n, E]) as a continuation of the prefix ending with
        chunk `below` (None: a root). Tokens already stored there are not stored twice (the overlap is dropped).
        Returns the chunk that ends the whole prefix; `key` names it. Evicts to stay within budget."""
        toks = np.asarray(tokens, np.int32)
        cur, m = self.match(toks, below)
        if cur is not None:
            below = self.split_at([cur])[0]
        if m < len(toks):
            c = KVChunk(toks[m:].copy(), kv[..., m:, :] if m else kv, hidden[m:] if m else hidden, parent=below,
                        start=0 if below is None else below.end)
            if m:  # compact copies, so the dropped overlap is not kept alive
                c.kv, c.hidden = c.kv.clone(), c.hidden.clone()  # type: ignore[union-attr]
            (self._roots if below is None else below.children)[int(toks[m])] = c
            if not self.kv_token_bytes:
                self.kv_token_bytes = kv[..., :1, :].numel() * kv.element_size()
            self.nbytes += c.measure()
            self._lru[id(c)] = c
            below = c
        assert below is not None
        if key is not None:
            self.name(below, key)
        self._touch(below)
        below.pins += 1  # not evicted by its own insertion
        self._fit()
        below.pins -= 1
        return below

    def pin(self, chunk: KVChunk, times: int = 1) -> None:
        """Protect `chunk` (and so its ancestors) from eviction while in use."""
        chunk.pins += times

    def unpin(self, chunk: KVChunk, times: int = 1) -> None:
        chunk.pins -= times

    # -- memory ------------------------------------------------------------------------------------------------
    def reserve(self, nbytes: int) -> None:
        """Count `nbytes` of working memory (a batch in flight) against the budget, evicting to make room;
        `reserve(0)` releases it."""
        self.working = int(nbytes)
        self._fit()
        self._peak()

    def room(self) -> int | None:
        """Bytes a batch may use: half the budget (the rest keeps the store useful), None if unbounded."""
        return None if self.budget is None else self.budget // 2

    def _touch(self, c: KVChunk | None) -> None:
        while c is not None:
            self._lru.move_to_end(id(c))
            c = c.parent

    def _fit(self) -> None:
        while self.budget is not None and self.nbytes + self.working > self.budget:
            victim = next((c for c in self._lru.values() if not c.children and c.pins == 0), None)
            if victim is None:
                break
            self._drop(victim)
        self._peak()

    def _drop(self, c: KVChunk) -> None:
        del self._lru[id(c)]
        for k in c.keys:
            self._keys.pop(k, None)
        if c.state is None:
            kids = self._roots if c.parent is None else c.parent.children
            if kids.get(int(c.tokens[0])) is c:
                del kids[int(c.tokens[0])]
        self.nbytes -= c.nbytes
        self.evictions += 1

    def _peak(self) -> None:
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)
        self.peak_total = max(self.peak_total, self.nbytes + self.working)

    def reset_peaks(self) -> None:
        """Start measuring peaks afresh (e.g. per problem)."""
        self.peak_nbytes = self.nbytes
        self.peak_total = self.nbytes + self.working

    def clear(self) -> None:
        """Drop everything (peaks and eviction counts are kept). The trie's parent/children links are cut, so
        the chunks' tensors are freed at once, not when the garbage collector next finds the cycles."""
        for c in self._lru.values():
            c.children, c.parent, c.kv, c.hidden, c.state = {}, None, None, None, None
        self._lru.clear()
        self._keys.clear()
        self._roots.clear()
        self.nbytes = self.working = 0

    # -- batches -----------------------------------------------------------------------------------------------
    @staticmethod
    def gather(anchors: Sequence[KVChunk | None], width: int | None = None, extra: int = 0,
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One gather of each anchor's prefix KV into preallocated, left-padded batch buffers: per layer one
        [2, R, H, W + extra, D] (keys, values; W = `width` or the longest prefix, `extra` positions reserved for
        decoding, see arbor/lm/batchcache.py), and the attention mask [R, W] (1 on real slots). A None anchor is
        an empty prefix. Consecutive rows with the same anchor share one concatenation of its chain."""
        real = [a for a in anchors if a is not None]
        width = max(a.end for a in real) if width is None else width
        kv0 = real[0].kv
        assert kv0 is not None
        n_layers, _, heads, _, dim = kv0.shape
        bufs = [kv0.new_zeros((2, len(anchors), heads, width + extra, dim)) for _ in range(n_layers)]
        mask = torch.zeros((len(anchors), width), dtype=torch.long, device=kv0.device)
        prev, full = None, kv0
        for r, a in enumerate(anchors):
            if a is None:
                continue
            if a is not prev:
                chain = a.chain()
                full = chain[0].kv if len(chain) == 1 else torch.cat([c.kv for c in chain], dim=3)  # type: ignore[misc]
                prev = a
            for li in range(n_layers):
                bufs[li][:, r, :, width - a.end : width] = full[li]
            mask[r, width - a.end :] = 1
        return bufs, mask

    # -- detached whole-prefix states (critics) ----------------------------------------------------------------
    def get(self, key: Hashable) -> PrefixState | None:
        """The whole-prefix state named `key` (marked recently used), or None. For a trie prefix the state is
        assembled from its chain (a copy) and `logits` holds its last hidden state."""
        c = self.find(key)
        if c is None:
            return None
        if c.state is not None:
            return c.state
        kv = torch.cat([x.kv for x in c.chain()], dim=3)  # type: ignore[misc]
        return PrefixState([(layer[0], layer[1]) for layer in kv], c.hidden[-1], c.end)  # type: ignore[index]

    def put(self, key: Hashable, state: PrefixState) -> None:
        """Hold a whole-prefix state as a detached entry (replacing one under `key`); evicts to fit."""
        old = self._keys.get(key)
        if old is not None and old.state is not None:
            self._drop(old)
            self.evictions -= 1  # a replacement, not an eviction
        c = KVChunk(np.zeros(0, np.int32), None, None, state=state)
        self.nbytes += c.measure()
        self._lru[id(c)] = c
        self.name(c, key)
        c.pins += 1
        self._fit()
        c.pins -= 1
