"""Lightning strategies for training on one device, N devices or N nodes (issue #14): auto, ddp, fsdp, deepspeed.

`trainer_kwargs(cfg, device, model)` gives `L.Trainer` its accelerator, devices, num_nodes and strategy:

- `auto`: one device (the one `device` names).
- `ddp`: one process per device, gradients all-reduced (gloo on CPU, NCCL on GPUs); every rank holds the whole
  model. On CPU `train.devices` is the number of processes. Lightning launches the other ranks by re-running
  the command (`python -m arbor.stages.train ...` / `arbor train ...`), so it runs from a script or the CLI, not
  from a notebook. Data: each rank draws its own items (`SampleStream` is rank-aware), so `world * batch_size`
  distinct items make one step, as one process with a `world`-times larger batch would.
- `fsdp` (GPUs only; Lightning refuses it on CPU): parameters, gradients and optimizer state sharded across
  ranks (ZeRO-3 style), each transformer block (`model._no_split_modules`) its own FSDP unit; the full state
  dict is gathered for saving (`state_dict_type="full"`).
- `deepspeed` (GPUs only, needs `pip install deepspeed`): ZeRO stage 2 (optimizer state and gradients
  sharded, weights whole on every rank, so the policy saves as usual).

Several nodes: set `train.num_nodes` and start the same command on every node with the cluster's launcher
(torchrun, SLURM `srun`; Lightning reads MASTER_ADDR, NODE_RANK, WORLD_SIZE from it).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from arbor.pipeline.fields import ConfigError
from arbor.train.config import TrainConfig


def _accelerator(device: str) -> tuple[str, list[int] | int]:
    from arbor.train.sft import lightning_accelerator

    return lightning_accelerator(device)


def block_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The transformer-block classes of an HF model (its `_no_split_modules`): FSDP's wrapping units."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def trainer_kwargs(cfg: TrainConfig, device: str, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """`accelerator`, `devices`, `num_nodes` and `strategy` for `L.Trainer` from `train.strategy`,
    `train.devices`, `train.num_nodes` and the params' `device` (module docstring). `model`: what FSDP wraps."""
    accelerator, devices = _accelerator(device)
    if cfg.devices is not None:
        devices = cfg.devices
    kind = cfg.strategy
    if kind in ("fsdp", "deepspeed") and accelerator != "gpu":
        raise ConfigError(f"train.strategy={kind} needs GPUs (device: cuda); on {accelerator} use train.strategy: "
                          "ddp (gloo) or auto")
    if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.strategy=deepspeed needs the deepspeed package (pip install deepspeed)")
    if cfg.num_nodes > 1 and kind == "auto":
        raise ConfigError(f"train.num_nodes={cfg.num_nodes} needs train.strategy: ddp, fsdp or deepspeed")
    strategy: Any = "auto"
    if kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else "nccl")
    elif kind == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        wrap = block_classes(model) if model is not None else set()
        strategy = FSDPStrategy(auto_wrap_policy=wrap or None, sharding_strategy="FULL_SHARD",
                                state_dict_type="full")
    elif kind == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(stage=2)
    return {"accelerator": accelerator, "devices": devices, "num_nodes": cfg.num_nodes, "strategy": strategy}


def trained_model(trainer: Any, model: torch.nn.Module) -> torch.nn.Module | None:
    """The trained weights as a plain HF model to save, on global rank 0 (None elsewhere). Under FSDP the full
    state dict is gathered (a collective: every rank must call this) into a fresh model of `model`'s class and
    config, since `model` itself then holds only this rank's shards; otherwise `model` itself (auto, DDP and
    ZeRO-2 keep whole weights on every rank). The FSDP path needs GPUs and is untested on this CPU-only project."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return model if trainer.is_global_zero else None
    state = trainer.strategy.lightning_module_state_dict()  # full, on rank 0 only (state_dict_type="full")
    if not trainer.is_global_zero:
        return None
    fresh = type(model)(model.config)  # type: ignore[call-arg]
    fresh.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return fresh


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
