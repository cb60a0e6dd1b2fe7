"""SFT-best, AlphaLLM's own policy update (arXiv 2404.12253 §4.5): NLL on the best path of each problem's tree.

From the Tree-GRPO view of the trees (prefs/iter_k/trajectories.parquet, one row per root-to-terminal path),
each problem contributes its best trajectory whose outcome reward is at least `sft_min_reward`: highest
reward, then most visits of its leaf (the path the search trusted most), then the shortest, then the first
created. The completion ends with EOS, as the bootstrap's training solutions do, so the policy keeps stopping
after its answer. Trained with `SFTModule` (completion NLL) from arbor/train/sft.py; no reference is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from arbor.train.config import TrainConfig
from arbor.train.logps import Seq
from arbor.train.sft import SFTModule, collate_sft, prompt_completion_length


def best_paths(trajectories: pa.Table, *, min_reward: float, eos_id: int) -> list[dict[str, Any]]:
    """One item {"problem_id", "prompt", "completion"} per problem that has a qualifying path, in the order
    problems first appear; `completion` = the path's step tokens + [eos_id]."""
    d = trajectories.select(["problem_id", "leaf", "reward", "leaf_visits", "prompt_ids",
                             "completion_ids"]).to_pydict()

    def rank(i: int) -> tuple:
        return d["reward"][i], d["leaf_visits"][i], -len(d["completion_ids"][i]), -d["leaf"][i]

    best: dict[str, int] = {}
    for i, pid in enumerate(d["problem_id"]):
        if d["reward"][i] >= min_reward and d["completion_ids"][i] and (pid not in best or rank(i) > rank(best[pid])):
            best[pid] = i
    return [{"problem_id": pid, "prompt": d["prompt_ids"][i], "completion": [*d["completion_ids"][i], eos_id]}
            for pid, i in best.items()]


def training_items(pairs: pa.Table, trajectories: pa.Table, cfg: TrainConfig, eos_id: int) -> list[dict[str, Any]]:
    """The best path of each problem (`best_paths` with `train.sft_min_reward`)."""
    return best_paths(trajectories, min_reward=cfg.sft_min_reward, eos_id=eos_id)


length = prompt_completion_length  # padded width of an item (length grouping, `train.length_pool`)


def reference_sequences(items: Sequence[dict[str, Any]]) -> list[Seq]:
    """SFT needs no reference log-probs."""
    return []


def attach_reference(items: list[dict[str, Any]], ref: Sequence[np.ndarray]) -> None:
    """Nothing to attach (no reference)."""


def collate(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """A `collate_sft` batch of the paths (prompt masked out)."""
    return collate_sft([(x["prompt"], x["completion"]) for x in items], pad_id)


def module(model: torch.nn.Module, cfg: TrainConfig, max_steps: int) -> SFTModule:
    """The Lightning module of `train.*` params."""
    return SFTModule(model, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=max_steps,
                     weight_decay=cfg.weight_decay)
