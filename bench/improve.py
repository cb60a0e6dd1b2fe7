"""Where one iteration's gain comes from: policies side by side on the same eval problems and seed.

For each policy: greedy pass@1, pass@k, maj@k (`arbor.stages.evaluate.evaluate_policy`, one seed for all, so
sampling noise is shared), optionally eta-MCTS search decoding (`--search`), and the synthetic task's planted
borrow misconception in the greedy solutions: among the greedy steps `a-b=c` whose subtraction needs a borrow,
the fraction written without borrowing (`c == subtract_without_borrow(a, b)`, e.g. 42-7=45) and the fraction
wrong (`Task.diagnostics`). Writes bench/results/improve.json and prints a table.

    .venv/bin/python -m bench.improve --threads 1 --policy policy_0=/tmp/policy_iter0 --policy dpo=models/... \
        [--eval data/eval.jsonl] [--n 200] [--search]

The three objectives of one iteration from the same preference set (#10): `--objectives dpo grpo sft_best
--prefs prefs/iter_1 --base models/iter_0/policy` first trains one policy per objective (`arbor train`, the
params' train settings otherwise, into a temporary directory with its checkpoints, deleted at the end; its
train wall time is reported), then measures the base and each trained policy as above. `arbor train` takes the
project lock: run this when no pipeline is running.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import save, table


def measure(name: str, path: str, args: argparse.Namespace) -> dict[str, Any]:
    """All numbers of one policy (module docstring)."""
    from arbor.lm.loading import load_policy
    from arbor.pipeline.config import load_config
    from arbor.pipeline.seeds import derive_seed
    from arbor.stages.evaluate import evaluate_policy, search_decode
    from arbor.tasks import build_task, read_problems

    cfg = load_config(args.params or None)
    e = cfg.evaluate
    problems = read_problems(args.eval)[: args.n]
    task = build_task(cfg.task)
    policy = load_policy(path, cfg)
    seed = derive_seed(cfg.seed, "bench.improve")
    t0 = time.perf_counter()
    row: dict[str, Any] = {"policy": name, "path": path}
    row |= evaluate_policy(policy, task, problems, k=e.k, temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                           batch_size=e.batch_size, seed=seed)  # with Task.diagnostics of greedy and samples
    if args.search:
        row |= search_decode(policy, task, problems[: e.search_problems], eta=cfg.search.eta,
                             simulations=e.search_simulations,
                             seed=seed + 2, kv_budget_mb=cfg.search.kv_budget_mb)
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", default=[], help="name=dir, repeatable (the first is the base).")
    p.add_argument("--eval", default="data/eval.jsonl")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--n", type=int, default=None, help="First n eval problems (default: all).")
    p.add_argument("--search", action="store_true", help="Also eta-MCTS search decoding (slow).")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="improve", help="Result file bench/results/<name>.json.")
    p.add_argument("--objectives", nargs="*", default=[], help="Train one policy per objective first (docstring).")
    p.add_argument("--prefs", default="prefs/iter_1", help="--objectives: the preference set to train on.")
    p.add_argument("--base", default="models/iter_0/policy", help="--objectives: starting and reference policy.")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs, trained = list(args.policy), {}
    tmp = tempfile.TemporaryDirectory(prefix="bench-improve-")
    if args.objectives:
        specs = [f"base={args.base}", *specs]
    for obj in args.objectives:
        out = Path(tmp.name) / obj
        subprocess.run([sys.executable, "-m", "arbor.stages.train", "--params", args.params, "--iter", "1",
                        "--prefs", args.prefs, "--policy", args.base, "--out", str(out), "--metrics",
                        str(out) + ".json", "--checkpoints", str(out) + ".ckpt", "--tracking.enabled", "false",
                        "--threads", str(args.threads), "--train.objective", obj], check=True)
        trained[obj] = json.loads(Path(str(out) + ".json").read_text())
        specs.append(f"{obj}={out}")
    if not specs:
        p.error("give --policy name=dir and/or --objectives")
    rows = [measure(*spec.split("=", 1), args) for spec in specs]
    for r in rows:
        if r["policy"] in trained:
            r |= {"train_seconds": trained[r["policy"]]["wall_seconds"], "train_items": trained[r["policy"]]["items"]}
    base = rows[0]
    for r in rows:
        r["greedy_gain"] = r["greedy_pass1"] - base["greedy_pass1"]
        r["pass_at_k_gain"] = r["pass_at_k"] - base["pass_at_k"]
    for r in rows:  # the trained policies are temporary: their rows keep the numbers, not the paths
        if r["policy"] in trained:
            r["path"] = None
    path = save(args.name, {"rows": rows, "eval": args.eval, "n": args.n, "search": args.search,
                            "objectives": args.objectives, "prefs": args.prefs if args.objectives else None})
    tmp.cleanup()
    cols = ["policy", "greedy_pass1", "greedy_gain", "pass_at_k", "pass_at_k_gain", "maj_at_k",
            "greedy_step_error_rate", "greedy_borrow_misconception_rate", "greedy_borrow_error_rate", "seconds"]
    cols += (["search_pass1"] if args.search else []) + (["train_seconds", "train_items"] if trained else [])
    print(table(rows, cols))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
