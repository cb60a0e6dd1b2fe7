"""Replay of random tree-operation programs on the numba tree and on the pure-Python reference.

A program is a list of ops: ["select", B, rule, c] (select B leaves; each selected non-terminal leaf is then
expanded with `n` children whose priors are given, and all are backed up with given values) — this mirrors one
batched MCTS step. Both implementations must produce the same leaves and the same statistics. Priors are
given as probabilities and stored as log priors (PUCT renormalises them over the siblings).
"""

from __future__ import annotations

import numpy as np

from arbor.mcts.kernels import backup_values, revert_virtual_loss, select
from arbor.mcts.pytree import PyTree
from arbor.mcts.tree import add_child, new_tree


def log_p(p: float) -> float:
    return float(np.log(p)) if p > 0 else -np.inf


def random_program(rng: np.random.Generator, steps: int) -> list[dict]:
    prog = []
    for _ in range(steps):
        b = int(rng.integers(1, 5))
        prog.append({
            "batch": b, "rule": int(rng.integers(0, 2)), "c": float(rng.choice([0.5, 1.0, 2.0])),
            "children": [int(rng.integers(0, 4)) for _ in range(b)],
            "priors": [[round(float(p), 3) for p in rng.dirichlet(np.ones(4))] for _ in range(b)],
            "terminal": [[bool(rng.random() < 0.2) for _ in range(4)] for _ in range(b)],
            "values": [round(float(rng.random()), 4) for _ in range(b)],
        })
    return prog


def run_numba(prog: list[dict], max_nodes: int = 4096) -> dict:
    tree = new_tree(max_nodes, max_nodes * 2, [1])
    expanded = np.zeros(max_nodes, np.bool_)
    selected = []
    for op in prog:
        leaves = select(tree, expanded, op["batch"], c=op["c"], rule=op["rule"])
        selected.append(leaves.tolist())
        seen: set[int] = set()
        keep = []
        for i, leaf in enumerate(leaves.tolist()):
            if leaf in seen:  # duplicate in the batch: undo its virtual loss, do not back it up twice
                revert_virtual_loss(tree.parent, tree.virtual, np.array([leaf], np.int32))
                continue
            seen.add(leaf)
            keep.append(i)
            if not tree.terminal[leaf] and not expanded[leaf]:
                for j in range(op["children"][i]):
                    add_child(tree, leaf, [2 + j], log_prior=log_p(op["priors"][i][j]),
                              terminal=op["terminal"][i][j])
                expanded[leaf] = True
        backup_values(tree, leaves[keep], np.array(op["values"])[keep])
    n = tree.num_nodes
    return {"selected": selected, "visits": tree.visits[:n].tolist(), "value_sum": tree.value_sum[:n].tolist(),
            "virtual": tree.virtual[:n].tolist(), "parent": tree.parent[:n].tolist()}


def run_python(prog: list[dict]) -> dict:
    tree = PyTree()
    selected = []
    for op in prog:
        leaves = tree.select(op["batch"], c=op["c"], rule=op["rule"])
        selected.append(leaves)
        seen: set[int] = set()
        keep_leaves, keep_values = [], []
        for i, leaf in enumerate(leaves):
            node = tree.nodes[leaf]
            if leaf in seen:
                x = node
                while x is not None:
                    x.virtual -= 1
                    x = x.parent
                continue
            seen.add(leaf)
            keep_leaves.append(leaf)
            keep_values.append(op["values"][i])
            if not node.terminal and not node.expanded:
                for j in range(op["children"][i]):
                    tree.add_child(leaf, log_prior=log_p(op["priors"][i][j]), terminal=op["terminal"][i][j])
                node.expanded = True
        tree.backup(keep_leaves, keep_values)
    nodes = tree.nodes
    return {"selected": selected, "visits": [x.visits for x in nodes], "value_sum": [x.value_sum for x in nodes],
            "virtual": [x.virtual for x in nodes], "parent": [x.parent.index if x.parent else -1 for x in nodes]}
