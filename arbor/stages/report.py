"""Stage `report`: one summary of the whole loop — `metrics/summary.json` and plots.

Reads the metrics every stage wrote for iterations 0..K (K = `loop.count`): `iter_<k>.json` (sampling
read-outs of evaluate), `decode_<k>.json` (search decoding), `critics_<k>.json`, `search_<k>.json`, and for
k ≥ 1 `prefs_<k>.json` and `train_<k>.json` (`bootstrap.json` stands in for iteration 0's training). A missing
file is an error naming it (the report never silently skips an iteration); a key a stage did not write is
null in the summary.

`metrics/summary.json` = `{"iterations": [{"iteration": k, <accuracy read-outs>, "eval_problems": n,
"search_problems": n (search_pass1 reads the first n eval problems), "policy_forward_tokens": {stage: n},
"critic_forward_tokens": {stage: n}, <critic AUROCs, pooled and within problem>, "diagnostics": {<the task's
greedy error rates, Task.diagnostics>}, "wall_seconds": {stage: s}, "search_scorer": critics | likelihood,
"critic_search_pass1": the critics' decoding when the gate kept them from scoring search_pass1 and
`evaluate.gated_critic_search` asked for it, else null},
...]}`.
Plots (PNG, registered as `dvc plots` and logged to MLflow): accuracy per iteration; and trajectories and
solve rate per problem against forward tokens per problem, tree (search_k over train problems, oracle reward)
against chains (evaluate's k samples over eval problems) — different problem sets, so the controlled
equal-budget comparison stays `python -m bench.tokens`. `plots/accuracy.json` is the same accuracy data for
`dvc plots show` to draw itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arbor.pipeline.config import ArborConfig, ArborInputError
from arbor.pipeline.io import atomic_path, read_json, write_json
from arbor.pipeline.tracking import NullTracker, Tracker

ACCURACY = ("greedy_pass1", "pass_at_k", "maj_at_k", "orm_best_of_n", "search_pass1")
AUROCS = ("value_auroc", "prm_auroc", "orm_auroc")
STAGES_0 = ("bootstrap", "search", "critics", "iter", "decode")
STAGES_K = ("search", "prefs", "train", "critics", "iter", "decode")


def _stage_files(metrics_dir: Path, k: int) -> dict[str, Path]:
    """Metrics file of each stage of iteration k (`iter` is evaluate's)."""
    names = STAGES_0 if k == 0 else STAGES_K
    return {s: metrics_dir / ("bootstrap.json" if s == "bootstrap" else f"{s}_{k}.json") for s in names}


def iteration_entry(metrics_dir: Path, k: int) -> dict[str, Any]:
    """The summary entry of iteration k (see the module docstring); a missing stage file raises its name."""
    per = {}
    for stage, f in _stage_files(metrics_dir, k).items():
        if not f.exists():
            raise ArborInputError(f"{f}: missing (iteration {k}'s {stage} stage has not run; run `dvc repro`)")
        per[stage] = read_json(f)
    flat = per["iter"] | per["decode"]
    entry: dict[str, Any] = {"iteration": k, **{key: flat.get(key) for key in ACCURACY}}
    entry["eval_problems"] = per["iter"].get("eval_problems")  # search_pass1: the first search_problems of them
    entry["search_problems"] = per["decode"].get("search_problems", entry["eval_problems"])
    decode = per["decode"]

    def spent(key: str) -> int | None:  # the decode stage's tokens: its read-out's + the gated critics' decoding
        vals = [v for v in (decode.get(key), decode.get(f"critic_{key}")) if isinstance(v, int)]
        return sum(vals) if vals else None

    entry["policy_forward_tokens"] = {s: m.get("forward_tokens") for s, m in per.items()
                                      if isinstance(m.get("forward_tokens"), int)}
    entry["policy_forward_tokens"]["decode"] = spent("search_forward_tokens")
    entry["critic_forward_tokens"] = {s: m["critic_forward_tokens"] for s, m in per.items()
                                      if isinstance(m.get("critic_forward_tokens"), int)}
    if isinstance(per["iter"].get("rerank_critic_forward_tokens"), int):  # the critics' read-outs of the samples
        entry["critic_forward_tokens"]["iter"] = per["iter"]["rerank_critic_forward_tokens"]
    if spent("search_critic_forward_tokens") is not None:
        entry["critic_forward_tokens"]["decode"] = spent("search_critic_forward_tokens")
    entry |= {key: per["critics"].get(key) for key in AUROCS}
    entry |= {f"{key}_within_problem": per["critics"].get(f"{key}_within_problem") for key in AUROCS}
    entry["diagnostics"] = {key: v for key, v in per["iter"].items() if key.startswith("greedy_") and
                            key != "greedy_pass1" and key != "greedy_forward_tokens"}  # Task.diagnostics
    entry["wall_seconds"] = {s: m.get("wall_seconds", m.get("search_wall_seconds")) for s, m in per.items()}
    if decode.get("critic_search_wall_seconds") is not None:  # gated critics: both decodings ran
        walls = entry["wall_seconds"]
        walls["decode"] = (walls["decode"] or 0.0) + decode["critic_search_wall_seconds"]
    # search_pass1's scorer (critics, or the likelihood when the critics fail the gate) and, then, the critics'
    entry["search_scorer"] = decode.get("search_scorer")
    entry["critic_search_pass1"] = decode.get("critic_search_pass1")
    search, sample = per["search"], per["iter"]
    n_s, n_e = max(1, search.get("problems", 0)), max(1, sample.get("eval_problems", 0))
    entry["tree_vs_chain"] = {
        "tree_tokens_per_problem": search.get("forward_tokens", 0) / n_s,
        "tree_trajectories_per_problem": search.get("trajectories", 0) / n_s,
        "tree_solved": search.get("solved_any"),
        "chain_tokens_per_problem": (sample.get("forward_tokens", 0) - sample.get("greedy_forward_tokens", 0)) / n_e,
        "chain_trajectories_per_problem": sample.get("k"),
        "chain_solved": sample.get("pass_at_k"),
    }
    return entry


def plot_accuracy(rows: list[dict[str, Any]], out: Path) -> None:
    """Accuracy read-outs per iteration, one line each (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    its = [r["iteration"] for r in rows]
    for key in ACCURACY:
        ys = [r[key] for r in rows]
        label = key
        if key == "search_pass1" and rows and rows[-1].get("search_problems") != rows[-1].get("eval_problems"):
            label = f"search_pass1 (first {rows[-1]['search_problems']})"
        if any(y is not None for y in ys):
            ax.plot(its, [float("nan") if y is None else y for y in ys], marker="o", label=label)
    ax.set(xlabel="iteration", ylabel="accuracy on the eval split", xticks=its, ylim=(0, 1))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out)


def plot_tokens(rows: list[dict[str, Any]], out: Path) -> None:
    """Trajectories and solve rate per problem against forward tokens per problem, tree vs chain (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for side, style in (("tree", "o-"), ("chain", "s--")):
        xs = [r["tree_vs_chain"][f"{side}_tokens_per_problem"] for r in rows]
        for ax, what in zip(axes, ("trajectories_per_problem", "solved"), strict=True):
            ys = [r["tree_vs_chain"][f"{side}_{what}"] for r in rows]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=side)
            for x, y, r in zip(xs, ys, rows, strict=True):
                if y is not None:
                    ax.annotate(str(r["iteration"]), (x, y), fontsize=7)
    axes[0].set(xlabel="forward tokens per problem", ylabel="trajectories per problem")
    axes[1].set(xlabel="forward tokens per problem", ylabel="problems with a correct trajectory", ylim=(0, 1))
    fig.suptitle("tree = search_k on train problems (oracle); chain = evaluate's k samples on eval problems",
                 fontsize=9)
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, out)


