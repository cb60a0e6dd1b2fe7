"""Monte Carlo labels for the critics from search trees (AlphaLLM §4.3; Math-Shepherd, arXiv 2312.08935 §3.3).

A node's *completions* are the terminal nodes below it (itself, if terminal) whose `reward` is known (the
oracle reward written by `search`), plus extra policy completions sampled from the node where the tree gave it
fewer than `min_completions` (a completion from a node is also one from each of its ancestors, so extras are
added like virtual terminal children and summed upward). Per node, with n completions of rewards r_i:

- value (MC return):   V(s) = mean_i r_i                                           -> value model (MSE/BCE)
- Math-Shepherd soft:  prm_soft = (1/n) sum_i is_solved(r_i)                      -> PRM (BCE on soft labels)
- Math-Shepherd hard:  prm_hard = 1 if any completion is_solved else 0
- outcome (terminals): orm = is_solved(reward)                                     -> ORM (BCE)

`arbor.tasks.is_solved` is the one definition of correct. Nodes with no completion are left unlabelled.

One row per labelled node: problem_id, node, parent, depth, terminal, n_completions, n_extra, n_correct,
value, prm_soft, prm_hard, orm (null off terminals), prefix (text before the step: prompt + earlier steps),
step (the node's step text; the prompt for the root), prefix_len (tokens before the step), tokens (every token
id from the prompt through the step) and owner. `owner` packs the labels into few sequences for training:
each node is owned by the leaf reached by following first children, so the owner's token path contains the
node's and every node is labelled in exactly one sequence (`path_owner`). Label sets are parquet, open with
`datasets.load_dataset("parquet", data_files=...)`, and are split by problem (`assign_splits`), never by node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numba as nb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from arbor.lm.base import Policy, StopRule
from arbor.lm.kvcache import KVStore, prefix_key
from arbor.tasks import is_solved, is_terminal_step

LABEL_SCHEMA = pa.schema([
    ("problem_id", pa.string()), ("node", pa.int32()), ("parent", pa.int32()), ("depth", pa.int32()),
    ("terminal", pa.bool_()), ("n_completions", pa.int32()), ("n_extra", pa.int32()), ("n_correct", pa.int32()),
    ("value", pa.float32()), ("prm_soft", pa.float32()), ("prm_hard", pa.float32()), ("orm", pa.float32()),
    ("prefix", pa.string()), ("step", pa.string()), ("prefix_len", pa.int32()), ("tokens", pa.list_(pa.int32())),
    ("owner", pa.int32()),
])

SPLITS = ("train", "val", "heldout")


@nb.njit(cache=True)
def mc_counts(parent, terminal, reward, solved, extra_n, extra_correct, extra_sum):  # pragma: no cover - numba
    """Completions below each node: (n [N] int64, n_correct [N] int64, reward_sum [N] float64).

    parent [N] int32 (parent[i] < i, root 0 has -1); terminal [N] bool; reward [N] float (NaN = unknown);
    solved [N] bool (is_solved(reward)); extra_* [N]: extra completions sampled from each node. One pass up the
    tree in reverse creation order adds each node's totals to its parent.
    """
    n_nodes = parent.shape[0]
    n = np.zeros(n_nodes, np.int64)
    correct = np.zeros(n_nodes, np.int64)
    total = np.zeros(n_nodes, np.float64)
    for i in range(n_nodes):
        if terminal[i] and not np.isnan(reward[i]):
            n[i] += 1
            total[i] += reward[i]
            correct[i] += 1 if solved[i] else 0
        n[i] += extra_n[i]
        correct[i] += extra_correct[i]
        total[i] += extra_sum[i]
    for i in range(n_nodes - 1, 0, -1):
        p = parent[i]
        n[p] += n[i]
        correct[p] += correct[i]
        total[p] += total[i]
    return n, correct, total


@nb.njit(cache=True)
def path_owner(parent):  # pragma: no cover - numba
    """owner [N] int32: the leaf reached from each node by following first (lowest-index) children."""
    n_nodes = parent.shape[0]
    first = np.full(n_nodes, -1, np.int32)
    for i in range(n_nodes - 1, 0, -1):
        first[parent[i]] = i  # the last write is the lowest index
    owner = np.empty(n_nodes, np.int32)
    for i in range(n_nodes - 1, -1, -1):
        owner[i] = i if first[i] == -1 else owner[first[i]]
    return owner


def assign_splits(problem_ids: Sequence[str], *, heldout_fraction: float, val_fraction: float,
                  seed: int) -> dict[str, str]:
    """problem_id -> "train" | "val" | "heldout": problems ordered by a seeded hash of their id, the first
    round(heldout_fraction * n) held out, the next round(val_fraction * n) for validation (at least one each
    when there are 3 or more problems). Deterministic in (ids, seed); the split never depends on nodes."""
    ids = sorted(set(problem_ids), key=lambda p: hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=8).digest())
    n = len(ids)
    n_held = round(heldout_fraction * n)
    n_val = round(val_fraction * n)
    if n >= 3:
        n_held, n_val = max(1, n_held), max(1, n_val)
    return {p: ("heldout" if i < n_held else "val" if i < n_held + n_val else "train") for i, p in enumerate(ids)}


class TreeArrays:
    """One problem's tree from its parquet rows (arbor/mcts/treeio.py), nodes in creation order."""

    def __init__(self, rows: pa.Table) -> None:
        rows = rows.sort_by("node")
        col = rows.column
        self.problem_id = str(col("problem_id")[0])
        self.parent = col("parent").to_numpy().astype(np.int32)
        if not np.all(self.parent[1:] < np.arange(1, len(self.parent))):
            raise ValueError(f"{self.problem_id}: parents must precede children (node index = creation order)")
        self.depth = col("depth").to_numpy().astype(np.int32)
        self.terminal = col("terminal").to_numpy(zero_copy_only=False).astype(np.bool_)
        self.reward = col("reward").to_numpy(zero_copy_only=False).astype(np.float64)
        self.step_text = col("step_text").to_pylist()
        self.tok_start = col("tok_start").to_numpy().astype(np.int64)
        self.tok_len = col("tok_len").to_numpy().astype(np.int64)
        self.tokens = np.asarray(col("tokens")[0].as_py(), np.int32)
        self.solved = np.array([is_solved(float(r)) for r in self.reward], np.bool_)

    def __len__(self) -> int:
        return len(self.parent)

    def path(self, node: int) -> list[int]:
        """Node ids from the root to `node`."""
        out = [node]
        while self.parent[out[-1]] >= 0:
            out.append(int(self.parent[out[-1]]))
        return out[::-1]

    def path_tokens(self, node: int) -> np.ndarray:
        return np.concatenate([self.tokens[self.tok_start[n]: self.tok_start[n] + self.tok_len[n]]
                               for n in self.path(node)])

    def solution_text(self, node: int) -> str:
        """Step texts from the first step through `node` (prompt excluded)."""
        return "".join(self.step_text[n] for n in self.path(node)[1:])


