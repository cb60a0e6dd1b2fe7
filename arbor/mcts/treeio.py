"""Tree (de)serialization: one row per node, parquet, readable with `datasets.load_dataset("parquet", ...)`.

Columns: problem_id, node, parent, depth, step_text, tok_start, tok_len, visits, q, log_prior, prior,
critic_score, terminal, reward, group (Tree-GRPO tree index, -1 otherwise). `tok_start`/`tok_len` index the
tree's own flat token buffer, which is stored per problem as the `tokens` column of the root row (empty
elsewhere), so a tree can be rebuilt exactly.

Priors (changed with the log-space priors of arbor/mcts/tree.py): `log_prior` (float64) is log pi(step |
parent), the sum of the step's token log-probs; `prior` (float64) is now PUCT's P(s,a), the softmax of
`log_prior` over the siblings. Files written before held only `prior` (float32) = the step's raw probability,
0.0 where it underflowed; `read_trees` gives such files a `log_prior` column = log(prior) (-inf where the
probability underflowed) and recomputes `prior` over siblings, so both generations read the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arbor.mcts.tree import Tree

SCHEMA = pa.schema([
    ("problem_id", pa.string()), ("node", pa.int32()), ("parent", pa.int32()), ("depth", pa.int32()),
    ("step_text", pa.string()), ("tok_start", pa.int64()), ("tok_len", pa.int32()), ("visits", pa.int32()),
    ("q", pa.float64()), ("log_prior", pa.float64()), ("prior", pa.float64()), ("critic_score", pa.float32()),
    ("terminal", pa.bool_()),
    ("reward", pa.float32()), ("group", pa.int32()), ("tokens", pa.list_(pa.int32())),
])


def tree_rows(problem_id: str, tree: Tree, decode: Callable[[Sequence[int]], str],
              group: np.ndarray | None = None) -> dict[str, list]:
    """Column lists for one tree (see module docstring)."""
    n = tree.num_nodes
    q = tree.q()
    cols: dict[str, list] = {
        "problem_id": [problem_id] * n,
        "node": list(range(n)),
        "parent": tree.parent[:n].tolist(),
        "depth": tree.depth[:n].tolist(),
        "step_text": [decode(tree.step_tokens(i).tolist()) for i in range(n)],
        "tok_start": tree.tok_start[:n].tolist(),
        "tok_len": tree.tok_len[:n].tolist(),
        "visits": tree.visits[:n].tolist(),
        "q": [None if np.isnan(x) else float(x) for x in q],
        "log_prior": tree.log_prior[:n].tolist(),
        "prior": tree.prior[:n].tolist(),
        "critic_score": [None if np.isnan(x) else float(x) for x in tree.critic_score[:n]],
        "terminal": tree.terminal[:n].tolist(),
        "reward": [None if np.isnan(x) else float(x) for x in tree.reward[:n]],
        "group": (group[:n].tolist() if group is not None else [-1] * n),
        "tokens": [tree.tokens[: tree.num_tokens].tolist()] + [[] for _ in range(n - 1)],
    }
    return cols


def write_trees(path: str | Path, parts: Sequence[dict[str, list]]) -> None:
    """Write the trees (column dicts from `tree_rows`) as one parquet file, atomically."""
    from arbor.pipeline.io import atomic_path

    cols = {name: [v for p in parts for v in p[name]] for name in SCHEMA.names}
    table = pa.table(cols, schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    del table, cols
    pa.default_memory_pool().release_unused()  # arrow's pool would keep the write's pages (RSS) across problems


def read_trees(path: str | Path) -> pa.Table:
    """One parquet file of trees (either generation, see module docstring) with `log_prior` and the
    sibling-normalised `prior` as float64."""
    table = pq.read_table(path)
    if "log_prior" in table.column_names:
        return table
    raw = table.column("prior").to_numpy(zero_copy_only=False).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_prior = np.log(raw)
    prior = np.ones_like(log_prior)
    pid = table.column("problem_id").to_pylist()
    parent = table.column("parent").to_numpy()
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (p, par) in enumerate(zip(pid, parent.tolist(), strict=True)):
        if par >= 0:
            groups.setdefault((p, par), []).append(i)
    for rows in groups.values():
        lp = log_prior[rows]
        m = lp.max()
        prior[rows] = np.exp(lp - m) / np.exp(lp - m).sum() if np.isfinite(m) else 1.0 / len(rows)
    i = table.column_names.index("prior")
    table = table.set_column(i, "prior", pa.array(prior, pa.float64()))
    return table.add_column(i, "log_prior", pa.array(log_prior, pa.float64()))
