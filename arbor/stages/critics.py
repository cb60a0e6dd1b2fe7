"""Stage `critics`: value, PRM and ORM critics trained on the search trees of iteration k (AlphaLLM §4.3).

Reads `trees/iter_<k>/*.parquet` (verified against their manifest), labels every node with Monte Carlo /
Math-Shepherd labels: the policy's estimated chance of success from the node (arbor/critics/labels.py,
`critics.label_estimate`; extra completions from the policy where a node has fewer than
`critics.min_completions` terminal descendants), splits the problems into train / val (early stopping) /
held-out, trains the critics from the policy's backbone (arbor/train/critic.py) and reports, per critic on
held-out problems, `<critic>_auroc`, `_precision`, `_recall`, `_ece` (arbor/critics/calibration.py), the label
counts and a reliability diagram.

Outputs: `models/iter_<k>/critics/` = `shared/` (one backbone, three heads) or `value/`, `prm/`, `orm/`, each a
model directory loadable with `arbor.critics.load`, plus `labels/{train,val,heldout}.parquet`,
`confidence.json` (`critics.confidence`: each critic fused with the policy's confidence in the path, fitted on
the validation problems; the held-out metrics are the fused scores', `<critic>_auroc_critic_only` beside them)
and `_manifest.json`, written atomically; `metrics/critics_<k>.json`; `plots/critics_<k>_reliability.png`.
Binary labels for the metrics: value = the value label >= 0.5, PRM = Math-Shepherd hard label (steps only; any
of N = `critics.min_completions` policy completions right, arbor/critics/labels.py), ORM = correct (terminals).

Iteration k (arbor/pipeline/plan.py): trees/iter_<k>; extra completions from the policy that grew them
(policy_0 for k = 0, policy_{k-1} after), backbones from policy_k -> models/iter_<k>/critics. `CriticsConfig`
(arbor/critics/config.py) is the `critics:` section of params.yaml (`cfg.critics`).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arbor.critics.calibration import critic_metrics, grouped_auroc, reliability_diagram
from arbor.critics.confidence import FEATURES, Fusion
from arbor.critics.config import KINDS, CriticsConfig
from arbor.critics.labels import (
    assign_splits,
    build_labels,
    label_counts,
    outcome_labels,
    read_tree_files,
    write_labels,
)
from arbor.critics.models import CriticModel
from arbor.pipeline import plan
from arbor.pipeline.config import ArborConfig, ArborInputError
from arbor.pipeline.seeds import derive_seed
from arbor.pipeline.tracking import NullTracker, Tracker

log = logging.getLogger("arbor.critics")


def _predicted(models: dict[str, CriticModel], labels: Any, items: list[dict]) -> tuple[dict[str, np.ndarray], dict]:
    """The critics' scores of the packed `items` ({kind: [R]}) and their label rows (a pydict, in that order)."""
    from arbor.train.critic import predict

    pred = predict(models, items)
    return pred, labels.take(pred["row"]).to_pydict()


