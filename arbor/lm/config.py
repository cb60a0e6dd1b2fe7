"""`PolicyConfig` (how a pretrained policy is loaded and prompted) and `LoraConfig` (low-rank adapters).

Declared like the sections of arbor/pipeline/config.py (arbor/pipeline/fields.py, checked generically by
`arbor.pipeline.config.build`), so that they compose into `ArborConfig` (`policy: PolicyConfig`) and into a
trainer's config (`lora: LoraConfig = section(LoraConfig)`), every key becoming a `--section.key` option and a
`params.yaml` entry. It imports only arbor/pipeline/fields.py, so arbor/pipeline/config.py can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from arbor.pipeline.fields import config_field as _f

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PolicyConfig:
    """How stages load and prompt the policy (dtype, chat template)."""

    dtype: str = _f("float32", "Weights and activations of the policy in stages that run it: float32 (CPU) | "
                               "bfloat16 (GPU) | float16. Logits are always compared in float32.", choices=DTYPES)
    chat_template: bool = _f(False, "Wrap each task prompt in the tokenizer's chat template as the user turn, "
                                    "followed by the assistant generation prompt (instruct models).")
    system_prompt: str | None = _f(None, "chat_template: the system turn (null = the template's own default; "
                                         "a string, even '', replaces it).")


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685: W + (alpha/r) B A) instead of full fine-tuning."""

    enabled: bool = _f(False, "Train LoRA adapters on a frozen base instead of every weight.")
    r: int = _f(16, "Adapter rank r.", min=1)
    alpha: float = _f(32.0, "Scale numerator: the update is (alpha / r) * B A.", gt=0.0)
    dropout: float = _f(0.0, "Dropout on the adapter input.", min=0.0, max=0.9)
    target_modules: str = _f("all-linear", "Modules that get adapters: all-linear (every linear layer but the "
                                           "output head) or comma-separated module names (q_proj,v_proj).",
                             pattern=r"all-linear|[A-Za-z_][\w.]*(,[A-Za-z_][\w.]*)*",
                             expect="all-linear or comma-separated module names")
    save: str = _f("merged", "What a trained model is saved as: merged (adapters folded into plain weights, a "
                             "normal model dir) | adapter (base dir + adapter_model.safetensors).",
                   choices=("merged", "adapter"))
