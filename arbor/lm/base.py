"""The policy boundary: the one protocol that search, critics and training use to drive a language model.

Search code never imports a model class (mctx's `recurrent_fn` idea): it calls a `Policy`. Every token position
a backend computes is counted at this boundary in `TokenCounters` (DESIGN.md, "Token accounting").

The contract a backend meets (issue #14). The HF backend (arbor/lm/hf.py) is one; a fast engine (vLLM, SGLang)
behind the same protocol must pass the same suite, tests/contract.py (`PolicyContract`; the HF backend runs it
in tests/test_contract.py, for both tiny architectures). What each method must do, and how such an engine does it:

- Token ids in, token ids out: prompts and parents are id lists (`encode_prompt`), never re-tokenised text, so a
  parent's ids are exactly its path in the tree (vLLM: `prompt_token_ids`; SGLang: `input_ids`).
- `expand` reuses prefixes by content: a parent whose prefix the engine still holds is not recomputed (vLLM
  automatic prefix caching, SGLang's radix cache). `store` is the backend's own cache handle (HF: a `KVStore`;
  an engine that owns its cache may ignore it). A continuation that can be continued carries
  `key = arbor.lm.kvcache.prefix_key(parent ids + its ids)`; one that ends its trajectory (EOS, a line-rule stop,
  `final(i, text)`) has `key = None`, and its last token is never fed.
- Per-step stop at the termination rule: `StopRule.at_newline` ends a continuation at the first step-end token
  (newline; `finish="newline"`, the token included) after text that is not only whitespace (a blank line joins
  the step after it, never a step of its own), EOS ends it (`"eos"`), `max_new_tokens` cuts it
  (`"length"`); the line rule (`StopRule.trajectory`) stops after the first line that `final_line` accepts
  (`"stop"`). vLLM: `SamplingParams(stop_token_ids=<step-end ids>, include_stop_str_in_output=True)`; the line
  rule needs a logits processor or a per-line loop.
- Log-probs for priors: `Continuation.logprobs[t]` is log pi(token_t | prefix, tokens_<t) under the *untempered*
  policy, equal to `score` of the same tokens (vLLM: `logprobs=0` with the default `logprobs_mode="raw_logprobs"`,
  which is computed before temperature).
- Sampling: deterministic in `seed`, a batch of parents gives what each parent gives alone (greedy), and
  `exclude` is sampling without replacement: no continuation ever equals an excluded one (vLLM: a logits
  processor applying the exclusion bias of arbor/lm/trie.py per request).
- Token accounting from what the engine computed, not what it served: `forward_tokens` grows by the positions fed
  to the model minus those served from cache (`served_from_cache`; vLLM: prompt length minus
  `RequestOutput.num_cached_tokens`, plus every generated token but the last). vLLM reuses whole 16-token blocks
  only and always recomputes a prompt's last token; the radix backends (HF here, SGLang) reuse token-exact. A
  prefix served wholly counts a `cache_hit`, one that needed computing a `cache_miss`; an evicted prefix costs
  its tokens again.
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

    EOS always; a newline too if `at_newline` (one reasoning step, an option), unless the step is only
    whitespace so far (leading blank lines join the step); `max_new_tokens` in all.
    A whole trajectory ends like a path of tree steps (`trajectory`): the text is cut into lines, a line
    ending at a newline (not while blank) or after `line_tokens` tokens (as a step does), and decoding stops
    after the first line satisfying `final_line` (the task's terminal-step predicate) or after `max_lines` lines.
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


def served_from_cache(matched: int, fed: int, *, block: int = 1, recomputes_last: bool = False) -> int:
    """Positions of a sequence of `fed` positions that an engine serves from its prefix cache when the cache holds
    its first `matched` positions (the rest it computes, and counts in `TokenCounters.forward_tokens`).

    Token-exact radix caches that keep the final hidden state (HF backend, block 1) serve all `matched`; a paged
    engine serves whole `block`s only, and vLLM recomputes the last position even on a full hit (it needs the
    logits there): `block * floor(min(matched, fed - 1) / block)`.

    >>> served_from_cache(40, 50), served_from_cache(40, 50, block=16, recomputes_last=True)
    (40, 32)
    >>> served_from_cache(32, 32, block=16, recomputes_last=True)  # a full hit still computes one block
    16
    """
    usable = min(matched, fed - 1 if recomputes_last else fed)
    return max(0, usable) // block * block


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
