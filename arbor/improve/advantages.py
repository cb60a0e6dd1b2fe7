"""The Tree-GRPO view of search trees: every root-to-leaf trajectory with its intra- and inter-tree advantage.

Tree-GRPO (arXiv 2509.21240, §3) standardises each leaf trajectory's outcome reward R twice:

    A = (R - mean_tree) / std_tree + (R - mean_prompt) / std_prompt

`mean/std_tree` over the leaves of the leaf's own tree, `mean/std_prompt` over every leaf of the prompt (all
its trees); intra-tree advantages alone collapse training (their Table 4), and under 0/1 rewards the intra-tree
term has the step-level DPO form (their Prop. 3.1). Std is the population std; a group whose rewards are all
equal (std = 0) gives 0, not a division by zero.

Which leaves form "a tree": Tree-GRPO sampling (`search.algorithm: tree_grpo`) records its tree index per node
in the `group` column, and that is used. An eta-MCTS or chain tree is one tree per prompt (`group` = -1); its
subtrees under each first step play the part of Tree-GRPO's M trees (each starts from one first step, as each
Tree-GRPO tree starts from one chain), so the intra term compares trajectories that share their first step and
the inter term compares all of them. A leaf is a terminal with a known reward; open (unexpanded) leaves are not
trajectories and are left out, and so are trajectories with a step the policy takes less often than
`min_step_prob` (a step forced by sampling without replacement: the advantages assume samples of the policy,
and a forced lucky final answer would be rewarded for not following from the computation; see
arbor/improve/prefs.py).
"""

from __future__ import annotations

import numba as nb
import numpy as np
import pyarrow as pa

from arbor.improve.prefs import ScoredTree

TRAJECTORY_SCHEMA = pa.schema([
    ("problem_id", pa.string()), ("leaf", pa.int32()), ("depth", pa.int32()), ("tree", pa.int32()),
    ("reward", pa.float64()), ("adv_intra", pa.float64()), ("adv_inter", pa.float64()),
    ("advantage", pa.float64()), ("leaf_visits", pa.int32()), ("min_step_logp", pa.float64()), ("text", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())), ("completion_ids", pa.list_(pa.int32())),
])
"""One row per trajectory: `tree` is the intra-tree group (the `group` index, else the first step's node id);
`completion_ids` are the step tokens from the first step through the leaf's, `prompt_ids` the root's;
`min_step_logp` is the least log-prior of its steps."""


@nb.njit(cache=True)
def first_step(parent):  # pragma: no cover - numba
    """[N] int32: the depth-1 ancestor of every node (itself at depth 1; -1 for the root). parent[i] < i."""
    n = parent.shape[0]
    out = np.full(n, -1, np.int32)
    for i in range(1, n):
        out[i] = i if parent[i] == 0 else out[parent[i]]
    return out


@nb.njit(cache=True)
def path_min(parent, log_prior):  # pragma: no cover - numba
    """[N] float64: the least log-prior of the steps from the first step through each node (0 at the root)."""
    n = parent.shape[0]
    out = np.zeros(n, np.float64)
    for i in range(1, n):
        out[i] = log_prior[i] if parent[i] == 0 else min(out[parent[i]], log_prior[i])
    return out


@nb.njit(cache=True)
def standardize(group, r):  # pragma: no cover - numba
    """[L] (r - mean_g) / std_g with mean and population std over the entries of the same `group` id (dense
    ids 0..G-1); 0 where a group's std is 0. group [L] int64, r [L] float64."""
    g_n = 0
    for i in range(group.shape[0]):
        g_n = max(g_n, group[i] + 1)
    cnt = np.zeros(g_n, np.float64)
    s1 = np.zeros(g_n, np.float64)
    s2 = np.zeros(g_n, np.float64)
    for i in range(group.shape[0]):
        cnt[group[i]] += 1.0
        s1[group[i]] += r[i]
    mean = s1 / np.maximum(cnt, 1.0)
    for i in range(group.shape[0]):
        d = r[i] - mean[group[i]]
        s2[group[i]] += d * d
    std = np.sqrt(s2 / np.maximum(cnt, 1.0))
    out = np.zeros(group.shape[0], np.float64)
    for i in range(group.shape[0]):
        if std[group[i]] > 1e-12:
            out[i] = (r[i] - mean[group[i]]) / std[group[i]]
    return out


def leaf_advantages(tree: ScoredTree, min_step_prob: float = 0.0, per_token: bool = False) -> dict[str, np.ndarray]:
    """{"leaf", "tree", "reward", "adv_intra", "adv_inter", "advantage", "min_step_logp"}, one [L] entry per
    scored terminal whose every step has probability >= `min_step_prob` (with `per_token`, its geometric-mean
    token probability: `ScoredTree.step_logp`)."""
    low = path_min(tree.parent, tree.step_logp(per_token))
    floor = np.log(min_step_prob) if min_step_prob > 0 else -np.inf
    leaf = np.flatnonzero(tree.terminal & ~np.isnan(tree.reward) & (low >= floor)).astype(np.int32)
    reward = tree.reward[leaf].astype(np.float64)
    own = np.where(tree.group[leaf] >= 0, tree.group[leaf], first_step(tree.parent)[leaf]).astype(np.int32)
    dense = np.unique(own, return_inverse=True)[1].astype(np.int64)
    intra = standardize(dense, reward)
    inter = standardize(np.zeros(len(leaf), np.int64), reward)
    return {"leaf": leaf, "tree": own, "reward": reward, "adv_intra": intra, "adv_inter": inter,
            "advantage": intra + inter, "min_step_logp": low[leaf]}


def tree_trajectories(tree: ScoredTree, min_step_prob: float = 0.0, per_token: bool = False) -> dict[str, list]:
    """TRAJECTORY_SCHEMA columns of one tree's trajectories (those whose steps all have probability >=
    `min_step_prob`)."""
    adv = leaf_advantages(tree, min_step_prob, per_token)
    prompt_len = int(tree.tok_len[0])
    prompt_ids = tree.tokens[:prompt_len].tolist()
    cols: dict[str, list] = {name: [] for name in TRAJECTORY_SCHEMA.names}
    for j, node in enumerate(adv["leaf"].tolist()):
        row = {
            "problem_id": tree.problem_id, "leaf": node, "depth": int(tree.depth[node]), "tree": int(adv["tree"][j]),
            "reward": float(adv["reward"][j]), "adv_intra": float(adv["adv_intra"][j]),
            "adv_inter": float(adv["adv_inter"][j]), "advantage": float(adv["advantage"][j]),
            "leaf_visits": int(tree.visits[node]), "min_step_logp": float(adv["min_step_logp"][j]),
            "text": tree.solution_text(node), "prompt_ids": prompt_ids,
            "completion_ids": tree.path_ids(node)[prompt_len:].tolist(),
        }
        for k, v in row.items():
            cols[k].append(v)
    return cols
