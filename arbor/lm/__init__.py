"""The policy boundary: the `Policy` protocol, the HF transformers backend with prefix-cached expansion, the KV
store, the character tokenizer, the tiny default model, pretrained-model loading (`loading`), prompt formats and
step-end rules (`prompting`), LoRA adapters (`lora`) and their configs (`config`)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Continuation": "base", "Policy": "base", "StopRule": "base", "TokenCounters": "base",
         "KVStore": "kvcache", "PrefixState": "kvcache"}
__all__ = ["Continuation", "KVStore", "Policy", "PrefixState", "StopRule", "TokenCounters"]


def __getattr__(name: str) -> Any:
    """Exports load on first use, so that importing `arbor.lm.config` (as arbor/pipeline/config.py does, in every
    stage) loads nothing else of the package (no torch; and stage `prepare` depends on no model code)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"arbor.lm.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'arbor.lm' has no attribute {name!r}")
