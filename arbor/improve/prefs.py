"""Step-level preference pairs from sibling subtrees (DESIGN.md, "Preferences and policy training").

Siblings share their prefix, so one outcome reward per trajectory turns into step-level preferences at every
depth with no step annotation: at every node with at least two valued children, children a, b whose values
differ by at least `margin` give the pair (prefix = prompt + steps to the node, chosen = the better step,
rejected = the worse), with `gap = v(chosen) - v(rejected)` (Step-DPO, arXiv 2406.18629, and the tree-built
pairs of AlphaLLM-style self-improvement; all depths are kept, depth is a column).

A step's value v (`PrefsConfig.value`):
- `policy`: the policy's expected outcome from the step, estimated on the tree: a scored terminal is worth its
  reward, an inner node the average of its valued children weighted by the policy, P(a|s) renormalised over
  them (softmax of their `log_prior`; `policy_values`). Search widens a node with steps sampled without
  replacement, so the tree holds low-probability siblings far more often than the policy produces them (a
  correct state's answer line gets "Answer: 11", "Answer: 2", ... beside the right one); weighting by the
  policy undoes that, where a plain mean would count each forced wrong sibling as often as the likely one;
- `mc`: the plain Monte Carlo mean outcome reward of the scored terminals in its subtree (`mc_counts` of
  arbor/critics/labels.py);
  with either, a step needs `min_terminals` scored terminals below it, an unexpanded leaf has none (no value);
- `q`: the search's backed-up Q = W / N (includes the scorer's values of inner nodes), visited steps only;
- `critic`: the node's own `critic_score` (the critic's estimate of the state after the step).

On-policy steps only (`min_step_prob`): search widens a node with steps sampled without replacement, so a
tree holds steps the policy almost never takes, and the outcome reward makes some of them look good. After a
wrong intermediate result, the gold answer is among the answer lines sampled without replacement ("...=26"
then "Answer: 27", probability ~4e-4) and earns reward 1: a pair (chosen "Answer: 27", rejected "Answer: 26")
teaches the policy to write a number other than the one it computed. Pushing down a rejected step the policy
never takes teaches nothing and displaces the likelihood of similar correct steps. On the tiny default's
iteration-1 trees 356 of 406 pairs were such answer lines and step-DPO on them broke the policy (greedy pass@1
0.47 -> 0.13); both steps of a pair must have probability >= `min_step_prob` under the policy that grew the
tree (their `log_prior`). The Tree-GRPO view applies the same rule to every step of a trajectory. With
`step_prob: token` the floor bounds the geometric-mean token probability instead: a 12-token sentence of a real
model has a whole-step probability far below 0.01 however typical it is (SmolLM2-135M: 75% of its steps fall
below 0.01, median per-token probability 0.44).

The pairing walks the tree arrays in a numba kernel (`sibling_pairs`); rows are built per tree in Python.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import pyarrow as pa

from arbor.critics.labels import TreeArrays, mc_counts, policy_values
from arbor.improve.config import PrefsConfig
from arbor.mcts.tree import gather_path_tokens

PAIR_SCHEMA = pa.schema([
    ("problem_id", pa.string()), ("node", pa.int32()), ("depth", pa.int32()),
    ("chosen_node", pa.int32()), ("rejected_node", pa.int32()),
    ("prefix", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("chosen_value", pa.float64()), ("rejected_value", pa.float64()), ("gap", pa.float64()),
    ("chosen_visits", pa.int32()), ("rejected_visits", pa.int32()),
    ("chosen_terminals", pa.int32()), ("rejected_terminals", pa.int32()),
    ("prefix_ids", pa.list_(pa.int32())), ("chosen_ids", pa.list_(pa.int32())),
    ("rejected_ids", pa.list_(pa.int32())),
])
"""One row per pair: `node` is the shared parent, `depth` the depth of the two steps (1 = first step)."""

_TOL = 1e-9  # a gap equal to the margin up to float rounding counts (0.7 - 0.4 = 0.29999999999999993)


class ScoredTree(TreeArrays):
    """`TreeArrays` plus the search statistics that value steps: visits, q, critic_score, group."""

    def __init__(self, rows: pa.Table) -> None:
        super().__init__(rows)
        rows = rows.sort_by("node")
        col = rows.column
        self.visits = col("visits").to_numpy().astype(np.int64)
        self.q = col("q").to_numpy(zero_copy_only=False).astype(np.float64)
        self.critic_score = col("critic_score").to_numpy(zero_copy_only=False).astype(np.float64)
        self.group = col("group").to_numpy().astype(np.int32)

    def step_logp(self, per_token: bool = False) -> np.ndarray:
        """[N] log-probability of each node's step under the policy that grew the tree (`log_prior`), or with
        `per_token` its mean per token (the log of the geometric-mean token probability; `prefs.step_prob`)."""
        return self.log_prior / np.maximum(self.tok_len, 1) if per_token else self.log_prior

    def path_ids(self, node: int) -> np.ndarray:
        """[L] token ids from the prompt through `node`'s step (numba path walk)."""
        return gather_path_tokens(self.parent, self.tok_start, self.tok_len, self.tokens, node)

    def step_ids(self, node: int) -> np.ndarray:
        """[tok_len[node]] token ids of `node`'s own step."""
        s = int(self.tok_start[node])
        return self.tokens[s: s + int(self.tok_len[node])]


