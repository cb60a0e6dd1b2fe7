"""Stage `train`: the policy of iteration k from iteration k's preferences and the policy of iteration k-1.

Reads `prefs/iter_<k>/` through its manifest (`pairs.parquet` for `dpo`, `trajectories.parquet` for `grpo` and
`sft_best`, arbor/stages/prefs.py) and `models/iter_<k-1>/policy`, which is both the starting point and the
reference (arbor/train/policy.py). Writes `models/iter_<k>/policy`, a normal HF model directory (safetensors,
tokenizer) whose `_manifest.json` is written last, atomically; and `metrics/train_<k>.json`. With `train.lora`
only LoRA adapters on the frozen policy train (arbor/lm/lora.py); the policy is saved with them merged (float32),
or as an adapter directory over `models/iter_<k-1>/policy` (`train.lora.save: adapter`), which `load_policy`
reads back merged.

Resumable after a kill: the reference log-probs are computed once and stored, and training checkpoints every
`train.checkpoint_every` optimizer steps, in `--checkpoints` (default `checkpoints/train_<k>`, deliberately
not a DVC out: `dvc repro` deletes a stage's outs before running it). A re-run resumes from the newest intact
checkpoint of the same run (`manifest.claim_dir`: config, inputs and source fingerprint) and ends with the same
weights as an uninterrupted run; the directory is emptied once the policy is in place.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arbor.pipeline.config import ArborConfig, ArborInputError, to_dict
from arbor.pipeline.tracking import NullTracker, Tracker
from arbor.train.config import TrainConfig

log = logging.getLogger("arbor.train")

REFERENCE = "reference.parquet"


def _reference_paths(directory: Path) -> tuple[Path, Path]:
    return directory / REFERENCE, directory / "reference.json"


def stored_reference(directory: Path | None, compute: Any) -> list[np.ndarray]:
    """The reference log-probs stored in `directory` when intact, else `compute()` stored there (file first,
    record second: a kill between the two leaves no record, so the file is recomputed)."""
    from arbor.pipeline.io import atomic_path, read_json, write_json
    from arbor.pipeline.manifest import check_record, file_record

    if directory is None:
        return compute()
    data, record = _reference_paths(directory)
    if record.exists():
        try:
            why = check_record(data, read_json(record)["file"])
        except (ValueError, KeyError, TypeError) as e:
            why = f"unreadable record ({e})"
        if why is None:
            return [np.asarray(x, np.float32) for x in pq.read_table(data).column("logps").to_pylist()]
        log.warning("%s: %s; recomputed", data, why)
    ref = compute()
    with atomic_path(data) as tmp:
        pq.write_table(pa.table({"logps": pa.array([r.tolist() for r in ref], pa.list_(pa.float32()))}), tmp)
    write_json(record, {"file": file_record(data)})
    return ref


def _fingerprint(cfg: ArborConfig, t: TrainConfig, prefs_dir: str | Path, policy_dir: str | Path,
                 iteration: int) -> str:
    from arbor.pipeline.manifest import fingerprint

    config = {"seed": cfg.seed, "iteration": iteration,
              "train": {k: v for k, v in to_dict(t).items() if k != "checkpoint_every"}}
    return fingerprint(config, [prefs_dir, policy_dir])


def run(cfg: ArborConfig, *, prefs_dir: str | Path = "prefs/iter_1", policy_dir: str | Path = "models/iter_0/policy",
        out: str | Path = "models/iter_1/policy", iteration: int = 1, tracker: Tracker | None = None,
        checkpoint_dir: str | Path | None = None, train: TrainConfig | None = None) -> dict[str, Any]:
    """Train the iteration's policy (module docstring) and save it atomically with its manifest to `out`."""
    import torch

    from arbor.lm.loading import load_policy
    from arbor.lm.lora import apply_lora, checkpoint_activations, save_trained, trainable_parameters
    from arbor.pipeline.io import atomic_path
    from arbor.pipeline.manifest import claim_dir, verified_files, write_manifest
    from arbor.pipeline.seeds import derive_seed, seed_everything
    from arbor.pipeline.tracking import lightning_logger
    from arbor.stages.prefs import PAIRS, TRAJECTORIES
    from arbor.train import checkpoints
    from arbor.train.logps import reference_logps
    from arbor.train.policy import OBJECTIVES, fit, total_steps

    tracker = tracker or NullTracker()
    t = train or getattr(cfg, "train", None) or TrainConfig()
    t0 = time.perf_counter()
    files = {f.name: f for f in verified_files(prefs_dir)}
    for name in (PAIRS, TRAJECTORIES):
        if name not in files:
            raise ArborInputError(f"{prefs_dir}: no {name}; expected the output of `arbor prefs`")
    # as every stage loads it (device, files and manifest checked, chat template required when configured); trained
    # in full, in float32: master weights, whose compute dtype train.precision decides (arbor/lm/loading.py); with
    # train.lora the base stays frozen in policy.dtype and only the adapters (float32) train
    policy = load_policy(policy_dir, cfg, dtype=None if t.lora.enabled else "float32")
    model, tok = policy.model, policy.tokenizer
    pad_id, eos_id = int(tok.pad_token_id), int(tok.eos_token_id)  # type: ignore[attr-defined]
    obj = OBJECTIVES[t.objective]
    items = obj.training_items(pq.read_table(files[PAIRS]), pq.read_table(files[TRAJECTORIES]), t, eos_id)
    if not items:  # the loop goes on: policy_k = policy_{k-1}, said loudly and in the metrics
        log.warning("train: %s: no training items for train.objective=%s (no pairs, no trajectory with a non-zero "
                    "advantage, or no path reaching train.sft_min_reward); policy_%d is policy_%d unchanged. "
                    "Search more problems or lower prefs.margin.", prefs_dir, t.objective, iteration, iteration - 1)
        if model.dtype != torch.float32:  # saved as loaded (train.lora), policy_k would be policy_{k-1} rounded
            model = load_policy(policy_dir, cfg, dtype="float32").model
        with atomic_path(out, is_dir=True) as tmp:
            model.cpu().eval().save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)  # type: ignore[attr-defined]
            write_manifest(tmp, {"stage": "train", "iteration": iteration, "objective": t.objective,
                                 "trained": False})
        return {"objective": t.objective, "items": 0, "trained": False, "wall_seconds": time.perf_counter() - t0}
    seed = derive_seed(cfg.seed, "train", iteration)
    seed_everything(seed)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        own = re.compile(checkpoints.OWN.pattern + r"|reference\.(parquet|json)")
        claim_dir(ckpt, _fingerprint(cfg, t, prefs_dir, policy_dir, iteration), own, "train checkpoint")
    t1 = time.perf_counter()
    seqs = obj.reference_sequences(items)
    if seqs:
        obj.attach_reference(items, stored_reference(ckpt, lambda: reference_logps(
            model, seqs, pad_id=pad_id, batch_size=2 * t.batch_size, device=cfg.device)))
    t_ref = time.perf_counter() - t1
    model = apply_lora(model, t.lora)  # adapters on the frozen policy (arbor/lm/lora.py); `model` itself when off
    if t.gradient_checkpointing:
        checkpoint_activations(model)
    trainable, total = trainable_parameters(model)
    steps = total_steps(t, len(items))
    start = time.perf_counter()
    summary = fit(obj.module(model, t, steps), items, lambda xs: obj.collate(xs, pad_id), t, steps=steps, seed=seed,
                  device=cfg.device, checkpoint_dir=ckpt, logger=lightning_logger(tracker, cfg.tracking.experiment),
                  length=obj.length)
    t_train = time.perf_counter() - start
    trained = summary.pop("model")  # `model` itself, or under FSDP its gathered weights (arbor/train/strategy.py)
    if summary.pop("global_zero"):
        with atomic_path(out, is_dir=True) as tmp:  # train.lora: merged, or an adapter dir over policy_dir
            save_trained(trained.cpu().eval(), tmp, t.lora, tokenizer=tok, base_dir=policy_dir, final_dir=out)
            write_manifest(tmp, {"stage": "train", "iteration": iteration, "objective": t.objective,
                                 "lora": t.lora.save if t.lora.enabled else None})
        if ckpt is not None:
            checkpoints.clear(ckpt)  # the policy is safely in place: nothing left to resume
            for p in _reference_paths(ckpt):
                p.unlink(missing_ok=True)
    return {"objective": t.objective, **summary, "lora": t.lora.enabled, "trainable_parameters": trainable,
            "parameters": total, "reference_seconds": t_ref, "train_seconds": t_train,
            "wall_seconds": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from arbor.pipeline.io import write_json
    from arbor.stages.common import stage_cli

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--iter", type=int, default=1, help="Iteration k: prefs/iter_<k> + models/iter_<k-1>/policy "
                                                           "-> models/iter_<k>/policy.")
        p.add_argument("--prefs", default=None, help="Preference directory (default prefs/iter_<k>).")
        p.add_argument("--policy", default=None, help="Starting and reference policy (default "
                                                      "models/iter_<k-1>/policy).")
        p.add_argument("--out", default=None, help="Output model directory (default models/iter_<k>/policy).")
        p.add_argument("--metrics", default=None, help="Metrics JSON (default metrics/train_<k>.json).")
        p.add_argument("--checkpoints", default=None, help="Training checkpoints (default checkpoints/train_<k>; "
                                                           "keep it across runs: a killed run resumes from it).")

    def go(cfg: ArborConfig, a: argparse.Namespace, tr: Tracker) -> dict[str, Any]:
        k = a.iter
        m = run(cfg, prefs_dir=a.prefs or f"prefs/iter_{k}", policy_dir=a.policy or f"models/iter_{k - 1}/policy",
                out=a.out or f"models/iter_{k}/policy", iteration=k, tracker=tr,
                checkpoint_dir=a.checkpoints or f"checkpoints/train_{k}")
        write_json(a.metrics or f"metrics/train_{k}.json", m)
        return m

    return stage_cli("train", __doc__ or "", paths, go, argv)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
