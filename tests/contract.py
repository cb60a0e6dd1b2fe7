"""The backend contract (arbor/lm/base.py): one suite that every `Policy` backend must pass (issue #14).

A backend's test module subclasses `PolicyContract` and provides a `backend` fixture returning a `Backend`:
how to make a fresh policy over fixed weights, a fresh prefix cache for `expand`, how to evict everything from
it, and the engine's prefix-reuse granularity (`served_from_cache`). tests/test_contract.py does this for the HF
backend; a vLLM or SGLang backend would add its own module (on a GPU machine) and reuse every test here.

The suite asks only what the protocol promises, so each property is stated in the protocol's terms: seeds are
deterministic, the stop rule is respected, recorded log-probs equal `score`, counters are honest (a cached
prefix is not computed again, an evicted one is), a batch equals its rows one by one (greedy), and sampling
without replacement never repeats an excluded continuation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from arbor.lm.base import Policy, StopRule, served_from_cache
from arbor.lm.kvcache import prefix_key


@dataclass(frozen=True)
class Backend:
    """A backend under test. `make()`: a fresh policy (zeroed counters) over the same weights each call;
    `store()`: a fresh prefix cache for `expand`; `evict(store)`: drop every cached prefix; `block`,
    `recomputes_last`: the engine's prefix reuse (`served_from_cache`)."""

    make: Callable[[], Policy]
    store: Callable[[], Any]
    evict: Callable[[Any], None]
    block: int = 1
    recomputes_last: bool = False

    def served(self, matched: int, fed: int) -> int:
        return served_from_cache(matched, fed, block=self.block, recomputes_last=self.recomputes_last)


def _always(_: int, __: str) -> bool:
    return True


def _parents(policy: Policy, texts: Sequence[str]) -> list[tuple[bytes, list[int]]]:
    return [(prefix_key(p), p) for p in (policy.encode_prompt(t) for t in texts)]


def _is_step_end(policy: Policy, token: int) -> bool:
    return "\n" in policy.decode([token])


def _ends_step(policy: Policy, ids: Sequence[int], j: int) -> bool:
    """Whether token j of a step `ids` ends it: a step-end token after text that is not only whitespace (a blank
    line joins the step after it)."""
    return _is_step_end(policy, ids[j]) and bool(policy.decode(list(ids[: j + 1])).strip())


PROMPTS = ("Q: 1 +2\n", "Q: 12 +3 *4 -1\n", "Q: 9\n")


