"""Benchmark: token economics of tree search vs independent chains, against the physical limit (issue #9).

    python -m bench.tokens [--quick] [--policy models/iter_0/policy] [--threads 1]

Per problem, side by side in one run, each method with its own KV store:

- `tree`: plain tree expansion (`expand_tree`: `--branching` samples per node for `--branch-depth` levels,
  siblings without replacement, then single continuations to a terminal).
- `eta_mcts`: the search of `arbor search` (default `EtaMCTSConfig`, oracle reward at terminals, no rollouts).
- chains, sampled until each has used the tree's forward tokens, with the tree's stop rule (first terminal step
  line, lines of <= step_tokens, <= max_depth lines: `TreeBuilder.trajectory_stop()`) and the same temperature:
  - `chain_cached`: prompt computed once per problem (content-keyed), and each chain computes its own tokens: the
    usual practice, the honest baseline;
  - `chain_shared`: the same chains with the tree's token-level sharing (chains with equal tokens so far share one
    forward; later batches walk along earlier chains), so that the tree's advantage is not just the sampler's;
  - `chain_naive`: each chain recomputes the prompt; `chain_engine`: chains grown step by step as a tree.
- accuracy at equal forward tokens (before vs after token sharing): `eta_unshared` is eta-MCTS with every sample
  computing its own tokens (the engine before #9); `eta_equal_tokens` is eta-MCTS with sharing, given that run's
  forward tokens per problem as its budget (`max_forward_tokens`, simulations unbounded).

Reported per method: distinct complete trajectories, correct ones, problems solved (any correct), the greedy
read-out's accuracy (eta), forward tokens, padded positions, wall time; for the trees the accounting of
`arbor.mcts.accounting`: `trie_tokens` (distinct token prefixes over the tree, prompt once), `compute_ratio` =
forward / trie (goal <= 1.10), `forward_per_stored_token` (the old node-level `reuse_ratio`), `kv_memory_ratio` =
peak KV bytes held / (stored tokens x one token's KV bytes; the store's bytes also hold each token's final
hidden state and id) (goal <= 1.2). Ratios: trajectories per forward token, tree / chain_cached (goal >= 2.5) and
tree / chain_shared, and the same for eta-MCTS. The speed probe (/work/shared/speedprobe.py) runs before and
after and is recorded. Writes bench/results/tokens.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from arbor.lm.base import StopRule
from arbor.lm.hf import HFPolicy
from arbor.lm.kvcache import KVStore
from arbor.mcts.accounting import sum_accounting, trie_tokens
from arbor.mcts.grow import TreeBuilder
from arbor.mcts.kernels import terminal_nodes
from arbor.mcts.samplers import chain_tree, expand_tree, sample_chains
from arbor.mcts.scoring import RewardScorer
from arbor.mcts.search import eta_mcts
from arbor.pipeline.config import EtaMCTSConfig, TaskConfig
from arbor.tasks import build_task, is_solved, make_splits
from arbor.tasks.answers import is_terminal_step
from bench.common import save, speedprobe, table

TREES = ("tree", "eta_mcts", "eta_unshared", "eta_equal_tokens")
CHAINS = ("chain_cached", "chain_shared", "chain_naive", "chain_engine")
COUNTS = ("trajectories", "correct", "solved", "greedy_correct", "forward_tokens", "padded_positions",
          "wall_seconds")


@contextmanager
def sharing(policy: HFPolicy, on: bool) -> Iterator[None]:
    """Token-level sharing of `policy.expand` on or off for a block."""
    old = policy.share_tokens
    policy.share_tokens = on
    try:
        yield
    finally:
        policy.share_tokens = old


def _distinct_complete(texts: list[str]) -> set[str]:
    return {t for t in texts if any(is_terminal_step(line) for line in t.splitlines())}


def _quality(texts: set[str], reward: Callable[[str], float]) -> dict:
    """How many distinct trajectories are correct, and whether any is (the accuracy the tokens buy)."""
    good = sum(is_solved(reward(t)) for t in texts)
    return {"trajectories": len(texts), "correct": good, "solved": int(good > 0)}


def _leaf_texts(b: TreeBuilder) -> list[str]:
    return [b.text(int(t)) for t in terminal_nodes(b.tree)]


def run_tree(policy: HFPolicy, grow: Callable[[KVStore], tuple[TreeBuilder, int]],
             reward: Callable[[str], float]) -> dict:
    """One tree of one problem: `grow(store)` -> (builder, greedy read-out leaf or -1)."""
    store = KVStore()
    before = policy.counters.snapshot()
    t0 = time.perf_counter()
    b, greedy = grow(store)
    wall = time.perf_counter() - t0
    used = policy.counters.since(before)
    return {**_quality(_distinct_complete(_leaf_texts(b)), reward),
            "greedy_correct": int(greedy >= 0 and is_solved(reward(b.text(greedy)))),
            "forward_tokens": used.forward_tokens, "padded_positions": used.padded_positions, "wall_seconds": wall,
            "trie_tokens": trie_tokens(b.tree), "stored_tokens": b.tree.num_tokens,
            "kv_peak_bytes": store.peak_nbytes, "kv_token_bytes": store.kv_token_bytes,
            "mean_path_tokens": float(np.mean([b.tree.path_tokens(int(t)).size - int(b.tree.tok_len[0])
                                               for t in terminal_nodes(b.tree)] or [0.0]))}


def run_chains(policy: HFPolicy, prompt: list[int], budget: int, *, method: str, stop: StopRule,
               est_len: float, seed: int, temperature: float, reward: Callable[[str], float],
               shape: dict) -> dict:
    """Chains of one problem until `budget` forward tokens are spent; `est_len` = expected tokens per chain
    after the prompt (the tree's mean path length), which sizes the batches."""
    before = policy.counters.snapshot()
    t0 = time.perf_counter()
    texts: list[str] = []
    store = KVStore()
    n_chains = batch = 0
    with sharing(policy, method in ("chain_shared", "chain_engine")):
        while (spent := policy.counters.since(before).forward_tokens) < budget:
            # expected cost of one more chain: its tokens, plus the prompt once (cached) or every time (naive)
            per_chain = spent / n_chains if n_chains else est_len + (len(prompt) if method == "chain_naive" else 0)
            left = budget - spent - (len(prompt) if method != "chain_naive" and not n_chains else 0)
            n = max(1, round(left / max(per_chain, 1.0)))
            if method == "chain_engine":
                b = chain_tree(policy, prompt, g=n, store=store, is_terminal=is_terminal_step,
                               temperature=temperature, seed=seed + batch, **shape)
                texts += _leaf_texts(b)
            else:
                outs = sample_chains(policy, prompt, n, stop=stop, temperature=temperature, seed=seed + batch,
                                     prompt_cached=method != "chain_naive", store=store)
                texts += [c.text for c in outs]
            n_chains += n
            batch += 1
    used = policy.counters.since(before)
    return {**_quality(_distinct_complete(texts), reward), "greedy_correct": 0, "samples": n_chains,
            "batches": batch, "forward_tokens": used.forward_tokens, "padded_positions": used.padded_positions,
            "wall_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Fewer problems (a few minutes).")
    ap.add_argument("--policy", default="models/iter_0/policy", help="Policy directory (run `make run` first).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--problems", type=int, default=None)
    ap.add_argument("--branching", type=int, default=2)
    ap.add_argument("--branch-depth", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (trees and chains).")
    ap.add_argument("--with-replacement", action="store_true",
                    help="Sample siblings independently (repeats allowed) instead of without replacement.")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). On a shared, loaded machine 1 avoids spinning "
                         "threads that slow every method ~30x.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    probe_before = speedprobe()
    try:
        policy = HFPolicy.from_pretrained(args.policy, args.device)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nTrain the tiny policy first (`make run`) or pass --policy DIR.") from None
    n_problems = args.problems or (6 if args.quick else 24)
    task = build_task(TaskConfig())
    problems = make_splits(TaskConfig(), 1, n_problems, seed=99)[1]
    steps = {"max_depth": 12, "step_tokens": 16}
    shape: dict = {"branching": args.branching, "branch_depth": args.branch_depth, **steps}
    eta = EtaMCTSConfig(temperature=args.temperature)
    rows: dict[str, list[dict]] = {m: [] for m in TREES + CHAINS}
    for i, p in enumerate(problems):
        print(f"problem {i + 1}/{n_problems}", file=sys.stderr, flush=True)

        def reward(text: str, p=p) -> float:
            return task.reward(p, text)

        prompt = policy.encode_prompt(task.prompt(p))

        def tree(store: KVStore, i=i, prompt=prompt) -> tuple[TreeBuilder, int]:
            return expand_tree(policy, prompt, **shape, is_terminal=is_terminal_step, temperature=args.temperature,
                               seed=i, store=store, distinct=not args.with_replacement), -1

        def search(store: KVStore, cfg: EtaMCTSConfig = eta, i=i, prompt=prompt,
                   reward=reward) -> tuple[TreeBuilder, int]:
            res = eta_mcts(policy, prompt, scorer=RewardScorer(reward), is_terminal=is_terminal_step, cfg=cfg, seed=i,
                           store=store)
            return res.builder, res.greedy_leaf

        rows["tree"].append(run_tree(policy, tree, reward))
        rows["eta_mcts"].append(run_tree(policy, search, reward))
        with sharing(policy, False):
            rows["eta_unshared"].append(run_tree(policy, search, reward))
        equal = dataclasses.replace(eta, num_simulations=100 * eta.num_simulations,
                                    max_forward_tokens=rows["eta_unshared"][-1]["forward_tokens"])
        rows["eta_equal_tokens"].append(run_tree(policy, lambda s, f=search, c=equal: f(s, c), reward))
        t = rows["tree"][-1]
        stop = StopRule.trajectory(**steps, is_terminal=is_terminal_step)  # = TreeBuilder.trajectory_stop()
        for name in CHAINS:
            rows[name].append(run_chains(policy, prompt, t["forward_tokens"], method=name, stop=stop,
                                         est_len=t["mean_path_tokens"], seed=1000 * i,
                                         temperature=args.temperature, reward=reward, shape=steps))
    result_rows = []
    for name, rs in rows.items():
        tot = {k: sum(r[k] for r in rs) for k in COUNTS}
        acc = sum_accounting(rs) if name in TREES else {}
        result_rows.append({"method": name, **tot, **acc,
                            "traj_per_1k_tokens": 1000 * tot["trajectories"] / max(1, tot["forward_tokens"]),
                            "wall_per_traj_ms": 1000 * tot["wall_seconds"] / max(1, tot["trajectories"])})
    by = {r["method"]: r for r in result_rows}

    def per_token(a: str, b: str) -> float:
        return by[a]["traj_per_1k_tokens"] / by[b]["traj_per_1k_tokens"] if by[b]["trajectories"] else float("nan")

    result = {
        "compute_ratio": by["eta_mcts"]["compute_ratio"], "kv_memory_ratio": by["eta_mcts"]["kv_memory_ratio"],
        "tree_compute_ratio": by["tree"]["compute_ratio"], "tree_kv_memory_ratio": by["tree"]["kv_memory_ratio"],
        "forward_per_stored_token": by["tree"]["forward_per_stored_token"],
        "trajectories_per_token_vs_chain": per_token("tree", "chain_cached"),
        "trajectories_per_token_vs_shared_chain": per_token("tree", "chain_shared"),
        "trajectories_per_token_vs_naive_chain": per_token("tree", "chain_naive"),
        "trajectories_per_token_vs_engine_chain": per_token("tree", "chain_engine"),
        "eta_trajectories_per_token_vs_chain": per_token("eta_mcts", "chain_cached"),
        "eta_trajectories_per_token_vs_shared_chain": per_token("eta_mcts", "chain_shared"),
        "wall_per_trajectory_vs_chain": by["chain_cached"]["wall_per_traj_ms"] / by["tree"]["wall_per_traj_ms"]
        if by["tree"]["trajectories"] else float("nan"),
        "accuracy_at_equal_forward_tokens": {
            m: {"forward_tokens": by[m]["forward_tokens"], "solved": by[m]["solved"] / n_problems,
                "greedy_correct": by[m]["greedy_correct"] / n_problems, "correct_trajectories": by[m]["correct"]}
            for m in ("eta_unshared", "eta_equal_tokens")},
        "tree_shape": shape | {"siblings_without_replacement": not args.with_replacement},
        "eta_config": dataclasses.asdict(eta),
        "chain_stop_rule": "the tree's: first terminal step line; lines of <= step_tokens; <= max_depth lines",
        "temperature": args.temperature, "problems": n_problems,
        "policy": args.policy, "device": args.device, "threads": torch.get_num_threads(),
        "policy_sha256": hashlib.sha256((Path(args.policy) / "model.safetensors").read_bytes()).hexdigest()
        if (Path(args.policy) / "model.safetensors").exists() else None,
        "methods": result_rows, "quick": args.quick,
        "speedprobe_before": probe_before, "speedprobe_after": speedprobe(),
    }
    path = save("tokens" if args.device == "cpu" else f"tokens_{args.device.replace(':', '')}", result)
    print(table(result_rows, ["method", *COUNTS, "traj_per_1k_tokens", "trie_tokens", "compute_ratio",
                              "kv_memory_ratio"]))
    for k in ("compute_ratio", "kv_memory_ratio", "tree_compute_ratio", "tree_kv_memory_ratio",
              "forward_per_stored_token", "trajectories_per_token_vs_chain", "trajectories_per_token_vs_shared_chain",
              "trajectories_per_token_vs_naive_chain", "trajectories_per_token_vs_engine_chain",
              "eta_trajectories_per_token_vs_chain", "eta_trajectories_per_token_vs_shared_chain",
              "wall_per_trajectory_vs_chain"):
        print(f"{k} = {result[k]:.3f}")
    print(f"accuracy at equal forward tokens: {result['accuracy_at_equal_forward_tokens']}")
    print(f"speedprobe before {probe_before}, after {result['speedprobe_after']}")
    print(f"tree shape {shape}, {n_problems} problems -> {path}")


if __name__ == "__main__":
    main()