def _rows_and_targets(d: dict, prm_label: str = "soft") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{kind: (rows it is measured on [R] bool, its training target [R] in [0, 1])} of label rows `d`: value on
    every node, the PRM on steps (depth > 0), the ORM on scored terminals (`label_targets`, what training packs)."""
    from arbor.train.critic import label_targets

    return {k: (~np.isnan(t), np.nan_to_num(t)) for k, t in label_targets(d, prm_label).items()}


def _features(d: dict) -> np.ndarray:
    """[R, 3] confidence features of label rows `d` (a clear error for a label table written before them)."""
    if "confidence" not in d:
        raise ArborInputError("label table without a 'confidence' column (written before critics.confidence); "
                              "rebuild the labels (rerun `arbor critics`)")
    return np.asarray(d["confidence"], np.float64).reshape(-1, 3)


def fit_confidence(pred: dict[str, np.ndarray], d: dict, cfg: CriticsConfig) -> Fusion:
    """The fusion of each critic with the policy's confidence (arbor/critics/confidence.py), fitted on scored rows
    (`pred`, `d`: `_predicted` of the validation problems) against the targets the heads train on. Root rows
    (no step: features 0) are left out; search never scores the root."""
    feats, depth = _features(d), np.asarray(d["depth"])
    rows = _rows_and_targets(d, cfg.prm_label)
    keep = {k: rows[k][0] & (depth > 0) for k in pred if k in rows}
    return Fusion.fit({k: pred[k][m] for k, m in keep.items()}, {k: feats[m] for k, m in keep.items()},
                      {k: rows[k][1][m] for k, m in keep.items()})


def _metrics(scores: dict[str, np.ndarray], d: dict, cfg: CriticsConfig,
             ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per-critic metrics of `scores` ({kind: [R]}) on label rows `d` and the (scores, binary labels) behind
    them; binary labels as the module docstring says."""
    problem = np.asarray(d["problem_id"])
    metrics: dict[str, float] = {}
    curves = {}
    for k, (keep, target) in _rows_and_targets(d, "hard").items():
        if k not in scores:
            continue
        s, y = scores[k][keep], target[keep] >= 0.5
        metrics.update(critic_metrics(k, s, y, threshold=cfg.threshold, n_bins=cfg.n_bins))
        within, groups = grouped_auroc(s, y, problem[keep])
        metrics |= {f"{k}_auroc_within_problem": within, f"{k}_within_problem_groups": groups}
        curves[k] = (s, y)
    return metrics, curves


def held_out_metrics(models: dict[str, CriticModel], labels: Any, items: list[dict], cfg: CriticsConfig,
                     fusion: Fusion | None = None,
                     ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per-critic metrics on `items` (packed held-out problems) and the (scores, binary labels) behind them;
    with `fusion`, of the scores fused with the policy's confidence (as search and the read-outs use them)."""
    pred, d = _predicted(models, labels, items)
    if fusion is not None:
        feats = _features(d)
        pred = {k: fusion.apply(k, v, feats) if k in models else v for k, v in pred.items()}
    return _metrics({k: pred[k] for k in models}, d, cfg)


def evaluate_critics(models: dict[str, CriticModel], parts: dict[str, Any], items: dict[str, list],
                     cfg: CriticsConfig) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]],
                                                  Fusion | None]:
    """Trained critics -> (held-out metrics, their curves, the fusion). With `cfg.confidence` the fusion is
    fitted on the validation split and `<kind>_auroc` etc. are the fused scores' (what search and the read-outs
    use), with two baselines beside them: the critic alone (`<kind>_auroc_critic_only`,
    `<kind>_auroc_within_problem_critic_only`) and the policy's confidence alone, fitted the same way without
    the critic (`..._confidence_only`): the critic's own contribution is the gap between fused and
    confidence-only. The fitted coefficients are `<kind>_confidence_<column>`."""
    kinds = list(models)
    held, d = _predicted(models, parts["heldout"], items["heldout"])
    if not cfg.confidence:
        metrics, curves = _metrics({k: held[k] for k in kinds}, d, cfg)
        return metrics, curves, None
    val, dv = _predicted(models, parts["val"], items["val"])
    fusion = fit_confidence({k: val[k] for k in kinds}, dv, cfg)
    feats = _features(d)
    metrics, curves = _metrics({k: fusion.apply(k, held[k], feats) for k in kinds}, d, cfg)
    alone = fit_confidence({k: np.full(len(val[k]), 0.5) for k in kinds}, dv, cfg)  # logit 0: features only
    for name, scores in (("critic_only", {k: held[k] for k in kinds}),
                         ("confidence_only", {k: alone.apply(k, np.full(len(held[k]), 0.5), feats) for k in kinds})):
        m, _ = _metrics(scores, d, cfg)
        metrics |= {f"{k}_{name}": m[k] for k in m if k.endswith(("_auroc", "_auroc_within_problem"))}
    metrics |= {f"{k}_confidence_{col}": float(x) for k, coef in fusion.coef.items()
                for col, x in zip(("critic", *FEATURES, "bias"), coef, strict=True)}
    return metrics, curves, fusion


