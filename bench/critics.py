"""Critic training choices, side by side on the same labels and the same held-out problems (issue #7).

    python -m bench.critics --trees trees/iter_0 --policy models/iter_0/policy --threads 1 \
        [--problems 64 128] [--variants default hard pairwise separate shared_3x]

Labels (MC / Math-Shepherd as `critics.label_estimate` estimates them, with the extra completions of
`critics.min_completions`) are built once from the first max(--problems) searched problems (cached in
`--labels` when given: one file per label setting,
`<stem>.<estimate>.m<min_completions>.t<completion_tokens>.parquet`). `--seeds N` trains each variant with N
training seeds (same labels and split) and adds a row with their mean and standard deviations. The held-out
problems are those `assign_splits` holds out among the first min(--problems) problems, for every row, so rows
differ only in the training labels (more problems) or the training choice (variant). Each row trains the
critics from the policy (arbor/stages/critics.py helpers) and reports held-out AUROC / precision / recall /
ECE per critic, the epochs, the training seconds and the AUROCs on the training problems (over- or under-
fitting). `separate` costs 3x the backbone compute of `shared` per epoch; `shared_3x` gives the shared
backbone that compute (3x the epochs and patience). Writes bench/results/<--name>.json and prints a table.
`--trees` may be a finished or a still-running search output (committed problems only).

`--ceiling N`: what a perfect critic could reach against these labels. The labels are Monte Carlo estimates
from few completions (a hard label is 1 when any of `min_completions` policy completions would be right), so
even a critic that knew each node's true success rate p(s) ranks them imperfectly. N fresh completions from
every held-out inner node estimate p(s); the row `ceiling` reports AUROC(p_hat, label) for value and PRM (the
ORM's labels are exact). The estimate is itself noisy (N samples), so it sits below the true ceiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "frozen": {"freeze_backbone": True},
    "finetune": {"freeze_backbone": False},
    "hard": {"prm_label": "hard"},
    "pairwise": {"prm_pairwise": True},
    "value_bce": {"value_loss": "bce"},
    "separate": {"shared_backbone": False},
    "shared_3x": {"max_epochs": 30, "patience": 9},
    "completion_rows": {"completion_rows": True},
}


def tree_files(trees: Path) -> list[Path]:
    """Shards plus committed per-problem files of a (possibly unfinished) search output, in problem order."""
    parts = sorted(trees.glob("part-*.parquet"))
    work = sorted(p for p in (trees / "_work").glob("i-*.parquet") if p.with_suffix(".json").exists())
    return parts + work


def labels_for(args: argparse.Namespace, cfg: Any, n: int) -> Any:
    """The label table of the first `n` searched problems (cached in `args.labels`)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from arbor.critics.labels import build_labels, read_tree_files, write_labels
    from arbor.lm.hf import HFPolicy
    from arbor.pipeline.seeds import derive_seed
    from arbor.tasks import build_task, read_problems

    cache = None
    if args.labels:  # one cache per label setting: a cached table must not answer for another
        c, path = cfg.critics, Path(args.labels)
        tag = f"{c.label_estimate}.m{c.min_completions}.t{c.completion_tokens}"
        cache = path.with_name(f"{path.name.removesuffix('.parquet')}.{tag}.parquet")
    if cache is not None and cache.exists():
        table = pq.read_table(cache)
        if len(set(table.column("problem_id").to_pylist())) >= n and "confidence" in table.column_names:
            return table  # (a cache written before labels had a confidence column is rebuilt)
    trees = read_tree_files(tree_files(Path(args.trees)))
    pids = list(dict.fromkeys(trees.column("problem_id").to_pylist()))[:n]
    trees = trees.filter(pc.is_in(trees.column("problem_id"), pa.array(pids)))
    problems = {p.id: p for p in read_problems(args.train)}
    task = build_task(cfg.task)
    rewards = {p: (lambda text, prob=problems[p]: task.reward(prob, text)) for p in pids}
    policy = HFPolicy.from_pretrained(args.policy, cfg.device)
    c = cfg.critics
    table = build_labels(trees, min_completions=c.min_completions, policy=policy, rewards=rewards,
                         completion_tokens=c.completion_tokens, step_tokens=cfg.search.eta.step_tokens,
                         seed=derive_seed(cfg.seed, "critics", 0), progress=True, completion_rows=True,
                         hard_completions=c.min_completions, estimate=c.label_estimate)
    if cache is not None:
        write_labels(cache, table)
    return table


