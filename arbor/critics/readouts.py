"""Critic read-outs over sampled chains: rerank the k samples of a problem by the ORM or the PRM (no gold answer).

Given the k complete solutions a policy sampled for one problem (the samples behind pass@k and maj@k):

- `orm_best_of_n`: the sample with the highest ORM score (Cobbe et al. 2021 verifier reranking);
- `orm_vote`: ORM-weighted majority vote, answer a maximising sum_i ORM(sample_i) [answer_i = a]
  (AlphaLLM §4.4 read-outs; Li et al. 2023 weighted voting);
- `prm_min_best_of_n` / `prm_last_best_of_n`: the sample whose PRM aggregate is highest, aggregate = min over
  its steps (Lightman et al. 2023) or the last step's score (Math-Shepherd's / Wang et al. 2024 "last").

Each sample is split into steps as the search tree splits a path (`arbor.critics.labels.step_ends`: a step
ends after a token whose text holds a newline, a blank line joining the step after it, or after `step_tokens`
tokens) and cut after its first terminal
step (the answer line, as a tree path ends); a trailing EOS is not fed. The critics read the samples with
prefix caching: the prompt once per problem, then each step on top of its parent's cached KV
(`CachedCritic.score`, fed level by level), so every distinct sample token passes each critic backbone once;
that work is `critic_forward_tokens`. Critics saved with a fusion (`critics.confidence`) score through it, with
each step prefix's confidence features from the sample's own token log-probs. Ties go to the first sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from arbor.critics.confidence import sample_features
from arbor.critics.labels import step_ends
from arbor.critics.scorer import CachedCritic
from arbor.lm.base import Continuation

READOUTS = ("orm_best_of_n", "orm_vote", "prm_min_best_of_n", "prm_last_best_of_n")
__all__ = ["READOUTS", "SampleScores", "rerank", "score_samples", "step_ends"]


@dataclass
class SampleScores:
    """Critic scores of one problem's k samples: `orm` [k] at each sample's end, `prm` k arrays [steps_i]."""

    orm: np.ndarray
    prm: list[np.ndarray]


def score_samples(critics: dict[str, CachedCritic], prompt: Sequence[int], samples: Sequence[Continuation], *,
                  piece: Callable[[int], str], step_tokens: int, is_terminal: Callable[[str], bool],
                  eos_token_id: int | None = None) -> SampleScores:
    """ORM and per-step PRM scores of `samples` (continuations of `prompt`), prefix-cached (module docstring).

    `critics` maps "prm" and "orm" to their `CachedCritic` (one object when the backbone is shared). A sample
    with no token gets ORM 0 and one PRM step of 0. The critics' stores are emptied afterwards.
    """
    paths, ends, feats = [], [], []
    for c in samples:
        toks = list(c.token_ids)
        if toks and c.finish == "eos" and eos_token_id is not None and toks[-1] == eos_token_id:
            toks = toks[:-1]
        e = step_ends(toks, piece, step_tokens=step_tokens, is_terminal=is_terminal) if toks else []
        paths.append([*prompt, *toks[: e[-1]]] if e else list(prompt))
        ends.append(e)
        feats.append(sample_features(c.logprobs, e) if e else np.zeros((0, 3)))
    orm = np.zeros(len(samples))
    prm = [np.zeros(max(1, len(e))) for e in ends]
    backbones = {id(c): c for c in critics.values()}.values()
    for critic in backbones:
        kinds = [k for k in ("prm", "orm") if critics.get(k) is critic]
        for level in range(max((len(e) for e in ends), default=0)):
            rows = [i for i, e in enumerate(ends) if len(e) > level]
            start = [len(prompt) + (ends[i][level - 1] if level else 0) for i in rows]
            seqs = [paths[i][: len(prompt) + ends[i][level]] for i in rows]
            last = [len(ends[i]) == level + 1 for i in rows]
            got = critic.score(seqs, start, kinds=kinds, keep=[not x for x in last],
                               confidence=np.asarray([feats[i][level] for i in rows]))
            for j, i in enumerate(rows):
                if "prm" in got:
                    prm[i][level] = got["prm"][j]
                if "orm" in got and last[j]:
                    orm[i] = got["orm"][j]
        critic.store.clear()
    return SampleScores(orm, prm)


def rerank(scores: SampleScores, keys: Sequence[str | None]) -> dict[str, int]:
    """{read-out: index of the chosen sample} for one problem; `keys[i]` = sample i's vote key (its parsed
    final answer, None if it states none). Only complete samples (stating an answer) are candidates, as only
    complete solutions are a verifier's input; -1 when no sample states an answer. `orm_vote` picks the first
    sample carrying the winning answer."""
    done = [i for i, k in enumerate(keys) if k is not None]
    if not done:
        return dict.fromkeys(READOUTS, -1)

    def best(values: Sequence[float]) -> int:
        return done[int(np.argmax([values[i] for i in done]))]

    out = {"orm_best_of_n": best(scores.orm), "prm_min_best_of_n": best([float(p.min()) for p in scores.prm]),
           "prm_last_best_of_n": best([float(p[-1]) for p in scores.prm])}
    weight: dict[str, float] = {}
    for k, s in zip(keys, scores.orm, strict=True):
        if k is not None:
            weight[k] = weight.get(k, 0.0) + float(s)
    out["orm_vote"] = keys.index(max(weight, key=lambda k: weight[k]))
    return out
