"""Benchmark: numba tree kernels vs Python object trees, and tree work's share of a real eta-MCTS search.

    python -m bench.kernels [--quick] [--reference | --out PATH]

1. select + backup throughput (simulations/s) on random AlphaLLM-shaped trees of 1k, 10k, 100k nodes. Three
   implementations, all warmed with the same simulations (so UCT compares visited children all the way down),
   then timed on the same further simulations; all must select the same leaves (checked):
   - numba: `kernels.simulate`, one compiled loop over the children table (`speedup_vs_object_tree`, target
     >= 100 at 10k nodes), and one Python call per simulation (`numba_per_call`, bounded by numba's dispatch
     cost of ~1-2 us per call);
   - `ObjectTree` below: the baseline, a faithful object tree as AlphaLLM's released MCTS keeps it (a node
     object with a dict of children and Python statistics, `n()`/`q()` methods, selection by max over the
     children's UCT/PUCT, backup walking parent pointers);
   - `arbor.mcts.pytree.PyTree`: the lean pure-Python reference the kernels are tested against (a list of
     children, the score loop inlined) — what a careful Python programmer would write.
2. `bookkeeping_fraction`: the share of wall time that is tree work (everything but `Policy` calls: selection,
   backup, path assembly, merge, sibling stats, scoring glue, read-outs; `SearchResult.timing`) over real
   `eta_mcts` searches with the default config and the oracle-reward scorer (as `arbor search`) on synthetic
   problems, with the tiny policy (`--policy`, default models/iter_0/policy; a fresh tiny model if missing).
   Then `bookkeeping_fraction_replayed`: the same searches replayed against their recorded policy outputs (no
   model between the tree's steps, fastest of 3): the tree work's own cost with warm CPU caches. The gap between
   the two is the cost of running Python cold after every model call (the model evicts the interpreter's
   working set from the caches; on a shared CPU other processes do too).

Results: `--quick` writes bench/results/kernels.quick.json, a full run bench/results/kernels.local.json; only
`--reference` writes the committed reference bench/results/kernels.json (or `--out PATH`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from arbor.mcts.kernels import UCT, backup, select_leaves, simulate
from arbor.mcts.pytree import PyTree
from arbor.mcts.tree import add_child, new_tree
from bench.common import RESULTS, machine, speedprobe, table


class Node:
    """A search node as AlphaLLM's released MCTS keeps it: statistics and a dict of children on the object."""

    def __init__(self, index: int, parent: Node | None = None, prior: float = 1.0) -> None:
        self.index = index
        self.parent = parent
        self.children: dict[int, Node] = {}  # action id -> child
        self.prior = prior
        self.visit_count = 0
        self.value_sum = 0.0
        self.virtual_loss = 0
        self.expanded = False
        self.terminal = False

    def n(self) -> int:
        return self.visit_count + self.virtual_loss

    def q(self, vl_value: float) -> float:
        return (self.value_sum - self.virtual_loss * vl_value) / self.n()

    def is_leaf(self) -> bool:
        return not self.expanded or self.terminal or not self.children


class ObjectTree:
    """The baseline: selection takes the max over `node.children.values()` of the child's UCT/PUCT score
    (ties: the first child, as the kernels), backup walks parent pointers. Same formulas as the kernels."""

    def __init__(self) -> None:
        self.root = Node(0)
        self.nodes = [self.root]

    def add_child(self, parent: int, prior: float = 1.0) -> int:
        p = self.nodes[parent]
        child = Node(len(self.nodes), p, prior)
        p.children[len(p.children)] = child
        self.nodes.append(child)
        return child.index

    def ucb(self, parent: Node, child: Node, c: float, rule: int, vl_value: float) -> float:
        if rule == UCT:
            if child.n() == 0:
                return math.inf
            return child.q(vl_value) + c * math.sqrt(math.log(max(parent.n(), 1)) / child.n())
        q = child.q(vl_value) if child.n() > 0 else 0.0
        return q + c * child.prior * math.sqrt(parent.n()) / (1.0 + child.n())

    def select(self, c: float = 1.0, rule: int = UCT, vl_value: float = 1.0) -> Node:
        node = self.root
        while not node.is_leaf():
            node = max(node.children.values(), key=lambda ch, p=node: self.ucb(p, ch, c, rule, vl_value))
        x: Node | None = node
        while x is not None:
            x.virtual_loss += 1
            x = x.parent
        return node

    def backup(self, leaf: Node, value: float) -> None:
        x: Node | None = leaf
        while x is not None:
            x.visit_count += 1
            x.value_sum += value
            x.virtual_loss -= 1
            x = x.parent


