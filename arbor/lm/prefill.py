"""Prefix states for a batch of parents: look each up in the radix KV store, compute only what is missing.

`resolve` finds each parent's stored prefix by its content key; a parent not named in the store is matched token
by token against the trie, and only the tokens past its longest stored prefix are computed (`extend`, one
batch: the stored prefixes gathered left-padded, the new tokens right-padded, so a real token never attends to a
later pad). So an evicted node costs its own step's tokens, not its whole path, while its parent is still held.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from transformers import DynamicCache

from arbor.lm.batchcache import reserved_cache
from arbor.lm.kvcache import KVChunk, KVStore
from arbor.lm.trie import Runner, batch_bytes


def resolve(runner: Runner, store: KVStore, parents: Sequence[tuple[Hashable, Sequence[int]]]) -> list[KVChunk]:
    """The chunk ending each `(key, ids)` parent's prefix, computing what the store lacks; every returned chunk is
    pinned once per parent (the caller unpins). Counts `cache_hits` (prefix found, by key or by its tokens) and
    `cache_misses` (distinct prefixes computed, wholly or in part) in `runner.counters`."""
    anchors: list[KVChunk | None] = [store.find(key) for key, _ in parents]
    for a in anchors:
        if a is not None:
            store.pin(a)
    todo: dict[Hashable, list[int]] = {}
    for i, a in enumerate(anchors):
        if a is None:
            todo.setdefault(parents[i][0], []).append(i)
    jobs: list[tuple[KVChunk | None, list[int], Hashable]] = []
    found: dict[Hashable, KVChunk] = {}
    for key, idx in todo.items():
        ids = list(parents[idx[0]][1])
        if not ids:
            raise ValueError("cannot continue an empty prompt: give at least one token (e.g. BOS)")
        cur, m = store.match(ids)
        base = store.split_at([cur])[0] if cur is not None else None
        if m == len(ids):
            store.name(base, key)  # type: ignore[arg-type]
            found[key] = base  # type: ignore[assignment]
        else:
            if base is not None:
                store.pin(base)
            jobs.append((base, ids[m:], key))
    runner.counters.cache_hits += len(parents) - sum(len(todo[k]) for _, _, k in jobs)
    runner.counters.cache_misses += len(jobs)
    computed: set[Hashable] = set()  # keys whose chunk `extend` returned pinned once already
    for (base, _, key), chunk in zip(jobs, extend_bounded(runner, store, jobs), strict=True):
        found[key] = chunk
        computed.add(key)
        if base is not None:
            store.unpin(base)
    out = []
    for i, a in enumerate(anchors):
        if a is None:
            key = parents[i][0]
            a = found[key]
            if key in computed:
                computed.discard(key)
            else:
                store.pin(a)
        out.append(a)
    return out


def extend_bounded(runner: Runner, store: KVStore, jobs: Sequence[tuple[KVChunk | None, list[int], Hashable]],
                   ) -> list[KVChunk]:
    """`extend` in batches whose working memory fits `store.room()`."""
    room = store.room()
    out: list[KVChunk] = []
    i = 0
    while i < len(jobs):
        j = i + 1
        while j < len(jobs) and (room is None or batch_bytes(
                j + 1 - i, max((b.end if b else 0) + len(t) for b, t, _ in jobs[i : j + 1]),
                runner.kv_token_bytes, runner.num_layers) <= room):
            j += 1
        out += extend(runner, store, jobs[i:j])
        i = j
    return out


def extend(runner: Runner, store: KVStore, jobs: Sequence[tuple[KVChunk | None, list[int], Hashable | None]],
           ) -> list[KVChunk]:
    """Feed each job's tokens on top of its stored prefix (`base`, None = from nothing) in one batch, store them
    as a chunk below `base` (named `key`), and return the chunks, each pinned once (the caller unpins). The bases
    must be pinned."""
    width = max((b.end if b is not None else 0) for b, _, _ in jobs)
    span = max(len(t) for _, t, _ in jobs)
    r = len(jobs)
    bases = [b for b, _, _ in jobs]
    if width > 0:
        bufs, pmask = KVStore.gather(bases, width, extra=span)
        cache: DynamicCache | None = reserved_cache(bufs, width)
    else:
        pmask, cache = torch.zeros((r, 0), dtype=torch.long), None
    dev = pmask.device
    ids = torch.full((r, span), runner.pad_token_id, dtype=torch.long)
    new = torch.zeros((r, span), dtype=torch.long)
    pos = torch.zeros((r, span), dtype=torch.long)
    for j, (b, toks, _) in enumerate(jobs):
        ids[j, : len(toks)] = torch.as_tensor(toks)
        new[j, : len(toks)] = 1
        pos[j] = (b.end if b is not None else 0) + torch.arange(span)
    store.reserve(batch_bytes(r, width + span, runner.kv_token_bytes, runner.num_layers))
    try:
        h, cache = runner.forward_hidden(ids.to(dev), torch.cat([pmask, new.to(dev)], dim=1), pos.to(dev), cache)
        out = []
        for j, (b, toks, key) in enumerate(jobs):
            n = len(toks)
            kv = torch.stack([x for layer in cache.layers
                              for x in (layer.keys[j, :, width : width + n], layer.values[j, :, width : width + n])])
            kv = kv.view(len(cache.layers), 2, *kv.shape[1:])
            chunk = store.insert(b, toks, kv, h[j, :n].clone(), key)
            store.pin(chunk)  # not evicted by the next rows' insertions before the caller uses it
            out.append(chunk)
        return out
    finally:
        store.reserve(0)
