"""eta-MCTS over reasoning steps (AlphaLLM, arXiv 2404.12253 §4.3-4.4), on the numba tree.

One iteration reads like the algorithm: select B leaves with virtual loss (kernel) -> expand them in one
batched policy call -> score the new nodes (scorer callback) -> back up (kernel). The search never imports a
model: it grows the tree through `TreeBuilder` (the `Policy` protocol) and values nodes through a `NodeScorer`.

- Options: a node is one step, ended by a newline (or EOS / the length limit).
- Selection: UCT `Q + c sqrt(ln N(s) / N(s,a))` (c = 1.0) or PUCT with the step's probability as prior.
- Importance-weighted adaptive branching: after a node's children are scored,
  `I(s) = max_o |v(s,o) - v(s)|` and `n(s) = max(c_min(t), min(floor(alpha I(s)) + 1, c_max(t)))`; a node
  with fewer than n(s) children is a leaf again, so selection widens it (progressive widening). Our values lie
  in [0, 1], so the default alpha (4) is larger than the paper's 1 (Table 5), whose values had a wider range.
- State merge: a new step within edit distance `merge_distance` of a sibling's is merged into it.
- Fast rollouts and the terminal reward live in the scorer (arbor/mcts/scoring.py).
- Budget: simulations and/or forward tokens, whichever ends first.
- Children table: sized by `max_children_bound(cfg)` up front, so the tree never widens it during a search.
- Timing: `SearchResult.timing` splits the search's wall time at the model boundary (every `Policy` call,
  expansion and scorer rollouts alike, is model time; everything else is tree work), by phase.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from arbor.lm.base import Policy
from arbor.mcts import fused
from arbor.mcts.grow import TreeBuilder
from arbor.mcts.kernels import PUCT, UCT, best_leaf, greedy_path, terminal_nodes
from arbor.mcts.scoring import NodeScorer
from arbor.mcts.tree import ROOT, Tree, reserve_children
from arbor.pipeline.config import EtaMCTSConfig
from arbor.tasks.answers import answer_key

PHASES = ("setup", "select", "expand", "score", "backup", "widen", "readout")


@dataclass
class SearchTiming:
    """Wall seconds of one search, split at the model boundary.

    model: inside `Policy` calls (expansions and the scorer's rollouts: the forward passes, with the backend's
    own batching and KV-cache handling).
    phases: tree work by phase, model time excluded: setup (allocating the tree), select (`fused.select_step`:
    selection, duplicates, terminals re-valued), expand (TreeBuilder: path assembly, exclusion lists, state
    merge, adding children), score (the scorer callback: rewards, path walks), backup (`fused.finish_step`:
    backup, sibling stats, branching targets), widen (branching counts, reopening, budget checks), readout
    (the four read-outs).
    total: the whole search, start to read-outs. `tree` = total - model.
    """

    model: float = 0.0
    total: float = 0.0
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @property
    def tree(self) -> float:
        return self.total - self.model

    @property
    def bookkeeping_fraction(self) -> float:
        """Tree work / total wall time."""
        return self.tree / self.total if self.total > 0 else float("nan")


class TimedPolicy:
    """The policy with a stopwatch on its model calls (expand, sample, score): `seconds` accumulates their wall
    time; everything else is delegated."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def _timed(self, name: str, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return getattr(self._policy, name)(*args, **kw)
        finally:
            self.seconds += time.perf_counter() - t0

    def expand(self, *args: Any, **kw: Any) -> Any:
        return self._timed("expand", *args, **kw)

    def sample(self, *args: Any, **kw: Any) -> Any:
        return self._timed("sample", *args, **kw)

    def score(self, *args: Any, **kw: Any) -> Any:
        return self._timed("score", *args, **kw)


class _Laps:
    """Accumulates wall time per phase, excluding the model seconds spent inside each phase."""

    def __init__(self, clock: TimedPolicy, timing: SearchTiming) -> None:
        self.clock, self.timing = clock, timing
        self.t, self.m = time.perf_counter(), clock.seconds

    def __call__(self, phase: str) -> None:
        t, m = time.perf_counter(), self.clock.seconds
        self.timing.phases[phase] += (t - self.t) - (m - self.m)
        self.t, self.m = t, m


@dataclass
class SearchResult:
    """A finished search: the builder (tree, keys), the read-outs (node ids, -1 if none) and its timing."""

    builder: TreeBuilder
    simulations: int
    greedy_leaf: int
    best_leaf: int
    rerank_leaf: int
    vote_answer: str | None
    timing: SearchTiming = field(default_factory=SearchTiming)
    walk_end: int = ROOT  # where the greedy walk by Q stopped: greedy_leaf if a terminal; else an inner node that
    # `complete_walk` completed (greedy_leaf below it) or not (greedy_leaf -1)


