"""Shared fixtures: tiny models built from config (never downloaded) and a scripted fake policy."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from arbor.lm.base import Continuation, StopRule, TokenCounters

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def char_tok():
    from arbor.lm.tokenizer import char_tokenizer

    return char_tokenizer()


def tiny_model(tok, arch: str = "llama", seed: int = 0):
    from arbor.lm.tiny import build_tiny_model
    from arbor.pipeline.config import ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                      max_positions=128)
    return build_tiny_model(cfg, tok).eval()


class ScriptedPolicy:
    """A fake `Policy`: completions for a prompt are taken in turn from a script keyed by prompt text."""

    eos_token_id = 0

    def __init__(self, script: dict[str, Sequence[str]]) -> None:
        self.script = {k: itertools.cycle(v) for k, v in script.items()}
        self.greedy = {k: v[0] for k, v in script.items()}
        self.counters = TokenCounters()

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    def sample(self, prompts, *, stop: StopRule, temperature: float, seed: int, batch_size: int = 64):
        out = []
        for p in prompts:
            key = self.decode(p)
            text = self.greedy[key] if temperature == 0 else next(self.script[key])
            self.counters.forward_tokens += len(p) + len(text)
            out.append(Continuation(self.encode(text), np.zeros(len(text), np.float32), "eos", text))
        return out

    def score(self, prefixes, continuations, batch_size: int = 64):
        return [np.zeros(len(c), np.float32) for c in continuations]
