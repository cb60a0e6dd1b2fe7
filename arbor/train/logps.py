"""Token log-probabilities of completions, for the policy objectives (step-DPO, Tree-GRPO) and their reference.

A sequence is `(prompt_ids, completion_ids)`; batches are `collate_sft` batches (right-padded, labels = the
completion ids, -100 elsewhere). `token_logps` gives log pi(y_t | x, y_<t) at the completion positions in the
shifted frame (position t predicts token t+1). The reference log-probs are computed once with the same
function (same padding, same arithmetic: the log-ratio of an unchanged policy is exactly 0) and stored per
sequence as float32 arrays; `place` lays stored arrays back onto the shifted frame of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from arbor.train.sft import IGNORE, collate_sft

Seq = tuple[Sequence[int], Sequence[int]]


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps [B, T-1] float32, 0 off the completion; mask [B, T-1] bool, True on completion tokens).

    logps[b, t] = log pi(input_ids[b, t+1] | input_ids[b, :t+1]) where labels[b, t+1] != -100.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lp = picked - torch.logsumexp(logits, dim=-1)  # log_softmax at the label only: no [B, T, V] copy kept
    return lp * mask, mask


def place(arrays: Sequence[np.ndarray], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T-1] float32: each sequence's per-token array laid onto its completion positions of `batch`."""
    mask = batch["labels"][:, 1:] != IGNORE
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i, a in enumerate(arrays):
        idx = torch.nonzero(mask[i]).squeeze(-1)
        if len(idx) != len(a):
            raise ValueError(f"sequence {i}: {len(a)} stored log-probs for {len(idx)} completion tokens")
        out[i, idx] = torch.as_tensor(np.asarray(a, np.float32))
    return out


@torch.no_grad()
def reference_logps(model: torch.nn.Module, seqs: Sequence[Seq], *, pad_id: int, batch_size: int = 32,
                    device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Per-token log-probs [len(completion)] of every sequence under `model` (eval mode), in `seqs` order."""
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    for i in range(0, len(seqs), batch_size):
        batch = {k: v.to(device) for k, v in collate_sft(seqs[i: i + batch_size], pad_id).items()}
        lp, mask = token_logps(model, batch)
        out += [lp[j][mask[j]].cpu().numpy().astype(np.float32) for j in range(lp.shape[0])]
    model.train(was_training)
    return out
