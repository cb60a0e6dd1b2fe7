"""Tree (de)serialization: one row per node, parquet, readable with `datasets.load_dataset("parquet", ...)`.

Columns: problem_id, node, parent, depth, step_text, tok_start, tok_len, visits, q, prior, critic_score,
terminal, reward, group (Tree-GRPO tree index, -1 otherwise). `tok_start`/`tok_len` index the tree's own flat
token buffer, which is stored per problem as the `tokens` column of the root row (empty elsewhere), so a tree
can be rebuilt exactly.
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
    ("q", pa.float64()), ("prior", pa.float32()), ("critic_score", pa.float32()), ("terminal", pa.bool_()),
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