def node_values(tree: ScoredTree, how: str, min_terminals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(value [N] float64, NaN = no value; terminals [N] int64, scored terminals in each subtree)."""
    z = np.zeros(len(tree), np.int64)
    n, _, total = mc_counts(tree.parent, tree.terminal, tree.reward, tree.solved, z, z, z.astype(np.float64))
    if how == "policy":
        v = policy_values(tree.parent, tree.log_prior, tree.terminal, tree.reward, z, z.astype(np.float64))
        value = np.where(n >= min_terminals, v, np.nan)
    elif how == "mc":
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(n >= min_terminals, total / np.maximum(n, 1), np.nan)
    elif how == "q":
        value = np.where(tree.visits > 0, tree.q, np.nan)
    elif how == "critic":
        value = tree.critic_score.copy()
    else:
        raise ValueError(f"value={how!r}: expected one of policy, mc, q, critic")
    return value, n


@nb.njit(cache=True)
def sibling_pairs(parent, value, margin):  # pragma: no cover - numba
    """(node, chosen, rejected) [P] int32 each: every pair of children of a node, both with a value (not NaN),
    whose values differ by at least `margin`; chosen = the higher. parent [N] int32 (parent[i] < i, root -1),
    value [N] float64. Pairs are ordered by node, then by the children's creation order."""
    n = parent.shape[0]
    start = np.zeros(n + 1, np.int64)
    for i in range(1, n):
        start[parent[i] + 1] += 1
    for i in range(n):
        start[i + 1] += start[i]
    kids = np.empty(max(n - 1, 0), np.int32)
    fill = start[:-1].copy()
    for i in range(1, n):  # creation order: each node's children stay in creation order
        kids[fill[parent[i]]] = i
        fill[parent[i]] += 1
    cap = 0
    for p in range(n):
        k = start[p + 1] - start[p]
        cap += k * (k - 1) // 2
    node = np.empty(cap, np.int32)
    chosen = np.empty(cap, np.int32)
    rejected = np.empty(cap, np.int32)
    m = 0
    for p in range(n):
        for x in range(start[p], start[p + 1]):
            a = kids[x]
            if np.isnan(value[a]):
                continue
            for y in range(x + 1, start[p + 1]):
                b = kids[y]
                if np.isnan(value[b]):
                    continue
                g = value[a] - value[b]
                if abs(g) >= margin - _TOL:
                    node[m] = p
                    chosen[m] = a if g > 0 else b
                    rejected[m] = b if g > 0 else a
                    m += 1
    return node[:m], chosen[:m], rejected[:m]


def _cap_per_node(node: np.ndarray, gap: np.ndarray, cap: int) -> np.ndarray:
    """Indices of the pairs kept when each node keeps its `cap` largest gaps (stable; 0 = all), in order."""
    if cap <= 0:
        return np.arange(len(node))
    order = np.lexsort((-gap, node))  # by node, then largest gap first
    rank = np.zeros(len(node), np.int64)
    for j in range(1, len(order)):
        same = node[order[j]] == node[order[j - 1]]
        rank[order[j]] = rank[order[j - 1]] + 1 if same else 0
    return np.flatnonzero(rank < cap)


def tree_pairs(tree: ScoredTree, cfg: PrefsConfig, prompt: str | None = None) -> dict[str, list]:
    """PAIR_SCHEMA columns of one tree's pairs. `prompt` is the prompt text (default: the root row's text)."""
    value, terms = node_values(tree, cfg.value, cfg.min_terminals)
    node, chosen, rejected = sibling_pairs(tree.parent, value, cfg.margin)
    if cfg.min_step_prob > 0:
        floor, logp = np.log(cfg.min_step_prob), tree.step_logp(cfg.step_prob == "token")
        likely = (logp[chosen] >= floor) & (logp[rejected] >= floor)
        node, chosen, rejected = node[likely], chosen[likely], rejected[likely]
    gap = value[chosen] - value[rejected]
    keep = _cap_per_node(node, gap, cfg.max_pairs_per_node)
    prompt = tree.step_text[0] if prompt is None else prompt
    cols: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
    for j in keep.tolist():
        p, c, r = int(node[j]), int(chosen[j]), int(rejected[j])
        row = {
            "problem_id": tree.problem_id, "node": p, "depth": int(tree.depth[c]), "chosen_node": c,
            "rejected_node": r, "prefix": prompt + tree.solution_text(p),
            "chosen": tree.step_text[c], "rejected": tree.step_text[r],
            "chosen_value": float(value[c]), "rejected_value": float(value[r]), "gap": float(gap[j]),
            "chosen_visits": int(tree.visits[c]), "rejected_visits": int(tree.visits[r]),
            "chosen_terminals": int(terms[c]), "rejected_terminals": int(terms[r]),
            "prefix_ids": tree.path_ids(p).tolist(), "chosen_ids": tree.step_ids(c).tolist(),
            "rejected_ids": tree.step_ids(r).tolist(),
        }
        for k, v in row.items():
            cols[k].append(v)
    return cols


GAP_BUCKET = 0.25  # metrics: pair counts per gap bucket [0, .25), [.25, .5), [.5, .75), [.75, 1]


def pair_counts(table: pa.Table) -> dict[str, int]:
    """Pair counts: `pairs`, `pair_problems` (problems with a pair), `pairs_depth_<d>` per step depth and
    `pairs_gap_<lo>_<hi>` per gap bucket of width 0.25 (the last one holds gaps of 0.75 up to 1)."""
    depth = np.asarray(table.column("depth").to_pylist(), np.int64)
    gap = np.asarray(table.column("gap").to_pylist(), np.float64)
    out = {"pairs": len(depth), "pair_problems": len(set(table.column("problem_id").to_pylist()))}
    for d in sorted(set(depth.tolist())):
        out[f"pairs_depth_{d}"] = int((depth == d).sum())
    n_buckets = round(1 / GAP_BUCKET)
    bucket = np.minimum(np.floor((gap + _TOL) / GAP_BUCKET), n_buckets - 1).astype(np.int64)
    for b in range(n_buckets):
        out[f"pairs_gap_{b * GAP_BUCKET:.2f}_{(b + 1) * GAP_BUCKET:.2f}"] = int((bucket == b).sum())
    return out