def ceiling(args: argparse.Namespace, cfg: Any, labels: Any, heldout: list[str], n: int) -> dict[str, Any]:
    """AUROC of p_hat (n fresh completions per held-out inner node; exact reward at terminals) against the
    value and PRM labels of the held-out rows (module docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from arbor.critics.calibration import auroc
    from arbor.critics.labels import TreeArrays, extra_completions, read_tree_files
    from arbor.lm.hf import HFPolicy
    from arbor.tasks import build_task, read_problems

    trees = read_tree_files(tree_files(Path(args.trees)))
    problems = {p.id: p for p in read_problems(args.train)}
    task = build_task(cfg.task)
    arrays = [TreeArrays(trees.filter(pc.equal(trees.column("problem_id"), p))) for p in heldout]
    needs = [np.where(t.terminal, 0, n) for t in arrays]
    policy = HFPolicy.from_pretrained(args.policy, cfg.device)
    got = extra_completions(arrays, needs, policy=policy,
                            rewards=[lambda text, prob=problems[p]: task.reward(prob, text) for p in heldout],
                            max_tokens=cfg.critics.completion_tokens, step_tokens=cfg.search.eta.step_tokens,
                            seed=12345, progress=True)
    p_hat = {}
    for t, (cnt, correct, _) in zip(arrays, got, strict=True):
        for i in range(len(t)):
            p_hat[(t.problem_id, i)] = float(t.solved[i]) if t.terminal[i] else correct[i] / max(1, cnt[i])
    d = labels.filter(pc.and_(pc.is_in(labels.column("problem_id"), pa.array(heldout)),
                              pc.greater_equal(labels.column("node"), 0))).to_pydict()
    score = np.array([p_hat[(p, i)] for p, i in zip(d["problem_id"], d["node"], strict=True)])
    depth = np.asarray(d["depth"])
    return {"variant": f"ceiling (p_hat from {n} completions)",
            "value_auroc": auroc(score, np.asarray(d["value"]) >= 0.5),
            "prm_auroc": auroc(score[depth > 0], np.asarray(d["prm_hard"])[depth > 0] >= 0.5)}


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (problems, variant) over its training seeds: the mean of each metric, and its standard
    deviation in `<metric>_sd` for the AUROCs (ddof 1)."""
    import numpy as np

    out = []
    for key in dict.fromkeys((r["problems"], r["variant"]) for r in rows):
        group = [r for r in rows if (r["problems"], r["variant"]) == key]
        mean = {k: float(np.nanmean([r[k] for r in group])) for k, v in group[0].items()
                if isinstance(v, (int, float)) and k not in ("problems", "train_seed")}
        sd = {f"{k}_sd": float(np.nanstd([r[k] for r in group], ddof=1)) for k in mean if k.endswith("auroc")}
        out.append({"problems": key[0], "variant": key[1], "train_seed": f"mean of {len(group)}", **mean, **sd})
    return out


