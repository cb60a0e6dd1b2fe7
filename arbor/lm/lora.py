"""LoRA adapters for policy and critic training (Hu et al. 2021, arXiv 2106.09685, eq. 3), via peft; and
gradient checkpointing (`checkpoint_activations`), the other memory lever of training a pretrained body.

A wrapped linear layer computes `W x + (alpha / r) B A x` with the base weight W [d_out, d_in] frozen and only
A [r, d_in] and B [d_out, r] trained; B starts at 0, so a freshly wrapped model equals its base exactly. For a
135M model on CPU this trains ~1-3% of the weights (r = 16 on every linear layer), and the optimizer state
shrinks by the same factor.

A trained model leaves as an ordinary directory, as `LoraConfig.save` says:
- `merged`: B A folded into W (`merge_and_unload`), saved with `save_pretrained` (safetensors): a normal
  model dir that every loader reads, nothing of peft needed.
- `adapter`: `adapter_config.json` + `adapter_model.safetensors` (a few MB) + the tokenizer; the config's
  `base_model_name_or_path` is the base model's directory relative to the adapter's final directory.
  `arbor.lm.hf.load_model_and_tokenizer` loads such a dir by loading the base and merging the adapter in.

Use: `model = apply_lora(model, cfg)` before building the optimizer (the trainable parameters are then only the
adapters: `trainable_parameters`), train, then `save_trained(model, tmp_dir, cfg, ...)` inside the stage's
`atomic_path`. For a critic (backbone + scalar heads), wrap the backbone and keep the heads trainable; `merged`
then gives a plain backbone to save beside the heads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arbor.lm.config import LoraConfig
from arbor.pipeline.config import ArborInputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """`model` with LoRA adapters on `cfg.target_modules` and every base weight frozen; `model` itself, untouched,
    when `cfg.enabled` is false."""
    if not cfg.enabled:
        return model
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise ArborInputError("lora.enabled: true needs peft, an optional extra: pip install -e '.[lora]'") from None

    targets: str | list[str] = cfg.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in cfg.target_modules.split(",")]
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              bias="none")
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ArborInputError(f"lora.target_modules={cfg.target_modules!r}: {str(e).splitlines()[0]}") from None


def is_lora(model: nn.Module) -> bool:
    """Whether `model` carries peft adapters. peft is an optional extra (`arbor[lora]`): a model can only carry
    them once peft is imported, so without it this is False, and peft is never imported here."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def checkpoint_activations(model: nn.Module) -> None:
    """Gradient checkpointing on an HF model (or its LoRA wrapper): each decoder layer's activations are
    recomputed in the backward pass instead of kept (`train.gradient_checkpointing`,
    `critics.gradient_checkpointing`); the non-reentrant form, so frozen inputs under adapters still get
    gradients. Only in training mode: `model.eval()` scoring and KV-cached decoding are unchanged."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", True):
        raise ArborInputError(f"gradient_checkpointing: {type(model).__name__} does not support it (expected a "
                              "transformers PreTrainedModel)")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def merge(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into its weights (W + (alpha/r) B A), in float32: folded into a
    bf16 base (`policy.dtype: bfloat16`), a small trained update would mostly round away. `model` itself if it
    has no adapters. The peft wrapper is consumed: use the returned model from here on."""
    if not is_lora(model):
        return model
    return model.float().merge_and_unload()  # type: ignore[operator]


def save_trained(model: nn.Module, out: str | Path, cfg: LoraConfig, *, tokenizer: Any = None,
                 base_dir: str | Path | None = None, final_dir: str | Path | None = None) -> None:
    """Save a trained model into the directory `out` as `cfg.save` says (module docstring), with `tokenizer`.

    `adapter` needs `base_dir` (the frozen base model's directory) and `final_dir` (where `out` will be renamed
    to, e.g. by `atomic_path`), so that the recorded base path is relative to the adapter's final place. A model
    without adapters is saved whole, whatever `cfg.save` says.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_lora(model) and cfg.save == "adapter":
        if base_dir is None or final_dir is None:
            raise ValueError("save_trained(save='adapter') needs base_dir and final_dir")
        model.save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
        meta = json.loads((out / ADAPTER_CONFIG).read_text())
        meta["base_model_name_or_path"] = os.path.relpath(Path(base_dir).resolve(), Path(final_dir).resolve())
        (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    else:
        merge(model).save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def adapter_base(path: str | Path) -> Path:
    """The base model directory an adapter dir was trained on (its recorded path, relative to `path`)."""
    path = Path(path)
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArborInputError(f"{path / ADAPTER_CONFIG}: expected JSON with 'base_model_name_or_path' "
                              f"({type(e).__name__}: {e})") from None
    return (path / str(base)).resolve()


def load_adapter(path: str | Path, base: nn.Module) -> nn.Module:
    """`base` with the adapter saved at `path` merged into its weights (a plain model, nothing of peft left)."""
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(path), is_trainable=False).merge_and_unload()
