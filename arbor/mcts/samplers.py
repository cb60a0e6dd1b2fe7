"""Samplers over the tree engine: plain tree expansion, Tree-GRPO tree sampling, and independent chains.

All grow trees through `TreeBuilder` (arbor/mcts/grow.py), so every count is the model boundary's.

- `expand_tree`: every non-terminal node gets `branching` samples for the first `branch_depth` levels, then
  one per level until it terminates. With `distinct=True` siblings are sampled one after another without
  replacement (each excludes the steps already taken, `Policy.expand(exclude=...)`), so every root-to-leaf
  path is a different trajectory at no extra token cost.
- `tree_grpo`: Tree-GRPO (arXiv 2509.21240 §3): M trees per prompt, each started from one chain; then L rounds
  in which N non-leaf nodes per tree are picked at random and each expanded by a new branch to a terminal.
  Rollouts per prompt: G = M * (L*N + 1). Expected tokens for trajectory length B: M*B + M*L*N*B/2.
- `chain_tree`: G independent chains in the same engine, step by step (the baseline at the same counters).
- `sample_chains`: G complete solutions without a tree, decoded in one pass each, naive (each recomputes the
  prompt) or prompt-cached (the prompt's state stored under its content key, shared by every batch). Give them
  the tree's stop rule (`TreeBuilder.trajectory_stop()` / `StopRule.trajectory`) to compare with a tree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from arbor.lm.base import Continuation, Policy, StopRule
from arbor.lm.kvcache import prefix_key
from arbor.mcts.grow import TreeBuilder
from arbor.mcts.tree import ROOT

__all__ = ["chain_tree", "expand_tree", "sample_chains", "tree_grpo"]


def expand_tree(policy: Policy, prompt_ids: Sequence[int], *, branching: int, branch_depth: int,
                max_depth: int, step_tokens: int, is_terminal: Callable[[str], bool], temperature: float,
                seed: int, store: object, max_nodes: int = 100_000, max_tokens: int = 2_000_000,
                batch_size: int = 256, distinct: bool = False) -> TreeBuilder:
    """Plain level-by-level tree expansion (see module docstring)."""
    b = TreeBuilder.start(policy, prompt_ids, store=store, seed=seed, max_nodes=max_nodes, max_tokens=max_tokens,
                          is_terminal=is_terminal, step_tokens=step_tokens, max_depth=max_depth,
                          temperature=temperature, batch_size=batch_size, exclude_existing=distinct)
    frontier = [ROOT]
    for level in range(max_depth):
        open_nodes = [n for n in frontier if not b.tree.terminal[n]]
        if not open_nodes:
            break
        kids = b.expand(open_nodes, branching if level < branch_depth else 1, seed=seed + 104_729 * level)
        frontier = [c for cs in kids for c in cs]
    return b


def tree_grpo(policy: Policy, prompt_ids: Sequence[int], *, m: int, l_rounds: int, n: int, step_tokens: int,
              max_depth: int, is_terminal: Callable[[str], bool], temperature: float, seed: int, store: object,
              max_nodes: int = 100_000) -> tuple[TreeBuilder, np.ndarray]:
    """Tree-GRPO sampling; returns the builder and `tree_of[node]` (which of the M trees a node belongs to).

    The M trees share the prompt node (index 0) but are otherwise independent: a branch from the prompt in
    tree j stays in tree j. Leaves = the M*(L*N+1) rollouts.
    """
    b = TreeBuilder.start(policy, prompt_ids, store=store, seed=seed, max_nodes=max_nodes,
                          is_terminal=is_terminal, step_tokens=step_tokens, max_depth=max_depth,
                          temperature=temperature, merge_distance=-1)
    rng = np.random.default_rng(seed)
    tree_of = np.full(max_nodes, -1, np.int32)
    firsts = b.expand([ROOT], m, seed=seed)[0]
    tree_of[firsts] = np.arange(m)
    b.complete(firsts, seed=seed + 1)
    _inherit(b, tree_of)
    for r in range(l_rounds):
        picks: list[int] = []
        owners: list[int] = []
        for j in range(m):
            members = np.flatnonzero(tree_of[: b.tree.num_nodes] == j)
            candidates = [ROOT] + [int(x) for x in members if b.tree.first_child[x] != -1 and not b.tree.terminal[x]]
            chosen = rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)
            picks += [candidates[c] for c in sorted(chosen)]
            owners += [j] * len(chosen)
        kids = b.expand(picks, 1, seed=seed + 31 * (r + 1))
        starts = [k[0] for k in kids]
        tree_of[starts] = owners
        b.complete(starts, seed=seed + 37 * (r + 1))
        _inherit(b, tree_of)
    return b, tree_of[: b.tree.num_nodes].copy()


def _inherit(b: TreeBuilder, tree_of: np.ndarray) -> None:
    """Nodes created by `complete` belong to their parent's tree (creation order: parents come first)."""
    for x in range(1, b.tree.num_nodes):
        if tree_of[x] == -1:
            tree_of[x] = tree_of[b.tree.parent[x]]


def chain_tree(policy: Policy, prompt_ids: Sequence[int], *, g: int, step_tokens: int, max_depth: int,
               is_terminal: Callable[[str], bool], temperature: float, seed: int, store: object,
               max_nodes: int = 100_000) -> TreeBuilder:
    """G independent step-by-step chains from the prompt (a tree that branches only at the root)."""
    b = TreeBuilder.start(policy, prompt_ids, store=store, seed=seed, max_nodes=max_nodes,
                          is_terminal=is_terminal, step_tokens=step_tokens, max_depth=max_depth,
                          temperature=temperature, merge_distance=-1)
    b.complete(b.expand([ROOT], g, seed=seed)[0], seed=seed + 1)
    return b


def sample_chains(policy: Policy, prompt_ids: Sequence[int], num_chains: int, *, stop: StopRule,
                  temperature: float, seed: int, prompt_cached: bool, store: object = None,
                  batch_size: int = 256) -> list[Continuation]:
    """`num_chains` independent complete solutions of one prompt, each ended by `stop` (see module docstring).

    Prompt-cached chains continue from the prompt's state in `store`, keyed by the prompt's content, so only
    the first call with a prompt computes it; chains are never continued, so no state is stored for them.
    """
    if not prompt_cached:
        return policy.sample([list(prompt_ids)] * num_chains, stop=stop, temperature=temperature, seed=seed,
                             batch_size=batch_size)
    parent = (prefix_key(prompt_ids), list(prompt_ids))
    out: list[Continuation] = []
    for i in range(0, num_chains, batch_size):
        k = min(batch_size, num_chains - i)
        out += policy.expand([parent], k, stop=stop, temperature=temperature, seed=seed + i, store=store,
                             final=lambda _i, _text: True)[0]
    return out
