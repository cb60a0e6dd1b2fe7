"""`TrainConfig`: stage `train`, the policy update of one iteration (step-DPO, Tree-GRPO or SFT-best).

Declared like the sections of arbor/pipeline/config.py (arbor/pipeline/fields.py), composed into `ArborConfig`
as the `train:` section; every key is a `--train.<key>` option and a params.yaml entry. `train.lora`
(arbor/lm/config.py): LoRA adapters on the frozen previous policy instead of full fine-tuning; the trained
policy is saved merged (a normal model dir) or as an adapter dir over policy_{k-1} (`train.lora.save`).
"""

from __future__ import annotations

from dataclasses import dataclass

from arbor.lm.config import LoraConfig
from arbor.pipeline.fields import COUNT, ConfigError, section
from arbor.pipeline.fields import config_field as _f

OBJECTIVES = ("dpo", "grpo", "sft_best")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")


@dataclass
class TrainConfig:
    """Stage `train`: the iteration's policy update from prefs/iter_k, starting from (and referenced to) the
    previous policy."""

    objective: str = _f("dpo", "dpo (step-DPO on sibling pairs + NLL on the chosen step) | grpo (Tree-GRPO "
                               "clipped policy gradient with intra+inter advantages, KL to the reference) | "
                               "sft_best (NLL on the best correct path per problem, AlphaLLM's update).",
                        choices=OBJECTIVES)
    epochs: float = _f(4.0, "Expected passes over the training items (items are drawn with replacement; steps "
                            "= ceil(epochs * items / (batch_size * accumulate_grad_batches))).", gt=0.0)
    batch_size: int = _f(16, "Items (pairs, trajectories or paths) per micro-batch.", **COUNT)
    accumulate_grad_batches: int = _f(1, "Micro-batches per optimizer step (gradient accumulation).", **COUNT)
    length_pool: int = _f(8, "Length grouping: micro-batches drawn at a time, sorted by item length and cut into "
                             "micro-batches of similar length (less padding; 1 = every micro-batch drawn at random).",
                          **COUNT)
    lr: float = _f(1e-5, "Peak learning rate (AdamW, linear warm-up then cosine decay to 0.1x). Fine-tuning "
                             "rate: 3e-4 broke the tiny default (README, #10).", gt=0.0)
    warmup_steps: int = _f(10, "Warm-up optimizer steps.", min=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0)
    gradient_clip: float = _f(1.0, "Clip the gradient norm at this value (0 = no clipping).", min=0.0)
    beta: float = _f(0.1, "dpo: beta, the strength of the implicit KL to the reference.", gt=0.0)
    nll_weight: float = _f(1.0, "dpo: weight of the per-token NLL of the chosen step (against likelihood "
                                "displacement; 0 = plain DPO).", min=0.0)
    clip_eps: float = _f(0.2, "grpo: ratio clipping epsilon of the surrogate objective.", gt=0.0, max=1.0)
    kl_coef: float = _f(0.04, "grpo: weight of the per-token KL to the reference (k3 estimator).", min=0.0)
    sft_min_reward: float = _f(1.0, "sft_best: a path qualifies when its outcome reward is at least this.",
                               min=0.0, max=1.0)
    gradient_checkpointing: bool = _f(False, "Recompute the policy's activations in the backward pass instead of "
                                             "keeping them: less memory for long sequences and large models, about "
                                             "a third more compute.")
    precision: str = _f("32-true", "Lightning precision.", choices=PRECISIONS)
    strategy: str = _f("auto", "Lightning strategy (arbor/train/strategy.py): auto (one device) | ddp (one process "
                               "per device; gloo on CPU) | fsdp (GPUs: sharded weights, grads, optimizer) | deepspeed "
                               "(GPUs: ZeRO-2).", choices=STRATEGIES)
    devices: int | None = _f(None, "Devices per node (GPUs; with ddp on CPU: processes); null: the one named by "
                                   "`device`.", **COUNT)
    num_nodes: int = _f(1, "Machines (Lightning num_nodes; start the same command on each, e.g. with torchrun or "
                           "SLURM).", **COUNT)
    checkpoint_every: int = _f(20, "Save a resumable checkpoint every N optimizer steps (0 = never); a killed "
                                   "run resumes from the last one.", min=0)
    lora: LoraConfig = section(LoraConfig)

    def __post_init__(self) -> None:
        if self.lora.enabled and self.strategy == "fsdp":
            raise ConfigError("train.lora.enabled with train.strategy=fsdp: the sharded save path rebuilds a plain "
                              "model and cannot hold adapters; use train.strategy: ddp or deepspeed, or full "
                              "fine-tuning (train.lora.enabled: false)")