def random_trees(n: int, seed: int) -> tuple[object, np.ndarray, PyTree, ObjectTree]:
    """The same random eta-MCTS-shaped tree in three representations (AlphaLLM Table 5 widths: the root has 60
    children, other expanded nodes 2-10), grown by expanding random leaves until `n` nodes; every node with
    children is marked expanded."""
    rng = np.random.default_rng(seed)
    tree = new_tree(n, n + 1, [0], max_children=60)
    py, obj = PyTree(), ObjectTree()
    leaves = [0]
    count = 1
    while count < n:
        node = leaves.pop(int(rng.integers(len(leaves)))) if count > 1 else leaves.pop()
        k = min(60 if node == 0 else int(rng.integers(2, 11)), n - count)
        for _ in range(k):
            add_child(tree, node, [])
            obj.add_child(node)
            leaves.append(py.add_child(node))
        count += k
    expanded = tree.num_children[:n] > 0
    for a, b, e in zip(py.nodes, obj.nodes, expanded, strict=True):
        a.expanded = b.expanded = bool(e)
    return tree, expanded, py, obj


def time_simulate(tree, expanded: np.ndarray, values: np.ndarray) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    leaves = simulate(tree.parent, tree.children_index, tree.num_children, tree.visits, tree.value_sum,
                      tree.virtual, tree.prior, expanded, tree.terminal, values, 1.0, UCT, 1.0)
    return time.perf_counter() - t0, leaves.tolist()


def time_per_call(tree, expanded: np.ndarray, values: np.ndarray) -> tuple[float, list[int]]:
    leaves = []
    t0 = time.perf_counter()
    for v in values:
        leaf = select_leaves(tree.parent, tree.children_index, tree.num_children, tree.visits, tree.value_sum,
                             tree.virtual, tree.prior, expanded, tree.terminal, 1, 1.0, UCT, 1.0)
        backup(tree.parent, tree.visits, tree.value_sum, tree.virtual, leaf, np.array([v]))
        leaves.append(int(leaf[0]))
    return time.perf_counter() - t0, leaves


def time_pytree(py: PyTree, values: np.ndarray) -> tuple[float, list[int]]:
    leaves = []
    t0 = time.perf_counter()
    for v in values.tolist():
        leaf = py.select(1)
        py.backup(leaf, [v])
        leaves.append(leaf[0])
    return time.perf_counter() - t0, leaves


def time_object_tree(obj: ObjectTree, values: np.ndarray) -> tuple[float, list[int]]:
    leaves = []
    t0 = time.perf_counter()
    for v in values.tolist():
        leaf = obj.select()
        obj.backup(leaf, v)
        leaves.append(leaf.index)
    return time.perf_counter() - t0, leaves


def kernel_rows(sizes: list[int], sims: int, rounds: int) -> list[dict]:
    """Side by side in one process: per size, `rounds` rounds of `sims` simulations; in each round the four
    implementations run back to back on the same values (the CPU is shared, so every ratio is the median of
    per-round ratios and every rate is the best round's)."""
    rows = []
    warm, we, _, _ = random_trees(64, 0)  # compile (or load the numba cache) outside the timing
    time_simulate(warm, we, np.zeros(4))
    time_per_call(warm, we, np.zeros(4))
    rng = np.random.default_rng(1)
    for n in sizes:
        tree, expanded, py, obj = random_trees(n, seed=n)
        warmup = rng.random(sims)
        l_nb = time_simulate(tree, expanded, warmup)[1]
        if l_nb != time_pytree(py, warmup)[1] or l_nb != time_object_tree(obj, warmup)[1]:
            raise AssertionError(f"implementations selected different leaves on the {n}-node tree (warm-up)")
        t: dict[str, list[float]] = {"numba": [], "per_call": [], "object_tree": [], "pytree": []}
        depths = []
        for _ in range(rounds):
            values = rng.random(sims)
            dt, l_loop = time_simulate(tree, expanded, values)
            t["numba"].append(dt)
            dt, l_obj = time_object_tree(obj, values)
            t["object_tree"].append(dt)
            dt, l_py = time_pytree(py, values)
            t["pytree"].append(dt)
            if not l_loop == l_obj == l_py:
                raise AssertionError(f"implementations selected different leaves on the {n}-node tree")
            more = rng.random(sims)  # per-call numba: the same work, one dispatch per simulation
            dt, l_call = time_per_call(tree, expanded, more)
            t["per_call"].append(dt)
            if l_call != time_pytree(py, more)[1] or l_call != time_object_tree(obj, more)[1]:
                raise AssertionError(f"per-call numba and python differ on the {n}-node tree")
            depths += [int(tree.depth[x]) for x in l_loop]
        tt = {k: np.array(v) for k, v in t.items()}
        rows.append({"nodes": n, "simulations": sims, "rounds": rounds, "max_depth": int(tree.depth[:n].max()),
                     "mean_leaf_depth": float(np.mean(depths)),
                     **{f"{k}_us_per_sim": 1e6 * float(v.min()) / sims for k, v in tt.items()},
                     "speedup_vs_object_tree": float(np.median(tt["object_tree"] / tt["numba"])),
                     "speedup_vs_pytree": float(np.median(tt["pytree"] / tt["numba"])),
                     "speedup_per_call_vs_object_tree": float(np.median(tt["object_tree"] / tt["per_call"])),
                     "object_tree_vs_pytree": float(np.median(tt["object_tree"] / tt["pytree"])),
                     "same_leaves": True})
    return rows