def heldout_record(metrics: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{kind: {auroc, auroc_within_problem}} of the held-out metrics (NaN -> None): what the manifest records for
    `CriticsConfig.guide_gate`."""
    def num(x: Any) -> float | None:
        return None if x is None or not np.isfinite(x) else float(x)

    return {k: {"auroc": num(metrics.get(f"{k}_auroc")),
                "auroc_within_problem": num(metrics.get(f"{k}_auroc_within_problem"))}
            for k in KINDS if f"{k}_auroc" in metrics}


def split_items(labels: Any, split: dict[str, str], c: CriticsConfig, outcome: Any = None,
                ) -> tuple[dict[str, Any], dict[str, list]]:
    """The label rows (pyarrow tables) and packed training items (arbor/train/critic.py) of each split named in
    `split` (problem_id -> train | val | heldout). Completion rows (node < 0) train and validate only with
    `c.completion_rows`, and never enter the held-out metrics. `outcome`: the rows of sampled solutions to
    problems without a tree (`arbor.critics.labels.outcome_labels`), all added to the training split."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from arbor.train.critic import pack_problems

    if not c.completion_rows:
        labels = labels.filter(pc.greater_equal(labels.column("node"), 0))
    col = labels.column("problem_id")
    parts = {s: labels.filter(pc.is_in(col, pa.array([p for p, x in split.items() if x == s])))
             for s in dict.fromkeys(split.values())}
    if "heldout" in parts:
        parts["heldout"] = parts["heldout"].filter(pc.greater_equal(parts["heldout"].column("node"), 0))
    if outcome is not None and outcome.num_rows:
        clash = set(outcome.column("problem_id").to_pylist()) & set(split)
        if clash:
            raise ValueError(f"outcome rows of problems that have trees: {sorted(clash)[:3]}")
        parts["train"] = pa.concat_tables([parts["train"], outcome]) if "train" in parts else outcome
    items = {s: pack_problems(t, prm_label=c.prm_label, pair_margin=c.pair_margin, max_tokens=c.max_trie_tokens)
             for s, t in parts.items()}
    return parts, items


def new_critics(base: Any, *, shared: bool) -> dict[str, CriticModel]:
    """{kind: CriticModel} started from the policy `base`: one backbone with three heads, or three models."""
    if shared:
        return dict.fromkeys(KINDS, CriticModel.from_policy(base, KINDS))
    return {k: CriticModel.from_policy(base, [k]) for k in KINDS}


def _backbone_source(cfg: ArborConfig, c: CriticsConfig, policy: Any, policy_dir: str | Path,
                     backbone_dir: str | Path | None) -> Any:
    """The causal LM whose body starts the critics: `policy.model` itself when `backbone_dir` is the policy's
    and its dtype fits, else `backbone_dir` loaded as `cfg` says. A backbone that is trained in full
    (`freeze_backbone` false) starts from float32 master weights (arbor/lm/loading.py); a frozen one, or one
    under LoRA adapters (`critics.lora`), runs in `policy.dtype`."""
    import torch

    from arbor.lm.loading import load_policy

    dtype = None if c.freeze_backbone or c.lora.enabled else "float32"
    source = Path(backbone_dir) if backbone_dir is not None else Path(policy_dir)
    if source == Path(policy_dir) and (dtype is None or policy.model.dtype == torch.float32):
        return policy.model
    return load_policy(source, cfg, dtype=dtype).model


def _mlflow_logger(tracker: Tracker, experiment: str) -> Any:
    if tracker.run_id is None:
        return False
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=experiment, tracking_uri=tracker.tracking_uri, run_id=tracker.run_id)


