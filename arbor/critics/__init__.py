"""The three critics of AlphaLLM (§4.3): value V(s), process reward model (PRM) and outcome reward model (ORM).

- `labels`: Monte Carlo / Math-Shepherd labels from search trees (+ extra completions), split by problem.
- `models`: an HF backbone (from the policy) with scalar heads; `load(path)` opens a saved critic on its own.
- `scorer`: `CriticScorer`, the `NodeScorer` of the node score `b_v V + b_prm PRM + b_orm mean ORM(rollouts)`,
  scoring each new node from its parent's cached KV in the critic's own store (`critic_forward_tokens`).
- `calibration`: AUROC, precision, recall, ECE and the reliability diagram.
- `config`: `CriticsConfig` (labels, training, weights). Training lives in arbor/train/critic.py, the stage in
  arbor/stages/critics.py.
"""

from __future__ import annotations

import importlib
from typing import Any

from arbor.critics.config import KINDS, CriticsConfig

_LAZY = {"CriticModel": "models", "load": "models", "CachedCritic": "scorer", "CriticScorer": "scorer",
         "load_critics": "scorer", "critic_scorer": "scorer"}
__all__ = ["KINDS", "CachedCritic", "CriticModel", "CriticScorer", "CriticsConfig", "critic_scorer", "load",
           "load_critics"]


def __getattr__(name: str) -> Any:
    """Models and scorer load on first use (torch, transformers, the tree engine), so that importing
    `arbor.critics.config` (as arbor/pipeline/config.py may) stays light and free of import cycles."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"arbor.critics.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'arbor.critics' has no attribute {name!r}")
