"""Benchmark: numba tree kernels vs a pure-Python object tree, and bookkeeping's share of a real expansion.

    python -m bench.kernels [--quick]

1. select + backup throughput (simulations/s) on random trees of 1k, 10k, 100k nodes, numba kernels vs
   `arbor.mcts.pytree.PyTree`; both must select the same leaves (checked). JSON: `speedup_vs_python` (10k).
2. `bookkeeping_fraction`: the share of wall time spent in tree bookkeeping (arrays, paths) during a real
   `expand_tree` run with the tiny policy (models/iter_0/policy if present, else a fresh tiny model).
Writes bench/results/kernels.json and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from arbor.mcts.kernels import UCT, backup, select_leaves
from arbor.mcts.pytree import PyTree
from arbor.mcts.tree import add_child, new_tree
from bench.common import save, table


def random_trees(n: int, seed: int) -> tuple[object, PyTree, np.ndarray]:
    """Same random shape in both representations; every internal node expanded; light random statistics."""
    rng = np.random.default_rng(seed)
    tree = new_tree(n, n + 1, [0])
    py = PyTree()
    # attach each new node to a random earlier node, biased to recent ones (deep, bushy trees like MCTS makes)
    for i in range(1, n):
        p = int(rng.integers(max(0, i - 50), i)) if rng.random() < 0.7 else int(rng.integers(0, i))
        add_child(tree, p, [])
        py.add_child(p)
    expanded = tree.first_child[:n] != -1
    for node, e in zip(py.nodes, expanded, strict=True):
        node.expanded = bool(e)
    return tree, py, expanded


def time_kernels(tree, expanded: np.ndarray, values: np.ndarray) -> tuple[float, list[int]]:
    leaves = []
    t0 = time.perf_counter()
    for v in values:
        leaf = select_leaves(tree.parent, tree.first_child, tree.next_sibling, tree.visits, tree.value_sum,
                             tree.virtual, tree.prior, expanded, tree.terminal, 1, 1.0, UCT, 1.0)
        backup(tree.parent, tree.visits, tree.value_sum, tree.virtual, leaf, np.array([v]))
        leaves.append(int(leaf[0]))
    return time.perf_counter() - t0, leaves


def time_python(py: PyTree, values: np.ndarray) -> tuple[float, list[int]]:
    leaves = []
    t0 = time.perf_counter()
    for v in values:
        leaf = py.select(1)
        py.backup(leaf, [float(v)])
        leaves.append(leaf[0])
    return time.perf_counter() - t0, leaves


def kernel_rows(sizes: list[int], sims: int) -> list[dict]:
    rows = []
    warm, _, we = random_trees(64, 0)  # compile (or load the numba cache) outside the timing
    time_kernels(warm, we, np.zeros(4))
    for n in sizes:
        tree, py, expanded = random_trees(n, seed=n)
        values = np.random.default_rng(1).random(sims)
        t_nb, l_nb = time_kernels(tree, expanded, values)
        t_py, l_py = time_python(py, values)
        if l_nb != l_py:
            raise AssertionError(f"numba and python selected different leaves on the {n}-node tree")
        rows.append({"nodes": n, "simulations": sims, "numba_sims_per_s": sims / t_nb,
                     "python_sims_per_s": sims / t_py, "speedup": t_py / t_nb, "same_leaves": True})
    return rows


def bookkeeping(quick: bool) -> dict:
    from arbor.lm.hf import HFPolicy
    from arbor.lm.kvcache import KVStore
    from arbor.mcts.samplers import expand_tree
    from arbor.tasks.answers import is_terminal_step

    path = Path("models/iter_0/policy")
    if path.exists():
        policy, source = HFPolicy.from_pretrained(path), str(path)
    else:
        from arbor.lm.tiny import build_tiny_model
        from arbor.lm.tokenizer import char_tokenizer
        from arbor.pipeline.config import ModelConfig

        tok = char_tokenizer()
        policy, source = HFPolicy(build_tiny_model(ModelConfig(), tok), tok), "fresh tiny model (untrained)"
    timing_model = timing_tree = 0.0
    nodes = 0
    for i, q in enumerate(["Q: 7 +5 *3 -4\n", "Q: 9 -2 *6 +8 -1\n", "Q: 4 *4 +3\n", "Q: 8 +9 -3 *2 +5\n"]):
        s = expand_tree(policy, policy.encode_prompt(q), branching=2, branch_depth=3 if quick else 5,
                        max_depth=8, step_tokens=16, is_terminal=is_terminal_step, temperature=1.0, seed=i,
                        store=KVStore())
        timing_model += s.timing.model
        timing_tree += s.timing.tree
        nodes += s.tree.num_nodes
    return {"policy": source, "nodes": nodes, "model_seconds": timing_model, "tree_seconds": timing_tree,
            "bookkeeping_fraction": timing_tree / (timing_tree + timing_model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Smaller run (well under 2 minutes).")
    args = ap.parse_args()
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    rows = kernel_rows(sizes, sims=300 if args.quick else 2000)
    book = bookkeeping(args.quick)
    at10k = next(r for r in rows if r["nodes"] == 10_000)
    result = {"speedup_vs_python": at10k["speedup"], "bookkeeping_fraction": book["bookkeeping_fraction"],
              "select_backup": rows, "bookkeeping": book, "quick": args.quick}
    path = save("kernels", result)
    print(table(rows, ["nodes", "simulations", "numba_sims_per_s", "python_sims_per_s", "speedup"]))
    print(f"\nbookkeeping_fraction = {book['bookkeeping_fraction']:.4f}  (tree {book['tree_seconds']:.3f}s, "
          f"model {book['model_seconds']:.3f}s, {book['nodes']} nodes, policy: {book['policy']})")
    print(f"speedup_vs_python (10k nodes) = {result['speedup_vs_python']:.1f}   -> {path}")


if __name__ == "__main__":
    main()
