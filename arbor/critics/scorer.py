"""Critic-guided node scoring with prefix-cached critics: the `NodeScorer` of AlphaLLM's node score (§4.3).

    s = b_v V(s) + b_prm PRM(s) + b_orm mean_i ORM(rollout_i)        (weights normalised to sum 1)

Each critic backbone keeps its own `KVStore` keyed by content (`prefix_key` of the token path, as the policy's
store is): a new node is scored by feeding only its step's tokens on top of its parent's cached KV, and its
own KV is stored for its children. So each token stored in the tree passes a critic once; a missing parent
(first call, or after eviction) is recomputed and counted. Work is counted at the critic's model call,
separately from the policy: `CachedCritic.counters.forward_tokens` (`critic_forward_tokens`).

For a critic store, `PrefixState.logits` holds the last hidden state [H] of the prefix (what the heads read),
not vocabulary logits. Terminals: the oracle reward when a gold answer is known (`reward`), else the ORM
(`CriticsConfig.orm_at_terminals`), else the weighted V/PRM; without gold, a terminal whose text states no
final answer (the task's `is_terminal` on none of its lines: cut at the depth limit or by EOS) scores 0. A
critic with weight 0 is never loaded or run. Fast rollouts continue from the node's cached KV in the policy's
store; the ORM reads each rollout from the node's cached KV in its own store (rollouts are never stored).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from arbor.critics.confidence import Fusion, path_features, path_steps, sample_features
from arbor.critics.config import KINDS, CriticsConfig
from arbor.critics.labels import step_ends, token_pieces
from arbor.critics.models import CriticModel, left_pad, load
from arbor.lm.base import StopRule, TokenCounters
from arbor.lm.kvcache import KVStore, PrefixState, prefix_key
from arbor.mcts.grow import TreeBuilder


class CachedCritic:
    """A critic backbone with its own content-keyed prefix KV store and token counters."""

    def __init__(self, model: CriticModel, budget_bytes: int | None = None, batch_size: int = 64,
                 fusion: Fusion | None = None) -> None:
        self.model = model.eval()
        self.store = KVStore(budget_bytes)
        self.counters = TokenCounters()
        self.batch_size = batch_size
        self.fusion = fusion  # with the policy's confidence (arbor/critics/confidence.py), saved beside the critics
        self.seconds = 0.0  # wall seconds inside `score` (the critic's model time)

    def view(self, budget_bytes: int | None) -> CachedCritic:
        """The same critic (model and fusion shared) with an empty store of `budget_bytes` and counters of its
        own: one per problem when several searches run together (arbor/lm/lockstep.py), so none evicts or
        counts another's."""
        return CachedCritic(self.model, budget_bytes, self.batch_size, self.fusion)

    @property
    def critic_forward_tokens(self) -> int:
        return self.counters.forward_tokens

    @torch.inference_mode()
    def _prefill(self, prefixes: Sequence[Sequence[int]]) -> list[PrefixState]:
        """States of whole prefixes (a cache miss pays this), one left-padded batch."""
        ids, mask, pos = left_pad(prefixes, self.model.device)
        self.counters.forward_tokens += int(mask.sum())
        self.counters.padded_positions += int((mask == 0).sum())
        h, cache = self.model.hidden(ids, mask, pos, DynamicCache())
        lengths = mask.sum(1).tolist()
        return [_row_state(cache, j, h[j, -1], mask.shape[1] - n, n) for j, n in enumerate(lengths)]

    def _parent_states(self, parents: Sequence[Sequence[int]]) -> list[PrefixState]:
        keys = [prefix_key(p) for p in parents]
        states = [self.store.get(k) for k in keys]
        missing: dict[bytes, int] = {}
        for i, st in enumerate(states):
            if st is None:
                missing.setdefault(keys[i], i)
        self.counters.cache_hits += len(parents) - len(missing)  # a prefix missing twice is computed once
        self.counters.cache_misses += len(missing)
        if missing:
            for key, st in zip(missing, self._prefill([parents[i] for i in missing.values()]), strict=True):
                self.store.put(key, st)
            states = [self.store.get(k) if st is None else st for k, st in zip(keys, states, strict=True)]
        return states  # type: ignore[return-value]

    @torch.inference_mode()
    def score(self, paths: Sequence[Sequence[int]], parent_lens: Sequence[int], *, kinds: Sequence[str],
              keep: Sequence[bool] | None = None, confidence: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """{kind: [n] sigmoid scores at the last token of each path}. Path i extends the cached prefix
        `paths[i][:parent_lens[i]]` (recomputed and stored on a miss); only `paths[i][parent_lens[i]:]` is fed
        (a path that adds no token is scored at the prefix it ends with). `keep[i]`: store path i's own state
        for later children (default all). `confidence` [n, 3]: the policy's confidence features of each path
        (arbor/critics/confidence.py); given and with a fusion loaded, the scores are the fused ones."""
        t0 = time.perf_counter()
        keep = [True] * len(paths) if keep is None else list(keep)
        out: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
        for a in range(0, len(paths), self.batch_size):
            idx = range(a, min(len(paths), a + self.batch_size))
            grow = [i for i in idx if len(paths[i]) > parent_lens[i]]
            same = [i for i in idx if len(paths[i]) <= parent_lens[i]]  # a step that added no token (e.g. EOS)
            rows: dict[int, torch.Tensor] = {}
            if grow:
                got = self._extend([paths[i] for i in grow], [parent_lens[i] for i in grow], [keep[i] for i in grow])
                rows |= dict(zip(grow, got, strict=True))
            if same:  # scored as the prefix it ends with: that prefix's cached last hidden state
                if any(len(paths[i]) == 0 for i in same):
                    raise ValueError("an empty path cannot be scored")
                got = self._parent_states([paths[i] for i in same])
                rows |= {i: st.logits.to(self.model.device) for i, st in zip(same, got, strict=True)}
            hs = torch.stack([rows[i] for i in idx])
            for k, v in self.model.head_logits(hs, kinds).items():
                out[k].append(torch.sigmoid(v).cpu().numpy())
        got = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
        if confidence is not None and self.fusion is not None:
            got = {k: self.fusion.apply(k, v, confidence) for k, v in got.items()}
        self.seconds += time.perf_counter() - t0
        return got

    def _extend(self, paths: list[Sequence[int]], parent_lens: list[int], keep: list[bool]) -> torch.Tensor:
        """Feed each path's new tokens on its parent's KV (left-padded parents, right-padded new tokens: a real
        token never attends to a later pad); returns the last hidden states [B, H] and stores kept states."""
        dev = self.model.device
        if any(len(p) <= n for p, n in zip(paths, parent_lens, strict=True)):
            raise ValueError("every scored path needs at least one token beyond its parent prefix")
        states = self._parent_states([p[:n] for p, n in zip(paths, parent_lens, strict=True)])
        width = max(st.length for st in states)
        new = [list(p[n:]) for p, n in zip(paths, parent_lens, strict=True)]
        span = max(len(x) for x in new)
        b = len(paths)
        ids = torch.zeros((b, span), dtype=torch.long)
        mask = torch.zeros((b, width + span), dtype=torch.long)
        pos = torch.zeros((b, span), dtype=torch.long)
        for i, (st, x) in enumerate(zip(states, new, strict=True)):
            ids[i, : len(x)] = torch.as_tensor(x)
            mask[i, width - st.length: width + len(x)] = 1
            pos[i] = st.length + torch.arange(span)
        layers = []
        for li in range(len(states[0].kv)):
            k0 = states[0].kv[li][0]
            keys = k0.new_zeros((b, k0.shape[0], width, k0.shape[2]))
            values = torch.zeros_like(keys)
            for i, st in enumerate(states):
                keys[i, :, width - st.length:] = st.kv[li][0]
                values[i, :, width - st.length:] = st.kv[li][1]
            layers.append((keys, values))
        n_new = sum(len(x) for x in new)
        self.counters.forward_tokens += n_new
        self.counters.padded_positions += b * span - n_new
        h, cache = self.model.hidden(ids.to(dev), mask.to(dev), pos.to(dev), DynamicCache(ddp_cache_data=layers))
        last = torch.stack([h[i, len(x) - 1] for i, x in enumerate(new)])
        for i, (st, x) in enumerate(zip(states, new, strict=True)):
            if keep[i]:
                self.store.put(prefix_key(paths[i]), _row_state(cache, i, last[i], width - st.length,
                                                                st.length + len(x)))
        return last


def _row_state(cache: DynamicCache, j: int, last_hidden: torch.Tensor, left: int, length: int) -> PrefixState:
    """Copy row `j`'s real KV positions [left, left + length) out of a batch cache, with its last hidden [H]."""
    kv = [(layer.keys[j, :, left: left + length].clone(), layer.values[j, :, left: left + length].clone())
          for layer in cache.layers]
    return PrefixState(kv, last_hidden.clone(), length)


def recorded_heldout(critics_dir: str | Path) -> dict | None:
    """The held-out metrics a `critics` stage output records in its manifest ({kind: {auroc,
    auroc_within_problem}}, `CriticsConfig.guide_gate`), or None: no such directory, no manifest, or critics
    not written by the stage."""
    from arbor.pipeline.manifest import read_manifest

    manifest = read_manifest(critics_dir) if Path(critics_dir).is_dir() else None
    return ((manifest or {}).get("meta") or {}).get("heldout")


def load_critics(critics_dir: str | Path, kinds: Sequence[str], *, device: str = "cpu",
                 budget_bytes: int | None = None, batch_size: int = 64,
                 confidence: bool = True) -> dict[str, CachedCritic]:
    """{kind: CachedCritic} for `kinds` from a stage output (`<dir>/shared` with every head, or
    `<dir>/{value,prm,orm}`), with the fusion saved beside them (`confidence.json`, if any, and `confidence`:
    false = the critics' own scores); a shared backbone is one `CachedCritic` serving all its kinds. Only the named
    kinds are loaded: a critic with weight 0 is never read. A stage-written directory is checked against its
    manifest first (a damaged or half-written one is refused, naming the file)."""
    from arbor.pipeline.manifest import verify

    root = Path(critics_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: critics not found (expected the output of `arbor critics`)")
    verify(root, required=False)
    fusion = Fusion.load(root) if confidence else None
    if (root / "shared").is_dir():
        one = CachedCritic(load(root / "shared", device), budget_bytes, batch_size, fusion)
        return {k: one for k in kinds}
    return {k: CachedCritic(load(root / k, device), budget_bytes, batch_size, fusion) for k in kinds}


def critic_scorer(critics_dir: str | Path, cfg: CriticsConfig, *, reward: Callable[[str], float] | None = None,
                  device: str = "cpu") -> CriticScorer:
    """The node scorer of a search: loads only the critics `cfg` needs (weight > 0; the ORM at terminals without
    gold) from a `critics` stage output. `reward` = the oracle at training time, None when decoding."""
    kinds = cfg.needed(gold=reward is not None)
    critics = load_critics(critics_dir, kinds, device=device, budget_bytes=int(cfg.kv_budget_mb * 2**20),
                           batch_size=cfg.batch_size, confidence=cfg.confidence)
    return CriticScorer(critics, cfg, reward)


class CriticScorer:
    """`NodeScorer`: AlphaLLM's node score from prefix-cached critics (module docstring).

    `critics` maps each needed kind to its `CachedCritic` (one object may serve several kinds: a shared
    backbone runs once per node for all of them). `reward`: the oracle outcome reward at terminals when a gold
    answer is known (training-time search); None at decoding time.
    """

    def __init__(self, critics: dict[str, CachedCritic], cfg: CriticsConfig,
                 reward: Callable[[str], float] | None = None) -> None:
        self.cfg, self.reward = cfg, reward
        self.uses_oracle = reward is not None
        self.weights = cfg.weights
        need = set(cfg.needed(gold=reward is not None))
        lacking = sorted(need - set(critics))
        if lacking:
            raise ValueError(f"critics {lacking} have a positive weight (or score terminals) but were not given")
        self.critics = {k: c for k, c in critics.items() if k in need}

    @property
    def backbones(self) -> list[CachedCritic]:
        """Distinct critic backbones in use (one for a shared backbone)."""
        return list({id(c): c for c in self.critics.values()}.values())

    @property
    def critic_forward_tokens(self) -> int:
        """Token positions computed by every critic backbone together."""
        return sum(c.critic_forward_tokens for c in self.backbones)

    @property
    def model_seconds(self) -> float:
        """Wall seconds in the critics' model calls (the search counts them as model time, not tree work)."""
        return sum(c.seconds for c in self.backbones)

    def clear(self) -> None:
        """Drop every cached prefix (call between problems, as the search stage clears the policy's store)."""
        for c in self.backbones:
            c.store.clear()

    def __call__(self, builder: TreeBuilder, nodes: Sequence[int], *, seed: int) -> np.ndarray:
        tree = builder.tree
        nodes = [int(n) for n in nodes]
        values = np.zeros(len(nodes))
        inner = [i for i, n in enumerate(nodes) if not tree.terminal[n]]
        term = [i for i, n in enumerate(nodes) if tree.terminal[n]]
        gold = self.reward is not None
        if gold:
            for i in term:
                values[i] = tree.reward[nodes[i]] = self.reward(builder.text(nodes[i]))  # type: ignore[misc]
        paths = [tree.path_tokens(n) for n in nodes]
        parent_lens = [len(p) - int(tree.tok_len[n]) for p, n in zip(paths, nodes, strict=True)]
        conf = path_features(tree.parent, tree.log_prior, tree.tok_len, np.asarray(nodes, np.int64))
        orm_terms = not gold and self.cfg.orm_at_terminals and "orm" in self.critics
        scores: dict[str, np.ndarray] = {}
        for critic in self.backbones:
            kinds = [k for k in KINDS if self.critics.get(k) is critic]
            # every backbone in use reads every new node once (inner nodes kept for their children);
            # terminals only where this backbone scores them
            reads_terms = not gold and (("orm" in kinds and orm_terms) or not orm_terms)
            rows = [i for i in range(len(nodes)) if i in inner or (reads_terms and i in term)]
            if not rows:
                continue
            got = critic.score([paths[i] for i in rows], [parent_lens[i] for i in rows], kinds=kinds,
                               keep=[not tree.terminal[nodes[i]] for i in rows], confidence=conf[rows])
            for k, v in got.items():
                full = np.full(len(nodes), np.nan)
                full[rows] = v
                scores[k] = full
        w = self.weights
        if inner:
            mix = np.zeros(len(inner))
            for k in ("value", "prm"):
                if w[k] > 0:
                    mix += w[k] * scores[k][inner]
            if w["orm"] > 0:
                mix += w["orm"] * self._rollout_orm(builder, [nodes[i] for i in inner], [paths[i] for i in inner],
                                                    seed)
            values[inner] = mix if sum(w.values()) > 0 else 0.5  # only terminals are scored: neutral inner
        if term and not gold:
            if orm_terms:
                values[term] = scores["orm"][term]
            else:  # no ORM at terminals: the weighted V/PRM of the complete solution
                vp = w["value"] + w["prm"]
                values[term] = sum(w[k] * scores[k][term] for k in ("value", "prm") if w[k] > 0) / max(vp, 1e-12)
            for i in term:  # cut at the depth limit or EOS before any answer line: incomplete, never right
                if not any(builder.is_terminal(line) for line in builder.text(nodes[i]).splitlines()):
                    values[i] = 0.0
        return np.clip(values, 0.0, 1.0)

    def _piece(self, builder: TreeBuilder) -> Callable[[int], str]:
        """One token's text (cached): how `step_ends` splits a rollout into steps."""
        if getattr(self, "_pieces", None) is None:
            self._pieces = token_pieces(builder.policy.decode)
        return self._pieces

    def _rollout_orm(self, builder: TreeBuilder, nodes: list[int], paths: list[np.ndarray], seed: int) -> np.ndarray:
        """mean_i ORM(rollout_i) over `cfg.n_rollouts` fast rollouts from each node (policy's cached KV; the
        ORM reads each rollout from the node's cached KV in its own store)."""
        stop = StopRule(at_newline=False, max_new_tokens=self.cfg.rollout_tokens, line_tokens=builder.step_tokens,
                        final_line=builder.is_terminal)
        outs = builder.policy.expand(builder.parents(nodes), self.cfg.n_rollouts, temperature=builder.temperature,
                                     seed=seed, stop=stop, store=builder.store, final=lambda _i, _text: True)
        tree = builder.tree
        seqs, parent_lens, owner, conf = [], [], [], []
        for j, conts in enumerate(outs):
            steps = path_steps(tree.parent, tree.log_prior, tree.tok_len, nodes[j])
            for c in conts:
                toks = c.token_ids[:-1] if c.finish == "eos" else c.token_ids
                if toks:
                    seqs.append([*paths[j].tolist(), *toks])
                    parent_lens.append(len(paths[j]))
                    owner.append(j)
                    ends = step_ends(toks, self._piece(builder), step_tokens=builder.step_tokens,
                                     is_terminal=builder.is_terminal) or [len(toks)]
                    ends[-1] = len(toks)  # its features where the ORM reads it: at its last token
                    conf.append(sample_features(c.logprobs[: len(toks)], ends, steps)[-1])
        means = np.full(len(nodes), 0.5)
        if seqs:
            orm = self.critics["orm"].score(seqs, parent_lens, kinds=["orm"], keep=[False] * len(seqs),
                                            confidence=np.asarray(conf))["orm"]
            own = np.asarray(owner)
            for j in range(len(nodes)):
                if np.any(own == j):
                    means[j] = float(orm[own == j].mean())
        return means
