"""Lockstep: several searches' `expand` calls merged into one batched call (arbor/lm/lockstep.py)."""

import gc

import greenlet
import numpy as np
import pytest

from arbor.lm.base import StopRule
from arbor.lm.hf import HFPolicy
from arbor.lm.kvcache import KVStore, prefix_key
from arbor.lm.lockstep import Lockstep, LockstepAborted, apportion
from arbor.mcts.scoring import LikelihoodScorer
from arbor.mcts.search import eta_mcts
from arbor.pipeline.config import EtaMCTSConfig
from arbor.tasks import is_terminal_step

from .conftest import tiny_model

PROMPTS = ["Q: 1+2\n", "Q: 34*5-6\n", "Q: 7\n"]
STEP = StopRule(at_newline=True, max_new_tokens=8)


@pytest.fixture()
def policy(char_tok, one_thread):
    return HFPolicy(tiny_model(char_tok, seed=3), char_tok)


def _parent(policy, text):
    ids = policy.encode_prompt(text)
    return prefix_key(ids), ids


def test_apportion_sums_exactly_and_follows_the_weights():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(5, [3, 1, 0]) == [4, 1, 0]
    assert apportion(7, [0, 0]) == [4, 3]
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.random(int(rng.integers(1, 6)))
        total = int(rng.integers(0, 1000))
        got = apportion(total, w)
        assert sum(got) == total and all(abs(g - total * x / w.sum()) < 1 for g, x in zip(got, w, strict=True))


def test_greedy_requests_get_what_they_get_alone_in_one_merged_call(policy):
    alone = [policy.expand([_parent(policy, p)], 2, stop=STEP, temperature=0.0, seed=i, store=KVStore())[0]
             for i, p in enumerate(PROMPTS)]
    base = HFPolicy(policy.model, policy.tokenizer)  # fresh counters and a cold store: everything computed
    ls = Lockstep(base)
    before = base.counters.snapshot()
    shared = KVStore()
    jobs = [lambda m, p=p, i=i: m.expand([_parent(m, p)], 2, stop=STEP, temperature=0.0, seed=i, store=shared)
            for i, p in enumerate(PROMPTS)]
    got = ls.run(jobs)
    assert ls.calls == 1 and ls.requests == 3  # all three waited together: one batched call
    for a, g in zip(alone, got, strict=True):
        assert [c.token_ids for c in a] == [c.token_ids for c in g[0]]
        assert [c.finish for c in a] == [c.finish for c in g[0]]
        np.testing.assert_allclose(np.concatenate([c.logprobs for c in a]),
                                   np.concatenate([c.logprobs for c in g[0]]), atol=1e-5)
    assert base.counters.since(before).forward_tokens == policy.counters.forward_tokens  # same work


def _lockstep_searches(policy, sims=12):
    cfg = EtaMCTSConfig(num_simulations=sims, batch_leaves=2, step_tokens=6, max_depth=4)
    store = KVStore()
    ls = Lockstep(policy)
    members = []

    def job(m, p, seed):
        members.append(m)
        return eta_mcts(m, m.encode_prompt(p), scorer=LikelihoodScorer(m), is_terminal=is_terminal_step, cfg=cfg,
                        seed=seed, store=store)

    before = policy.counters.snapshot()
    results = ls.run([lambda m, p=p, s=s: job(m, p, s) for s, p in enumerate(PROMPTS)])
    return ls, results, members, policy.counters.since(before)


def _tree(res):
    t = res.builder.tree
    n = t.num_nodes
    return t.parent[:n].tolist(), t.tokens[: t.num_tokens].tolist(), t.visits[:n].tolist()


def test_searches_in_lockstep_are_deterministic_and_their_counts_add_up(policy):
    ls, first, members, used = _lockstep_searches(policy)
    assert ls.calls < ls.requests  # requests were merged
    assert all(r.builder.tree.num_nodes > 3 for r in first)
    # every forward position is some member's: the apportioned shares add up to the backend's counts
    for k, v in used.as_dict().items():
        assert sum(getattr(m.counters, k) for m in members) == v, k
    # one shared store: the trees' prefixes are each computed at most once (the common "Q: " once for all)
    assert used.forward_tokens <= sum(r.builder.compute_tokens() for r in first)
    again = _lockstep_searches(HFPolicy(policy.model, policy.tokenizer))[1]
    assert [_tree(r) for r in first] == [_tree(r) for r in again]


