"""Benchmark: token economics of tree expansion vs independent chains at an equal forward-token budget.

    python -m bench.tokens [--quick] [--policy models/iter_0/policy]

For each problem: one tree (`expand_tree`, default shape: binary branching at every level up to
`--branch-depth`, siblings sampled without replacement, then single continuations to a terminal), then three
chain baselines, each sampled until it has used the tree's forward tokens, all with the tree's stop rule (a
chain ends after its first terminal step line, lines cut at `step_tokens`, at most `max_depth` lines:
`TreeBuilder.trajectory_stop()`), the same temperature and each method with its own KV store per problem:

- `chain_cached`: one pass of decoding per chain from the prompt's cached state (content-keyed, so every batch of
  the problem reuses it: the prompt is computed once per problem). The strongest baseline.
- `chain_naive`: one pass per chain, each recomputing the prompt.
- `chain_engine`: chains grown step by step through the tree engine (`chain_tree`), the tree's exact code path.

Chain batch sizes come from the tree's mean path length, so a problem's chains are mostly one batch.
Reported per method: complete distinct trajectories (a terminal step line reached), how many are correct,
problems solved (any correct), forward tokens, padded positions, padded KV positions (attention over left
padding), wall time. JSON keys: reuse_ratio (tree forward tokens / `TreeBuilder.compute_tokens()`, the tokens a
perfect prefix cache computes), trajectories_per_token_vs_chain (tree / chain_cached),
trajectories_per_token_vs_naive_chain, trajectories_per_token_vs_engine_chain, wall_per_trajectory_vs_chain
(chain_cached / tree; > 1 = tree faster), tree_shape. Every ratio comes from one run, methods side by side on
the same problems. Writes bench/results/tokens.json and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from arbor.lm.base import StopRule
from arbor.lm.hf import HFPolicy
from arbor.lm.kvcache import KVStore
from arbor.mcts.grow import TreeBuilder
from arbor.mcts.kernels import terminal_nodes
from arbor.mcts.samplers import chain_tree, expand_tree, sample_chains
from arbor.pipeline.config import TaskConfig
from arbor.tasks import build_task, is_solved, make_splits
from arbor.tasks.answers import is_terminal_step
from bench.common import save, table

METHODS = ("tree", "chain_cached", "chain_naive", "chain_engine")
COUNTS = ("trajectories", "correct", "solved", "forward_tokens", "padded_positions", "padded_kv_positions",
          "wall_seconds")


def _distinct_complete(texts: list[str]) -> set[str]:
    return {t for t in texts if any(is_terminal_step(line) for line in t.splitlines())}


def _quality(texts: set[str], reward: Callable[[str], float]) -> dict:
    """How many distinct trajectories are correct, and whether any is (the accuracy the tokens buy)."""
    good = sum(is_solved(reward(t)) for t in texts)
    return {"trajectories": len(texts), "correct": good, "solved": int(good > 0)}


def _leaf_texts(b: TreeBuilder) -> list[str]:
    return [b.text(int(t)) for t in terminal_nodes(b.tree)]


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
                                 prompt_cached=method == "chain_cached", store=store)
            texts += [c.text for c in outs]
        n_chains += n
        batch += 1
    used = policy.counters.since(before)
    return {**_quality(_distinct_complete(texts), reward), "samples": n_chains, "batches": batch,
            "forward_tokens": used.forward_tokens, "padded_positions": used.padded_positions,
            "padded_kv_positions": used.padded_kv_positions, "wall_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Fewer problems (well under 2 minutes).")
    ap.add_argument("--policy", default="models/iter_0/policy", help="Policy directory (run `make run` first).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--problems", type=int, default=None)
    ap.add_argument("--branching", type=int, default=2)
    ap.add_argument("--branch-depth", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (tree and chains).")
    ap.add_argument("--with-replacement", action="store_true",
                    help="Sample siblings independently (repeats allowed) instead of without replacement.")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). On a shared, loaded machine 1 avoids spinning "
                         "threads that slow every method ~30x.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        policy = HFPolicy.from_pretrained(args.policy, args.device)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nTrain the tiny policy first (`make run`) or pass --policy DIR.") from None
    n_problems = args.problems or (6 if args.quick else 24)
    task = build_task(TaskConfig())
    problems = make_splits(TaskConfig(), 1, n_problems, seed=99)[1]
    steps = {"max_depth": 12, "step_tokens": 16}
    shape: dict = {"branching": args.branching, "branch_depth": args.branch_depth, **steps}
    totals = {m: dict.fromkeys(COUNTS, 0) | {"wall_seconds": 0.0} for m in METHODS}
    compute_tokens = 0
    for i, p in enumerate(problems):
        print(f"problem {i + 1}/{n_problems}", file=sys.stderr, flush=True)

        def reward(text: str, p=p) -> float:
            return task.reward(p, text)

        prompt = policy.encode_prompt(task.prompt(p))
        before = policy.counters.snapshot()
        t0 = time.perf_counter()
        s = expand_tree(policy, prompt, **shape, is_terminal=is_terminal_step, temperature=args.temperature, seed=i,
                        store=KVStore(), distinct=not args.with_replacement)
        wall = time.perf_counter() - t0
        used = policy.counters.since(before)
        tr = totals["tree"]
        for k, v in _quality(_distinct_complete(_leaf_texts(s)), reward).items():
            tr[k] += v
        for k in ("forward_tokens", "padded_positions", "padded_kv_positions"):
            tr[k] += getattr(used, k)
        tr["wall_seconds"] += wall
        compute_tokens += s.compute_tokens()
        leaves = terminal_nodes(s.tree)
        est_len = float(np.mean([s.tree.path_tokens(int(t)).size - len(prompt) for t in leaves]))
        for name in METHODS[1:]:
            r = run_chains(policy, prompt, used.forward_tokens, method=name, stop=s.trajectory_stop(),
                           est_len=est_len, seed=1000 * i, temperature=args.temperature, reward=reward, shape=steps)
            for k in COUNTS:
                totals[name][k] += r[k]
    rows = []
    for name, t in totals.items():
        rows.append({"method": name, **t, "traj_per_1k_tokens": 1000 * t["trajectories"] / t["forward_tokens"],
                     "wall_per_traj_ms": 1000 * t["wall_seconds"] / max(1, t["trajectories"])})
    by = {r["method"]: r for r in rows}
    per_token = {m: by["tree"]["traj_per_1k_tokens"] / by[m]["traj_per_1k_tokens"]
                 if by[m]["trajectories"] else float("nan") for m in METHODS[1:]}
    result = {
        "reuse_ratio": totals["tree"]["forward_tokens"] / compute_tokens,
        "trajectories_per_token_vs_chain": per_token["chain_cached"],
        "trajectories_per_token_vs_naive_chain": per_token["chain_naive"],
        "trajectories_per_token_vs_engine_chain": per_token["chain_engine"],
        "wall_per_trajectory_vs_chain": by["chain_cached"]["wall_per_traj_ms"] / by["tree"]["wall_per_traj_ms"]
        if by["tree"]["trajectories"] else float("nan"),
        "tree_shape": shape | {"siblings_without_replacement": not args.with_replacement},
        "chain_stop_rule": "the tree's: first terminal step line; lines of <= step_tokens; <= max_depth lines",
        "tree_compute_tokens": compute_tokens,
        "temperature": args.temperature, "problems": n_problems,
        "policy": args.policy, "device": args.device, "threads": torch.get_num_threads(),
        "policy_sha256": hashlib.sha256((Path(args.policy) / "model.safetensors").read_bytes()).hexdigest()
        if (Path(args.policy) / "model.safetensors").exists() else None,
        "methods": rows, "quick": args.quick,
    }
    path = save("tokens" if args.device == "cpu" else f"tokens_{args.device.replace(':', '')}", result)
    print(table(rows, ["method", *COUNTS, "traj_per_1k_tokens", "wall_per_traj_ms"]))
    for k in ("reuse_ratio", "trajectories_per_token_vs_chain", "trajectories_per_token_vs_naive_chain",
              "trajectories_per_token_vs_engine_chain", "wall_per_trajectory_vs_chain"):
        print(f"{k} = {result[k]:.3f}")
    print(f"tree shape {shape}, {n_problems} problems -> {path}")


if __name__ == "__main__":
    main()
