"""Prefix-cached expansion: only new tokens are computed, and the cache never changes what is generated."""

import numpy as np
import pytest

from arbor.lm.base import StopRule
from arbor.lm.hf import HFPolicy
from arbor.lm.kvcache import KVStore, PrefixState, prefix_key
from arbor.mcts.accounting import trie_tokens
from arbor.mcts.grow import TreeBuilder
from arbor.mcts.samplers import chain_tree, expand_tree, sample_chains
from arbor.mcts.scoring import RewardScorer

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
    first = policy.expand([(prefix_key(p), p) for p in prompts], [2, 3], stop=stop, temperature=1.0, seed=3,
                          store=store)
    parents = [(c.key, p + c.token_ids) for p, cs in zip(prompts, first, strict=True) for c in cs]
    assert all(k == prefix_key(prefix) for k, prefix in parents)  # content keys
    cached = policy.expand(parents, 1, stop=stop, temperature=0.0, seed=0, store=store)
    for (_, prefix), [c] in zip(parents, cached, strict=True):
        ref = policy.sample([prefix], stop=stop, temperature=0.0, seed=0)[0]
        assert c.token_ids == ref.token_ids and c.finish == ref.finish
        np.testing.assert_allclose(c.logprobs, ref.logprobs, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_without_eviction_forward_tokens_are_at_most_unique_tree_tokens(char_tok, arch):
    policy = _policy(char_tok, arch)
    store = KVStore()
    sample = expand_tree(policy, policy.encode_prompt("Q: 3 +4\n"), branching=2, branch_depth=3, max_depth=4,
                         step_tokens=4, is_terminal=_never, temperature=1.0, seed=1, store=store)
    c = policy.counters
    assert sample.tree.num_nodes > 8
    # every stored token once, except the last token of each depth-4 leaf: it ends its path, so is never fed
    leaves = sum(1 for n in range(sample.tree.num_nodes) if sample.tree.terminal[n])
    assert sample.unfed == leaves - sum(sample.samples[n][0][-1] == policy.eos_token_id for n in
                                        range(1, sample.tree.num_nodes) if sample.tree.terminal[n])
    assert sample.compute_tokens() == sample.tree.num_tokens - sample.unfed
    # a perfect node cache computes compute_tokens(); token sharing computes each distinct prefix once
    assert trie_tokens(sample.tree) - sample.unfed <= c.forward_tokens <= sample.compute_tokens()
    assert c.padded_positions == 0 and c.cache_misses == 1  # only the root prompt was ever computed cold
    assert c.cache_hits == sum(1 for n in range(sample.tree.num_nodes) if sample.tree.first_child[n] != -1) - 1


def test_eviction_under_small_budget_gives_identical_tree(char_tok):
    # greedy, siblings without replacement (deterministic and distinct): every node must match the unbounded run
    kw = dict(branching=2, branch_depth=3, max_depth=4, step_tokens=4, is_terminal=_never, temperature=0.0,
              seed=2, distinct=True)
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
    stop = StopRule(max_new_tokens=6)
    naive = sample_chains(policy, prompt, 4, stop=stop, temperature=1.0, seed=0, prompt_cached=False)
    naive_tokens = policy.counters.forward_tokens
    # the prompt every time; each sampled token but a chain's last is fed back
    assert naive_tokens == 4 * len(prompt) + sum(len(c.token_ids) - 1 for c in naive)
    before = policy.counters.snapshot()
    store = KVStore()
    cached = sample_chains(policy, prompt, 4, stop=stop, temperature=1.0, seed=0, prompt_cached=True, store=store)
    used = policy.counters.since(before)
    assert len(cached) == 4
    # prompt once; each sampled token but a chain's last is fed (a chain is never continued: no state kept)
    assert used.forward_tokens == len(prompt) + sum(len(c.token_ids) - 1 for c in cached)
    assert len(store) == 1 and all(c.key is None for c in cached)


def test_sampling_without_replacement_never_repeats_an_excluded_step(char_tok):
    policy = _policy(char_tok, seed=11)
    store = KVStore()
    prompt = policy.encode_prompt("Q: 4 +4\n")
    stop = StopRule(at_newline=True, max_new_tokens=2)
    parent = (prefix_key(prompt), prompt)
    [[greedy]] = policy.expand([parent], 1, stop=stop, temperature=0.0, seed=0, store=store)
    excluded = (greedy.token_ids, greedy.logprobs)
    [[other]] = policy.expand([parent], 1, stop=stop, temperature=0.0, seed=0, store=store,
                              exclude=[[excluded]])
    assert other.token_ids != greedy.token_ids  # the argmax path is taken away: the next best is chosen
    many = policy.expand([parent], 200, stop=stop, temperature=1.0, seed=1, store=store,
                         exclude=[[excluded]])[0]
    assert all(c.token_ids != greedy.token_ids for c in many)
    # the excluded step's first token is still allowed when followed by something else
    assert any(c.token_ids[0] == greedy.token_ids[0] for c in many) or len(greedy.token_ids) == 1
    # log-probs recorded are the policy's own, not the re-weighted sampling distribution
    np.testing.assert_allclose(other.logprobs, policy.score([prompt], [other.token_ids])[0], atol=1e-5)


def test_content_keys_share_the_prompt_across_chain_batches_and_trees(char_tok):
    # issue #8: keys were seeds / object ids, so every chain batch and every tree re-prefilled the prompt
    policy = _policy(char_tok)
    prompt = policy.encode_prompt("Q: 8 +1 *2\n")
    store = KVStore()
    stop = StopRule(max_new_tokens=5)
    for seed in (0, 1, 2):  # three batches with different seeds, one store
        sample_chains(policy, prompt, 3, stop=stop, temperature=1.0, seed=seed, prompt_cached=True, store=store)
    assert policy.counters.cache_misses == 1 and policy.counters.cache_hits == 2
    for seed in (5, 6):  # two trees of the same prompt in the same store: the second one's root is a hit
        expand_tree(policy, prompt, branching=2, branch_depth=1, max_depth=2, step_tokens=3, is_terminal=_never,
                    temperature=1.0, seed=seed, store=store)
    assert policy.counters.cache_misses == 1


def test_equal_content_nodes_share_one_state_and_stay_exact(char_tok):
    # greedy siblings drawn independently are identical: each level's nodes have one content, hence one state
    policy = _policy(char_tok, seed=5)
    store = KVStore()
    b = expand_tree(policy, policy.encode_prompt("Q: 6 *7\n"), branching=2, branch_depth=3, max_depth=4,
                    step_tokens=4, is_terminal=_never, temperature=0.0, seed=0, store=store)
    tree = b.tree
    assert tree.num_nodes == 1 + 2 + 4 + 8 + 8
    open_nodes = [n for n in range(tree.num_nodes) if not tree.terminal[n]]
    assert len(store) == len({prefix_key(tree.path_tokens(n)) for n in open_nodes}) == 4
    for n in range(1, tree.num_nodes):  # each node = uncached greedy generation from its parent's path
        ref = policy.sample([tree.path_tokens(int(tree.parent[n])).tolist()], stop=StopRule(True, 4),
                            temperature=0.0, seed=0)[0]
        assert tree.step_tokens(n).tolist() == [t for t in ref.token_ids if t != policy.eos_token_id]


def test_trajectory_ends_get_no_named_state_and_only_open_nodes_are_named(char_tok):
    policy = _policy(char_tok, seed=3)
    store = KVStore()
    b = expand_tree(policy, policy.encode_prompt("Q: 2 +2\n"), branching=3, branch_depth=2, max_depth=3,
                    step_tokens=3, is_terminal=lambda s: "1" in s or "3" in s, temperature=1.0, seed=4,
                    store=store, distinct=True)
    tree = b.tree
    assert b.unfed > 3  # several paths end on a terminal step (not EOS): those steps were not captured
    # the store names exactly the open nodes' states (a terminal made of EOS alone has its parent's content)
    opened = {prefix_key(tree.path_tokens(n)) for n in range(tree.num_nodes) if not tree.terminal[n]}
    assert all(k in store for k in opened) and len(store) == len(opened)
    assert policy.counters.forward_tokens <= b.compute_tokens()  # token sharing may compute fewer


def test_rollouts_name_nothing_and_stop_after_the_terminal_line(char_tok):
    policy = _policy(char_tok, seed=9)
    store = KVStore()
    b = TreeBuilder.start(policy, policy.encode_prompt("Q: 5 -3\n"), store=store, is_terminal=_never,
                          step_tokens=4, max_depth=6)
    kids = b.expand([0], 2, seed=0)[0]
    held, used = len(store), policy.counters.snapshot()
    texts: list[str] = []
    scorer = RewardScorer(lambda t: texts.append(t) or 0.0, n_rollouts=3, rollout_tokens=12)
    scorer(b, kids, seed=1)
    inner = sum(not b.tree.terminal[k] for k in kids)
    assert inner > 0 and len(texts) == 3 * inner + (len(kids) - inner)  # a terminal kid is valued by its reward
    assert len(store) == held  # rollouts are never expanded: no state is named for them
    # each rollout stopped after its first line (the builder's steps never end a trajectory here, but the
    # rollout stop cuts lines of step_tokens tokens like a step, and stops at max_new_tokens) and fed all
    # tokens but its last one
    assert policy.counters.since(used).forward_tokens <= 6 * 11


def test_chains_end_by_the_tree_stop_rule(char_tok):
    # a chain decoded in one pass with the tree's stop rule is token for token the tree's chain (greedy)
    policy = _policy(char_tok, seed=13)
    prompt = policy.encode_prompt("Q: 9 +9 -4\n")

    def terminal(step: str) -> bool:
        return "9" in step or "+" in step

    kw = dict(step_tokens=3, max_depth=5, is_terminal=terminal, temperature=0.0, seed=0)
    b = chain_tree(policy, prompt, g=1, store=KVStore(), **kw)
    leaf = next(n for n in range(b.tree.num_nodes) if b.tree.terminal[n])
    stop = b.trajectory_stop()
    assert (stop.line_tokens, stop.max_lines, stop.final_line) == (3, 5, terminal)
    for cached in (True, False):
        [c] = sample_chains(policy, prompt, 1, stop=stop, temperature=0.0, seed=0, prompt_cached=cached,
                            store=KVStore())
        ids = [t for t in c.token_ids if t != policy.eos_token_id]
        assert ids == b.tree.path_tokens(leaf)[len(prompt):].tolist()
    lines = [policy.decode(b.tree.step_tokens(n)) for n in b.tree.path(leaf)[1:]]
    assert not any(terminal(s) for s in lines[:-1])  # it stopped at the first terminal step, not later


def test_padded_kv_slots_are_counted_for_parents_of_different_lengths(char_tok):
    policy = _policy(char_tok)
    store = KVStore()
    short, long = policy.encode_prompt("Q: 1\n"), policy.encode_prompt("Q: 12 +3 *4\n")
    pad = len(long) - len(short)
    [[a], [b]] = policy.expand([(prefix_key(short), short), (prefix_key(long), long)], 1,
                               stop=StopRule(max_new_tokens=6), temperature=0.0, seed=0, store=store,
                               final=lambda i, t: True)
    c = policy.counters
    # prefill of the two prompts (one left-padded batch): the short one's real queries see `pad` padded slots;
    # then each decode step of the short row attends over the same `pad` slots of its left-padded cache
    assert c.padded_positions == pad
    assert c.padded_kv_positions == pad * len(short) + pad * (len(a.token_ids) - 1)
    assert b.token_ids  # the long row costs nothing padded


def test_store_counts_the_real_bytes_a_state_keeps_alive():
    import torch

    big = torch.zeros(4, 2, 100, 8)  # a batch cache: a state that keeps a view into it holds all of it
    view = PrefixState([(big[0, :, :10], big[1, :, :10])], torch.zeros(16)[:4], 10)
    assert view.nbytes == big.numel() * 4 + 16 * 4
    compact = PrefixState([(big[0, :, :10].clone(), big[1, :, :10].clone())], torch.zeros(4), 10)
    assert compact.nbytes == 2 * 2 * 10 * 8 * 4 + 4 * 4
    store = KVStore(budget_bytes=3 * compact.nbytes)
    for i in range(5):
        store.put(i, PrefixState([(big[0, :, :10].clone(), big[1, :, :10].clone())], torch.zeros(4), 10))
    assert len(store) == 3 and store.nbytes == 3 * compact.nbytes and store.evictions == 2
    store.put(99, view)  # one oversized entry evicts everything else (it alone exceeds the budget)
    assert len(store) == 1 and store.nbytes == view.nbytes and store.peak_nbytes == view.nbytes


def test_search_decode_keeps_its_store_within_the_search_kv_budget(char_tok):
    from arbor.pipeline.config import EtaMCTSConfig, TaskConfig
    from arbor.stages.evaluate import search_decode
    from arbor.tasks import build_task, make_splits

    policy = _policy(char_tok)
    task = build_task(TaskConfig())
    problems = make_splits(TaskConfig(), 1, 2, seed=3)[1]
    budget_mb = 0.15  # ~157 kB: the store and the batch in flight, a few hundred tokens of the test model
    m = search_decode(policy, task, problems, eta=EtaMCTSConfig(step_tokens=8, max_depth=4), simulations=12,
                      seed=0, kv_budget_mb=budget_mb)
    assert m["search_kv_evictions"] > 0 and 0 < m["search_kv_peak_mb"] <= budget_mb
    assert m["search_forward_tokens"] == policy.counters.forward_tokens
    assert m["search_padded_kv_positions"] == policy.counters.padded_kv_positions
