"""Benchmark: numba tree kernels vs a pure-Python object tree, and bookkeeping's share of a real expansion.

    python -m bench.kernels [--quick]

1. select + backup throughput (simulations/s) on random trees of 1k, 10k, 100k nodes, numba kernels vs
   `arbor.mcts.pytree.PyTree`; both must select the same leaves (checked). Both trees are first warmed with
   the same simulations (so UCT compares visited children all the way down), then timed. Numba is timed two
   ways: the compiled simulation loop (`simulate`, JSON `speedup_vs_python` at 10k nodes) and one Python call
   per simulation (`speedup_per_call`, bounded by numba's dispatch cost of ~1-2 us per call).
2. `bookkeeping_fraction`: the share of wall time spent in tree bookkeeping (arrays, paths) during a real
   `expand_tree` run (siblings without replacement, as in `bench.tokens`) with the tiny policy
   (models/iter_0/policy if present, else a fresh tiny model).
Writes bench/results/kernels.json and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from arbor.mcts.kernels import UCT, backup, select_leaves, simulate
from arbor.mcts.pytree import PyTree
from arbor.mcts.tree import add_child, new_tree
from bench.common import save, table


def random_trees(n: int, seed: int) -> tuple[object, PyTree, np.ndarray]:
    """Same random eta-MCTS-shaped tree in both representations (AlphaLLM Table 5 widths: the root has 60
    children, other expanded nodes 2-10), grown by expanding random leaves until `n` nodes; every node with
    children is marked expanded."""
    rng = np.random.default_rng(seed)
    tree = new_tree(n, n + 1, [0])
    py = PyTree()
    leaves = [0]
    count = 1
    while count < n:
        node = leaves.pop(int(rng.integers(len(leaves)))) if count > 1 else leaves.pop()
        k = min(60 if node == 0 else int(rng.integers(2, 11)), n - count)
        for _ in range(k):
            add_child(tree, node, [])
            leaves.append(py.add_child(node))
        count += k
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


def time_simulate(tree, expanded: np.ndarray, values: np.ndarray) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    leaves = simulate(tree.parent, tree.first_child, tree.next_sibling, tree.visits, tree.value_sum, tree.virtual,
                      tree.prior, expanded, tree.terminal, values, 1.0, UCT, 1.0)
    return time.perf_counter() - t0, leaves.tolist()


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
    time_simulate(warm, we, np.zeros(4))
    rng = np.random.default_rng(1)
    for n in sizes:
        tree, py, expanded = random_trees(n, seed=n)
        warmup = rng.random(sims)
        _, l_nb = time_simulate(tree, expanded, warmup)
        _, l_py = time_python(py, warmup)
        values = rng.random(sims)
        t_loop, l_loop = time_simulate(tree, expanded, values)
        t_py, l_py2 = time_python(py, values)
        t_call, _ = time_kernels(tree, expanded, values)  # continues from the same state as python's next
        if l_nb != l_py or l_loop != l_py2:
            raise AssertionError(f"numba and python selected different leaves on the {n}-node tree")
        rows.append({"nodes": n, "simulations": sims, "numba_sims_per_s": sims / t_loop,
                     "numba_per_call_sims_per_s": sims / t_call, "python_sims_per_s": sims / t_py,
                     "speedup": t_py / t_loop, "speedup_per_call": t_py / t_call, "same_leaves": True,
                     "max_depth": int(tree.depth[:n].max())})
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
    # warm-up (untimed): loads the numba cache of every kernel the builder calls
    expand_tree(policy, policy.encode_prompt("Q: 1 +1\n"), branching=2, branch_depth=1, max_depth=2, step_tokens=8,
                is_terminal=is_terminal_step, temperature=1.0, seed=0, store=KVStore(), distinct=True)
    timing_model = timing_tree = 0.0
    nodes = 0
    for i, q in enumerate(["Q: 7 +5 *3 -4\n", "Q: 9 -2 *6 +8 -1\n", "Q: 4 *4 +3\n", "Q: 8 +9 -3 *2 +5\n"]):
        s = expand_tree(policy, policy.encode_prompt(q), branching=2, branch_depth=3 if quick else 5,
                        max_depth=8, step_tokens=16, is_terminal=is_terminal_step, temperature=1.0, seed=i,
                        store=KVStore(), distinct=True)
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
    rows = kernel_rows(sizes, sims=2000 if args.quick else 5000)
    book = bookkeeping(args.quick)
    at10k = next(r for r in rows if r["nodes"] == 10_000)
    result = {"speedup_vs_python": at10k["speedup"], "speedup_per_call_vs_python": at10k["speedup_per_call"],
              "bookkeeping_fraction": book["bookkeeping_fraction"],
              "select_backup": rows, "bookkeeping": book, "quick": args.quick}
    path = save("kernels", result)
    print(table(rows, ["nodes", "max_depth", "simulations", "numba_sims_per_s", "numba_per_call_sims_per_s",
                       "python_sims_per_s", "speedup", "speedup_per_call"]))
    print(f"\nbookkeeping_fraction = {book['bookkeeping_fraction']:.4f}  (tree {book['tree_seconds']:.3f}s, "
          f"model {book['model_seconds']:.3f}s, {book['nodes']} nodes, policy: {book['policy']})")
    print(f"speedup_vs_python (10k nodes) = {result['speedup_vs_python']:.1f}   -> {path}")


if __name__ == "__main__":
    main()
