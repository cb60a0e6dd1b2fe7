"""The search tree as a struct of preallocated arrays (mctx's `Tree`), and its numba kernels.

Node index = creation order, root = 0. Capacity is fixed up front (`max_nodes`, `max_tokens`); adding past it
raises `TreeFullError` instead of writing out of bounds. Each node is one reasoning step (an option); its
tokens are the span `tokens[tok_start[n] : tok_start[n] + tok_len[n]]` of one flat buffer, the root's span is
the prompt. Kernels take arrays, never Python objects, and are compiled with `cache=True` because every
pipeline stage is its own process.

Statistics (DESIGN.md, "eta-MCTS"): `visits[n]` = N(s), `value_sum[n]` = W(s), Q(s) = W/N. Virtual loss
(batched selection): a node on a path selected but not yet backed up has `virtual[n] > 0`; selection sees it as
`N + virtual` visits with `W - virtual * vl_value`, so B selections in one batch spread over the tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

ROOT = 0
NO_PARENT = -1
NO_CHILD = -1


class TreeFullError(RuntimeError):
    """The tree's node or token capacity is exhausted."""


@dataclass
class Tree:
    """Arrays of capacity N = max_nodes (and T = max_tokens for the token buffer)."""

    parent: np.ndarray  # [N] int32, NO_PARENT for the root
    depth: np.ndarray  # [N] int32, root 0
    first_child: np.ndarray  # [N] int32, NO_CHILD if none
    next_sibling: np.ndarray  # [N] int32, NO_CHILD if last
    num_children: np.ndarray  # [N] int32
    visits: np.ndarray  # [N] int32, N(s)
    value_sum: np.ndarray  # [N] float64, W(s)
    virtual: np.ndarray  # [N] int32, pending virtual losses
    prior: np.ndarray  # [N] float32, P(s) for PUCT (policy prob of the step)
    critic_score: np.ndarray  # [N] float32, node score from the scorer, NaN if unscored
    terminal: np.ndarray  # [N] bool
    reward: np.ndarray  # [N] float32, outcome at terminals, NaN elsewhere
    tok_start: np.ndarray  # [N] int64, start of the node's step in `tokens`
    tok_len: np.ndarray  # [N] int32
    tokens: np.ndarray  # [T] int32, flat token buffer
    counts: np.ndarray  # [2] int64: (num_nodes, num_tokens)

    @property
    def num_nodes(self) -> int:
        return int(self.counts[0])

    @property
    def num_tokens(self) -> int:
        return int(self.counts[1])

    @property
    def capacity(self) -> int:
        return len(self.parent)

    def q(self) -> np.ndarray:
        """[num_nodes] Q = W / N (NaN where unvisited)."""
        n = self.num_nodes
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.visits[:n] > 0, self.value_sum[:n] / np.maximum(self.visits[:n], 1), np.nan)

    def step_tokens(self, node: int) -> np.ndarray:
        s = int(self.tok_start[node])
        return self.tokens[s : s + int(self.tok_len[node])]

    def path(self, node: int) -> np.ndarray:
        """[depth+1] node ids from the root to `node`."""
        return path_to_root(self.parent, node)[::-1].copy()

    def path_tokens(self, node: int) -> np.ndarray:
        """All tokens from the prompt through `node`'s step (one kernel call: this is on the expansion path)."""
        return gather_path_tokens(self.parent, self.tok_start, self.tok_len, self.tokens, node)

    def children(self, node: int) -> np.ndarray:
        return children_of(self.first_child, self.next_sibling, node)



