"""Where one iteration's gain comes from: policies side by side on the same eval problems and seed.

For each policy: greedy pass@1, pass@k, maj@k (`arbor.stages.evaluate.evaluate_policy`, one seed for all, so
sampling noise is shared), optionally eta-MCTS search decoding (`--search`), and the synthetic task's planted
borrow misconception in the greedy solutions: among the greedy steps `a-b=c` whose subtraction needs a borrow,
the fraction written without borrowing (`c == subtract_without_borrow(a, b)`, e.g. 42-7=45) and the fraction
correct. Writes bench/results/improve.json and prints a table.

    .venv/bin/python -m bench.improve --threads 1 --policy policy_0=/tmp/policy_iter0 --policy dpo=models/... \
        [--eval data/eval.jsonl] [--n 200] [--search]
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import save, table

STEP = re.compile(r"^(\d+)-(\d+)=(-?\d+)$")


def borrow_steps(texts: Sequence[str]) -> dict[str, Any]:
    """Counts over every `a-b=c` line needing a borrow: `borrow_steps`, `borrow_misconception` (fraction done
    without borrowing), `borrow_correct` (fraction right)."""
    from arbor.tasks.synthetic import needs_borrow, subtract_without_borrow

    n = wrong = right = 0
    for text in texts:
        for line in text.splitlines():
            m = STEP.match(line.strip())
            if not m:
                continue
            a, b, c = (int(x) for x in m.groups())
            if 0 <= b <= a and needs_borrow(a, b):
                n += 1
                wrong += c == subtract_without_borrow(a, b)
                right += c == a - b
    return {"borrow_steps": n, "borrow_misconception": wrong / max(1, n), "borrow_correct": right / max(1, n)}


def measure(name: str, path: str, args: argparse.Namespace) -> dict[str, Any]:
    """All numbers of one policy (module docstring)."""
    from arbor.lm.base import StopRule
    from arbor.lm.hf import HFPolicy
    from arbor.pipeline.config import load_config
    from arbor.pipeline.seeds import derive_seed
    from arbor.stages.evaluate import evaluate_policy, search_decode
    from arbor.tasks import build_task, read_problems

    cfg = load_config(args.params or None)
    e = cfg.evaluate
    problems = read_problems(args.eval)[: args.n]
    task = build_task(cfg.task)
    policy = HFPolicy.from_pretrained(path, cfg.device)
    seed = derive_seed(cfg.seed, "bench.improve")
    t0 = time.perf_counter()
    row: dict[str, Any] = {"policy": name, "path": path}
    row |= evaluate_policy(policy, task, problems, k=e.k, temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                           batch_size=e.batch_size, seed=seed)
    greedy = policy.sample([policy.encode_prompt(task.prompt(p)) for p in problems],
                           stop=StopRule(max_new_tokens=e.max_new_tokens), temperature=0.0, seed=seed,
                           batch_size=e.batch_size)
    row |= borrow_steps([c.text for c in greedy])
    if args.search:
        row |= search_decode(policy, task, problems, eta=cfg.search.eta, simulations=e.search_simulations,
                             seed=seed + 2, kv_budget_mb=cfg.search.kv_budget_mb)
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", required=True, help="name=dir, repeatable (the first is the base).")
    p.add_argument("--eval", default="data/eval.jsonl")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--n", type=int, default=None, help="First n eval problems (default: all).")
    p.add_argument("--search", action="store_true", help="Also eta-MCTS search decoding (slow).")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="improve", help="Result file bench/results/<name>.json.")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(*spec.split("=", 1), args) for spec in args.policy]
    base = rows[0]
    for r in rows:
        r["greedy_gain"] = r["greedy_pass1"] - base["greedy_pass1"]
        r["pass_at_k_gain"] = r["pass_at_k"] - base["pass_at_k"]
    path = save(args.name, {"rows": rows, "eval": args.eval, "n": args.n, "search": args.search})
    cols = ["policy", "greedy_pass1", "greedy_gain", "pass_at_k", "pass_at_k_gain", "maj_at_k", "borrow_steps",
            "borrow_misconception", "borrow_correct", "seconds"] + (["search_pass1"] if args.search else [])
    print(table(rows, cols))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
