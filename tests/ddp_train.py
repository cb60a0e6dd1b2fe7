"""Training under a Lightning strategy, recorded per rank: run by tests/test_train_ddp.py.

`python -m tests.ddp_train --out DIR --strategy ddp --devices 2 --batch 4` trains the tiny policy with
`arbor.train.policy.fit` (the stage's own fit) as two CPU processes (gloo; Lightning re-runs this command for
rank 1), and each rank writes its per-step losses (`rank<r>.json`) and final weights (`rank<r>.safetensors`).
`train(...)` does the same in-process (one process, `--strategy auto`). Every completion has the same number of
tokens, so the mean token NLL of a doubled batch is the mean of its two halves' losses.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from arbor.train.sft import SFTModule, collate_sft, prompt_completion_length

STEPS, SEED = 6, 3


class RecordingSFT(SFTModule):
    """`SFTModule` that keeps each optimizer step's loss and writes it with the final weights at the end."""

    def __init__(self, model: torch.nn.Module, out: Path, **kw) -> None:
        super().__init__(model, **kw)
        self.out, self.losses_seen = out, []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses_seen.append(float(loss.detach()))
        return loss

    def on_train_end(self) -> None:
        from safetensors.torch import save_file

        r = self.global_rank
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{r}.json").write_text(json.dumps({"rank": r, "world": self.trainer.world_size,
                                                            "losses": self.losses_seen}))
        save_file({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                  self.out / f"rank{r}.safetensors")


def items(tok: object, n: int = 40) -> list[dict[str, list[int]]]:
    """`n` (prompt, completion) items, prompts of different lengths, completions of 8 tokens each."""
    enc = tok.encode  # type: ignore[attr-defined]
    return [{"prompt": [1, *enc(f"Q: {i} +{i % 7}" + " ?" * (i % 3) + "\n", add_special_tokens=False)],
             "completion": [*enc(f"A: {i + i % 7:04d}\n"[:7], add_special_tokens=False), 2]} for i in range(n)]


def train(out: Path, *, strategy: str, devices: int | None, batch: int) -> None:
    from arbor.lm.tokenizer import char_tokenizer
    from arbor.train.config import TrainConfig
    from arbor.train.policy import fit

    from .conftest import tiny_model

    tok = char_tokenizer()
    cfg = TrainConfig(objective="sft_best", batch_size=batch, lr=3e-3, warmup_steps=0, strategy=strategy,
                      devices=devices, checkpoint_every=0)
    module = RecordingSFT(tiny_model(tok, "llama", seed=0), out, lr=cfg.lr, warmup_steps=0, max_steps=STEPS,
                          weight_decay=0.0)
    data = items(tok)
    assert {len(x["completion"]) for x in data} == {8}
    # length grouping on (train.length_pool, default 8): the ranks share each grouped global batch
    fit(module, data, lambda xs: collate_sft([(x["prompt"], x["completion"]) for x in xs], tok.pad_token_id), cfg,
        steps=STEPS, seed=SEED, device="cpu", progress=False, length=prompt_completion_length)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    train(a.out, strategy=a.strategy, devices=a.devices, batch=a.batch)


if __name__ == "__main__":
    main()
