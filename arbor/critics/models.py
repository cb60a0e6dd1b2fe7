"""Critic models: an HF transformer backbone (initialised from the policy) with scalar heads (AlphaLLM §4.3).

A critic reads a token prefix and outputs one probability per head at a chosen position:

- value V(s): at the last token of state s (prompt + steps so far), the expected outcome from s;
- PRM: at the end of each step, the chance that the step leads to a correct answer (Math-Shepherd);
- ORM: at the last token of a complete solution, the chance that it is correct.

All three read the hidden state at a step end, so one forward over a root-to-leaf path scores every step on
it. Score = sigmoid(w . h_t + b), h_t [H] the backbone's last hidden state at position t. `CriticModel` holds one
backbone and one `Linear(H, 1)` head per kind: three heads on one backbone (`shared_backbone`) or one head each
on three separate backbones (three `CriticModel`s).

Saved as a normal model directory: the backbone's `save_pretrained` (config.json + model.safetensors), the
heads in `heads.safetensors`, the tokenizer when given, and `critic.json` naming the kinds and the head. Load
one on its own with `arbor.critics.load(path)` (safetensors only, `trust_remote_code=False`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from arbor.critics.config import KINDS

CRITIC_JSON = "critic.json"
HEADS_FILE = "heads.safetensors"
FORMAT = "arbor-critic/1"


def backbone_of(model: PreTrainedModel) -> PreTrainedModel:
    """The transformer body of a causal LM (LlamaModel of LlamaForCausalLM, GPT2Model of GPT2LMHeadModel)."""
    return model.base_model


class CriticModel(nn.Module):
    """A backbone with one scalar head per kind in `kinds` (a subset of value, prm, orm)."""

    def __init__(self, backbone: PreTrainedModel, kinds: Sequence[str]) -> None:
        super().__init__()
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds={list(kinds)}: expected a non-empty subset of {KINDS}")
        self.backbone = backbone
        self.kinds = tuple(k for k in KINDS if k in kinds)
        hidden = int(backbone.config.hidden_size)
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, 1) for k in self.kinds})
        for h in self.heads.values():
            nn.init.normal_(h.weight, std=0.02)
            nn.init.zeros_(h.bias)

    @classmethod
    def from_policy(cls, policy: PreTrainedModel | str | Path, kinds: Sequence[str]) -> CriticModel:
        """A critic whose backbone is a copy of the policy's transformer body (fresh heads)."""
        import copy

        if isinstance(policy, (str, Path)):
            from arbor.lm.hf import load_model_and_tokenizer

            policy, _ = load_model_and_tokenizer(policy, "cpu")
        return cls(copy.deepcopy(backbone_of(policy)), kinds)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: object | None = None,
               ) -> tuple[torch.Tensor, object]:
        """Last hidden states [B, T, H] of `ids` [B, T] (`mask`: full attention [B, past+T] of 0/1, or a 4D bool
        [B, 1, T, T] with True = attend, e.g. a token trie's paths; `pos` [B, T]) and the updated KV cache."""
        attn = getattr(self.backbone.config, "_attn_implementation", "sdpa")
        if mask.dim() == 4 and attn not in ("sdpa", "eager"):
            raise ValueError(f"attention {attn!r}: a token trie's 4D mask needs sdpa or eager attention "
                             "(attn_implementation)")
        if mask.dim() == 4 and attn == "eager":
            mask = torch.zeros(mask.shape, dtype=self.backbone.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.backbone.dtype).min)  # eager attention adds its mask to the scores
        out = self.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                            use_cache=cache is not None)
        return out.last_hidden_state, out.cache

    def head_logits(self, h: torch.Tensor, kinds: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """{kind: logits [...]} of hidden states `h` [..., H] (heads in float32)."""
        return {k: self.heads[k](h.float()).squeeze(-1) for k in (kinds or self.kinds)}

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's last hidden states [B, P, H] at `positions` [B, P] (indices into T; padding entries may
        point anywhere and are masked by the caller) of sequences [B, T]: right-padded with a 2D
        `attention_mask` [B, T] (positions counted from it), or token tries (arbor/train/critic.py
        `pack_problems`) with a 4D bool mask [B, 1, T, T] and their `position_ids` [B, T]."""
        if position_ids is None:
            if attention_mask.dim() != 2:
                raise ValueError("a 4D attention mask needs position_ids")
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        h, _ = self.hidden(input_ids, attention_mask, position_ids)
        return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training forward: {kind: logits [B, P]} of the heads on `features` (same arguments)."""
        return self.head_logits(self.features(input_ids, attention_mask, positions, position_ids))

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[int]], kinds: Sequence[str] | None = None,
              batch_size: int = 64) -> dict[str, np.ndarray]:
        """Uncached scores: {kind: [n] sigmoid at the last token of each sequence}, left-padded batches of
        `batch_size` (the reference that the prefix-cached scorer must match)."""
        kinds = tuple(kinds or self.kinds)
        out: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
        for i in range(0, len(sequences), batch_size):
            ids, mask, pos = left_pad(sequences[i: i + batch_size], self.device)
            h, _ = self.hidden(ids, mask, pos)
            for k, v in self.head_logits(h[:, -1], kinds).items():
                out[k].append(torch.sigmoid(v).cpu().numpy())
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}

    def save(self, path: str | Path, tokenizer: object | None = None) -> None:
        """Write the critic as a model directory into `path` (an existing or new directory; see module doc)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, safe_serialization=True)
        save_file({f"{k}.{n}": p.detach().cpu().contiguous() for k, h in self.heads.items()
                   for n, p in h.named_parameters()}, str(path / HEADS_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
        meta = {"format": FORMAT, "kinds": list(self.kinds), "head": "linear(hidden_size, 1) + sigmoid",
                "position": "last token of the scored prefix (a step end)",
                "hidden_size": int(self.backbone.config.hidden_size)}
        (path / CRITIC_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def left_pad(seqs: Sequence[Sequence[int]], device: torch.device | str = "cpu", pad_id: int = 0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T], attention mask [B, T] and position ids [B, T] (0 at each first real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError("cannot score an empty sequence")
        ids[i, width - len(s):] = torch.as_tensor(list(s))
        mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def load(path: str | Path, device: str = "cpu") -> CriticModel:
    """A saved critic (`CriticModel.save`): backbone from safetensors (`trust_remote_code=False`, local files
    only), heads from `heads.safetensors`; a missing or mismatched head is an error naming the file."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    path = Path(path)
    meta_file = path / CRITIC_JSON
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: no {CRITIC_JSON}; expected a critic saved by arbor (CriticModel.save)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    backbone = AutoModel.from_pretrained(path, trust_remote_code=False, local_files_only=True,
                                         use_safetensors=True)
    model = CriticModel(backbone, meta["kinds"])
    state = load_file(str(path / HEADS_FILE))
    expected = {f"{k}.{n}" for k, h in model.heads.items() for n, _ in h.named_parameters()}
    if set(state) != expected:
        raise ValueError(f"{path / HEADS_FILE}: tensors {sorted(state)}, expected {sorted(expected)}")
    model.heads.load_state_dict(state)
    return model.to(device).eval()
