"""The search tree as a struct of preallocated arrays (mctx's `Tree`), and its numba kernels.

Node index = creation order, root = 0. Capacity is fixed up front (`max_nodes`, `max_tokens`); adding past it
raises `TreeFullError` instead of writing out of bounds. Each node is one reasoning step (an option); its
tokens are the span `tokens[tok_start[n] : tok_start[n] + tok_len[n]]` of one flat buffer, the root's span is
the prompt. Kernels take arrays, never Python objects, and are compiled with `cache=True` because every
pipeline stage is its own process.

Children: a contiguous table as in mctx (`children_index[N, C]`, int32, `NO_CHILD`-padded, row n = n's
children in creation order, `num_children[n]` of them), so selection reads one row of contiguous indices
instead of chasing a first-child/next-sibling list. The width C is a capacity like `max_nodes`: `new_tree`
takes `max_children` (eta-MCTS sizes it from its config so that it is never exceeded, see
`search.max_children_bound`), and a node that outgrows it doubles the table (amortised O(1) per child, so
samplers with wide roots, e.g. G chains, still work; memory is N * C * 4 bytes).

Statistics (DESIGN.md, "eta-MCTS"): `visits[n]` = N(s), `value_sum[n]` = W(s), Q(s) = W/N. Virtual loss
(batched selection): a node on a path selected but not yet backed up has `virtual[n] > 0`; selection sees it as
`N + virtual` visits with `W - virtual * vl_value`, so B selections in one batch spread over the tree.

Priors live in log space: `log_prior[n]` = log pi(step_n | path to parent) = the sum of the step's token
log-probs (float64; a 40-token step at -3 nats per token is -120, which underflows float32 probabilities to 0).
PUCT uses `prior[n]` = P(s,a) = exp(log_prior[a] - logsumexp_b log_prior[b]) over the siblings b of a (the
policy renormalised over the expanded children, the usual PUCT prior), which `add_child` keeps up to date; it
is a cache of `log_prior`, never set directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

ROOT = 0
NO_PARENT = -1
NO_CHILD = -1
DEFAULT_MAX_CHILDREN = 16


class TreeFullError(RuntimeError):
    """The tree's node or token capacity is exhausted."""


@dataclass
class Tree:
    """Arrays of capacity N = max_nodes, C = max_children (grows on demand) and T = max_tokens."""

    parent: np.ndarray  # [N] int32, NO_PARENT for the root
    depth: np.ndarray  # [N] int32, root 0
    children_index: np.ndarray  # [N, C] int32, children in creation order, NO_CHILD-padded
    num_children: np.ndarray  # [N] int32
    visits: np.ndarray  # [N] int32, N(s)
    value_sum: np.ndarray  # [N] float64, W(s)
    virtual: np.ndarray  # [N] int32, pending virtual losses
    log_prior: np.ndarray  # [N] float64, log pi(step | parent), 0 for the root
    prior: np.ndarray  # [N] float64, P(s,a) for PUCT: softmax of log_prior over the siblings (a cache)
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

    @property
    def max_children(self) -> int:
        """C, the width of the children table."""
        return int(self.children_index.shape[1])

    @property
    def first_child(self) -> np.ndarray:
        """[N] view of the table's first column (NO_CHILD for a leaf): `first_child[n] != NO_CHILD` tests for
        children."""
        return self.children_index[:, 0]

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
        """[num_children[node]] children of `node` in creation order (a view of its table row)."""
        return self.children_index[node, : self.num_children[node]]