def new_tree(max_nodes: int, max_tokens: int, root_tokens: np.ndarray | list[int]) -> Tree:
    """An empty tree whose root holds the prompt tokens."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes={max_nodes}: need at least 1 (the root)")
    n, t = max_nodes, max_tokens
    tree = Tree(
        parent=np.full(n, NO_PARENT, np.int32), depth=np.zeros(n, np.int32),
        first_child=np.full(n, NO_CHILD, np.int32), next_sibling=np.full(n, NO_CHILD, np.int32),
        num_children=np.zeros(n, np.int32), visits=np.zeros(n, np.int32), value_sum=np.zeros(n, np.float64),
        virtual=np.zeros(n, np.int32), prior=np.ones(n, np.float32), critic_score=np.full(n, np.nan, np.float32),
        terminal=np.zeros(n, np.bool_), reward=np.full(n, np.nan, np.float32), tok_start=np.zeros(n, np.int64),
        tok_len=np.zeros(n, np.int32), tokens=np.zeros(t, np.int32), counts=np.zeros(2, np.int64),
    )
    root = np.asarray(root_tokens, np.int32)
    if len(root) > t:
        raise TreeFullError(f"prompt of {len(root)} tokens exceeds max_tokens={t}")
    tree.tokens[: len(root)] = root
    tree.tok_len[ROOT] = len(root)
    tree.counts[:] = (1, len(root))
    return tree


def add_child(tree: Tree, parent: int, step_tokens: np.ndarray | list[int], *, prior: float = 1.0,
              terminal: bool = False, reward: float = np.nan) -> int:
    """Append a child of `parent` holding `step_tokens`; returns its index."""
    toks = np.asarray(step_tokens, np.int32)
    idx = _add_child(tree.parent, tree.depth, tree.first_child, tree.next_sibling, tree.num_children,
                     tree.prior, tree.terminal, tree.reward, tree.tok_start, tree.tok_len, tree.tokens, tree.counts,
                     parent, toks, prior, terminal, reward)
    if idx == -1:
        raise TreeFullError(f"tree is full: {tree.num_nodes}/{tree.capacity} nodes, "
                            f"{tree.num_tokens}/{len(tree.tokens)} tokens; raise max_nodes/max_tokens")
    if idx == -2:
        raise IndexError(f"parent {parent} is not a node of this tree ({tree.num_nodes} nodes)")
    return int(idx)


@nb.njit(cache=True)
def _add_child(parent, depth, first_child, next_sibling, num_children, prior, terminal, reward, tok_start,
               tok_len, tokens, counts, p, step, p_prior, is_terminal, r):  # pragma: no cover - numba
    n, t = counts[0], counts[1]
    if p < 0 or p >= n:
        return -2
    if n >= parent.shape[0] or t + step.shape[0] > tokens.shape[0]:
        return -1
    parent[n] = p
    depth[n] = depth[p] + 1
    # append as the last sibling, so children are listed in creation order
    if first_child[p] == -1:
        first_child[p] = n
    else:
        c = first_child[p]
        while next_sibling[c] != -1:
            c = next_sibling[c]
        next_sibling[c] = n
    num_children[p] += 1
    prior[n] = p_prior
    terminal[n] = is_terminal
    reward[n] = r
    tok_start[n] = t
    tok_len[n] = step.shape[0]
    tokens[t : t + step.shape[0]] = step
    counts[0] = n + 1
    counts[1] = t + step.shape[0]
    return n


@nb.njit(cache=True)
def path_to_root(parent, node):  # pragma: no cover - numba
    """[depth+1] node ids from `node` up to the root."""
    out = np.empty(64, np.int32)
    k = 0
    while node != -1:
        if k == out.shape[0]:
            bigger = np.empty(out.shape[0] * 2, np.int32)
            bigger[:k] = out[:k]
            out = bigger
        out[k] = node
        k += 1
        node = parent[node]
    return out[:k]


@nb.njit(cache=True)
def gather_path_tokens(parent, tok_start, tok_len, tokens, node):  # pragma: no cover - numba
    """Concatenated step tokens from the root to `node`."""
    path = path_to_root(parent, node)
    total = 0
    for i in range(path.shape[0]):
        total += tok_len[path[i]]
    out = np.empty(total, np.int32)
    k = 0
    for i in range(path.shape[0] - 1, -1, -1):
        n = path[i]
        out[k : k + tok_len[n]] = tokens[tok_start[n] : tok_start[n] + tok_len[n]]
        k += tok_len[n]
    return out


@nb.njit(cache=True)
def children_of(first_child, next_sibling, node):  # pragma: no cover - numba
    """Children of `node` in creation order."""
    k = 0
    c = first_child[node]
    while c != -1:
        k += 1
        c = next_sibling[c]
    out = np.empty(k, np.int32)
    c = first_child[node]
    for i in range(k):
        out[i] = c
        c = next_sibling[c]
    return out
