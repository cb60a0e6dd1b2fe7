"""Benchmark: token economics of tree expansion vs independent chains at an equal forward-token budget.

    python -m bench.tokens [--quick] [--policy models/iter_0/policy]

For each problem: one tree (`expand_tree`, default shape: binary branching at every level up to
`--branch-depth`, siblings sampled without replacement, then single continuations to a terminal), then
prompt-cached chains and naive chains sampled until each has used the tree's forward tokens. Reported per
method: complete distinct trajectories, how many are correct, problems solved (any correct), forward tokens,
padded positions, wall time. JSON keys: reuse_ratio (tree forward / unique tree tokens),
trajectories_per_token_vs_chain (tree / prompt-cached chains), trajectories_per_token_vs_naive_chain,
wall_per_trajectory_vs_chain (chain / tree; > 1 = tree faster), tree_shape.
Writes bench/results/tokens.json and prints a table.
"""

from __future__ import annotations

import argparse
import time

from arbor.lm.hf import HFPolicy
from arbor.lm.kvcache import KVStore
from arbor.mcts.kernels import terminal_nodes
from arbor.mcts.samplers import expand_tree, sample_chains
from arbor.pipeline.config import TaskConfig
from arbor.tasks import build_task, make_splits
from arbor.tasks.answers import is_terminal_step
from bench.common import save, table


def _distinct_complete(texts: list[str]) -> set[str]:
    return {t for t in texts if any(is_terminal_step(line) for line in t.splitlines())}


def _quality(texts: set[str], reward: object) -> dict:
    """How many distinct trajectories are correct, and whether any is (the accuracy the tokens buy)."""
    good = sum(reward(t) > 0.5 for t in texts)  # type: ignore[operator]
    return {"trajectories": len(texts), "correct": good, "solved": int(good > 0)}


def run_chains(policy: HFPolicy, prompt: list[int], budget: int, *, cached: bool, seed: int, batch: int,
               max_new_tokens: int, temperature: float, reward: object) -> dict:
    before = policy.counters.snapshot()
    t0 = time.perf_counter()
    texts: list[str] = []
    store = KVStore()
    i = 0
    per_chain = 0.0  # running estimate of tokens per chain, so the last batch does not overshoot the budget
    while (spent := policy.counters.since(before).forward_tokens) < budget:
        n = 2 if not per_chain else max(1, min(batch, round((budget - spent) / per_chain)))
        outs = sample_chains(policy, prompt, n, max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=seed + i, prompt_cached=cached, store=store)
        texts += [c.text for c in outs if c.finish == "eos"]
        per_chain = policy.counters.since(before).forward_tokens / max(1, len(texts))
        i += 1
    used = policy.counters.since(before)
    return {**_quality(_distinct_complete(texts), reward), "samples": len(texts),
            "forward_tokens": used.forward_tokens, "padded_positions": used.padded_positions,
            "wall_seconds": time.perf_counter() - t0}


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
    args = ap.parse_args()
    try:
        policy = HFPolicy.from_pretrained(args.policy, args.device)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nTrain the tiny policy first (`make run`) or pass --policy DIR.") from None
    n_problems = args.problems or (6 if args.quick else 24)
    task = build_task(TaskConfig())
    problems = make_splits(TaskConfig(), 1, n_problems, seed=99)[1]
    shape: dict = {"branching": args.branching, "branch_depth": args.branch_depth, "max_depth": 12, "step_tokens": 16}
    totals = {m: {"trajectories": 0, "correct": 0, "solved": 0, "forward_tokens": 0, "padded_positions": 0,
                  "wall_seconds": 0.0, "unique_tokens": 0} for m in ("tree", "chain_cached", "chain_naive")}
    for i, p in enumerate(problems):
        def reward(text: str, p=p) -> float:
            return task.reward(p, text)

        prompt = policy.encode_prompt(task.prompt(p))
        before = policy.counters.snapshot()
        t0 = time.perf_counter()
        s = expand_tree(policy, prompt, **shape, is_terminal=is_terminal_step, temperature=args.temperature, seed=i,
                        store=KVStore(), distinct=not args.with_replacement)
        used = policy.counters.since(before)
        tree = s.tree
        q = _quality(_distinct_complete([s.text(int(t)) for t in terminal_nodes(tree)]), reward)
        tr = totals["tree"]
        for k in ("trajectories", "correct", "solved"):
            tr[k] += q[k]
        tr["forward_tokens"] += used.forward_tokens
        tr["padded_positions"] += used.padded_positions
        tr["wall_seconds"] += time.perf_counter() - t0
        tr["unique_tokens"] += tree.num_tokens
        for name, cached in (("chain_cached", True), ("chain_naive", False)):
            r = run_chains(policy, prompt, used.forward_tokens, cached=cached, seed=1000 * i, batch=16,
                           max_new_tokens=96, temperature=args.temperature, reward=reward)
            for k in ("trajectories", "correct", "solved", "forward_tokens", "padded_positions", "wall_seconds"):
                totals[name][k] += r[k]
    rows = []
    for name, t in totals.items():
        rows.append({"method": name, **t, "traj_per_1k_tokens": 1000 * t["trajectories"] / t["forward_tokens"],
                     "wall_per_traj_ms": 1000 * t["wall_seconds"] / max(1, t["trajectories"])})
    by = {r["method"]: r for r in rows}
    result = {
        "reuse_ratio": totals["tree"]["forward_tokens"] / totals["tree"]["unique_tokens"],
        "trajectories_per_token_vs_chain": by["tree"]["traj_per_1k_tokens"] / by["chain_cached"]["traj_per_1k_tokens"],
        "trajectories_per_token_vs_naive_chain":
            by["tree"]["traj_per_1k_tokens"] / by["chain_naive"]["traj_per_1k_tokens"],
        "wall_per_trajectory_vs_chain": by["chain_cached"]["wall_per_traj_ms"] / by["tree"]["wall_per_traj_ms"],
        "tree_shape": shape | {"siblings_without_replacement": not args.with_replacement},
        "temperature": args.temperature, "problems": n_problems,
        "policy": args.policy, "device": args.device,
        "methods": rows, "quick": args.quick,
    }
    path = save("tokens" if args.device == "cpu" else f"tokens_{args.device.replace(':', '')}", result)
    print(table(rows, ["method", "trajectories", "correct", "solved", "forward_tokens", "padded_positions",
                       "wall_seconds", "traj_per_1k_tokens", "wall_per_traj_ms"]))
    for k in ("reuse_ratio", "trajectories_per_token_vs_chain", "trajectories_per_token_vs_naive_chain",
              "wall_per_trajectory_vs_chain"):
        print(f"{k} = {result[k]:.3f}")
    print(f"tree shape {shape}, {n_problems} problems -> {path}")


if __name__ == "__main__":
    main()