def max_nodes_bound(cfg: EtaMCTSConfig, cap: int = 20_000) -> int:
    """Most nodes a search of `num_simulations` can create (at most `cap`): each selected leaf gains at most
    max(c_max_root, c_max) children, and the last batch may overshoot the budget by `batch_leaves`. Sizing the
    tree by it, not by `cap`, keeps a small search from allocating (and page-faulting) a 20k-node tree: that was
    16% of a default search's tree work (bench/kernels.py)."""
    return min(cap, 1 + (cfg.num_simulations + cfg.batch_leaves) * max(cfg.c_max_root, cfg.c_max))


def max_children_bound(cfg: EtaMCTSConfig) -> int:
    """Most children eta-MCTS can give one node: an expansion tops a node up to its branching target
    (<= max(c_max_root, c_max)) or adds one child, and a node is expanded at most max(widen_cap, max_attempts)
    times (`_grow`, `_reopen`). Defaults: 6 + 16 = 22; the paper's c_max(0) = 60 gives 76."""
    return max(cfg.c_max_root, cfg.c_max) + max(cfg.widen_cap, cfg.max_attempts)


def branching_target(imp: float, depth: int, cfg: EtaMCTSConfig) -> int:
    """n(s) = max(c_min(t), min(floor(alpha * I(s)) + 1, c_max(t))), t = depth (AlphaLLM eq. for n(s)); the
    kernel `arbor.mcts.fused.branching_target` that the search uses."""
    return int(fused.branching_target(float(imp), int(depth), float(cfg.alpha), cfg.c_min, cfg.c_max,
                                      cfg.c_max_root))


def eta_mcts(policy: Policy, prompt_ids: Sequence[int], *, scorer: NodeScorer, is_terminal: Callable[[str], bool],
             cfg: EtaMCTSConfig, seed: int, store: object, max_nodes: int | None = None,
             vote_key: Callable[[str], str | None] = answer_key, complete_walk: bool = False) -> SearchResult:
    """Run eta-MCTS from `prompt_ids`; see the module docstring.

    `max_nodes` (default: `max_nodes_bound(cfg)`) caps the tree; the search stops before an expansion could
    overflow it. `vote_key` names a terminal's answer for the weighted vote (the task's `vote_key`).
    `complete_walk` (decoding): when the greedy walk by Q stops at an inner node (a small budget leaves the
    best path unfinished), the policy completes it greedily (temperature 0, step by step, kept in the tree
    unvalued), so the greedy read-out always ends in an answer; its tokens count as search tokens.
    """
    t_start = time.perf_counter()
    max_nodes = max_nodes_bound(cfg) if max_nodes is None else max_nodes
    capacity = max_nodes + (cfg.max_depth if complete_walk else 0)  # room for the completion, never searched in
    clock = TimedPolicy(policy)
    timing = SearchTiming()
    lap = _Laps(clock, timing)
    # every step holds at most step_tokens tokens, so this token buffer cannot overflow
    max_tokens = len(prompt_ids) + capacity * cfg.step_tokens
    b = TreeBuilder.start(clock, prompt_ids, store=store, seed=seed, max_nodes=capacity,  # type: ignore[arg-type]
                          max_tokens=max_tokens, is_terminal=is_terminal, step_tokens=cfg.step_tokens,
                          max_depth=cfg.max_depth, temperature=cfg.temperature, merge_distance=cfg.merge_distance,
                          exclude_existing=cfg.sample_without_replacement)
    tree = b.tree
    reserve_children(tree, max_children_bound(cfg))
    target = np.zeros(capacity, np.int32)
    target[ROOT] = cfg.c_min
    expanded = np.zeros(capacity, np.bool_)
    attempts = np.zeros(capacity, np.int32)
    rule = UCT if cfg.rule == "uct" else PUCT
    lap("setup")
    start_tokens = policy.counters.forward_tokens
    sims = step = stalled = 0
    while sims < cfg.num_simulations and stalled < 64:  # 64 terminal-only selections in a row: nothing to add
        if cfg.max_forward_tokens is not None and \
                policy.counters.forward_tokens - start_tokens >= cfg.max_forward_tokens:
            break
        lap("widen")
        grow, done, unique = fused.select_step(tree.parent, tree.children_index, tree.num_children, tree.visits,
                                               tree.value_sum, tree.virtual, tree.prior, expanded, tree.terminal,
                                               tree.critic_score, cfg.batch_leaves, float(cfg.c), rule, 1.0)
        lap("select")
        if grow.size:
            stalled = 0
            _grow(b, grow, target, expanded, attempts, scorer, cfg, seed + 7 * step, lap)
        else:  # only terminals were selected: the search prefers finished paths, so widen along them
            stalled += 1
            exhausted = not np.any(~expanded[: tree.num_nodes] & ~tree.terminal[: tree.num_nodes])
            if exhausted or stalled >= 4:
                if _reopen(tree, done, expanded, attempts, cfg):
                    stalled = 0
                elif exhausted:
                    break  # every path ends in a terminal and no node may be widened further
        sims += unique
        step += 1
        if tree.num_nodes + cfg.batch_leaves * max(cfg.c_max_root, cfg.c_max) >= max_nodes:
            break
    lap("widen")
    completion = None
    if complete_walk:
        end = int(greedy_path(tree.children_index, tree.num_children, tree.visits, tree.value_sum)[-1])
        if not tree.terminal[end] and tree.num_nodes + cfg.max_depth <= capacity:
            completion = b.complete([end], seed=seed + 104_729, temperature=0.0)[0]
    b.policy = policy  # the stopwatch only lives during the search
    res = readouts(b, sims, vote_key, completion)
    lap("readout")
    timing.model = clock.seconds
    timing.total = time.perf_counter() - t_start
    res.timing = timing
    return res


