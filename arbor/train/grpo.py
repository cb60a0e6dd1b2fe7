"""Tree-GRPO policy update: clipped policy gradient on tree trajectories with intra+inter advantages, KL to the
reference, as a Lightning module.

Per trajectory o_i (completion tokens y_t after the prompt) with advantage A_i (arbor/improve/advantages.py,
Tree-GRPO arXiv 2509.21240 §3) and per token t (GRPO, DeepSeekMath arXiv 2402.03300, eq. 3-4):

    rho_t = pi(y_t | .) / pi_old(y_t | .)
    L_t   = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + kl_coef * KL_t
    KL_t  = pi_ref / pi - log(pi_ref / pi) - 1                 (k3 estimator, unbiased, >= 0)
    L     = mean_i [ (1 / |o_i|) sum_t L_t ]

The trajectories were sampled by the previous policy, which is both pi_old (the behaviour policy) and
pi_ref: its per-token log-probs are computed once before training and stored (`ref_logps` in the batch).
Training passes over the same trajectories more than once (offline), which is what the clipping bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from arbor.train.config import TrainConfig
from arbor.train.logps import Seq, place, token_logps
from arbor.train.sft import SFTModule, collate_sft, prompt_completion_length


def grpo_loss(logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor,
              *, clip_eps: float, kl_coef: float) -> dict[str, torch.Tensor]:
    """Clipped surrogate + KL (module docstring) over [B, T] token log-probs with `mask` [B, T] and `adv` [B];
    returns `loss` and its parts `pg`, `kl` (each a mean of per-sequence token means) and `clip_frac`."""
    m = mask.float()
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(-1)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    d = ref - logp
    kl = torch.exp(d) - d - 1
    n = m.sum(-1).clamp(min=1)

    def seq_mean(x: torch.Tensor) -> torch.Tensor:
        return ((x * m).sum(-1) / n).mean()

    clipped = ((ratio - 1).abs() > clip_eps).float()
    return {"loss": seq_mean(pg + kl_coef * kl), "pg": seq_mean(pg), "kl": seq_mean(kl), "clip_frac": seq_mean(clipped)}


def training_items(pairs: pa.Table, trajectories: pa.Table, cfg: TrainConfig, eos_id: int) -> list[dict[str, Any]]:
    """One item per row of a prefs `trajectories.parquet` (prompt, completion token ids, advantage); rows with
    a zero advantage carry no policy gradient and are dropped."""
    d = trajectories.select(["prompt_ids", "completion_ids", "advantage"]).to_pydict()
    return [{"prompt": p, "completion": c, "advantage": float(a)}
            for p, c, a in zip(d["prompt_ids"], d["completion_ids"], d["advantage"], strict=True)
            if len(c) and abs(a) > 1e-12]


length = prompt_completion_length  # padded width of an item (length grouping, `train.length_pool`)


def reference_sequences(items: Sequence[dict[str, Any]]) -> list[Seq]:
    """The sequence of each item, in order."""
    return [(it["prompt"], it["completion"]) for it in items]


def attach_reference(items: list[dict[str, Any]], ref: Sequence[np.ndarray]) -> None:
    """Store each trajectory's per-token reference log-probs on its item."""
    for it, r in zip(items, ref, strict=True):
        it["ref"] = r


def collate(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """A `collate_sft` batch plus `advantage` [B] and `ref_logps` [B, T-1] (on the completion positions)."""
    batch = collate_sft(reference_sequences(items), pad_id)
    batch["advantage"] = torch.tensor([it["advantage"] for it in items], dtype=torch.float32)
    batch["ref_logps"] = place([it["ref"] for it in items], batch)
    return batch


class TreeGRPOModule(SFTModule):
    """Tree-GRPO (module docstring) over `collate` batches; optimizer and schedule of SFTModule."""

    def __init__(self, model: torch.nn.Module, *, clip_eps: float = 0.2, kl_coef: float = 0.04, lr: float = 3e-4,
                 warmup_steps: int = 10, max_steps: int = 100, weight_decay: float = 0.0) -> None:
        super().__init__(model, lr=lr, warmup_steps=warmup_steps, max_steps=max_steps, weight_decay=weight_decay)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every logged quantity of one batch; `loss` is what is minimised."""
        lp, mask = token_logps(self.model, batch)
        ref = batch["ref_logps"].to(lp.device)
        out = grpo_loss(lp, ref, ref, mask, batch["advantage"], clip_eps=self.hparams.clip_eps,
                        kl_coef=self.hparams.kl_coef)
        seq = lp.sum(-1)
        pos = batch["advantage"] > 0
        if bool(pos.any()):
            out["logps/positive"] = seq[pos].mean()
        if bool((~pos).any()):
            out["logps/negative"] = seq[~pos].mean()
        return out


def module(model: torch.nn.Module, cfg: TrainConfig, max_steps: int) -> TreeGRPOModule:
    """The Lightning module of `train.*` params."""
    return TreeGRPOModule(model, clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, lr=cfg.lr,
                          warmup_steps=cfg.warmup_steps, max_steps=max_steps, weight_decay=cfg.weight_decay)
