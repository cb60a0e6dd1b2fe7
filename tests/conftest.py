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


@pytest.fixture
def one_thread():
    """Tiny matrices: one torch thread is much faster than two on a busy 2-core machine (150 training steps:
    0.5 s vs 140 s); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


class StepWorld:
    """A fake step-level `Policy`: the next step after a solution prefix is drawn from `options(prefix)`.

    Tokens are character codes; `expand` samples each child's step uniformly (seeded) from the options and
    counts one forward token per generated character (the cache is trivially perfect).
    """

    eos_token_id = 0

    def __init__(self, options, prompt: str = "Q\n") -> None:
        self.options = options
        self.prompt = prompt
        self.counters = TokenCounters()
        self._key = itertools.count()

    def encode(self, text):
        return [ord(c) for c in text]

    def encode_prompt(self, text):
        return self.encode(text)

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def expand(self, parents, num_samples, *, stop, temperature, seed, store, exclude=None, final=None):
        counts = [num_samples] * len(parents) if isinstance(num_samples, int) else list(num_samples)
        rng = np.random.default_rng(seed)
        out = []
        for pi, ((_, prefix), n) in enumerate(zip(parents, counts, strict=True)):
            solution = self.decode(prefix)[len(self.prompt):]
            banned = {self.decode(ids) for ids, _ in (exclude[pi] if exclude else [])}
            conts = []
            for _ in range(n):
                opts = [o for o in self.options(solution) if o not in banned] or self.options(solution)
                if stop.at_newline:
                    text = opts[int(rng.integers(len(opts)))]
                else:  # a full rollout: keep taking steps until an answer line
                    text, sol = "", solution
                    while True:
                        step = self.options(sol)[int(rng.integers(len(self.options(sol))))]
                        text, sol = text + step, sol + step
                        if step.startswith("Answer:"):
                            break
                self.counters.forward_tokens += len(text)
                conts.append(Continuation(self.encode(text), np.full(len(text), -0.1, np.float32), "newline", text,
                                          key=next(self._key)))
            out.append(conts)
        return out