def run(cfg: ArborConfig, *, trees_dir: str | Path, policy_dir: str | Path, train_file: str | Path = "data/train.jsonl",
        out_dir: str | Path = "models/iter_0/critics", plot: str | Path | None = None, iteration: int = 0,
        backbone_dir: str | Path | None = None, tracker: Tracker | None = None,
        critics: CriticsConfig | None = None) -> dict[str, Any]:
    """Label, split, train and evaluate the critics (module docstring); returns the stage metrics.

    `policy_dir`: the policy that grew the trees (it samples the extra completions, so labels stay on-policy);
    `backbone_dir`: the policy whose body starts the critics (default: the same).
    """
    from arbor.lm.loading import load_policy
    from arbor.pipeline.io import atomic_path
    from arbor.pipeline.manifest import verified_files, write_manifest
    from arbor.tasks import build_task, is_solved, read_problems
    from arbor.train.critic import train_critics
    from arbor.train.sft import lightning_accelerator

    tracker = tracker or NullTracker()
    c = critics or cfg.critics
    t0 = time.perf_counter()
    trees = read_tree_files(verified_files(trees_dir))
    policy = load_policy(policy_dir, cfg)  # device, dtype, step-end rule and prompts as search ran it
    task = build_task(cfg.task)
    problems = {p.id: p for p in read_problems(train_file)}
    pids = list(dict.fromkeys(trees.column("problem_id").to_pylist()))
    unknown = [p for p in pids if p not in problems]
    if unknown:
        raise FileNotFoundError(f"{train_file}: no problems {unknown[:3]}... of the trees in {trees_dir}")
    rewards = {p: (lambda text, prob=problems[p]: task.reward(prob, text)) for p in pids}
    seed = derive_seed(cfg.seed, "critics", iteration)
    labels = build_labels(trees, min_completions=c.min_completions, policy=policy, rewards=rewards,
                          completion_tokens=c.completion_tokens, step_tokens=cfg.search.eta.step_tokens, seed=seed,
                          progress=True, completion_rows=c.completion_rows, hard_completions=c.min_completions,
                          estimate=c.label_estimate)
    t_labels = time.perf_counter() - t0
    outcome, n_outcome = None, {}
    if c.outcome_problems > 0:  # whole solutions to train problems the search did not reach (training only)
        searched = set(pids)
        rest = [p for p in problems.values() if p.id not in searched][: c.outcome_problems]
        t_out = time.perf_counter()
        outcome, got = outcome_labels({p.id: policy.encode_prompt(task.prompt(p)) for p in rest},
                                      {p.id: (lambda text, prob=p: task.reward(prob, text)) for p in rest},
                                      policy=policy, samples=c.outcome_samples, step_tokens=cfg.search.eta.step_tokens,
                                      max_depth=cfg.search.eta.max_depth,
                                      seed=derive_seed(cfg.seed, "critics_outcome", iteration), progress=True)
        n_outcome = {"outcome_problems": len(rest), "outcome_solutions": len(got), "outcome_rows": outcome.num_rows,
                     "outcome_solved": float(np.mean([is_solved(r) for r in got])) if len(got) else None,
                     "outcome_seconds": time.perf_counter() - t_out}
    split = assign_splits(pids, heldout_fraction=c.heldout_fraction, val_fraction=c.val_fraction, seed=seed)
    parts, items = split_items(labels, split, c, outcome)
    for s in ("train", "val", "heldout"):
        if not items.get(s):
            raise FileNotFoundError(f"{trees_dir}: {len(pids)} problems leave the {s} split empty; search more "
                                    "problems (search.n_problems) or change critics.heldout_fraction/val_fraction")
    import torch

    torch.manual_seed(seed)  # the heads' initialisation draws from the global RNG: seed it, not whatever ran before
    models = new_critics(_backbone_source(cfg, c, policy, policy_dir, backbone_dir), shared=c.shared_backbone)
    accelerator, devices = lightning_accelerator(cfg.device)
    t1 = time.perf_counter()
    summary = train_critics(models, items["train"], items["val"], c, seed=seed, accelerator=accelerator,
                            devices=devices, logger=_mlflow_logger(tracker, cfg.tracking.experiment))
    t_train = time.perf_counter() - t1
    metrics, curves, fusion = evaluate_critics(models, parts, items, c)
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, model in ({"shared": models["value"]} if c.shared_backbone else models).items():
            model.cpu().save(tmp / name, tokenizer=policy.tokenizer)
        for s, t in parts.items():
            write_labels(tmp / "labels" / f"{s}.parquet", t)
        if fusion is not None:
            fusion.save(tmp)
        write_manifest(tmp, {"stage": "critics", "iteration": iteration, "heldout": heldout_record(metrics)})
    if plot is not None:
        reliability_diagram(curves, plot, n_bins=c.n_bins)
        tracker.log_artifact(plot)
    counts = {f"{s}_{k}": v for s, t in parts.items() for k, v in label_counts(t).items()}
    if outcome is not None:  # completion rows are the extra completions' own; outcome rows are counted apart
        counts["train_completion_rows"] -= outcome.num_rows
    # undefined metrics (a held-out split without positives) are null in the JSON, not NaN
    metrics = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}
    return {**metrics, **counts, **n_outcome, **summary, "shared_backbone": c.shared_backbone, "lora": c.lora.enabled,
            "extra_completions": int(np.sum(labels.column("n_extra").to_numpy())) if c.min_completions else 0,
            "label_seconds": t_labels, "train_seconds": t_train, "wall_seconds": time.perf_counter() - t0}