class _Recorder:
    """The policy, with every `expand` result and its forward tokens recorded in call order."""

    def __init__(self, policy: object) -> None:
        self._policy, self.log = policy, []
        self.counters = policy.counters  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._policy, name)

    def expand(self, *args: object, **kw: object) -> object:
        before = self.counters.snapshot()
        out = self._policy.expand(*args, **kw)  # type: ignore[attr-defined]
        self.log.append((out, self.counters.since(before).forward_tokens))
        return out


class _Replay:
    """A policy that answers each `expand` with the recorded result (and calls `final` as the policy did): the
    same search, with no model in it."""

    def __init__(self, policy: object, log: list) -> None:
        from arbor.lm.base import TokenCounters

        self._policy, self.log, self.i = policy, log, 0
        self.counters = TokenCounters()
        self.eos_token_id = policy.eos_token_id  # type: ignore[attr-defined]

    def decode(self, ids: list[int]) -> str:
        return self._policy.decode(ids)  # type: ignore[attr-defined]

    def expand(self, parents: object, num_samples: object, *, final: object = None, **kw: object) -> object:
        out, tokens = self.log[self.i]
        self.i += 1
        self.counters.forward_tokens += tokens
        for j, conts in enumerate(out):
            for c in conts:
                if final is not None and c.finish in ("newline", "length"):
                    final(j, c.text)  # type: ignore[operator]
        return out


