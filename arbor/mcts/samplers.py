"""Samplers over the tree engine: plain k-ary tree expansion and independent chains (the baselines).

These are the measuring sticks of the token economics (DESIGN.md, "Token accounting"): every sampler drives
the model only through the `Policy` protocol (`expand`, `sample`), so the counts it reports are the model
boundary's. The tree sampler expands every open node of a level in one batched `expand` call, children
continuing from their parent's cached KV.

- `expand_tree`: every non-terminal node gets `branching` samples for the first `branch_depth` levels, then
  one per level until it terminates (so every leaf becomes a complete trajectory) or `max_depth`. A sample
  whose step repeats a sibling's exactly is dropped (`dedup=True`): its subtree would only repeat the
  sibling's, so every root-to-terminal path is a distinct trajectory. (Near-duplicate merging by edit
  distance is eta-MCTS's state merge.)
- `sample_chains(prompt_cached=False)`: G independent samples, each recomputing the prompt (naive).
- `sample_chains(prompt_cached=True)`: the prompt computed once, each chain decoded on its own (what
  vLLM-style prefix caching gives chains; the strong baseline).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from arbor.lm.base import Continuation, Policy, StopRule
from arbor.mcts.tree import ROOT, Tree, add_child, new_tree


@dataclass
class Timing:
    """Wall seconds spent in the model boundary vs in tree bookkeeping."""

    model: float = 0.0
    tree: float = 0.0
    calls: int = 0


@dataclass
class TreeSample:
    """A sampled tree plus the per-node prefix-cache keys and timing."""

    tree: Tree
    cache_keys: dict[int, object] = field(default_factory=dict)
    timing: Timing = field(default_factory=Timing)


def _step_tokens(c: Continuation, eos_id: int) -> list[int]:
    """A step's tokens as stored in the tree: EOS is a finish marker, not content."""
    return c.token_ids[:-1] if c.finish == "eos" else c.token_ids


def expand_tree(policy: Policy, prompt_ids: Sequence[int], *, branching: int, branch_depth: int,
                max_depth: int, step_tokens: int, is_terminal: Callable[[str], bool], temperature: float,
                seed: int, store: object, max_nodes: int = 100_000, max_tokens: int = 2_000_000,
                batch_size: int = 256, dedup: bool = True) -> TreeSample:
    """Plain tree expansion (see module docstring). Node = one step ended by a newline (or EOS/length)."""
    out = TreeSample(new_tree(max_nodes, max_tokens, prompt_ids))
    tree, timing = out.tree, out.timing
    stop = StopRule(at_newline=True, max_new_tokens=step_tokens)
    frontier = [ROOT]
    out.cache_keys[ROOT] = ("prompt", seed)
    for level in range(max_depth):
        open_nodes = [n for n in frontier if not tree.terminal[n]]
        if not open_nodes:
            break
        k = branching if level < branch_depth else 1
        nxt: list[int] = []
        for i in range(0, len(open_nodes), max(1, batch_size // k)):
            chunk = open_nodes[i : i + max(1, batch_size // k)]
            t0 = time.perf_counter()
            parents = [(out.cache_keys[n], tree.path_tokens(n).tolist()) for n in chunk]
            t1 = time.perf_counter()
            results = policy.expand(parents, k, stop=stop, temperature=temperature,
                                    seed=seed * 1_000_003 + level * 7919 + i, store=store)
            t2 = time.perf_counter()
            for node, conts in zip(chunk, results, strict=True):
                seen: set[tuple[int, ...]] = set()
                for c in conts:
                    if dedup:
                        if tuple(c.token_ids) in seen:
                            continue
                        seen.add(tuple(c.token_ids))
                    done = c.finish == "eos" or is_terminal(c.text)
                    prior = float(np.exp(c.logprobs.sum()))
                    child = add_child(tree, node, _step_tokens(c, policy.eos_token_id), prior=prior,
                                      terminal=done)
                    if c.key is not None:
                        out.cache_keys[child] = c.key
                    nxt.append(child)
            t3 = time.perf_counter()
            timing.model += t2 - t1
            timing.tree += (t1 - t0) + (t3 - t2)
            timing.calls += 1
        frontier = nxt
    return out


def sample_chains(policy: Policy, prompt_ids: Sequence[int], num_chains: int, *, max_new_tokens: int,
                  temperature: float, seed: int, prompt_cached: bool, store: object = None,
                  batch_size: int = 256) -> list[Continuation]:
    """`num_chains` independent complete solutions of one prompt (see module docstring)."""
    stop = StopRule(at_newline=False, max_new_tokens=max_new_tokens)
    if not prompt_cached:
        return policy.sample([list(prompt_ids)] * num_chains, stop=stop, temperature=temperature, seed=seed,
                             batch_size=batch_size)
    out: list[Continuation] = []
    for i in range(0, num_chains, batch_size):
        n = min(batch_size, num_chains - i)
        out += policy.expand([(("chain-prompt", seed), list(prompt_ids))], n, stop=stop,
                             temperature=temperature, seed=seed + i, store=store)[0]
    return out
