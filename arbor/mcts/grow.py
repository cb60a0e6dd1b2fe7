"""Growing a tree through the policy: the one place where search asks the model for new steps.

`TreeBuilder` owns a `Tree`, the prefix-cache key of every node and the step stop rule. `expand(nodes,
counts)` samples `counts[i]` next steps of each node in one batched `Policy.expand` call (children continue
from the parent's cached KV) and adds them as children; `complete(nodes)` extends each node one step at a time
until a terminal (a branch, a rollout kept in the tree). Sibling de-duplication and state merge
(AlphaLLM §4.4: a new step within edit distance `merge_distance` of a sibling's is merged into it) happen here,
so every algorithm gets them the same way. With `exclude_existing`, a node's new steps are sampled without
replacement against its existing children (`Policy.expand(exclude=...)`), so widening a node where the policy
is confident costs no repeated samples. The builder knows nothing about which model it drives.

Cache keys are content-based (`prefix_key` of a node's path tokens), so nodes with equal token paths share one
stored state. A step that ends its trajectory (the task's terminal step, or a step at `max_depth`) is never
continued: the policy is told so (`Policy.expand(final=...)`), stores no state for it and does not feed its last
token; `compute_tokens()` is what a perfect prefix cache computes for the tree.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from arbor.lm.base import Continuation, Policy, StopRule
from arbor.lm.kvcache import prefix_key
from arbor.mcts.kernels import edit_distance
from arbor.mcts.tree import Tree, add_child, new_tree


@dataclass
class Timing:
    """Wall seconds spent in the model boundary vs in tree bookkeeping."""

    model: float = 0.0
    tree: float = 0.0
    calls: int = 0


@dataclass
class TreeBuilder:
    """A tree under construction: the arrays and how to grow them (step stop rule, merge, exclusion)."""

    policy: Policy
    store: object
    tree: Tree
    is_terminal: Callable[[str], bool]
    step_tokens: int = 64
    max_depth: int = 16
    temperature: float = 1.0
    merge_distance: int = -1  # -1: keep duplicates; 0: drop exact repeats; d > 0: merge within edit distance d
    exclude_existing: bool = False  # sample new steps of a node without replacement against its children
    batch_size: int = 256
    timing: Timing = field(default_factory=Timing)
    merged: int = 0
    unfed: int = 0  # stored tokens never fed to the model: the last token of each non-EOS trajectory end
    samples: dict[int, tuple[list[int], np.ndarray]] = field(default_factory=dict)  # node -> its sampled step
    _texts: dict[int, str] = field(default_factory=dict, repr=False)  # node -> solution text (decoded once)
    _steps: dict[int, set[bytes]] = field(default_factory=dict, repr=False)  # node -> its children's steps
    _excl: dict[int, list] = field(default_factory=dict, repr=False)  # node -> its children's samples
    _parent_of: dict[int, tuple[bytes, list[int]]] = field(default_factory=dict, repr=False)  # `parents` cache

    @classmethod
    def start(cls, policy: Policy, prompt_ids: Sequence[int], *, store: object, seed: int | None = None,
              max_nodes: int = 100_000, max_tokens: int = 2_000_000, **kw: object) -> TreeBuilder:
        """A tree holding only the prompt. `seed` is accepted for callers' convenience and unused: nothing
        about the tree's cache keys depends on it (they are content-based)."""
        return cls(policy, store, new_tree(max_nodes, max_tokens, prompt_ids), **kw)  # type: ignore[arg-type]

    def parents(self, nodes: Sequence[int]) -> list[tuple[Hashable, list[int]]]:
        """`(content key, path token ids)` of each node: what `Policy.expand` takes as parents."""
        out = []
        for n in nodes:
            got = self._parent_of.get(n)
            if got is None:
                ids = self.tree.path_tokens(int(n))
                got = self._parent_of[n] = (prefix_key(ids), ids.tolist())
            out.append(got)
        return out

    def ends_trajectory(self, node: int, step_text: str) -> bool:
        """Whether a step `step_text` sampled under `node` is terminal (answer step or depth limit)."""
        return int(self.tree.depth[node]) + 1 >= self.max_depth or self.is_terminal(step_text)

    def compute_tokens(self) -> int:
        """Token positions a perfect prefix cache computes for this tree: every stored token (prompt and
        steps) except the last token of each trajectory-ending step that did not end in EOS (sampled from its
        predecessor's logits, never fed). With no eviction, forward tokens equal this."""
        return self.tree.num_tokens - self.unfed

    def trajectory_stop(self) -> StopRule:
        """The stop rule of one root-to-terminal path of this tree, for a chain sampled without a tree."""
        return StopRule.trajectory(step_tokens=self.step_tokens, max_depth=self.max_depth,
                                   is_terminal=self.is_terminal)

    def text(self, node: int) -> str:
        """The solution text from the first step through `node` (prompt excluded; decoded once per node)."""
        text = self._texts.get(node)
        if text is None:
            ids = self.tree.path_tokens(node)[int(self.tree.tok_len[0]) :]
            text = self._texts[node] = self.policy.decode(ids.tolist())
        return text

    def _is_duplicate(self, node: int, toks: np.ndarray, new: list[np.ndarray]) -> bool:
        """State merge against `node`'s children and this round's `new` steps (exact repeats: a set lookup)."""
        if self.merge_distance < 0:
            return False
        if self.merge_distance == 0:
            return toks.tobytes() in self._steps.get(node, ())
        for other in [*(self.tree.step_tokens(int(c)) for c in self.tree.children(node)), *new]:
            if abs(len(other) - len(toks)) <= self.merge_distance and \
                    edit_distance(other, toks) <= self.merge_distance:
                return True
        return False

    def expand(self, nodes: Sequence[int], counts: int | Sequence[int], *, seed: int,
               merge: bool = True, temperature: float | None = None) -> list[list[int]]:
        """Sample `counts[i]` next steps of `nodes[i]`; returns the ids of the children actually added.
        `merge=False` keeps every sample (no state merge), e.g. along a branch.

        With `exclude_existing`, the samples of one node are drawn in rounds of one (all nodes batched in each
        round), each round excluding every child drawn before, so no sample repeats a sibling.
        """
        counts = [counts] * len(nodes) if isinstance(counts, int) else list(counts)
        temp = self.temperature if temperature is None else temperature
        if self.exclude_existing and max(counts, default=0) > 1:
            added: list[list[int]] = [[] for _ in nodes]
            for r in range(max(counts)):
                todo = [i for i, c in enumerate(counts) if c > r]
                for i, kids in zip(todo, self._expand_once([nodes[i] for i in todo], [1] * len(todo),
                                                            seed=seed + 7_919 * r, merge=merge, temperature=temp),
                                   strict=True):
                    added[i] += kids
            return added
        return self._expand_once(nodes, counts, seed=seed, merge=merge, temperature=temp)

    def _expand_once(self, nodes: Sequence[int], counts: list[int], *, seed: int, merge: bool,
                     temperature: float) -> list[list[int]]:
        out: list[list[int]] = []
        stop = StopRule(at_newline=True, max_new_tokens=self.step_tokens)
        per_call = max(1, self.batch_size // max(1, max(counts, default=1)))
        for i in range(0, len(nodes), per_call):
            chunk, chunk_counts = list(nodes[i : i + per_call]), counts[i : i + per_call]
            t0 = time.perf_counter()
            parents = self.parents(chunk)
            exclude = [self._excl.get(n, []) for n in chunk] if self.exclude_existing else None
            ends: dict[tuple[int, str], bool] = {}  # the policy's `final` verdicts, reused by `_add`

            def final(j: int, text: str, chunk: list[int] = chunk, ends: dict = ends) -> bool:
                done = ends[(chunk[j], text)] = self.ends_trajectory(chunk[j], text)
                return done

            t1 = time.perf_counter()
            results = self.policy.expand(parents, chunk_counts, stop=stop, temperature=temperature,
                                         seed=seed * 1_000_003 + i, store=self.store, exclude=exclude, final=final)
            t2 = time.perf_counter()
            for node, conts in zip(chunk, results, strict=True):
                out.append(self._add(node, conts, merge, ends))
            t3 = time.perf_counter()
            self.timing.model += t2 - t1
            self.timing.tree += (t1 - t0) + (t3 - t2)
            self.timing.calls += 1
        return out

    def _add(self, node: int, conts: list[Continuation], merge: bool,
             ends: dict[tuple[int, str], bool] | None = None) -> list[int]:
        added: list[int] = []
        new_toks: list[np.ndarray] = []
        seen = self._steps.setdefault(node, set())
        for c in conts:
            toks = np.asarray(c.token_ids[:-1] if c.finish == "eos" else c.token_ids, np.int32)
            if merge and self._is_duplicate(node, toks, new_toks):
                self.merged += 1
                continue
            done = c.finish == "eos" or (ends or {}).get((node, c.text))
            if done is None:
                done = self.ends_trajectory(node, c.text)
            child = add_child(self.tree, node, toks, log_prior=float(c.logprobs.sum(dtype=np.float64)),
                              terminal=done)
            self.unfed += int(done and c.finish != "eos")
            self.samples[child] = (c.token_ids, c.logprobs)
            self._excl.setdefault(node, []).append(self.samples[child])
            seen.add(toks.tobytes())
            added.append(child)
            new_toks.append(toks)
        return added

    def complete(self, nodes: Sequence[int], *, seed: int, temperature: float | None = None) -> list[int]:
        """Extend each node one step at a time (one sample per step, at `temperature`, default the builder's;
        0 = greedy) until terminal; returns the leaves.

        De-duplication does not apply along a branch: each branch is one new trajectory.
        """
        leaves = list(nodes)
        open_idx = [i for i, n in enumerate(leaves) if not self.tree.terminal[n]]
        step = 0
        while open_idx:
            kids = self.expand([leaves[i] for i in open_idx], 1, seed=seed * 7919 + step, merge=False,
                               temperature=temperature)
            for i, k in zip(open_idx, kids, strict=True):
                leaves[i] = k[0]
            open_idx = [i for i in open_idx if not self.tree.terminal[leaves[i]]]
            step += 1
        return leaves