def bookkeeping(n_problems: int, policy_dir: Path, replays: int = 3) -> dict:
    """Tree work / total wall time over real eta-MCTS searches (see module docstring); then the same searches
    replayed against their recorded policy outputs (`replays` times, the fastest kept): the tree work with warm
    caches, without the model run between its steps."""
    from arbor.lm.hf import HFPolicy
    from arbor.lm.kvcache import KVStore
    from arbor.mcts.scoring import RewardScorer
    from arbor.mcts.search import PHASES, eta_mcts
    from arbor.pipeline.config import EtaMCTSConfig, SearchConfig, TaskConfig
    from arbor.tasks import build_task, is_terminal_step, make_splits

    if policy_dir.exists():
        policy, source = HFPolicy.from_pretrained(policy_dir), str(policy_dir)
    else:
        from arbor.lm.tiny import build_tiny_model
        from arbor.lm.tokenizer import char_tokenizer
        from arbor.pipeline.config import ModelConfig

        tok = char_tokenizer()
        policy, source = HFPolicy(build_tiny_model(ModelConfig(), tok), tok), "fresh tiny model (untrained)"
    import torch

    # one torch thread: the tiny model's matmuls gain little from a second one, and on a shared CPU two spinning
    # threads inflated model time ~10x (which flatters the fraction); restored afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    task_cfg, search_cfg, cfg = TaskConfig(), SearchConfig(), EtaMCTSConfig()
    task = build_task(task_cfg)
    problems = make_splits(task_cfg, n_problems + 1, 0, seed=1234)[0]

    def search(p: object, i: int, pol: object) -> object:
        scorer = RewardScorer(lambda text, p=p: task.reward(p, text), n_rollouts=search_cfg.n_rollouts,
                              rollout_tokens=search_cfg.rollout_tokens)
        return eta_mcts(pol, policy.encode_prompt(task.prompt(p)), scorer=scorer,  # type: ignore[arg-type]
                        is_terminal=is_terminal_step, cfg=cfg, seed=i, store=KVStore())

    model = total = 0.0
    phases = dict.fromkeys(PHASES, 0.0)
    nodes = sims = 0
    logs = []
    for i, problem in enumerate(problems):
        rec = _Recorder(policy)
        res = search(problem, i, rec)
        logs.append(rec.log)
        if i == 0:
            continue  # warm-up (untimed): loads the numba cache of every kernel the search calls
        model += res.timing.model
        total += res.timing.total
        for k, v in res.timing.phases.items():
            phases[k] += v
        nodes += res.builder.tree.num_nodes
        sims += res.simulations
    warm = min(sum(search(p, i, _Replay(policy, logs[i])).timing.tree for i, p in enumerate(problems) if i)
               for _ in range(replays))
    torch.set_num_threads(threads)
    tree = total - model
    return {"policy": source, "torch_threads": 1, "problems": n_problems, "nodes": nodes, "simulations": sims,
            "model_seconds": model, "tree_seconds": tree, "total_seconds": total,
            "tree_seconds_by_phase": phases, "tree_us_per_node": 1e6 * tree / max(nodes, 1),
            "bookkeeping_fraction": tree / total, "replayed_tree_seconds": warm,
            "bookkeeping_fraction_replayed": warm / (warm + model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Smaller run (well under 2 minutes).")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--reference", action="store_true",
                       help="Write the committed reference results, bench/results/kernels.json.")
    where.add_argument("--out", type=Path, help="Write the results here.")
    ap.add_argument("--policy", type=Path, default=Path("models/iter_0/policy"),
                    help="Policy of the bookkeeping searches (a fresh tiny model if the directory is missing).")
    args = ap.parse_args()
    out = args.out or RESULTS / ("kernels.json" if args.reference else
                                 "kernels.quick.json" if args.quick else "kernels.local.json")
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    rows = kernel_rows(sizes, sims=1000 if args.quick else 2000, rounds=3 if args.quick else 7)
    book = bookkeeping(4 if args.quick else 16, args.policy)
    at10k = next(r for r in rows if r["nodes"] == 10_000)
    result = {"speedup_vs_object_tree": at10k["speedup_vs_object_tree"],
              "speedup_vs_pytree": at10k["speedup_vs_pytree"],
              "speedup_per_call_vs_object_tree": at10k["speedup_per_call_vs_object_tree"],
              "bookkeeping_fraction": book["bookkeeping_fraction"],
              "bookkeeping_fraction_replayed": book["bookkeeping_fraction_replayed"],
              "select_backup": rows, "bookkeeping": book, "quick": args.quick, "speedprobe": speedprobe(),
              "machine": machine(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    from arbor.pipeline.io import write_json

    write_json(out, result)
    print(table(rows, ["nodes", "max_depth", "mean_leaf_depth", "numba_us_per_sim", "per_call_us_per_sim",
                       "object_tree_us_per_sim", "pytree_us_per_sim", "speedup_vs_object_tree",
                       "speedup_vs_pytree", "speedup_per_call_vs_object_tree"]))
    print(f"\nbookkeeping_fraction = {book['bookkeeping_fraction']:.4f}  (tree {book['tree_seconds']:.3f}s, "
          f"model {book['model_seconds']:.3f}s over {book['problems']} eta-MCTS searches, {book['nodes']} nodes, "
          f"{book['tree_us_per_node']:.0f} us tree work per node; policy: {book['policy']})")
    print("tree seconds by phase: " + ", ".join(f"{k} {v:.3f}" for k, v in book["tree_seconds_by_phase"].items()))
    print(f"replayed against the recorded policy outputs (warm caches, no model between steps): tree "
          f"{book['replayed_tree_seconds']:.3f}s -> fraction {book['bookkeeping_fraction_replayed']:.4f}")
    print(f"speedup_vs_object_tree (select + backup, 10k nodes) = {result['speedup_vs_object_tree']:.1f}   -> {out}")


if __name__ == "__main__":
    main()
