"""eta-MCTS iteration kernels: each half of one iteration around the model call fused into one compiled call.

An iteration (AlphaLLM arXiv 2404.12253 §4.3-4.4; arbor/mcts/search.py) is select B leaves -> expand them (the
policy) -> score the new nodes (the scorer) -> back up and widen. Done as a dozen small numpy operations and
kernel calls per iteration, the Python overhead around the model was most of the search's tree work (issue #9,
bench/kernels.py); here each side of the model call is one kernel:

- `select_step`: batched selection with virtual loss, de-duplication of the batch (a repeated leaf's virtual loss
  is reverted), and the re-valuation of selected terminals by their stored score (backed up at once);
- `finish_step`: new nodes' scores stored and backed up, the expanded leaves' virtual loss reverted, importance
  I(s) = max_o |v(s,o) - v(s)| and branching targets n(s) = max(c_min(t), min(floor(alpha I(s)) + 1, c_max(t)))
  of the expanded leaves, new nodes starting at c_min, and the leaves' `expanded` flags (a leaf with fewer
  children than its target stays open: progressive widening, unless it was expanded `max_attempts` times).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from arbor.mcts.kernels import _backup_one, _select_one, sibling_stats


@nb.njit(cache=True)
def branching_target(imp, depth, alpha, c_min, c_max, c_max_root):  # pragma: no cover - numba
    """n(s) = max(c_min(t), min(floor(alpha * I(s)) + 1, c_max(t))), t = depth; c_min where I(s) is NaN (fewer than
    two scored children)."""
    if np.isnan(imp):
        return c_min
    top = c_max_root if depth == 0 else c_max
    return max(c_min, min(int(np.floor(alpha * imp)) + 1, top))


@nb.njit(cache=True)
def select_step(parent, children_index, num_children, visits, value_sum, virtual, prior, expanded, terminal,
                critic_score, num_select, c, rule, vl_value):  # pragma: no cover - numba
    """Select `num_select` leaves with virtual loss; returns (the distinct non-terminal leaves to expand, the
    distinct terminal leaves, the number of distinct leaves). A repeated leaf has its virtual loss reverted; a
    terminal leaf is backed up with its stored score (NaN as 0), which also removes its virtual loss."""
    leaves = np.empty(num_select, np.int32)
    buf = np.empty((4, children_index.shape[1]), np.float64)
    for b in range(num_select):
        x = _select_one(children_index, num_children, visits, value_sum, virtual, prior, expanded, terminal, c, rule,
                        vl_value, buf)
        leaves[b] = x
        y = x
        while y != -1:
            virtual[y] += 1
            y = parent[y]
    out = np.empty(num_select, np.int32)
    ends = np.empty(num_select, np.int32)
    k = e = unique = 0
    for b in range(num_select):
        x = leaves[b]
        repeated = False
        for a in range(b):
            if leaves[a] == x:
                repeated = True
                break
        if repeated:
            y = x
            while y != -1:
                virtual[y] -= 1
                y = parent[y]
            continue
        unique += 1
        if terminal[x]:
            v = critic_score[x]
            _backup_one(parent, visits, value_sum, virtual, x, 0.0 if np.isnan(v) else v, True)
            ends[e] = x
            e += 1
        else:
            out[k] = x
            k += 1
    return out[:k], ends[:e], unique


@nb.njit(cache=True)
def finish_step(parent, children_index, num_children, visits, value_sum, virtual, depth, critic_score, leaves, new,
                values, target, expanded, attempts, alpha, c_min, c_max, c_max_root,
                max_attempts):  # pragma: no cover - numba
    """After expanding `leaves` into `new` nodes valued `values`: see the module docstring."""
    for i in range(new.shape[0]):
        critic_score[new[i]] = values[i]
    for i in range(leaves.shape[0]):
        attempts[leaves[i]] += 1
        y = leaves[i]
        while y != -1:
            virtual[y] -= 1
            y = parent[y]
    for i in range(new.shape[0]):
        _backup_one(parent, visits, value_sum, virtual, new[i], values[i], False)
    _, imp = sibling_stats(children_index, num_children, leaves, critic_score)
    for i in range(leaves.shape[0]):
        x = leaves[i]
        target[x] = branching_target(imp[i], depth[x], alpha, c_min, c_max, c_max_root)
    for i in range(new.shape[0]):
        target[new[i]] = c_min
    for i in range(leaves.shape[0]):
        x = leaves[i]
        expanded[x] = num_children[x] >= target[x] or attempts[x] >= max_attempts
