"""Numba kernels over `Tree` arrays: batched selection with virtual loss, backup, sibling stats, read-outs.

Selection scores (DESIGN.md, eta-MCTS; AlphaLLM arXiv 2404.12253 §4.3):
  UCT:  Q(s,a) + c * sqrt(ln N(s) / N(s,a))                   (unvisited children first, in creation order)
  PUCT: Q(s,a) + c * P(s,a) * sqrt(N(s)) / (1 + N(s,a))       (unvisited children have Q = 0)
with N and Q including pending virtual losses: N' = N + v, W' = W - v * vl_value; P(s,a) is the policy
renormalised over the siblings (`Tree.prior`, from log priors). Ties go to the earlier child. A NaN Q (a NaN
value backed up) counts as 0, like an unknown node, so selection always returns a node.
Children are read from the contiguous table `children_index[N, C]` (`num_children[N]` per row).
All kernels are deterministic and `cache=True`.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from arbor.mcts.tree import Tree

UCT = 0
PUCT = 1


@nb.njit(cache=True, error_model="numpy")
def _select_one(children_index, num_children, visits, value_sum, virtual, prior, expanded, terminal, c, rule,
                vl_value, buf):  # pragma: no cover - numba
    """Walk from the root to a leaf by the highest child score (ties and all-NaN scores: the earliest child).

    Per node: the children's statistics are gathered into `buf` (float64 [4, C], allocated once per call),
    their scores computed in one branch-free loop (the module docstring's formulas; an unvisited child's UCT
    is inf, a NaN Q counts as 0; the compiler can vectorize its divisions and square roots, and
    error_model="numpy" lets a 0/0 through to be masked), then the first maximum taken. The parent term
    (ln N(s) or sqrt N(s)) is computed once per node.
    """
    nn, ww, vv, sc = buf[0], buf[1], buf[2], buf[3]
    node = 0
    while expanded[node] and not terminal[node] and num_children[node] > 0:
        k = num_children[node]
        row = children_index[node]
        for i in range(k):  # the scattered loads, once
            ch = row[i]
            nn[i] = visits[ch] + virtual[ch]
            ww[i] = value_sum[ch]
            vv[i] = virtual[ch]
        n_parent = visits[node] + virtual[node]
        if rule == UCT:
            log_n = np.log(max(n_parent, 1))
            for i in range(k):
                q = (ww[i] - vv[i] * vl_value) / nn[i]
                q = 0.0 if np.isnan(q) else q
                sc[i] = np.inf if nn[i] == 0 else q + c * np.sqrt(log_n / nn[i])
        else:
            sqrt_n = np.sqrt(n_parent)
            for i in range(k):
                q = (ww[i] - vv[i] * vl_value) / nn[i]
                q = 0.0 if (nn[i] == 0 or np.isnan(q)) else q
                sc[i] = q + c * prior[row[i]] * sqrt_n / (1.0 + nn[i])
        best, best_score = row[0], -np.inf
        for i in range(k):
            if sc[i] > best_score:
                best, best_score = row[i], sc[i]
        node = best
    return node


@nb.njit(cache=True)
def _add_virtual(parent, virtual, node, delta):  # pragma: no cover - numba
    while node != -1:
        virtual[node] += delta
        node = parent[node]


@nb.njit(cache=True)
def _backup_one(parent, visits, value_sum, virtual, node, value, undo_virtual):  # pragma: no cover - numba
    while node != -1:
        visits[node] += 1
        value_sum[node] += value
        if undo_virtual:
            virtual[node] -= 1
        node = parent[node]


@nb.njit(cache=True)
def select_leaves(parent, children_index, num_children, visits, value_sum, virtual, prior, expanded, terminal,
                  num_select, c, rule, vl_value):  # pragma: no cover - numba
    """Select `num_select` leaves, one after another, adding a virtual loss along each path.

    A node is a leaf if it is terminal, not yet `expanded`, or has no children. At an inner node the child of
    highest score is taken (ties and all-NaN scores: the earliest child, so selection never fails). Returns
    int32[num_select] (a leaf may repeat when the tree is too small to spread the batch; callers de-duplicate).
    """
    out = np.empty(num_select, np.int32)
    buf = np.empty((4, children_index.shape[1]), np.float64)
    for b in range(num_select):
        out[b] = _select_one(children_index, num_children, visits, value_sum, virtual, prior, expanded, terminal,
                             c, rule, vl_value, buf)
        _add_virtual(parent, virtual, out[b], 1)
    return out


@nb.njit(cache=True)
def backup(parent, visits, value_sum, virtual, leaves, values, undo_virtual=True):  # pragma: no cover - numba
    """Add `values[i]` to every node from `leaves[i]` to the root; undo the virtual loss of that path.

    With `undo_virtual=False` no virtual loss is touched (backing up new children of a selected leaf whose own
    virtual loss was reverted separately).
    """
    for i in range(leaves.shape[0]):
        _backup_one(parent, visits, value_sum, virtual, leaves[i], values[i], undo_virtual)


@nb.njit(cache=True)
def simulate(parent, children_index, num_children, visits, value_sum, virtual, prior, expanded, terminal, values,
             c, rule, vl_value):  # pragma: no cover - numba
    """Run len(values) simulations of select(1) + backup(values[i]) in one compiled loop; returns the leaves.

    The bookkeeping of a search without the model: what `bench/kernels.py` times against pure Python.
    """
    out = np.empty(values.shape[0], np.int32)
    buf = np.empty((4, children_index.shape[1]), np.float64)
    for i in range(values.shape[0]):
        leaf = _select_one(children_index, num_children, visits, value_sum, virtual, prior, expanded, terminal, c,
                           rule, vl_value, buf)
        _add_virtual(parent, virtual, leaf, 1)
        _backup_one(parent, visits, value_sum, virtual, leaf, values[i], True)
        out[i] = leaf
    return out


@nb.njit(cache=True)
def revert_virtual_loss(parent, virtual, leaves):  # pragma: no cover - numba
    """Undo the virtual loss of selections that will not be backed up (e.g. duplicates in a batch)."""
    for i in range(leaves.shape[0]):
        x = leaves[i]
        while x != -1:
            virtual[x] -= 1
            x = parent[x]


@nb.njit(cache=True)
def sibling_stats(children_index, num_children, nodes, v):  # pragma: no cover - numba
    """For each s in `nodes`: the mean of v over its children and the importance I(s) = max_o |v(s,o) - v(s)|
    (AlphaLLM §4.4, adaptive branching). `v` [N] holds node values (NaN = unknown, skipped); where v(s) itself
    is unknown (the root), the children's mean stands in for it. Returns (mean [len(nodes)], importance
    [len(nodes)]), NaN for a node without a child of known value.
    """
    mean = np.full(nodes.shape[0], np.nan)
    imp = np.full(nodes.shape[0], np.nan)
    for i in range(nodes.shape[0]):
        row = children_index[nodes[i]]
        k = num_children[nodes[i]]
        total, known = 0.0, 0
        for j in range(k):
            if not np.isnan(v[row[j]]):
                total += v[row[j]]
                known += 1
        if known == 0:
            continue
        mean[i] = total / known
        own = v[nodes[i]] if not np.isnan(v[nodes[i]]) else mean[i]
        best = 0.0
        for j in range(k):
            if not np.isnan(v[row[j]]):
                best = max(best, abs(v[row[j]] - own))
        imp[i] = best
    return mean, imp


@nb.njit(cache=True)
def greedy_path(children_index, num_children, visits, value_sum):  # pragma: no cover - numba
    """Root-to-leaf path following the visited child of highest Q (ties: more visits, then earlier)."""
    out = np.empty(children_index.shape[0], np.int32)
    k, node = 0, 0
    while True:
        out[k] = node
        k += 1
        best, best_q, best_n = -1, -np.inf, -1
        for i in range(num_children[node]):
            ch = children_index[node, i]
            if visits[ch] > 0:
                q = value_sum[ch] / visits[ch]
                if q > best_q or (q == best_q and visits[ch] > best_n):
                    best, best_q, best_n = ch, q, visits[ch]
        if best == -1:
            return out[:k]
        node = best


@nb.njit(cache=True)
def best_leaf(num_children, visits, value_sum, terminal, num_nodes, terminals_only):  # pragma: no cover
    """The visited leaf (or terminal, if `terminals_only`) with the highest Q; -1 if none."""
    best, best_q = -1, -np.inf
    for s in range(num_nodes):
        if visits[s] == 0:
            continue
        if terminals_only and not terminal[s]:
            continue
        if not terminals_only and num_children[s] > 0:
            continue
        q = value_sum[s] / visits[s]
        if q > best_q:
            best, best_q = s, q
    return best


# -- thin typed wrappers -------------------------------------------------------------------------------------

def select(tree: Tree, expanded: np.ndarray, num_select: int, *, c: float = 1.0, rule: int = UCT,
           vl_value: float = 1.0) -> np.ndarray:
    """`select_leaves` on a `Tree`; `expanded` [N] bool marks nodes whose children have been generated."""
    return select_leaves(tree.parent, tree.children_index, tree.num_children, tree.visits, tree.value_sum,
                         tree.virtual, tree.prior, expanded, tree.terminal, num_select, float(c), rule,
                         float(vl_value))


def backup_values(tree: Tree, leaves: np.ndarray, values: np.ndarray, *, undo_virtual: bool = True) -> None:
    """`backup` on a `Tree`."""
    backup(tree.parent, tree.visits, tree.value_sum, tree.virtual, np.asarray(leaves, np.int32),
           np.asarray(values, np.float64), undo_virtual)


@nb.njit(cache=True)
def edit_distance(a, b):  # pragma: no cover - numba
    """Levenshtein distance between two int arrays (token or character codes); O(len(a) * len(b))."""
    n, m = a.shape[0], b.shape[0]
    prev = np.arange(m + 1)
    cur = np.empty(m + 1, np.int64)
    for i in range(1, n + 1):
        cur[0] = i
        for j in range(1, m + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
        prev, cur = cur, prev
    return prev[m]


def terminal_nodes(tree: Tree) -> np.ndarray:
    """Indices of terminal nodes (each defines one complete trajectory: its root path)."""
    return np.flatnonzero(tree.terminal[: tree.num_nodes]).astype(np.int32)