def extra_completions(trees: Sequence[TreeArrays], needs: Sequence[np.ndarray], *, policy: Policy,
                      rewards: Sequence[Callable[[str], float]], max_tokens: int, step_tokens: int, seed: int,
                      rows_per_call: int = 256, progress: bool = False,
                      ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sample `needs[t][i]` completions from node i of tree t, each ended at its first terminal step line (as a
    fast rollout is), batched across trees in `Policy.expand` calls of about `rows_per_call` sequences; scored by
    `rewards[t]`. Returns (extra_n, extra_correct, extra_sum), each [N_t], per tree."""
    out = [(np.zeros(len(t), np.int64), np.zeros(len(t), np.int64), np.zeros(len(t), np.float64)) for t in trees]
    jobs = [(t, int(i), int(need[i])) for t, need in enumerate(needs) for i in np.flatnonzero(need > 0)]
    stop = StopRule(at_newline=False, max_new_tokens=max_tokens, line_tokens=step_tokens,
                    final_line=is_terminal_step)
    chunk: list[tuple[int, int, int]] = []
    calls = 0
    from tqdm import tqdm

    bar = tqdm(total=sum(n for _, _, n in jobs), desc="extra completions", unit="seq", disable=not progress)
    for k, job in enumerate(jobs):
        chunk.append(job)
        if sum(n for _, _, n in chunk) < rows_per_call and k + 1 < len(jobs):
            continue
        store = KVStore()
        parents = []
        for t, i, _ in chunk:
            ids = trees[t].path_tokens(i)
            parents.append((prefix_key(ids), ids.tolist()))
        conts = policy.expand(parents, [n for _, _, n in chunk], stop=stop, temperature=1.0, seed=seed + calls,
                              store=store, final=lambda _i, _text: True)
        for (t, i, _), cs in zip(chunk, conts, strict=True):
            prefix = trees[t].solution_text(i)
            got = [float(rewards[t](prefix + c.text)) for c in cs]
            out[t][0][i] = len(got)
            out[t][1][i] = sum(is_solved(r) for r in got)
            out[t][2][i] = float(np.sum(got))
        bar.update(sum(n for _, _, n in chunk))
        chunk, calls = [], calls + 1
    bar.close()
    return out


def tree_labels(tree: TreeArrays, extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                decode: Callable[[Sequence[int]], str] | None = None) -> dict[str, list]:
    """Label columns (LABEL_SCHEMA) of one tree's labelled nodes; `extra` = `extra_completions(...)`.
    `decode` gives the prompt text of the root (default: the root row's step_text)."""
    n = len(tree)
    ex = extra or (np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float64))
    cnt, correct, total = mc_counts(tree.parent, tree.terminal, tree.reward, tree.solved, *ex)
    owner = path_owner(tree.parent)
    prompt = decode(tree.tokens[: tree.tok_len[0]].tolist()) if decode else tree.step_text[0]
    cols: dict[str, list] = {name: [] for name in LABEL_SCHEMA.names}
    for i in np.flatnonzero(cnt > 0).tolist():
        path = tree.path(i)
        toks = tree.path_tokens(i)
        soft = correct[i] / cnt[i]
        row = {
            "problem_id": tree.problem_id, "node": i, "parent": int(tree.parent[i]), "depth": int(tree.depth[i]),
            "terminal": bool(tree.terminal[i]), "n_completions": int(cnt[i]), "n_extra": int(ex[0][i]),
            "n_correct": int(correct[i]), "value": float(total[i] / cnt[i]), "prm_soft": float(soft),
            "prm_hard": float(correct[i] > 0),
            "orm": float(tree.solved[i]) if tree.terminal[i] and not np.isnan(tree.reward[i]) else None,
            "prefix": "" if i == 0 else prompt + "".join(tree.step_text[m] for m in path[1:-1]),
            "step": prompt if i == 0 else tree.step_text[i],
            "prefix_len": int(len(toks) - tree.tok_len[i]) if i else 0, "tokens": toks.tolist(),
            "owner": int(owner[i]),
        }
        for k, v in row.items():
            cols[k].append(v)
    return cols


def build_labels(trees: pa.Table, *, min_completions: int = 0, policy: Policy | None = None,
                 rewards: dict[str, Callable[[str], float]] | None = None, completion_tokens: int = 96,
                 step_tokens: int = 32, seed: int = 0, rows_per_call: int = 256, progress: bool = False) -> pa.Table:
    """The label table of every tree in `trees` (rows of arbor/mcts/treeio.py, any number of problems).

    With `min_completions` > 0, nodes with fewer completions in the tree get extra ones from `policy` (batched
    across problems), scored by `rewards[problem_id](solution text)` (the task's oracle reward).
    """
    if min_completions > 0 and (policy is None or rewards is None):
        raise ValueError("min_completions > 0 needs a policy and the problems' reward functions")
    pids = list(dict.fromkeys(trees.column("problem_id").to_pylist()))
    pid_col = trees.column("problem_id")
    arrays = [TreeArrays(trees.filter(pc.equal(pid_col, pid))) for pid in pids]
    extras: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(arrays)
    if min_completions > 0:
        needs = []
        for t in arrays:
            z = np.zeros(len(t), np.int64)
            cnt, _, _ = mc_counts(t.parent, t.terminal, t.reward, t.solved, z, z, z.astype(np.float64))
            needs.append(np.where(t.terminal, 0, np.maximum(0, min_completions - cnt)))
        extras = list(extra_completions(arrays, needs, policy=policy, rewards=[rewards[p] for p in pids],  # type: ignore
                                        max_tokens=completion_tokens, step_tokens=step_tokens, seed=seed,
                                        rows_per_call=rows_per_call, progress=progress))
    decode = policy.decode if policy is not None else None
    parts = [tree_labels(t, e, decode=decode) for t, e in zip(arrays, extras, strict=True)]
    cols = {name: [v for p in parts for v in p[name]] for name in LABEL_SCHEMA.names}
    return pa.table(cols, schema=LABEL_SCHEMA)


def read_tree_files(files: Sequence[str | Path]) -> pa.Table:
    """Concatenate tree parquet files (`arbor.mcts.treeio.read_trees`, either generation of the format)."""
    from arbor.mcts.treeio import read_trees

    if not files:
        raise FileNotFoundError("no tree files (expected trees/iter_<k>/*.parquet from `arbor search`)")
    return pa.concat_tables([read_trees(f) for f in files], promote_options="default")


def write_labels(path: str | Path, table: pa.Table) -> None:
    """Write a label table as one parquet file, atomically."""
    from arbor.pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def label_counts(table: pa.Table) -> dict[str, int]:
    """Rows and positives per critic: value (V >= 0.5), prm (hard label, steps only), orm (terminals)."""
    d = table.to_pydict()
    depth = np.asarray(d["depth"])
    value = np.asarray(d["value"], np.float64)
    hard = np.asarray(d["prm_hard"], np.float64)
    orm = [x for x in d["orm"] if x is not None]
    return {"value_n": len(value), "value_pos": int((value >= 0.5).sum()),
            "prm_n": int((depth > 0).sum()), "prm_pos": int(hard[depth > 0].sum()),
            "orm_n": len(orm), "orm_pos": int(sum(orm)), "problems": len(set(d["problem_id"]))}