class PolicyContract:
    """The contract tests; subclass and define a `backend` fixture returning a `Backend`."""

    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError("a backend's test module defines the `backend` fixture")

    # -- seeds --------------------------------------------------------------------------------------------------
    def test_seeds_are_deterministic_and_matter(self, backend: Backend) -> None:
        stop = StopRule(at_newline=True, max_new_tokens=6)

        def draw(seed: int) -> list[list[int]]:
            policy = backend.make()
            parents = _parents(policy, PROMPTS[:2])
            got = policy.expand(parents, 4, stop=stop, temperature=1.0, seed=seed, store=backend.store())
            rows = policy.sample([p for _, p in parents] * 2, stop=stop, temperature=1.0, seed=seed)
            return sorted(c.token_ids for cs in got for c in cs) + [c.token_ids for c in rows]

        first = draw(5)
        assert draw(5) == first
        assert draw(6) != first

    # -- the stop rule ------------------------------------------------------------------------------------------
    def test_a_step_ends_at_its_first_step_end_token(self, backend: Backend) -> None:
        policy = backend.make()
        limit = 8
        stop = StopRule(at_newline=True, max_new_tokens=limit)
        got = policy.expand(_parents(policy, PROMPTS), 6, stop=stop, temperature=1.0, seed=1, store=backend.store())
        conts = [c for cs in got for c in cs]
        assert {len(cs) for cs in got} == {6}
        assert {c.finish for c in conts} <= {"newline", "eos", "length"}
        for c in conts:
            ids, body = c.token_ids, c.token_ids[:-1]
            assert 0 < len(ids) <= limit and len(c.logprobs) == len(ids)
            assert not any(_ends_step(policy, ids, j) or t == policy.eos_token_id for j, t in enumerate(body))
            if c.finish == "newline":
                assert _ends_step(policy, ids, len(ids) - 1)
            else:  # a step-end token at the limit itself may report the limit
                assert not _ends_step(policy, ids, len(ids) - 1) or len(ids) == limit
            assert (c.finish == "eos") == (c.token_ids[-1] == policy.eos_token_id)
            assert c.finish != "length" or len(c.token_ids) == limit
            assert c.text == policy.decode(c.token_ids)

    def test_continuable_steps_are_keyed_by_content_and_final_ones_are_not(self, backend: Backend) -> None:
        policy = backend.make()
        parents = _parents(policy, PROMPTS[:2])
        stop = StopRule(at_newline=True, max_new_tokens=6)
        got = policy.expand(parents, 3, stop=stop, temperature=1.0, seed=2, store=backend.store())
        for (_, prefix), cs in zip(parents, got, strict=True):
            for c in cs:
                assert c.key == (None if c.finish == "eos" else prefix_key(prefix + c.token_ids))
        ended = policy.expand(parents, 3, stop=stop, temperature=1.0, seed=2, store=backend.store(), final=_always)
        assert all(c.key is None for cs in ended for c in cs)

    def test_a_trajectory_stops_after_its_first_final_line(self, backend: Backend) -> None:
        policy = backend.make()

        def final(line: str) -> bool:
            return "1" in line or "2" in line

        stop = StopRule.trajectory(step_tokens=3, max_depth=4, is_terminal=final)
        prompt = policy.encode_prompt(PROMPTS[0])
        for c in policy.sample([prompt] * 6, stop=stop, temperature=1.0, seed=3):
            lines, cur = [], []
            for t in c.token_ids:
                cur.append(t)
                if _ends_step(policy, cur, len(cur) - 1) or len(cur) == 3:
                    lines.append(policy.decode(cur))
                    cur = []
            assert c.finish in ("stop", "eos") and len(lines) <= 4
            if c.finish == "stop":  # it ended a line that is final, or the 4th line
                assert not cur and (final(lines[-1]) or len(lines) == 4)
                lines = lines[:-1]
            assert not any(final(line) for line in lines)  # it never went on past a final line

    # -- log-probs ----------------------------------------------------------------------------------------------
    def test_recorded_logprobs_are_the_untempered_policys_scores(self, backend: Backend) -> None:
        policy = backend.make()
        parents = _parents(policy, PROMPTS)
        stop = StopRule(at_newline=True, max_new_tokens=6)
        for temperature in (0.0, 0.7, 1.5):
            got = policy.expand(parents, 2, stop=stop, temperature=temperature, seed=4, store=backend.store())
            pairs = [(p, c) for (_, p), cs in zip(parents, got, strict=True) for c in cs]
            scored = policy.score([p for p, _ in pairs], [c.token_ids for _, c in pairs])
            for (_, c), s in zip(pairs, scored, strict=True):
                np.testing.assert_allclose(c.logprobs, s, atol=1e-4)
                assert np.all(c.logprobs <= 0)
        rows = policy.sample([p for _, p in parents], stop=stop, temperature=1.5, seed=4)
        for (_, p), c in zip(parents, rows, strict=True):
            np.testing.assert_allclose(c.logprobs, policy.score([p], [c.token_ids])[0], atol=1e-4)

    # -- batches ------------------------------------------------------------------------------------------------
    def test_a_batch_equals_its_rows_one_by_one(self, backend: Backend) -> None:
        policy = backend.make()
        parents = _parents(policy, PROMPTS)  # prompts of different lengths in one batch
        stop = StopRule(at_newline=False, max_new_tokens=10)
        batched = policy.expand(parents, 1, stop=stop, temperature=0.0, seed=0, store=backend.store())
        rows = policy.sample([p for _, p in parents], stop=stop, temperature=0.0, seed=0)
        for parent, [b], r in zip(parents, batched, rows, strict=True):
            [[alone]] = backend.make().expand([parent], 1, stop=stop, temperature=0.0, seed=0, store=backend.store())
            [single] = backend.make().sample([parent[1]], stop=stop, temperature=0.0, seed=0)
            assert b.token_ids == alone.token_ids == single.token_ids == r.token_ids
            np.testing.assert_allclose(b.logprobs, alone.logprobs, atol=1e-5)
            np.testing.assert_allclose(r.logprobs, single.logprobs, atol=1e-5)

    def test_expanding_a_cached_parent_equals_generating_from_its_full_prefix(self, backend: Backend) -> None:
        policy = backend.make()
        store = backend.store()
        stop = StopRule(at_newline=True, max_new_tokens=5)
        parents = _parents(policy, PROMPTS[:2])
        first = policy.expand(parents, 2, stop=stop, temperature=1.0, seed=3, store=store)
        children = [(c.key, p + c.token_ids) for (_, p), cs in zip(parents, first, strict=True) for c in cs
                    if c.key is not None]
        assert children
        cached = policy.expand(children, 1, stop=stop, temperature=0.0, seed=0, store=store)
        fresh = backend.make().sample([p for _, p in children], stop=stop, temperature=0.0, seed=0)
        for [c], f in zip(cached, fresh, strict=True):
            assert c.token_ids == f.token_ids and c.finish == f.finish
            np.testing.assert_allclose(c.logprobs, f.logprobs, atol=1e-4)

    # -- token accounting ---------------------------------------------------------------------------------------
    def test_counters_count_what_was_computed_not_what_was_served(self, backend: Backend) -> None:
        """`final` makes every continuation end its trajectory, so each call feeds its parent's prefix and every
        generated token but the last: `fed = len(prefix) + len(ids) - 1` positions, of which the engine serves
        `served_from_cache(matched, fed)` from what it holds."""
        policy = backend.make()
        store = backend.store()
        stop = StopRule(at_newline=False, max_new_tokens=6)
        parent = _parents(policy, PROMPTS[1:2])[0]
        prefix = parent[1]

        def expand(par: tuple[bytes, list[int]]) -> tuple[list[int], Any]:
            before = policy.counters.snapshot()
            [[c]] = policy.expand([par], 1, stop=stop, temperature=0.0, seed=0, store=store, final=_always)
            return c.token_ids, policy.counters.since(before)

        ids, cold = expand(parent)  # nothing cached: every fed position is computed
        fed = len(prefix) + len(ids) - 1
        assert cold.forward_tokens == fed and cold.cache_misses == 1 and cold.cache_hits == 0
        again, warm = expand(parent)  # the prefix and the fed continuation are held now
        assert again == ids
        assert warm.forward_tokens == fed - backend.served(fed, fed)
        assert warm.cache_hits + warm.cache_misses == 1
        assert warm.cache_hits == int(backend.served(len(prefix), len(prefix)) == len(prefix))
        other = next(t for t in policy.encode("xyz") if not ids or t != ids[0])
        sibling = [*prefix, other]  # shares the prefix, then leaves what is held
        sib_ids, sib = expand((prefix_key(sibling), sibling))
        sib_fed = len(sibling) + len(sib_ids) - 1
        assert sib.forward_tokens == sib_fed - backend.served(len(prefix), sib_fed)
        backend.evict(store)
        after, evicted = expand(parent)  # gone from the cache: computed (and counted) again in full
        assert after == ids and evicted.forward_tokens == fed and evicted.cache_misses == 1

    def test_counters_add_up_over_calls(self, backend: Backend) -> None:
        policy = backend.make()
        stop = StopRule(at_newline=True, max_new_tokens=5)
        parts = []
        for seed in (0, 1):
            before = policy.counters.snapshot()
            policy.expand(_parents(policy, PROMPTS), 2, stop=stop, temperature=1.0, seed=seed, store=backend.store())
            parts.append(policy.counters.since(before))
        total = policy.counters.as_dict()
        assert all(total[k] == sum(p.as_dict()[k] for p in parts) for k in total)
        assert all(p.forward_tokens > 0 for p in parts)

    # -- sampling without replacement ---------------------------------------------------------------------------
    def test_sampling_without_replacement_never_repeats_an_excluded_step(self, backend: Backend) -> None:
        policy = backend.make()
        store = backend.store()
        stop = StopRule(at_newline=True, max_new_tokens=2)
        parents = _parents(policy, PROMPTS[:2])
        greedy = [cs[0] for cs in policy.expand(parents, 1, stop=stop, temperature=0.0, seed=0, store=store)]
        excluded = [[(g.token_ids, g.logprobs)] for g in greedy]
        second = policy.expand(parents, 1, stop=stop, temperature=0.0, seed=0, store=store, exclude=excluded)
        many = policy.expand(parents, 64, stop=stop, temperature=1.0, seed=1, store=store, exclude=excluded)
        for (_, p), g, [s], cs in zip(parents, greedy, second, many, strict=True):
            assert s.token_ids != g.token_ids  # the argmax path is taken away: the next best is chosen
            assert len(cs) == 64 and all(c.token_ids != g.token_ids for c in cs)
            np.testing.assert_allclose(s.logprobs, policy.score([p], [s.token_ids])[0], atol=1e-4)
