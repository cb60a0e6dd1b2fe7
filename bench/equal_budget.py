"""Experiment (issue #13): tree vs chain at equal forward-token budgets, for training and for decoding.

    .venv/bin/python -m bench.equal_budget --quick --threads 1 [--policy /tmp/policy_iter0] [--critics DIR]

(a) Training. From the same policy_0, per training problem a budget of B, B/2 or B/4 forward tokens (policy
tokens at the model boundary, prefill + decode; `--budget` = B) buys the training data of one method:
- `chain_grpo`: G independent chains (`search.algorithm: chains`, prompt cached, each chain computing its own
  tokens unless `--chain-sharing`); each chain is its own group, so the intra-tree term is 0 and the advantage
  is the prompt-level (R - mean)/std: GRPO;
- `tree_grpo`: Tree-GRPO sampling (arXiv 2509.21240 §3, M trees, L rounds, N branches), intra + inter advantages;
- `step_dpo`: eta-MCTS trees (AlphaLLM §4.3, oracle reward at terminals, no critics), stopped at the budget
  (`eta.max_forward_tokens`), step-level pairs from sibling subtrees -> step-DPO (+ chosen NLL).
G and (M, L, N) are sized from a pilot's mean trajectory length T so that prompt + G*T and prompt +
M*T*(1 + L*N/2) (Tree-GRPO's expected cost, times the pilot's measured/expected ratio) match the budget;
the measured forward tokens per problem are reported beside each result. Data -> `arbor prefs` -> `arbor train`
(stage functions, params.yaml's `train:` section (learning rate, beta, schedule) and the same optimizer steps for
every method: `--train-steps`), then greedy pass@1 on the eval problems; mean and std over `--seeds`.

(b) Decoding, on held-out problems with policy_0, no gold answer anywhere: greedy; self-consistency (majority
over N prompt-cached samples); ORM best-of-N (same samples, ORM of the critics dir); eta-MCTS with the critics as
node scorer (AlphaLLM decoding, `search_decode`). Forward tokens per problem = policy + critic tokens. Curves over
N and simulations; the `decoding` entry of each method is its curve point closest to eta-MCTS's largest budget.

(c) The decoding comparison alone for another preset (no training: `--methods` with no name), e.g. the real
model of configs/smollm2.yaml with its pipeline's policy_0 and critics_0:
    .venv/bin/python -m bench.equal_budget --params configs/smollm2.yaml --policy models/iter_0/policy \
        --critics models/iter_0/critics --methods --decode-problems 16 --name equal_budget_smollm2
Policies load as the stages load them (`load_policy`: dtype, chat template, step-end rule).

Writes bench/results/equal_budget[_quick].json (shape of issue #13, plus the curves, the measured tokens and
wall times, the speed probe) and bench/results/equal_budget_{training,decoding}.png; prints tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, save, speedprobe, table
from bench.tokens import sharing

METHODS = {"chain_grpo": ("chains", "grpo"), "tree_grpo": ("tree_grpo", "grpo"), "step_dpo": ("eta_mcts", "dpo")}
LEVELS = {"B": 1.0, "B/2": 0.5, "B/4": 0.25}


def tree_shape(units: float) -> tuple[int, int, int]:
    """(M, L, N) whose Tree-GRPO expected cost M*(1 + L*N/2) trajectories is closest to `units`; ties go to
    more rollouts M*(L*N + 1)."""
    grid = [(m, l_, n) for m in range(1, 17) for l_ in range(1, 5) for n in range(1, 4)]
    return min(grid, key=lambda s: (abs(s[0] * (1 + s[1] * s[2] / 2) - units), -s[0] * (s[1] * s[2] + 1)))


def sized_search(cfg: Any, method: str, budget: float, pilot: dict[str, float]) -> Any:
    """The `SearchConfig` that spends about `budget` forward tokens per problem with `method`'s sampler:
    `pilot` holds the prompt and trajectory lengths and the measured / expected cost of Tree-GRPO trees (a
    branch shares its prefix, so a tree costs less than M*T*(1 + L*N/2))."""
    s = cfg.search
    units = max(1.0, (budget - pilot["prompt_len"]) / max(pilot["traj_len"], 1.0))
    algo = METHODS[method][0]
    if algo == "chains":
        return dataclasses.replace(s, algorithm=algo, chains=max(2, round(units)))
    if algo == "tree_grpo":
        m, l_, n = tree_shape(units / max(pilot["tree_cost_factor"], 0.1))
        return dataclasses.replace(s, algorithm=algo, grpo_m=m, grpo_l=l_, grpo_n=n)
    eta = dataclasses.replace(s.eta, num_simulations=100_000, max_forward_tokens=int(budget))
    return dataclasses.replace(s, algorithm=algo, eta=eta, n_rollouts=0)


def generate(policy: Any, task: Any, problems: Sequence[Any], scfg: Any, seed: int, out: Path) -> dict[str, float]:
    """Search every problem with `scfg`, write the trees (with a manifest) to `out`; mean tokens and wall time."""
    from arbor.lm.kvcache import KVStore
    from arbor.mcts.treeio import write_trees
    from arbor.pipeline.manifest import write_manifest
    from arbor.stages.search import search_problem

    store = KVStore(int(scfg.kv_budget_mb * 2**20))
    rows, stats = [], []
    for i, p in enumerate(problems):
        r, st = search_problem(policy, task, p, scfg, seed + i, store)
        rows.append(r)
        stats.append(st)
    out.mkdir(parents=True)
    write_trees(out / "part-00000.parquet", rows)
    write_manifest(out, {"stage": "search", "bench": "equal_budget"})
    n = len(stats)
    return {"forward_tokens": sum(s["forward_tokens"] for s in stats) / n,
            "terminals": sum(s["terminals"] for s in stats) / n,
            "solved_any": sum(s["solved_any"] for s in stats) / n,
            "search_seconds": sum(s["wall_seconds"] for s in stats)}


def greedy_pass1(policy: Any, task: Any, problems: Sequence[Any], e: Any, seed: int) -> float:
    """Greedy pass@1 of `policy` (the evaluate stage's greedy decode)."""
    from arbor.lm.base import StopRule

    outs = policy.sample([policy.encode_prompt(task.prompt(p)) for p in problems],
                         stop=StopRule(at_newline=False, max_new_tokens=e.max_new_tokens), temperature=0.0, seed=seed,
                         batch_size=e.batch_size)
    return sum(task.is_correct(p, c.text) for p, c in zip(problems, outs, strict=True)) / len(problems)


def train_one(cfg: Any, policy: Any, task: Any, train: Sequence[Any], evals: Sequence[Any], method: str, level: str,
              seed_i: int, args: argparse.Namespace, pilot: dict[str, float], work: Path) -> dict[str, Any]:
    """One (method, budget, seed) cell: data at the budget -> prefs -> train -> greedy pass@1."""
    from arbor.lm.loading import load_policy
    from arbor.pipeline.config import ArborInputError
    from arbor.pipeline.seeds import derive_seed
    from arbor.stages import prefs as prefs_stage
    from arbor.stages import train as train_stage

    budget = args.budget * LEVELS[level]
    scfg = sized_search(cfg, method, budget, pilot)
    seed = derive_seed(cfg.seed, "bench.equal_budget", method, level, seed_i)
    cell = work / f"{method}_{level.replace('/', '_')}_{seed_i}"
    t0 = time.perf_counter()
    row: dict[str, Any] = {"method": method, "level": level, "seed": seed_i, "budget": budget,
                           "shape": {"chains": scfg.chains} if method == "chain_grpo" else
                           {"m": scfg.grpo_m, "l": scfg.grpo_l, "n": scfg.grpo_n} if method == "tree_grpo" else
                           {"max_forward_tokens": scfg.eta.max_forward_tokens}}
    with sharing(policy, args.chain_sharing or method != "chain_grpo"):
        row |= generate(policy, task, train, scfg, seed, cell / "trees")
    pm = prefs_stage.run(cfg, trees_dir=cell / "trees", out_dir=cell / "prefs")
    row |= {"pairs": pm["pairs"],
            "trajectories_nonzero_advantage": pm["trajectories_nonzero_advantage"]}
    t = dataclasses.replace(cfg.train, objective=METHODS[method][1], checkpoint_every=0,  # params.yaml's train:
                            batch_size=args.batch_size or cfg.train.batch_size)      # lr, beta, schedule
    items = row["pairs"] if t.objective == "dpo" else row["trajectories_nonzero_advantage"]
    row["items"] = items
    try:
        t = dataclasses.replace(t, epochs=args.train_steps * t.batch_size / max(1, items or 1))
        tm = train_stage.run(cfg, prefs_dir=cell / "prefs", policy_dir=args.policy, out=cell / "policy", train=t)
        trained = load_policy(cell / "policy", cfg)
        row |= {"train_steps": tm["steps"], "train_seconds": tm["train_seconds"]}
    except ArborInputError:  # no pair / no trajectory with a non-zero advantage: nothing to learn, policy_0 stays
        trained, row["train_steps"] = policy, 0
    row["pass1"] = greedy_pass1(trained, task, evals, cfg.evaluate, derive_seed(cfg.seed, "bench.equal_budget.eval"))
    row["wall_seconds"] = time.perf_counter() - t0
    return row


def pilot_lengths(cfg: Any, policy: Any, task: Any, problems: Sequence[Any], work: Path) -> dict[str, float]:
    """Mean prompt length, trajectory length (tokens after the prompt) of 4 chains, and Tree-GRPO's measured
    cost over its expected cost (`tree_cost_factor`), on a few problems."""
    scfg = dataclasses.replace(cfg.search, algorithm="chains", chains=4)
    prompt = sum(len(policy.encode_prompt(task.prompt(p))) for p in problems) / len(problems)
    with sharing(policy, False):  # T = the tokens one chain computes on its own
        g = generate(policy, task, problems, scfg, 7, work / "pilot")
    traj = (g["forward_tokens"] - prompt) / 4
    tree = dataclasses.replace(cfg.search, algorithm="tree_grpo", grpo_m=2, grpo_l=2, grpo_n=2)  # M(1+LN/2) = 6
    t = generate(policy, task, problems, tree, 7, work / "pilot_tree")
    return {"prompt_len": prompt, "traj_len": traj, "tree_cost_factor": (t["forward_tokens"] - prompt) / traj / 6}


def decoding(cfg: Any, policy: Any, task: Any, problems: Sequence[Any], args: argparse.Namespace) -> list[dict]:
    """Accuracy-vs-tokens points of greedy, self-consistency@N, ORM best-of-N and critic-scored eta-MCTS."""
    from arbor.critics.scorer import CriticScorer, load_critics
    from arbor.lm.base import StopRule
    from arbor.lm.kvcache import KVStore
    from arbor.mcts.samplers import sample_chains
    from arbor.pipeline.seeds import derive_seed
    from arbor.stages.evaluate import critic_readouts, majority_correct, search_decode

    e, n = cfg.evaluate, len(problems)
    seed = derive_seed(cfg.seed, "bench.equal_budget.decode")
    c = cfg.critics
    critics = load_critics(args.critics, sorted({"prm", "orm", *c.needed(gold=False)}), device=cfg.device,
                           budget_bytes=int(c.kv_budget_mb * 2**20), batch_size=c.batch_size,
                           confidence=c.confidence)
    stop = StopRule(at_newline=False, max_new_tokens=e.max_new_tokens)
    before, t0 = policy.counters.snapshot(), time.perf_counter()
    acc = greedy_pass1(policy, task, problems, e, seed)
    points = [{"method": "greedy", "n": 1, "accuracy": acc, "wall_seconds": time.perf_counter() - t0,
               "forward_tokens": policy.counters.since(before).forward_tokens / n}]
    for big_n in args.sc_n:
        before, t0 = policy.counters.snapshot(), time.perf_counter()
        samples = [sample_chains(policy, policy.encode_prompt(task.prompt(p)), big_n, stop=stop,
                                 temperature=e.temperature, seed=seed + 101 * i, prompt_cached=True, store=KVStore())
                   for i, p in enumerate(problems)]
        tokens = policy.counters.since(before).forward_tokens / n
        sc = sum(majority_correct(task, p, [x.text for x in s]) for p, s in zip(problems, samples, strict=True))
        points.append({"method": "self_consistency", "n": big_n, "accuracy": sc / n, "forward_tokens": tokens,
                       "wall_seconds": time.perf_counter() - t0})
        t1 = time.perf_counter()
        ro = critic_readouts(critics, policy, task, problems, samples, step_tokens=cfg.search.eta.step_tokens)
        points.append({"method": "orm_best_of_n", "n": big_n, "accuracy": ro["orm_best_of_n"],
                       "forward_tokens": tokens + ro["rerank_critic_forward_tokens"] / n,
                       "critic_forward_tokens": ro["rerank_critic_forward_tokens"] / n,
                       "wall_seconds": points[-1]["wall_seconds"] + time.perf_counter() - t1})
    scorer = CriticScorer(critics, c)  # decoding: no gold, terminals by the ORM
    for sims in args.sims:
        d = search_decode(policy, task, problems, eta=cfg.search.eta, simulations=sims, seed=seed + 2,
                          kv_budget_mb=cfg.search.kv_budget_mb, scorer=scorer)
        points.append({"method": "eta_mcts", "n": sims, "accuracy": d["search_pass1"],
                       "vote_accuracy": d["search_vote_pass1"], "best_accuracy": d["search_best_pass1"],
                       "forward_tokens": (d["search_forward_tokens"] + d["search_critic_forward_tokens"]) / n,
                       "critic_forward_tokens": d["search_critic_forward_tokens"] / n,
                       "wall_seconds": d["search_wall_seconds"]})
    return points


def summarize(train_rows: list[dict], points: list[dict]) -> dict[str, Any]:
    """The issue's JSON shape: training mean/std per method and level; decoding at eta-MCTS's budget."""
    training: dict[str, dict] = {}
    for m in METHODS:
        for lv in LEVELS:
            cell = [r for r in train_rows if r["method"] == m and r["level"] == lv]
            if cell:
                acc = [r["pass1"] for r in cell]
                training.setdefault(m, {})[lv] = {
                    "mean": statistics.fmean(acc), "std": statistics.pstdev(acc), "seeds": len(acc),
                    "forward_tokens": statistics.fmean(r["forward_tokens"] for r in cell)}
    ref = max((p["forward_tokens"] for p in points if p["method"] == "eta_mcts"), default=0.0)
    decoding: dict[str, dict] = {}
    for m in ("eta_mcts", "self_consistency", "orm_best_of_n", "greedy"):
        mine = [p for p in points if p["method"] == m]
        if mine:
            best = min(mine, key=lambda p: abs(p["forward_tokens"] - ref))
            decoding[m] = {"accuracy": best["accuracy"], "forward_tokens": best["forward_tokens"], "n": best["n"]}
    return {"training": training, "decoding": decoding}


def plot(result: dict[str, Any], points: list[dict], name: str) -> list[str]:
    """<name>_training.png (pass@1 vs budget level; only with training runs) and <name>_decoding.png (accuracy vs
    tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))  # drawn empty, not saved, in a decoding-only run
    for m, cells in result["training"].items():
        lvs = [lv for lv in LEVELS if lv in cells]
        ax.errorbar([cells[lv]["forward_tokens"] for lv in lvs], [cells[lv]["mean"] for lv in lvs],
                    yerr=[cells[lv]["std"] for lv in lvs], marker="o", capsize=3, label=m)
    ax.set(xlabel="forward tokens per training problem", ylabel="greedy pass@1 after training", xscale="log")
    ax.legend()
    fig.tight_layout()
    if result["training"]:
        paths.append(str(RESULTS / f"{name}_training.png"))
        fig.savefig(paths[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in ("greedy", "self_consistency", "orm_best_of_n", "eta_mcts"):
        mine = sorted((p for p in points if p["method"] == m), key=lambda p: p["forward_tokens"])
        ax.plot([p["forward_tokens"] for p in mine], [p["accuracy"] for p in mine], marker="o", label=m)
    ax.set(xlabel="forward tokens per problem (policy + critics)", ylabel="accuracy", xscale="log")
    ax.legend()
    fig.tight_layout()
    paths.append(str(RESULTS / f"{name}_decoding.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Few problems, one seed, tiny budgets.")
    ap.add_argument("--policy", default="/tmp/policy_iter0", help="policy_0 (HF dir).")
    ap.add_argument("--critics", default=None, help="Critics dir (`arbor critics` output); omit to skip decoding.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--budget", type=float, default=None, help="B: forward tokens per training problem.")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--train-problems", type=int, default=None)
    ap.add_argument("--eval-problems", type=int, default=None)
    ap.add_argument("--decode-problems", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=None, help="Optimizer steps per training run (all methods).")
    ap.add_argument("--batch-size", type=int, default=None, help="Train micro-batch (default: train.batch_size).")
    ap.add_argument("--sc-n", type=int, nargs="+", default=None, help="Self-consistency / best-of-N sizes.")
    ap.add_argument("--sims", type=int, nargs="+", default=None, help="eta-MCTS decoding simulations.")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                    help="Training methods; none (`--methods` alone) runs the decoding comparison only.")
    ap.add_argument("--chain-sharing", action="store_true",
                    help="chain_grpo chains share equal token prefixes (the trie engine); default: each chain "
                         "computes its own tokens after the cached prompt (the usual practice, bench.tokens' "
                         "chain_cached).")
    ap.add_argument("--name", default=None, help="Results bench/results/<name>.json and <name>_*.png (default "
                                                 "equal_budget, equal_budget_quick with --quick).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-probe", action="store_true", help="Skip the speed probe (minutes on a loaded machine).")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {"budget": 1200 if q else 2000, "seeds": 1 if q else 3, "train_problems": 4 if q else 8,
                "eval_problems": 16 if q else 64, "decode_problems": 6 if q else 24, "train_steps": 6 if q else 64,
                "sc_n": [2, 4] if q else [2, 4, 8, 16], "sims": [4, 8] if q else [4, 8, 16]}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    from arbor.lm.loading import load_policy
    from arbor.pipeline.config import load_config
    from arbor.tasks import build_task, make_splits

    probe = None if args.no_probe else speedprobe()
    cfg = load_config(args.params)
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, enabled=False))
    task = build_task(cfg.task)
    train, evals = make_splits(cfg.task, args.train_problems, max(args.eval_problems, args.decode_problems), seed=413)
    policy = load_policy(args.policy, cfg)  # as the stages load it: dtype, chat template, step-end rule
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="equal_budget_") as tmp:
        work = Path(tmp)
        pilot = pilot_lengths(cfg, policy, task, train[:4], work) if args.methods else {}
        base = greedy_pass1(policy, task, evals[: args.eval_problems], cfg.evaluate, 0) if args.methods else None
        for s in range(args.seeds if args.methods else 0):
            for lv in LEVELS:
                for m in args.methods:
                    rows.append(train_one(cfg, policy, task, train, evals[: args.eval_problems], m, lv, s, args,
                                          pilot, work))
                    print(table(rows[-1:], ["method", "level", "seed", "forward_tokens", "items", "train_steps",
                                            "pass1", "wall_seconds"]), flush=True)
    points = decoding(cfg, policy, task, evals[: args.decode_problems], args) if args.critics else []
    result = summarize(rows, points)
    name = args.name or ("equal_budget_quick" if q else "equal_budget")
    result |= {"policy_0_greedy_pass1": base, "pilot": pilot, "training_runs": rows, "decoding_curves": points,
               "args": vars(args), "wall_seconds": time.perf_counter() - t0, "speedprobe_before": probe,
               "speedprobe_after": None if args.no_probe else speedprobe()}
    result["plots"] = plot(result, points, name)
    path = save(name, result)
    flat = [{"method": m, "level": lv, **c} for m, cs in result["training"].items() for lv, c in cs.items()]
    if flat:
        print(table(flat, ["method", "level", "mean", "std", "seeds", "forward_tokens"]))
    print(table(points, ["method", "n", "accuracy", "forward_tokens", "wall_seconds"]))
    print(f"policy_0 greedy pass@1 {base}; speedprobe {probe} -> {result['speedprobe_after']}; wrote {path}")


if __name__ == "__main__":
    main()
