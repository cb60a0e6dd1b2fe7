"""One iteration's policy update: the training items of `train.objective`, their reference log-probs, and a
resumable Lightning fit (gradient accumulation, LR schedule, precision, strategy, step checkpoints).

Objectives (one Lightning module each): `dpo` (arbor/train/dpo.py) on prefs pairs, `grpo` (arbor/train/grpo.py)
on the Tree-GRPO trajectories, `sft_best` (arbor/train/sft_best.py, `SFTModule`) on the best path per problem.
Items are drawn with replacement from a seeded stream (`SampleStream`), so a run resumed after `step` optimizer
steps skips exactly the `step * batch_size * accumulate_grad_batches` items an uninterrupted run consumed and
ends with the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from arbor.train import dpo, grpo, sft_best
from arbor.train.config import TrainConfig

OBJECTIVES: dict[str, ModuleType] = {"dpo": dpo, "grpo": grpo, "sft_best": sft_best}
"""`train.objective` -> its module. Each offers the same functions: `training_items(pairs, trajectories, cfg,
eos_id)`, `reference_sequences(items)` (empty: no reference), `attach_reference(items, ref)`,
`collate(items, pad_id)`, `length(item)` (its padded width: length grouping) and `module(model, cfg,
max_steps)` (the Lightning module)."""


def total_steps(cfg: TrainConfig, n_items: int) -> int:
    """Optimizer steps for `cfg.epochs` expected passes over `n_items` items."""
    return max(1, math.ceil(cfg.epochs * n_items / (cfg.batch_size * cfg.accumulate_grad_batches)))


def fit(module: Any, items: list[dict[str, Any]], collate: Callable[..., dict[str, torch.Tensor]], cfg: TrainConfig,
        *, steps: int, seed: int, device: str = "cpu", checkpoint_dir: str | Path | None = None, logger: Any = False,
        progress: bool = True, length: Callable[[dict[str, Any]], int] | None = None) -> dict[str, Any]:
    """Train `module` for `steps` optimizer steps on items drawn from a seeded stream; with `checkpoint_dir`
    (and `cfg.checkpoint_every` > 0) checkpoint there and resume from its newest intact checkpoint. The summary's
    `model` is the trained model to save on global rank 0 (None on other ranks; `train.strategy`:
    arbor/train/strategy.py). `length(item)`: with `cfg.length_pool` > 1, micro-batches group items of similar
    length (`SampleStream`)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from arbor.train import checkpoints
    from arbor.train.sft import SampleStream
    from arbor.train.strategy import trained_model, trainer_kwargs

    callbacks, resume = [], None
    if checkpoint_dir is not None and cfg.checkpoint_every > 0:
        resume = checkpoints.latest(checkpoint_dir)
        callbacks.append(checkpoints.StepCheckpoint(checkpoint_dir, cfg.checkpoint_every))
    start = resume.step if resume else 0
    per_step = cfg.batch_size * cfg.accumulate_grad_batches
    pool = cfg.length_pool if length is not None else 1
    stream = SampleStream(lambda rng: items[int(rng.integers(len(items)))], seed, skip=start * per_step,
                          batch_size=cfg.batch_size, pool=pool, length=length)
    loader = DataLoader(stream, batch_size=cfg.batch_size, collate_fn=collate)
    trainer = L.Trainer(max_steps=steps, **trainer_kwargs(cfg, device, getattr(module, "model", None)),
                        precision=cfg.precision, accumulate_grad_batches=cfg.accumulate_grad_batches,
                        gradient_clip_val=cfg.gradient_clip or None, logger=logger, callbacks=callbacks,
                        enable_checkpointing=bool(callbacks), enable_progress_bar=progress,
                        enable_model_summary=False, log_every_n_steps=1)
    # resume loads with torch.load(weights_only=True): a checkpoint holds tensors and plain containers only
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume.path if resume else None, weights_only=True)
    loss = trainer.callback_metrics.get("train_loss")
    return {"steps": steps, "resumed_from_step": start, "items": len(items), "global_zero": trainer.is_global_zero,
            "model": trained_model(trainer, module.model),  # what to save (rank 0; FSDP: gathered)
            "final_train_loss": float(loss) if loss is not None else float("nan"),
            **{f"final_{k.replace('/', '_')}": float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("train/")}}