def keep_critics(source: str | Path, out_dir: str | Path, source_metrics: str | Path, iteration: int) -> dict[str, Any]:
    """`critics.refresh: false`: iteration k's critics are critics_0, copied (verified, atomically, with a new
    manifest) so that every iteration reads `models/iter_<k>/critics`; the metrics are critics_0's, marked."""
    import shutil

    from arbor.critics.scorer import recorded_heldout
    from arbor.pipeline.io import atomic_path, read_json
    from arbor.pipeline.manifest import verify, write_manifest

    verify(source)
    heldout = recorded_heldout(source)
    with atomic_path(out_dir, is_dir=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("_manifest.json"))
        write_manifest(tmp, {"stage": "critics", "iteration": iteration, "kept_from": str(source),
                             "heldout": heldout})
    return {**read_json(source_metrics), "refreshed": False, "kept_from": str(source), "wall_seconds": 0.0}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from arbor.pipeline.io import write_json
    from arbor.stages.common import stage_cli

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--iter", type=int, default=0, help="Iteration k >= 0: trains on trees/iter_<k>.")
        p.add_argument("--trees", default=None, help="Tree directory (default trees/iter_<k>).")
        p.add_argument("--policy", default=None, help="Policy that grew the trees; samples the extra completions "
                                                      "(default models/iter_0/policy for k = 0, "
                                                      "models/iter_<k-1>/policy after).")
        p.add_argument("--backbone", default=None, help="Policy whose body starts the critics (default "
                                                        "models/iter_<k>/policy).")
        p.add_argument("--train", default="data/train.jsonl", help="Training problems (gold answers).")
        p.add_argument("--out", default=None, help="Critic directory (default models/iter_<k>/critics).")
        p.add_argument("--metrics", default=None, help="Metrics JSON (default metrics/critics_<k>.json).")
        p.add_argument("--plot", default=None, help="Reliability PNG (default plots/critics_<k>_reliability.png).")

    def go(cfg: ArborConfig, a: argparse.Namespace, tr: Tracker) -> dict[str, Any]:
        k = a.iter
        if k < 0:
            raise ArborInputError(f"command line: --iter {k}: expected an iteration >= 0")
        if k >= 1 and not cfg.critics.refresh:
            m = keep_critics(plan.critics_dir(0), a.out or plan.critics_dir(k), "metrics/critics_0.json", k)
            write_json(a.metrics or f"metrics/critics_{k}.json", m)
            return m
        m = run(cfg, trees_dir=a.trees or plan.trees_dir(k), policy_dir=a.policy or plan.policy_dir(plan.searcher(k)),
                train_file=a.train, out_dir=a.out or plan.critics_dir(k),
                plot=a.plot or f"plots/critics_{k}_reliability.png", iteration=k,
                backbone_dir=a.backbone or plan.policy_dir(k), tracker=tr)
        write_json(a.metrics or f"metrics/critics_{k}.json", m)
        return m

    return stage_cli("critics", __doc__ or "", paths, go, argv)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
