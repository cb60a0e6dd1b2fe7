"""Supervised fine-tuning (NLL on completion tokens) as a Lightning module, and its data plumbing.

Used by `bootstrap` (tiny policy from scratch on noisy synthetic solutions) and later by the SFT-best
baseline (AlphaLLM's own policy update: NLL on the best leaf per problem). Loss is the mean token NLL of the
completion only; prompt and padding positions carry label -100.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import IterableDataset

IGNORE = -100


def collate_sft(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt, completion) id pairs into `input_ids`, `attention_mask`, `labels`, each [B, T].

    labels = input ids on completion positions, -100 on prompt and padding (HF shifts them internally).
    """
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        seq = torch.as_tensor(list(p) + list(c), dtype=torch.long)
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = seq[len(p) :]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_completion_length(item: dict[str, Any]) -> int:
    """Padded width of an item {"prompt": ids, "completion": ids, ...} in a `collate_sft` batch."""
    return len(item["prompt"]) + len(item["completion"])


class SampleStream(IterableDataset):
    """Endless samples from `draw(rng)`, seeded (Lightning's rollout-dataset idea), sharded by rank.

    Every rank draws the same seeded sequence and keeps the samples `rank, rank + world, ...` (rank and world
    from the process group when one is up, `arbor.train.strategy.rank_and_world`). So under DDP the ranks' batches
    are disjoint and together are exactly the batch of one process with a `world`-times larger batch size (with
    `num_workers=0`). `skip` starts each rank after that many of its own samples, so that training resumed from a
    checkpoint after `step` optimizer steps sees exactly the samples an uninterrupted run would:
    `skip = step * batch_size` (per rank).

    Length grouping (`pool` > 1, as HF's `group_by_length`): the stream draws `pool` global batches
    (`pool * batch_size * world` samples) at a time, sorts them by `length(sample)`, cuts the sorted run into
    `pool` global batches of neighbours in length and yields those batches in a seeded random order (each rank
    its share of each), so a batch pads to nearly its own length. The samples are the same draws; only their
    grouping into batches changes (the batch order has its own seeded stream). A loader must then take
    `batch_size` samples per batch, and `skip` must be a multiple of it (whole batches).
    """

    def __init__(self, draw: Callable[[np.random.Generator], Any], seed: int, skip: int = 0, *,
                 batch_size: int = 1, pool: int = 1, length: Callable[[Any], int] | None = None) -> None:
        if pool > 1 and (length is None or skip % batch_size):
            raise ValueError(f"SampleStream(pool={pool}): needs `length` and a skip ({skip}) that is a multiple "
                             f"of batch_size ({batch_size})")
        self.draw, self.seed, self.skip = draw, seed, skip
        self.batch_size, self.pool, self.length = batch_size, pool, length

    def __iter__(self) -> Iterator[Any]:
        from arbor.train.strategy import rank_and_world

        rank, world = rank_and_world()  # known only once the process group is up: read per iteration
        rng = np.random.default_rng(self.seed)
        if self.pool > 1:
            yield from self._grouped(rng, rank, world)
            return
        for _ in range(self.skip * world):
            self.draw(rng)
        i = 0
        while True:
            sample = self.draw(rng)
            if i % world == rank:
                yield sample
            i += 1

    def _grouped(self, rng: np.random.Generator, rank: int, world: int) -> Iterator[Any]:
        width = self.batch_size * world  # one global batch
        to_skip = self.skip // self.batch_size
        order_rng = np.random.default_rng([self.seed, 1])  # its own stream: the draws stay the plain stream's
        while True:
            samples = [self.draw(rng) for _ in range(self.pool * width)]
            order = sorted(range(len(samples)), key=lambda i: self.length(samples[i]))  # type: ignore[misc]
            for j in order_rng.permutation(self.pool):
                if to_skip:
                    to_skip -= 1
                    continue
                batch = order[j * width: (j + 1) * width]
                yield from (samples[i] for n, i in enumerate(batch) if n % world == rank)


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over `warmup` steps, cosine decay to `floor` at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


class SFTModule(L.LightningModule):
    """Wraps an HF causal LM; `training_step` minimises completion NLL. Other policy objectives (step-DPO,
    Tree-GRPO) subclass it with their own `losses` and share its optimizer and LR schedule."""

    def __init__(self, model: torch.nn.Module, *, lr: float = 1e-3, warmup_steps: int = 100,
                 max_steps: int = 1000, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.model = model.train()
        self.save_hyperparameters(ignore=["model"])

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every logged quantity of one batch; `loss` is what is minimised (subclasses: other objectives)."""
        return {"loss": self.model(**batch).loss}

    def _common_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        got = self.losses(batch)
        n = int(batch["input_ids"].shape[0])
        self.log(f"{stage}_loss", got["loss"], prog_bar=True, batch_size=n)
        if len(got) > 1:
            self.log_dict({f"{stage}/{k}": v for k, v in got.items() if k != "loss"}, batch_size=n)
        return got["loss"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams
        trained = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters only
        decay = [p for p in trained if p.ndim >= 2]
        no_decay = [p for p in trained if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(hp.warmup_steps, hp.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lightning_accelerator(device: str) -> tuple[str, list[int] | int]:
    """Map a torch device string to Lightning's (accelerator, devices)."""
    if device.startswith("cuda"):
        idx = device.split(":")[1] if ":" in device else "0"
        return "gpu", [int(idx)]
    if device in ("cpu", "mps"):
        return device, 1
    raise ValueError(f"device={device!r}: expected cpu, cuda, cuda:N or mps")
