"""Token-trie sampling over the radix KV store: samples that have produced the same tokens share one forward.

Issue #9, Deliver 1. The `k` samples drawn from one prefix form a token trie as they decode: a *group* stands for
every sample whose tokens so far are equal; at each step a group of `k` draws `k` next tokens i.i.d. from its one
next-token distribution and splits into one group per distinct token (with the multiplicities drawn). A group
costs one forward per step whatever its `k`, so each distinct token prefix is computed once. The samples'
joint distribution is that of `k` independent samples: given the shared prefix their next tokens are i.i.d.
draws, and each sub-group continues independently (exchangeable; only the order of the returned samples is lost).

The walk goes further than one call: while a group's tokens follow a prefix already in the store (an earlier
sibling's step, an earlier chain), its next-token logits are the LM head applied to the stored final hidden
state there and its KV is already held, so it costs no forward at all (phase A). A group whose next token
leaves the store joins the decoding batch (phase B): one gather of its prefix from the store into a left-padded
batch cache, then batched decoding as usual. A group that splits there stores its shared segment as a chunk,
and its sub-groups continue as rows of their own; rows that finish store their segment (named by the content
key when the continuation can be continued, unnamed otherwise: later siblings may still walk along it).

Sampling without replacement (`exclude`, `HFPolicy.decode` semantics) applies per group: the exclusion weights
depend only on the tokens generated so far, which a group's samples share. With `share=False` every sample is
its own group and walks nothing: each computes its own tokens (the usual practice, for honest baselines).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from transformers import DynamicCache

from arbor.lm.base import Continuation, Excluded, StopRule, TokenCounters
from arbor.lm.batchcache import reserve, reserved_cache
from arbor.lm.kvcache import Cursor, KVChunk, KVStore, prefix_key

OPEN, ENDED, CLOSING = 0, 1, 2


class Runner(Protocol):
    """What the sampler needs of a model backend (`arbor.lm.hf.HFPolicy`)."""

    counters: TokenCounters
    eos_token_id: int
    pad_token_id: int
    newline_set: frozenset[int]
    kv_token_bytes: int
    num_layers: int

    def forward_hidden(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                       cache: DynamicCache | None) -> tuple[torch.Tensor, DynamicCache]:
        """Final hidden states [B, T, E] of `ids` [B, T] (full mask [B, S], positions [B, T]) and the cache."""
        ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [G, V] (float32) from final hidden states [G, E]."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...


def batch_bytes(rows: int, width: int, kv_token_bytes: int, num_layers: int) -> int:
    """Working memory of a decoding batch of `rows` x `width` cached positions: its KV buffers
    (arbor/lm/batchcache.py), plus one layer's copy while rows are selected."""
    return rows * width * kv_token_bytes * (num_layers + 1) // max(num_layers, 1)


@dataclass(eq=False)
class _Group:
    """Samples of parent `parent` that have produced the same `tokens` so far (`k` of them)."""

    parent: int
    k: int
    tokens: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    line_start: int = 0
    lines: int = 0
    finish: str = "length"
    cursor: Cursor | None = None
    key: bytes | None = None
    closing: bool = False  # done, its last token still to be fed (then named)

    def fork(self, k: int) -> _Group:
        return _Group(self.parent, k, list(self.tokens), list(self.lps), self.line_start, self.lines, self.finish,
                      self.cursor)


@dataclass(eq=False)
class _Row:
    """A group in the decoding batch: `pending` is its sampled, not yet fed token; `seg` the tokens fed since
    `anchor` (the stored chunk its batch KV continues), `seg_h` their final hidden states."""

    group: _Group
    anchor: KVChunk | None
    pending: int
    closing: bool
    seg: list[int] = field(default_factory=list)
    seg_h: list[torch.Tensor] = field(default_factory=list)


