"""Prefix-cached expansion: only new tokens are computed, and the cache never changes what is generated."""

import numpy as np
import pytest

from arbor.lm.base import StopRule
from arbor.lm.hf import HFPolicy
from arbor.lm.kvcache import KVStore
from arbor.mcts.samplers import expand_tree, sample_chains

from .conftest import tiny_model


def _policy(char_tok, arch="llama", seed=7):
    return HFPolicy(tiny_model(char_tok, arch, seed=seed), char_tok)


def _never(_: str) -> bool:
    return False


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_expansion_equals_uncached_generation(char_tok, arch):
    policy = _policy(char_tok, arch)
    store = KVStore()
    stop = StopRule(at_newline=True, max_new_tokens=5)
    # parents of different lengths in one batch: prompts of 4 and 12 tokens, then their children
    prompts = [policy.encode_prompt("Q: 1\n"), policy.encode_prompt("Q: 12 +3 *4\n")]
    first = policy.expand([("a", prompts[0]), ("b", prompts[1])], [2, 3], stop=stop, temperature=1.0, seed=3,
                          store=store)
    parents = [(c.key, p + c.token_ids) for p, cs in zip(prompts, first, strict=True) for c in cs]
    assert all(k is not None for k, _ in parents)
    cached = policy.expand(parents, 1, stop=stop, temperature=0.0, seed=0, store=store)
    for (_, prefix), [c] in zip(parents, cached, strict=True):
        ref = policy.sample([prefix], stop=stop, temperature=0.0, seed=0)[0]
        assert c.token_ids == ref.token_ids and c.finish == ref.finish
        np.testing.assert_allclose(c.logprobs, ref.logprobs, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_without_eviction_forward_tokens_equal_unique_tree_tokens(char_tok, arch):
    policy = _policy(char_tok, arch)
    store = KVStore()
    sample = expand_tree(policy, policy.encode_prompt("Q: 3 +4\n"), branching=2, branch_depth=3, max_depth=4,
                         step_tokens=4, is_terminal=_never, temperature=1.0, seed=1, store=store)
    c = policy.counters
    assert sample.tree.num_nodes > 8
    assert c.forward_tokens == sample.tree.num_tokens
    assert c.padded_positions == 0 and c.cache_misses == 1  # only the root prompt was ever computed cold
    assert c.cache_hits == sum(1 for n in range(sample.tree.num_nodes) if sample.tree.first_child[n] != -1) - 1


def test_eviction_under_small_budget_gives_identical_tree(char_tok):
    # greedy, siblings drawn independently: a full binary tree whose every node must match the uncached run
    kw = dict(branching=2, branch_depth=3, max_depth=4, step_tokens=4, is_terminal=_never, temperature=0.0,
              seed=2)
    big = _policy(char_tok)
    full = expand_tree(big, big.encode_prompt("Q: 9 -2\n"), store=KVStore(), **kw)
    small = _policy(char_tok)
    store = KVStore(budget_bytes=40_000)  # a few prefix states at most
    tight = expand_tree(small, small.encode_prompt("Q: 9 -2\n"), store=store, **kw)
    n = full.tree.num_nodes
    assert tight.tree.num_nodes == n
    assert tight.tree.tokens[: tight.tree.num_tokens].tolist() == full.tree.tokens[: full.tree.num_tokens].tolist()
    assert tight.tree.parent[:n].tolist() == full.tree.parent[:n].tolist()
    np.testing.assert_allclose(tight.tree.prior[:n], full.tree.prior[:n], rtol=1e-4)
    assert store.evictions > 0 and small.counters.cache_misses > 1
    assert store.nbytes <= 40_000 or len(store) == 1
    assert small.counters.forward_tokens > big.counters.forward_tokens  # misses recompute prefixes


def test_chain_samplers_count_prompt_once_or_every_time(char_tok):
    policy = _policy(char_tok)
    prompt = policy.encode_prompt("Q: 5 *2 +1\n")
    naive = sample_chains(policy, prompt, 4, max_new_tokens=6, temperature=1.0, seed=0, prompt_cached=False)
    naive_tokens = policy.counters.forward_tokens
    # the prompt every time; each sampled token but a chain's last is fed back
    assert naive_tokens == 4 * len(prompt) + sum(len(c.token_ids) - 1 for c in naive)
    before = policy.counters.snapshot()
    cached = sample_chains(policy, prompt, 4, max_new_tokens=6, temperature=1.0, seed=0, prompt_cached=True,
                           store=KVStore())
    used = policy.counters.since(before)
    assert len(cached) == 4
    # prompt once; every non-EOS generated token is fed once (the last one too, to leave a reusable state)
    assert used.forward_tokens == len(prompt) + sum(len(c.token_ids) - (c.finish == "eos") for c in cached)


def test_sampling_without_replacement_never_repeats_an_excluded_step(char_tok):
    policy = _policy(char_tok, seed=11)
    store = KVStore()
    prompt = policy.encode_prompt("Q: 4 +4\n")
    stop = StopRule(at_newline=True, max_new_tokens=2)
    [[greedy]] = policy.expand([("p", prompt)], 1, stop=stop, temperature=0.0, seed=0, store=store)
    excluded = (greedy.token_ids, greedy.logprobs)
    [[other]] = policy.expand([("p", prompt)], 1, stop=stop, temperature=0.0, seed=0, store=store,
                              exclude=[[excluded]])
    assert other.token_ids != greedy.token_ids  # the argmax path is taken away: the next best is chosen
    many = policy.expand([("p", prompt)], 200, stop=stop, temperature=1.0, seed=1, store=store,
                         exclude=[[excluded]])[0]
    assert all(c.token_ids != greedy.token_ids for c in many)
    # the excluded step's first token is still allowed when followed by something else
    assert any(c.token_ids[0] == greedy.token_ids[0] for c in many) or len(greedy.token_ids) == 1
    # log-probs recorded are the policy's own, not the re-weighted sampling distribution
    np.testing.assert_allclose(other.logprobs, policy.score([prompt], [other.token_ids])[0], atol=1e-5)