def splits(pids: list[str], n_heldout_pool: int, c: Any, seed: int) -> dict[str, str]:
    """Held-out problems chosen among the first `n_heldout_pool` (as the stage would for that many); the
    problems after them only ever train or validate."""
    from arbor.critics.labels import assign_splits

    split = assign_splits(pids[:n_heldout_pool], heldout_fraction=c.heldout_fraction, val_fraction=c.val_fraction,
                          seed=seed)
    rest = pids[n_heldout_pool:]
    if rest:
        extra = assign_splits(rest, heldout_fraction=c.val_fraction, val_fraction=0.0, seed=seed)
        split |= {p: ("val" if s != "train" else "train") for p, s in extra.items()}
    return split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default="trees/iter_0")
    ap.add_argument("--policy", default="models/iter_0/policy")
    ap.add_argument("--train", default="data/train.jsonl")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--labels", default=None, help="Label cache (parquet), reused when it covers the problems.")
    ap.add_argument("--problems", type=int, nargs="+", default=[64])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="critics.<KEY> overrides applied to every variant (e.g. problems_per_batch=1).")
    ap.add_argument("--ceiling", type=int, default=0, help="Fresh completions per held-out node for the label-noise "
                                                          "ceiling (0 = skip).")
    ap.add_argument("--seeds", type=int, default=1, help="Training seeds per variant (same labels and split): the "
                                                        "spread of a critic's AUROC from training alone.")
    ap.add_argument("--name", default="critics", help="bench/results/<name>.json")
    args = ap.parse_args()

    import torch

    from arbor.critics.labels import label_counts
    from arbor.lm.hf import HFPolicy
    from arbor.pipeline.config import load_config
    from arbor.pipeline.seeds import derive_seed
    from arbor.stages.critics import evaluate_critics, held_out_metrics, new_critics, split_items
    from arbor.train.critic import train_critics

    from .common import save, table

    torch.set_num_threads(args.threads)
    cfg = load_config(args.params if Path(args.params).exists() else None,
                      {f"critics.{kv.split('=', 1)[0]}": kv.split("=", 1)[1] for kv in args.set})
    labels = labels_for(args, cfg, max(args.problems))
    pids = list(dict.fromkeys(labels.column("problem_id").to_pylist()))
    seed = derive_seed(cfg.seed, "critics", 0)
    base = HFPolicy.from_pretrained(args.policy, cfg.device).model
    rows = []
    if args.ceiling:
        split = splits(pids[: min(args.problems)], min(args.problems), cfg.critics, seed)
        held = [p for p, x in split.items() if x == "heldout"]
        rows.append({"problems": min(args.problems), **ceiling(args, cfg, labels, held, args.ceiling)})
        print(table(rows[-1:], ["problems", "variant", "value_auroc", "prm_auroc"]), flush=True)
    for n in sorted(args.problems):
        split = splits(pids[:n], min(args.problems), cfg.critics, seed)
        for name in args.variants:
            c = dataclasses.replace(cfg.critics, **VARIANTS[name])
            parts, items = split_items(labels, split, c)
            for rep in range(args.seeds):  # training seeds: the split and the labels stay
                train_seed = seed + rep
                torch.manual_seed(train_seed)  # the heads' initialisation, as the stage seeds it
                models = new_critics(base, shared=c.shared_backbone)
                t0 = time.perf_counter()
                summary = train_critics(models, items["train"], items["val"], c, seed=train_seed, progress=False)
                metrics, _, _ = evaluate_critics(models, parts, items, c)  # fused, as the stage reports them
                seen, seen_items = split_items(labels, {p: "heldout" for p, x in split.items() if x == "train"}, c)
                fit, _ = held_out_metrics(models, seen["heldout"], seen_items["heldout"], c)  # tree nodes of train
                metrics |= {f"train_{k}_auroc": fit[f"{k}_auroc"] for k in ("value", "prm", "orm")}
                counts = label_counts(parts["train"])
                rows.append({"problems": n, "variant": " ".join([name, *args.set]), "train_seed": train_seed,
                             **metrics, "train_seconds": time.perf_counter() - t0,
                             "epochs": summary["critic_epochs"], "best_epoch": summary["critic_best_epoch"],
                             "train_problems": counts["problems"], "heldout_problems": len(items["heldout"]),
                             "train_value_n": counts["value_n"], "train_prm_n": counts["prm_n"],
                             "train_orm_n": counts["orm_n"]})
                print(table(rows[-1:], ["problems", "variant", "train_seed", "value_auroc", "prm_auroc", "orm_auroc",
                                        "train_value_auroc", "train_prm_auroc", "train_orm_auroc", "train_seconds",
                                        "epochs"]), flush=True)
    if args.seeds > 1:
        rows += seed_summary(rows)
    cols = ["problems", "variant", "train_seed", "value_auroc", "value_precision", "value_recall", "value_ece",
            "prm_auroc", "prm_precision", "prm_recall", "prm_ece", "orm_auroc", "orm_precision", "orm_recall",
            "orm_ece", "epochs", "train_seconds"]
    cols += [f"{k}_{m}" for m in ("auroc_within_problem", "auroc_critic_only", "auroc_within_problem_critic_only")
             for k in ("value", "prm", "orm") if any(f"{k}_{m}" in r for r in rows)]
    print(table(rows, cols))
    path = save(args.name, {"trees": args.trees, "policy": args.policy, "threads": args.threads,
                            "critics": dataclasses.asdict(cfg.critics), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