def _reopen(tree: Tree, terminals: np.ndarray, expanded: np.ndarray, attempts: np.ndarray,
            cfg: EtaMCTSConfig) -> bool:
    """Selection keeps reaching only terminals (or no open node is left): let the nodes on those paths be
    widened again (progressive widening), each up to `widen_cap` expansions in all. Returns whether any
    node was reopened."""
    reopened = False
    for t in terminals.tolist():
        for a in tree.path(t)[:-1].tolist():
            if attempts[a] < cfg.widen_cap and not tree.terminal[a]:
                expanded[a] = False
                reopened = True
    return reopened


def _grow(b: TreeBuilder, leaves: np.ndarray, target: np.ndarray, expanded: np.ndarray, attempts: np.ndarray,
          scorer: NodeScorer, cfg: EtaMCTSConfig, seed: int, lap: _Laps) -> None:
    """Expand each selected leaf up to its branching target, score the new children, back them up and widen
    (`fused.finish_step`). A scorer that runs models of its own (critics) reports their time in
    `model_seconds` (cumulative); it counts as model time, not tree work.

    Samples merged into an existing sibling add nothing; a node keeps being widened until it has its target
    number of distinct children or has been expanded `max_attempts` times (a confident policy may have fewer
    distinct next steps than the target).
    """
    tree = b.tree
    nodes = leaves.tolist()
    counts = [max(1, int(target[x]) - int(tree.num_children[x])) for x in nodes]
    lap("widen")
    kids = b.expand(nodes, counts, seed=seed)
    new = [k for ks in kids for k in ks]
    lap("expand")
    scorer_model = getattr(scorer, "model_seconds", 0.0)
    values = scorer(b, new, seed=seed + 1) if new else np.zeros(0)
    lap.clock.seconds += getattr(scorer, "model_seconds", 0.0) - scorer_model  # type: ignore[attr-defined]
    lap("score")
    fused.finish_step(tree.parent, tree.children_index, tree.num_children, tree.visits, tree.value_sum, tree.virtual,
                      tree.depth, tree.critic_score, leaves, np.asarray(new, np.int32),
                      np.asarray(values, np.float64), target, expanded, attempts, float(cfg.alpha), cfg.c_min,
                      cfg.c_max, cfg.c_max_root, cfg.max_attempts)
    lap("backup")


def readouts(b: TreeBuilder, sims: int, vote_key: Callable[[str], str | None] = answer_key,
             completion: int | None = None) -> SearchResult:
    """Read-outs of a valued tree: greedy-by-Q terminal, best terminal by Q, rerank by score, and the answer
    (`vote_key` of a terminal's solution: the task's answer rule) with the largest sum of terminal values.
    `completion`: the terminal that completes the greedy walk when it stops at an inner node (`eta_mcts`
    `complete_walk`; unvisited, so no other read-out sees it)."""
    tree = b.tree
    n = tree.num_nodes
    path = greedy_path(tree.children_index, tree.num_children, tree.visits, tree.value_sum)
    end = int(path[-1])
    greedy = end if tree.terminal[end] else completion if completion is not None else -1
    best = int(best_leaf(tree.num_children, tree.visits, tree.value_sum, tree.terminal, n, True))
    terms = terminal_nodes(tree)
    scores = tree.critic_score[terms]
    rerank = int(terms[np.nanargmax(scores)]) if len(terms) and not np.all(np.isnan(scores)) else -1
    votes: dict[str, float] = defaultdict(float)
    for t in terms:
        key = vote_key(b.text(int(t))) if tree.visits[t] > 0 else None
        if key is not None:
            votes[key] += tree.value_sum[t] / tree.visits[t]
    vote = max(votes, key=votes.__getitem__) if votes else None
    return SearchResult(b, sims, greedy, best, rerank, vote, walk_end=end)