def _save(fig: Any, out: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def run(cfg: ArborConfig, *, metrics_dir: str | Path = "metrics", plots_dir: str | Path = "plots",
        tracker: Tracker | None = None) -> dict[str, Any]:
    """Write `metrics/summary.json` and the plots for iterations 0..loop.count; returns the summary."""
    tracker = tracker or NullTracker()
    metrics_dir, plots_dir = Path(metrics_dir), Path(plots_dir)
    rows = [iteration_entry(metrics_dir, k) for k in range(cfg.loop.count + 1)]
    write_json(plots_dir / "accuracy.json", [{"iteration": r["iteration"], **{k: r[k] for k in ACCURACY}}
                                             for r in rows])
    plot_accuracy(rows, plots_dir / "accuracy.png")
    plot_tokens(rows, plots_dir / "tree_vs_chain.png")
    for name in ("accuracy.png", "tree_vs_chain.png"):
        tracker.log_artifact(plots_dir / name)
    summary = {"iterations": rows}
    write_json(metrics_dir / "summary.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from arbor.stages.common import stage_cli

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--metrics-dir", default="metrics", help="Where the stages wrote their metrics.")
        p.add_argument("--plots-dir", default="plots", help="Where to write the PNG plots.")

    def body(cfg: ArborConfig, a: argparse.Namespace, tracker: Tracker) -> dict[str, Any]:
        summary = run(cfg, metrics_dir=a.metrics_dir, plots_dir=a.plots_dir, tracker=tracker)
        last = summary["iterations"][-1]
        return {"iterations": len(summary["iterations"]), **{f"last_{k}": last[k] for k in ACCURACY
                                                             if isinstance(last[k], (int, float))}}

    return stage_cli("report", "Summary of every iteration (metrics/summary.json) and plots.", paths, body, argv,
                     uses_device=False)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
