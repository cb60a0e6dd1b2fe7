"""The policy boundary: the one protocol that search, critics and training use to drive a language model.

Search code never imports a model class (mctx's `recurrent_fn` idea): it calls a `Policy`. Every token position
a backend computes is counted at this boundary in `TokenCounters` (DESIGN.md, "Token accounting").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class TokenCounters:
    """Work done at the model boundary.

    forward_tokens: real (non-padding) token positions computed, prefill and decode.
    padded_positions: query positions computed only because of batching (left padding of prompts).
    padded_kv_positions: attention work over padding: per forward, for every real query position, the
        masked (padding) KV slots it attends over, summed over rows. Rows of different lengths in one batch
        (left-padded prompts or parent caches) cost this even when `padded_positions` is 0.
    cache_hits / cache_misses: prefix KV-cache look-ups (a miss recomputes the prefix).
    """

    forward_tokens: int = 0
    padded_positions: int = 0
    padded_kv_positions: int = 0
    cache_hits: int = 0
    cache_misses: int = 0

    def snapshot(self) -> TokenCounters:
        return dataclasses.replace(self)

    def since(self, before: TokenCounters) -> TokenCounters:
        """Counts accumulated after `before` was taken."""
        return TokenCounters(**{k: getattr(self, k) - getattr(before, k) for k in self.as_dict()})

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StopRule:
    """When a continuation ends.

    EOS always; a newline too if `at_newline` (one reasoning step, an option); `max_new_tokens` in all.
    A whole trajectory ends like a path of tree steps (`trajectory`): the text is cut into lines, a line
    ending at a newline or after `line_tokens` tokens (as a step does), and decoding stops after the first
    line satisfying `final_line` (the task's terminal-step predicate) or after `max_lines` lines.
    """

    at_newline: bool = False
    max_new_tokens: int = 64
    line_tokens: int | None = None
    max_lines: int | None = None
    final_line: Callable[[str], bool] | None = None

    @classmethod
    def trajectory(cls, *, step_tokens: int, max_depth: int, is_terminal: Callable[[str], bool]) -> StopRule:
        """The stop rule of one root-to-terminal path of a tree grown with these step limits."""
        return cls(at_newline=False, max_new_tokens=step_tokens * max_depth, line_tokens=step_tokens,
                   max_lines=max_depth, final_line=is_terminal)

    @property
    def by_lines(self) -> bool:
        return self.line_tokens is not None or self.max_lines is not None or self.final_line is not None


@dataclass
class Continuation:
    """One sampled continuation.

    token_ids: [T] generated ids, including the stop token (newline or EOS) when one was produced.
    logprobs: [T] log pi(token | prefix) under the untempered policy.
    finish: "newline" | "eos" | "length" | "stop" (a line rule of `StopRule` ended it).
    """

    token_ids: list[int]
    logprobs: np.ndarray
    finish: str
    text: str = ""
    key: Hashable | None = None  # content key of (prefix + this continuation) when `expand` stored its state
    state: Any = None  # backend-private prefix state while in flight; None once stored


Excluded = tuple[Sequence[int], np.ndarray]
"""A continuation that sampling must not repeat: (token ids, their log-probs under the policy)."""


class Policy(Protocol):
    """A language model behind a fixed interface (HF transformers backend: `arbor.lm.hf.HFPolicy`)."""

    counters: TokenCounters
    eos_token_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt (BOS where the model uses one, then `encode(text)`)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        ...

    def sample(self, prompts: Sequence[Sequence[int]], *, stop: StopRule, temperature: float, seed: int,
               batch_size: int = 64) -> list[Continuation]:
        """One continuation per prompt until `stop`; temperature 0 = greedy. Deterministic in `seed`."""
        ...

    def expand(self, parents: Sequence[tuple[Hashable, Sequence[int]]], num_samples: int | Sequence[int], *,
               stop: StopRule, temperature: float, seed: int, store: Any,
               exclude: Sequence[Sequence[Excluded]] | None = None,
               final: Callable[[int, str], bool] | None = None) -> list[list[Continuation]]:
        """Sample continuations of each `(cache_key, prefix_ids)` parent, reusing its cached prefix state in
        `store`. The key is content-based: `arbor.lm.kvcache.prefix_key(prefix_ids)`, so equal prefixes share
        one state. Continuations that can be continued carry the `key` of their own stored state.
        `exclude[i]` lists continuations that parent i's samples must not repeat (sampling without
        replacement against existing children). `final(i, text)`: whether a continuation of parent i ends its
        trajectory (never continued): it gets no state, and its last token is not fed."""
        ...

    def score(self, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
              batch_size: int = 64) -> list[np.ndarray]:
        """Per-token log pi(continuation_t | prefix, continuation_<t); one [len(continuation)] array each."""
        ...