def test_requests_with_different_stop_rules_or_stores_are_not_merged(policy):
    ls = Lockstep(policy)
    s1, s2 = KVStore(), KVStore()
    other = StopRule(at_newline=False, max_new_tokens=5)
    jobs = [lambda m: m.expand([_parent(m, PROMPTS[0])], 1, stop=STEP, temperature=1.0, seed=0, store=s1),
            lambda m: m.expand([_parent(m, PROMPTS[1])], 1, stop=other, temperature=1.0, seed=0, store=s1),
            lambda m: m.expand([_parent(m, PROMPTS[2])], 1, stop=STEP, temperature=1.0, seed=0, store=s2),
            lambda m: m.expand([_parent(m, PROMPTS[0])], 1, stop=STEP, temperature=1.0, seed=1, store=s1)]
    out = ls.run(jobs)
    assert ls.calls == 3 and ls.requests == 4  # only the first and last share a call
    assert len(out[1][0][0].token_ids) <= 5


def _live_members() -> list:
    """Greenlets started and not finished, other than this one: a member the run left suspended."""
    gc.collect()
    return [g for g in gc.get_objects() if isinstance(g, greenlet.greenlet) and g and g is not greenlet.getcurrent()]


def test_a_failing_search_stops_the_group_and_its_error_is_raised(policy):
    store = KVStore()
    seen = []

    def failing(m):
        m.expand([_parent(m, PROMPTS[0])], 1, stop=STEP, temperature=1.0, seed=0, store=store)
        raise ValueError("bad problem")

    def endless(m):
        try:
            while True:
                m.expand([_parent(m, PROMPTS[1])], 1, stop=STEP, temperature=1.0, seed=0, store=store)
        except LockstepAborted:
            seen.append("aborted")
            raise

    with pytest.raises(ValueError, match="bad problem"):
        Lockstep(policy).run([endless, failing, endless])
    assert seen == ["aborted", "aborted"]
    assert not _live_members()


def test_an_error_in_the_merged_call_reaches_every_member_of_it(policy):
    store = KVStore()
    seen = []

    def bad(m):
        try:
            return m.expand([_parent(m, PROMPTS[0])], 1, stop=STEP, temperature=1.0, seed=0, store=store,
                            exclude=[[("not", "a valid exclusion")]])
        except Exception as e:
            seen.append(e)
            raise

    with pytest.raises(Exception) as raised:  # whatever the backend raises, the run raises it
        Lockstep(policy).run([bad, bad])
    assert len(seen) == 2 and seen[0] is seen[1] is raised.value  # one merged call, its error in both members
    assert not isinstance(raised.value, LockstepAborted)
    assert not _live_members()


def test_groups_are_fixed_by_index():
    from arbor.lm.lockstep import lockstep_groups

    assert lockstep_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert lockstep_groups(64, 32) == [list(range(32)), list(range(32, 64))]
    assert lockstep_groups(3, 1) == [[0], [1], [2]] and lockstep_groups(0, 4) == []


def test_an_interrupt_in_the_coordinator_unwinds_every_waiting_member(policy):
    class Interrupting:
        counters = policy.counters

        def expand(self, *args, **kw):
            raise KeyboardInterrupt

    unwound = []

    def job(m, i):
        try:
            return m.expand([_parent(policy, PROMPTS[0])], 1, stop=STEP, temperature=1.0, seed=i, store=None)
        finally:
            unwound.append(i)

    with pytest.raises(KeyboardInterrupt):
        Lockstep(Interrupting()).run([lambda m, i=i: job(m, i) for i in range(3)])
    assert sorted(unwound) == [0, 1, 2] and not _live_members()


def test_a_lockstep_over_a_member_is_refused(policy):
    def nested(m):
        return Lockstep(m).run([lambda inner: 0])

    with pytest.raises(ValueError, match="lockstep member"):
        Lockstep(policy).run([nested])
