"""Step-level DPO on sibling-step pairs, with an NLL term on the chosen step, as a Lightning module.

Loss per pair (prefix p, chosen step c, rejected step r), log-probs summed over the step's tokens:

    h     = beta * [(log pi(c|p) - log pi_ref(c|p)) - (log pi(r|p) - log pi_ref(r|p))]
    L_dpo = -log sigmoid(h)                                  (DPO, Rafailov et al. 2023, eq. 7; per step as in
                                                              Step-DPO, arXiv 2406.18629)
    L_nll = -log pi(c|p) / |c|                               (per-token NLL of the chosen step, as in RPO,
                                                              Pang et al. 2024, arXiv 2404.19733, eq. 1)
    L     = mean(L_dpo) + nll_weight * mean(L_nll)

The reference is the previous iteration's policy; its log-probs are computed once before training and stored
(`ref_chosen`, `ref_rejected` in the batch), so no reference model is kept in memory. Sibling steps that
differ in one number share almost every token, which is where DPO lowers the chosen log-prob together with the
rejected one (likelihood displacement); the NLL term holds it up, and `logps/chosen` is logged to show it,
beside the log-ratios and implicit rewards beta * log-ratio (their margin and accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F

from arbor.train.config import TrainConfig
from arbor.train.logps import Seq, token_logps
from arbor.train.sft import SFTModule, collate_sft


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """DPO terms for [B] summed step log-probs: `loss` (mean -log sigmoid(h)), the log-ratios and rewards."""
    ratio_c, ratio_r = pi_chosen - ref_chosen, pi_rejected - ref_rejected
    h = beta * (ratio_c - ratio_r)
    return {"loss": -F.logsigmoid(h).mean(), "logratio_chosen": ratio_c, "logratio_rejected": ratio_r,
            "reward_chosen": beta * ratio_c, "reward_rejected": beta * ratio_r, "margin": h}


def training_items(pairs: pa.Table, trajectories: pa.Table, cfg: TrainConfig, eos_id: int) -> list[dict[str, Any]]:
    """One item per row of a prefs `pairs.parquet`: prefix, chosen, rejected token ids."""
    d = pairs.select(["prefix_ids", "chosen_ids", "rejected_ids"]).to_pydict()
    return [{"prefix": p, "chosen": c, "rejected": r}
            for p, c, r in zip(d["prefix_ids"], d["chosen_ids"], d["rejected_ids"], strict=True)]


def length(item: dict[str, Any]) -> int:
    """Padded width the item needs in a batch (length grouping, `train.length_pool`)."""
    return len(item["prefix"]) + max(len(item["chosen"]), len(item["rejected"]))


def reference_sequences(items: Sequence[dict[str, Any]]) -> list[Seq]:
    """The sequences whose reference log-probs an item needs, in order: chosen, rejected of each item."""
    return [s for it in items for s in ((it["prefix"], it["chosen"]), (it["prefix"], it["rejected"]))]


def attach_reference(items: list[dict[str, Any]], ref: Sequence[Any]) -> None:
    """Store the summed reference log-probs (`ref` in `reference_sequences` order) on the items."""
    for i, it in enumerate(items):
        it["ref_chosen"], it["ref_rejected"] = float(ref[2 * i].sum()), float(ref[2 * i + 1].sum())


def collate(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """A `collate_sft` batch of 2B sequences (the B chosen, then the B rejected) plus `ref_chosen`,
    `ref_rejected` [B]."""
    seqs = [(it["prefix"], it["chosen"]) for it in items] + [(it["prefix"], it["rejected"]) for it in items]
    batch = collate_sft(seqs, pad_id)
    batch["ref_chosen"] = torch.tensor([it["ref_chosen"] for it in items], dtype=torch.float32)
    batch["ref_rejected"] = torch.tensor([it["ref_rejected"] for it in items], dtype=torch.float32)
    return batch


class StepDPOModule(SFTModule):
    """Step-DPO + chosen-step NLL (module docstring) over `collate` batches; the optimizer and LR
    schedule are SFTModule's (AdamW, warm-up then cosine)."""

    def __init__(self, model: torch.nn.Module, *, beta: float = 0.1, nll_weight: float = 1.0, lr: float = 3e-4,
                 warmup_steps: int = 10, max_steps: int = 100, weight_decay: float = 0.0) -> None:
        super().__init__(model, lr=lr, warmup_steps=warmup_steps, max_steps=max_steps, weight_decay=weight_decay)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every logged quantity of one batch; `loss` is what is minimised."""
        lp, mask = token_logps(self.model, batch)
        seq, n = lp.sum(-1), mask.sum(-1).clamp(min=1)
        b = seq.shape[0] // 2
        out = dpo_loss(seq[:b], seq[b:], batch["ref_chosen"], batch["ref_rejected"], self.hparams.beta)
        nll = (-seq[:b] / n[:b]).mean()
        return {"loss": out["loss"] + self.hparams.nll_weight * nll, "loss/dpo": out["loss"], "loss/nll": nll,
                "logps/chosen": seq[:b].mean(), "logps/rejected": seq[b:].mean(),
                "logratio/chosen": out["logratio_chosen"].mean(), "logratio/rejected": out["logratio_rejected"].mean(),
                "rewards/chosen": out["reward_chosen"].mean(), "rewards/rejected": out["reward_rejected"].mean(),
                "rewards/margin": out["margin"].mean(), "rewards/accuracy": (out["margin"] > 0).float().mean()}


def module(model: torch.nn.Module, cfg: TrainConfig, max_steps: int) -> StepDPOModule:
    """The Lightning module of `train.*` params."""
    return StepDPOModule(model, beta=cfg.beta, nll_weight=cfg.nll_weight, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                         max_steps=max_steps, weight_decay=cfg.weight_decay)
