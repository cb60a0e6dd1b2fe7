"""Node scorers: the callback through which search values a node (mctx's `recurrent_fn` value head).

A scorer maps new nodes to values in [0, 1]; the search backs them up. AlphaLLM's node score is
`b_v * V(s) + b_prm * PRM(s) + b_orm * mean_i ORM(rollout_i)` (§4.3); until the critics exist (issue #5) two
scorers stand in, both without a learned model:

- `RewardScorer` (training-time search, gold answer known): terminals get the task's outcome reward; other
  nodes get the mean reward of `n_rollouts` fast rollouts from the node (0.5 if `n_rollouts` = 0). A rollout
  continues from the node's cached KV, stops after its first terminal step line, and stores no state.
- `LikelihoodScorer` (decoding at evaluation, no gold answer): the policy's own confidence, the geometric
  mean token probability of the path, exp(mean log pi). Never sees the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from arbor.lm.base import Policy, StopRule
from arbor.mcts.grow import TreeBuilder


class NodeScorer(Protocol):
    """values[i] in [0, 1] for `nodes[i]` of the builder's tree (called once per batch of new nodes). A scorer
    that runs models of its own (critics, not `Policy` calls) may expose `model_seconds`, the cumulative wall
    seconds of those calls: the search counts them as model time, not tree work (`SearchTiming`)."""

    uses_oracle: bool

    def __call__(self, builder: TreeBuilder, nodes: Sequence[int], *, seed: int) -> np.ndarray: ...


class RewardScorer:
    """Outcome reward at terminals, mean rollout reward elsewhere (needs the gold answer)."""

    uses_oracle = True

    def __init__(self, reward: Callable[[str], float], *, n_rollouts: int = 0, rollout_tokens: int = 128) -> None:
        self.reward, self.n_rollouts, self.rollout_tokens = reward, n_rollouts, rollout_tokens

    def __call__(self, builder: TreeBuilder, nodes: Sequence[int], *, seed: int) -> np.ndarray:
        tree = builder.tree
        values = np.full(len(nodes), 0.5)
        ends = tree.terminal[np.asarray(nodes, np.int64)]
        for i in np.flatnonzero(ends).tolist():
            values[i] = tree.reward[nodes[i]] = self.reward(builder.text(nodes[i]))
        inner = np.flatnonzero(~ends).tolist()
        if inner and self.n_rollouts > 0:
            # a rollout ends like a path of the tree (first terminal step line; steps cut at step_tokens), at
            # most `rollout_tokens` tokens; it is never continued, so no state is stored for it
            stop = StopRule(at_newline=False, max_new_tokens=self.rollout_tokens, line_tokens=builder.step_tokens,
                            final_line=builder.is_terminal)
            outs = builder.policy.expand(builder.parents([nodes[i] for i in inner]), self.n_rollouts,
                                         temperature=builder.temperature, seed=seed, stop=stop,
                                         store=builder.store, final=lambda _i, _text: True)
            for i, conts in zip(inner, outs, strict=True):
                prefix = builder.text(nodes[i])
                values[i] = float(np.mean([self.reward(prefix + c.text) for c in conts]))
        return values


class LikelihoodScorer:
    """exp(mean token log-prob) of the path from the prompt: the policy's confidence, no oracle."""

    uses_oracle = False

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def __call__(self, builder: TreeBuilder, nodes: Sequence[int], *, seed: int) -> np.ndarray:
        tree = builder.tree
        out = np.empty(len(nodes))
        for i, n in enumerate(nodes):
            path = tree.path(n)[1:]
            # log_prior[n] = sum of the step's token log-probs; tok_len gives the token count
            logp = float(np.sum(tree.log_prior[path]))
            length = max(1, int(tree.tok_len[path].sum()))
            out[i] = float(np.exp(logp / length))
        return out