class TrieSampler:
    """One `expand`/`sample` call's decoding (see the module docstring). Continuations accumulate in `out`,
    one list per parent, `k` entries per finished group.

    Stop rule (`StopRule`): EOS, a newline if `stop.at_newline`, the line rule, or `stop.max_new_tokens`; a
    step-end token ends nothing while the step (line) is only whitespace so far, so a blank line is never a step
    of its own: it becomes the start of the next one (same tokens, same forwards, one node fewer). With
    `capture`, a continuation ending on a newline or the length limit has its last token fed and its prefix
    named in the store (`Continuation.key`), unless `final(parent, text)` says it ends its trajectory; EOS and
    line-rule stops are never fed. `exclude[parent]`: continuations that parent's samples must not repeat,
    each (ids, log-probs); sampling is then from pi(. | not excluded), exactly at temperature 1: where the
    generated prefix runs along an excluded c, the token c[i] is down-weighted by 1 - P(rest of c | prefix +
    c[i]), so completing c has probability 0 and everything else keeps its relative weight. Recorded log-probs
    are always the untempered policy's.
    """

    def __init__(self, runner: Runner, store: KVStore | None, parent_ids: Sequence[Sequence[int]], *,
                 stop: StopRule, temperature: float, generator: torch.Generator | None, capture: bool,
                 exclude: Sequence[Sequence[Excluded]] | None = None,
                 final: Callable[[int, str], bool] | None = None, share: bool = True) -> None:
        if share and store is None:
            raise ValueError("token sharing needs a store")
        self.runner, self.store, self.parent_ids = runner, store, parent_ids
        self.stop, self.temperature, self.generator = stop, temperature, generator
        self.capture, self.exclude, self.final, self.share = capture, exclude, final, share
        self.out: list[list[Continuation]] = [[] for _ in parent_ids]

    # -- entry points --------------------------------------------------------------------------------------------
    def run(self, jobs: Sequence[tuple[int, KVChunk, int]]) -> None:
        """Sample `count` continuations of each `(parent, anchor, count)`; `anchor` ends the parent's stored
        prefix (pinned by the caller)."""
        groups: list[_Group] = []
        for i, anchor, k in jobs:
            n_groups, size = (1, k) if self.share else (k, 1)
            groups += [_Group(i, size, cursor=(anchor, anchor.n)) for _ in range(n_groups)]
        frontier, named = self._walk(groups)
        assert self.store is not None
        ends = self.store.split_at([g.cursor for g in frontier + named])  # type: ignore[misc]
        for g, end in zip(named, ends[len(frontier):], strict=True):
            self._name(g, end)
            self._finish(g)
        rows = [_Row(g, end, g.tokens[-1], g.closing) for g, end in zip(frontier, ends[: len(frontier)], strict=True)]
        for r in rows:
            self.store.pin(r.anchor)  # type: ignore[arg-type]
        if rows:
            bufs, mask = KVStore.gather([r.anchor for r in rows], extra=self.stop.max_new_tokens)  # type: ignore[misc]
            self._decode(rows, reserved_cache(bufs, mask.shape[1]), mask, mask.sum(1))

    def from_prefill(self, last_hidden: torch.Tensor, cache: DynamicCache, mask: torch.Tensor,
                     next_pos: torch.Tensor) -> None:
        """One sample per parent from a batch prefilled by the caller: `last_hidden` [B, E] after each prompt,
        `cache`/`mask` [B, S] the batch's, `next_pos` [B] the next positions (no store)."""
        groups = [_Group(i, 1) for i in range(len(self.parent_ids))]
        rows, keep = [], []
        for j, (g, [(t, lp, _)]) in enumerate(zip(groups, self._draw(groups, self.runner.head(last_hidden)),
                                                  strict=True)):
            status = self._push(g, t, lp)
            if status == ENDED:
                self._finish(g)
            else:
                rows.append(_Row(g, None, t, status == CLOSING))
                keep.append(j)
        if rows:
            cache = reserve(cache, self.stop.max_new_tokens)
            if len(keep) < len(groups):
                idx = torch.tensor(keep, device=mask.device)
                cache.batch_select_indices(idx)
                mask, next_pos = mask[idx], next_pos[idx]
            self._decode(rows, cache, mask, next_pos)

    # -- phase A: follow the store -------------------------------------------------------------------------------
    def _walk(self, groups: list[_Group]) -> tuple[list[_Group], list[_Group]]:
        """Advance every group as far as the store holds its tokens. Returns the groups that must be computed
        (their cursor = the stored prefix before their last token) and the finished groups whose whole
        continuation is stored (their cursor = its end), to be named."""
        frontier: list[_Group] = []
        named: list[_Group] = []
        walking = groups
        while walking:
            hidden = torch.stack([KVStore.hidden_at(g.cursor) for g in walking])  # type: ignore[arg-type]
            nxt: list[_Group] = []
            for g, children in zip(walking, self._draw(walking, self.runner.head(hidden)), strict=True):
                for t, lp, cnt in children:
                    c = g if len(children) == 1 else g.fork(cnt)
                    status = self._push(c, t, lp)
                    if status == ENDED:
                        self._finish(c)
                        continue
                    cur = KVStore.walk(c.cursor, t) if self.share else None  # type: ignore[arg-type]
                    if cur is None:
                        c.closing = status == CLOSING
                        frontier.append(c)
                    else:
                        c.cursor = cur
                        (named if status == CLOSING else nxt).append(c)
            walking = nxt
        return frontier, named

    # -- phase B: batched decoding ------------------------------------------------------------------------------
    def _decode(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Feed each row's pending token, sample, split, drop finished rows, until every row is done."""
        run = self.runner
        store = self.store
        if store is not None:
            width = mask.shape[1] + self.stop.max_new_tokens
            store.reserve(batch_bytes(sum(r.group.k for r in rows), width, run.kv_token_bytes, run.num_layers))
        dev = mask.device
        try:
            while rows:
                ids = torch.tensor([[r.pending] for r in rows], device=dev)
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                h, cache = run.forward_hidden(ids, mask, next_pos[:, None], cache)
                h = h[:, -1]
                next_pos = next_pos + 1
                for j, r in enumerate(rows):
                    r.seg.append(r.pending)
                    r.seg_h.append(h[j])
                keep: list[int] = []
                nxt: list[_Row] = []
                opened = [j for j, r in enumerate(rows) if not r.closing]
                for j, r in enumerate(rows):
                    if r.closing:
                        self._name(r.group, self._save(r, cache, j))
                        self._release(r)
                        self._finish(r.group)
                draws = self._draw([rows[j].group for j in opened], run.head(h[opened])) if opened else []
                for j, children in zip(opened, draws, strict=True):
                    r = rows[j]
                    base = None
                    if len(children) > 1:  # the shared segment is stored once; each sub-group continues it
                        base = self._save(r, cache, j)
                        store.pin(base, len(children))  # type: ignore[union-attr,arg-type]
                        self._release(r)
                    for t, lp, cnt in children:
                        g = r.group if base is None else r.group.fork(cnt)
                        status = self._push(g, t, lp)
                        if status == ENDED:
                            if base is None:
                                if self.share:
                                    self._save(r, cache, j)  # unnamed: later samples may walk along it
                                self._release(r)
                            else:
                                store.unpin(base)  # type: ignore[union-attr]
                            self._finish(g)
                            continue
                        if base is None:
                            r.pending, r.closing = t, status == CLOSING
                            nxt.append(r)
                        else:
                            nxt.append(_Row(g, base, t, status == CLOSING))
                        keep.append(j)
                if keep and keep != list(range(len(rows))):
                    idx = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(idx)
                    mask, next_pos = mask[idx], next_pos[idx]
                rows = nxt
        finally:
            if store is not None:
                store.reserve(0)

    def _save(self, r: _Row, cache: DynamicCache, j: int) -> KVChunk | None:
        """Store row `j`'s fed segment as a chunk under its anchor (its KV = the batch row's last positions);
        returns the chunk ending it (None without a store)."""
        if self.store is None:
            return None
        m = len(r.seg)
        layers = cache.layers
        kv = torch.stack([x for layer in layers for x in (layer.keys[j, :, -m:], layer.values[j, :, -m:])])
        kv = kv.view(len(layers), 2, *kv.shape[1:])
        chunk = self.store.insert(r.anchor, r.seg, kv, torch.stack(r.seg_h))
        r.seg, r.seg_h = [], []
        return chunk

    def _release(self, r: _Row) -> None:
        if r.anchor is not None:
            self.store.unpin(r.anchor)  # type: ignore[union-attr]

    # -- per-token rules ----------------------------------------------------------------------------------------
    def _draw(self, groups: list[_Group], logits: torch.Tensor) -> list[list[tuple[int, float, int]]]:
        """For each group of `k`: its `k` i.i.d. next tokens as (token, log pi(token), multiplicity)."""
        logp = torch.log_softmax(logits, dim=-1)
        scores = logits if self.temperature <= 0 else logits / self.temperature
        if self.exclude is not None:
            scores = scores + self._exclusion_bias(groups, logits.shape).to(logits.device)
        if self.temperature <= 0:
            best = scores.argmax(-1)
            lps = logp.gather(1, best[:, None]).squeeze(1).tolist()
            return [[(t, lp, g.k)] for g, t, lp in zip(groups, best.tolist(), lps, strict=True)]
        probs = torch.softmax(scores, dim=-1)
        logp_np = logp.cpu().numpy()
        ones = [i for i, g in enumerate(groups) if g.k == 1]  # one batched draw for them
        first = torch.multinomial(probs[ones], 1, generator=self.generator)[:, 0].tolist() if ones else []
        single = dict(zip(ones, first, strict=True))
        out = []
        for i, g in enumerate(groups):
            if g.k == 1:
                t = single[i]
                out.append([(t, float(logp_np[i, t]), 1)])
            else:  # k i.i.d. draws, grouped by token
                draws = torch.multinomial(probs[i], g.k, replacement=True, generator=self.generator).cpu().numpy()
                vals, cnts = np.unique(draws, return_counts=True)
                out.append([(int(t), float(logp_np[i, t]), int(c)) for t, c in zip(vals, cnts, strict=True)])
        return out

    def _exclusion_bias(self, groups: list[_Group], shape: torch.Size) -> torch.Tensor:
        """[G, V] log-multipliers that remove the excluded continuations' mass (see the class docstring)."""
        bias = torch.zeros(shape)
        for j, g in enumerate(groups):
            gen, i = g.tokens, len(g.tokens)
            mass: dict[int, float] = {}
            for ids, lps in self.exclude[g.parent]:  # type: ignore[index]
                if len(ids) > i and list(ids[:i]) == gen:
                    mass[ids[i]] = mass.get(ids[i], 0.0) + float(np.exp(np.sum(lps[i + 1 :])))
            for t, m in mass.items():
                bias[j, t] = float(np.log(max(1e-9, 1.0 - m)))
        return bias

    def _push(self, g: _Group, t: int, lp: float) -> int:
        """Append token `t` to group `g`; returns OPEN, ENDED (done, nothing more fed) or CLOSING (done, its last
        token is fed and its prefix named)."""
        stop = self.stop
        g.tokens.append(t)
        g.lps.append(lp)
        n = len(g.tokens)
        # a step-end token ends a step (or a line) only after some text: while the step is blank so far (the model
        # opened it with an empty line), decoding goes on, so leading blank lines join the step that follows them
        newline = t in self.runner.newline_set and bool(self.runner.decode(g.tokens[g.line_start:]).strip())
        if t == self.runner.eos_token_id:
            g.finish = "eos"
        elif stop.by_lines and (newline or n - g.line_start == stop.line_tokens):
            g.lines += 1
            line = self.runner.decode(g.tokens[g.line_start :])
            g.line_start = n
            if (stop.final_line is not None and stop.final_line(line)) or g.lines == stop.max_lines:
                g.finish = "stop"
        elif stop.at_newline and newline and n < stop.max_new_tokens:
            g.finish = "newline"
        if g.finish == "length" and n < stop.max_new_tokens:
            return OPEN
        if g.finish in ("eos", "stop") or not self.capture:
            return ENDED
        if self.final is not None and self.final(g.parent, self.runner.decode(g.tokens)):
            return ENDED
        return CLOSING

    def _name(self, g: _Group, chunk: KVChunk | None) -> None:
        if chunk is not None:
            g.key = prefix_key([*self.parent_ids[g.parent], *g.tokens])
            self.store.name(chunk, g.key)  # type: ignore[union-attr]

    def _finish(self, g: _Group) -> None:
        text = self.runner.decode(g.tokens)
        lps = np.asarray(g.lps, dtype=np.float32)
        self.out[g.parent] += [Continuation(list(g.tokens), lps.copy(), g.finish, text, key=g.key)
                               for _ in range(g.k)]