def new_tree(max_nodes: int, max_tokens: int, root_tokens: np.ndarray | list[int], *,
             max_children: int = DEFAULT_MAX_CHILDREN) -> Tree:
    """An empty tree whose root holds the prompt tokens."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes={max_nodes}: need at least 1 (the root)")
    if max_children < 1:
        raise ValueError(f"max_children={max_children}: need at least 1")
    n, t = max_nodes, max_tokens
    tree = Tree(
        parent=np.full(n, NO_PARENT, np.int32), depth=np.zeros(n, np.int32),
        children_index=np.full((n, max_children), NO_CHILD, np.int32), num_children=np.zeros(n, np.int32),
        visits=np.zeros(n, np.int32), value_sum=np.zeros(n, np.float64), virtual=np.zeros(n, np.int32),
        log_prior=np.zeros(n, np.float64), prior=np.ones(n, np.float64),
        critic_score=np.full(n, np.nan, np.float32), terminal=np.zeros(n, np.bool_),
        reward=np.full(n, np.nan, np.float32), tok_start=np.zeros(n, np.int64), tok_len=np.zeros(n, np.int32),
        tokens=np.zeros(t, np.int32), counts=np.zeros(2, np.int64),
    )
    root = np.asarray(root_tokens, np.int32)
    if len(root) > t:
        raise TreeFullError(f"prompt of {len(root)} tokens exceeds max_tokens={t}")
    tree.tokens[: len(root)] = root
    tree.tok_len[ROOT] = len(root)
    tree.counts[:] = (1, len(root))
    return tree


def reserve_children(tree: Tree, max_children: int) -> None:
    """Widen the children table to at least `max_children` columns (existing rows are kept)."""
    if max_children > tree.max_children:
        wider = np.full((tree.capacity, max_children), NO_CHILD, np.int32)
        n = tree.num_nodes  # rows past num_nodes are all padding
        wider[:n, : tree.max_children] = tree.children_index[:n]
        tree.children_index = wider


def add_child(tree: Tree, parent: int, step_tokens: np.ndarray | list[int], *, log_prior: float = 0.0,
              terminal: bool = False, reward: float = np.nan) -> int:
    """Append a child of `parent` holding `step_tokens`, with log pi(step | parent) = `log_prior`; returns its
    index. Renormalises the PUCT prior of `parent`'s children (see module docstring)."""
    toks = np.asarray(step_tokens, np.int32)
    if 0 <= parent < tree.num_nodes and tree.num_children[parent] >= tree.max_children:
        reserve_children(tree, 2 * tree.max_children)
    idx = _add_child(tree.parent, tree.depth, tree.children_index, tree.num_children, tree.log_prior, tree.prior,
                     tree.terminal, tree.reward, tree.tok_start, tree.tok_len, tree.tokens, tree.counts,
                     parent, toks, float(log_prior), terminal, reward)
    if idx == -1:
        raise TreeFullError(f"tree is full: {tree.num_nodes}/{tree.capacity} nodes, "
                            f"{tree.num_tokens}/{len(tree.tokens)} tokens; raise max_nodes/max_tokens")
    if idx == -2:
        raise IndexError(f"parent {parent} is not a node of this tree ({tree.num_nodes} nodes)")
    return int(idx)


@nb.njit(cache=True)
def sibling_prior(children_index, num_children, log_prior, prior, p):  # pragma: no cover - numba
    """prior[a] = exp(log_prior[a] - logsumexp(log_prior[children of p])) for every child a of p."""
    k = num_children[p]
    m = -np.inf
    for i in range(k):
        m = max(m, log_prior[children_index[p, i]])
    if not np.isfinite(m):  # every child has log-prior -inf (or NaN): uniform
        for i in range(k):
            prior[children_index[p, i]] = 1.0 / k
        return
    total = 0.0
    for i in range(k):
        total += np.exp(log_prior[children_index[p, i]] - m)
    for i in range(k):
        prior[children_index[p, i]] = np.exp(log_prior[children_index[p, i]] - m) / total


@nb.njit(cache=True)
def _add_child(parent, depth, children_index, num_children, log_prior, prior, terminal, reward, tok_start,
               tok_len, tokens, counts, p, step, p_log_prior, is_terminal, r):  # pragma: no cover - numba
    n, t = counts[0], counts[1]
    if p < 0 or p >= n:
        return -2
    if n >= parent.shape[0] or t + step.shape[0] > tokens.shape[0]:
        return -1
    parent[n] = p
    depth[n] = depth[p] + 1
    children_index[p, num_children[p]] = n  # the caller made room; appended, so rows keep creation order
    num_children[p] += 1
    log_prior[n] = p_log_prior
    sibling_prior(children_index, num_children, log_prior, prior, p)
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
