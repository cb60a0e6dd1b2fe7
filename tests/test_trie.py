"""Token-trie sampling and the radix KV store (issue #9): same distribution, each distinct prefix computed and held
once, eviction of leaves only, anchors that survive splits, a budget that covers the batch in flight."""

from collections import Counter

import numpy as np
import pytest
import torch

from arbor.lm.base import StopRule
from arbor.lm.hf import HFPolicy
from arbor.lm.kvcache import KVStore, prefix_key
from arbor.lm.trie import TrieSampler
from arbor.mcts.accounting import trie_tokens
from arbor.mcts.samplers import expand_tree

from .conftest import tiny_model


def _peaked_policy(char_tok, scale: float = 12.0, arch: str = "llama") -> HFPolicy:
    """A tiny random model whose next-token distributions are peaked (scaled final norm), so that 3-token
    continuations fall into a few hundred distinct sequences: enough mass per bin for a chi-square test."""
    model = tiny_model(char_tok, arch, seed=1)
    with torch.no_grad():
        (model.model.norm if arch == "llama" else model.transformer.ln_f).weight.mul_(scale)
    return HFPolicy(model, char_tok)


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(df) by Wilson-Hilferty; z = 3.719 is the standard normal's 1e-4 quantile."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * np.sqrt(a)) ** 3


def _two_sample_chi2(a: Counter, b: Counter, min_count: int = 10) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom of a 2 x K contingency table of two samples' outcomes (outcomes
    with fewer than `min_count` pooled observations pooled into one bin)."""
    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= min_count]
    rows = np.array([[a[k] for k in keys] + [sum(a.values()) - sum(a[k] for k in keys)],
                     [b[k] for k in keys] + [sum(b.values()) - sum(b[k] for k in keys)]], dtype=float)
    rows = rows[:, rows.sum(0) > 0]
    expected = rows.sum(1, keepdims=True) * rows.sum(0, keepdims=True) / rows.sum()
    return float(((rows - expected) ** 2 / expected).sum()), rows.shape[1] - 1


def _samples(policy: HFPolicy, n: int, seed: int, share: bool) -> Counter:
    prompt = policy.encode_prompt("Q: 1\n")
    policy.share_tokens = share
    outs = policy.expand([(prefix_key(prompt), prompt)], n, stop=StopRule(max_new_tokens=3), temperature=1.0,
                         seed=seed, store=KVStore(), final=lambda _i, _t: True)[0]
    return Counter(tuple(c.token_ids) for c in outs)


def test_shared_sampling_has_the_distribution_of_independent_sampling(char_tok, monkeypatch):
    policy = _peaked_policy(char_tok)
    n = 1500
    shared, independent = _samples(policy, n, 0, True), _samples(policy, n, 1, False)
    assert sum(shared.values()) == sum(independent.values()) == n
    stat, df = _two_sample_chi2(shared, independent)
    assert df >= 10 and stat < _chi2_critical(df), (stat, df)
    # the shared draws cost one forward per distinct prefix, the independent ones one per sample and token
    # power: the same test rejects a wrong trie sampler that gives all of a group's samples one token
    real = TrieSampler._draw

    def one_token_per_group(self, groups, logits):
        return [[(t, lp, g.k) for t, lp, _ in [d[0]]] for g, d in zip(groups, real(self, groups, logits),
                                                                      strict=True)]

    monkeypatch.setattr(TrieSampler, "_draw", one_token_per_group)
    wrong = _samples(policy, n, 2, True)
    stat, df = _two_sample_chi2(wrong, independent)
    assert stat > _chi2_critical(df), (stat, df)


def test_each_distinct_prefix_is_computed_and_stored_once(char_tok):
    policy = _peaked_policy(char_tok, scale=8.0)
    prompt = policy.encode_prompt("Q: 2 +2\n")
    store = KVStore()
    stop = StopRule(at_newline=True, max_new_tokens=4)
    outs = policy.expand([(prefix_key(prompt), prompt)], 40, stop=stop, temperature=1.0, seed=3, store=store)[0]
    fed = {tuple(c.token_ids[:i]) for c in outs
           for i in range(1, len(c.token_ids) + (c.finish != "eos"))}  # EOS is never fed
    assert len({tuple(c.token_ids) for c in outs}) > 5  # the samples really branch
    assert policy.counters.forward_tokens == len(prompt) + len(fed)
    assert store.stored_tokens == len(prompt) + len(fed)  # radix: each distinct prefix's KV once
    assert store.chunks < len(fed)  # ... in chunks of several tokens (trie edges), not one per token
    # without sharing every sample computes its own tokens from the prompt's state
    policy.share_tokens = False
    before = policy.counters.snapshot()
    again = policy.expand([(prefix_key(prompt), prompt)], 40, stop=stop, temperature=1.0, seed=3,
                          store=KVStore())[0]
    assert policy.counters.since(before).forward_tokens == len(prompt) + sum(
        len(c.token_ids) - (c.finish == "eos") for c in again)


def test_a_later_sibling_walks_along_earlier_siblings_for_free(char_tok):
    policy = _peaked_policy(char_tok, scale=8.0)
    prompt = policy.encode_prompt("Q: 5\n")
    store = KVStore()
    stop = StopRule(at_newline=True, max_new_tokens=6)
    parent = (prefix_key(prompt), prompt)
    [[first]] = policy.expand([parent], 1, stop=stop, temperature=0.0, seed=0, store=store)
    before = policy.counters.snapshot()
    [[again]] = policy.expand([parent], 1, stop=stop, temperature=0.0, seed=0, store=store)
    assert again.token_ids == first.token_ids and again.key == first.key
    assert policy.counters.since(before).forward_tokens == 0  # greedy repeats a stored path: nothing computed
    before = policy.counters.snapshot()
    [[other]] = policy.expand([parent], 1, stop=stop, temperature=0.0, seed=0, store=store,
                              exclude=[[(first.token_ids, first.logprobs)]])
    lcp = next((i for i, (a, b) in enumerate(zip(first.token_ids, other.token_ids, strict=False)) if a != b),
               min(len(first.token_ids), len(other.token_ids)))
    assert other.token_ids != first.token_ids
    # only the tokens after the shared prefix are computed (the last one fed too: the step can be continued)
    assert policy.counters.since(before).forward_tokens == len(other.token_ids) - lcp
    # its state is exact: its greedy continuation equals uncached generation from its whole path
    path = prompt + other.token_ids
    [[nxt]] = policy.expand([(other.key, path)], 1, stop=stop, temperature=0.0, seed=0, store=store)
    ref = policy.sample([path], stop=stop, temperature=0.0, seed=0)[0]
    assert nxt.token_ids == ref.token_ids
    np.testing.assert_allclose(nxt.logprobs, ref.logprobs, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tree_computes_its_trie_and_holds_it_once(char_tok, arch):
    policy = _peaked_policy(char_tok, 12.0, arch)
    store = KVStore()
    b = expand_tree(policy, policy.encode_prompt("Q: 3 *3\n"), branching=3, branch_depth=2, max_depth=3,
                    step_tokens=3, is_terminal=lambda s: False, temperature=1.0, seed=0, store=store, distinct=True)
    trie = trie_tokens(b.tree)
    leaves = int(b.tree.terminal[: b.tree.num_nodes].sum())
    assert trie < b.tree.num_tokens  # siblings share first tokens
    # every trie token computed once, except each path end's last token (never fed)
    assert trie - leaves <= policy.counters.forward_tokens <= trie
    per_token = store.kv_token_bytes + b.tree.tokens.itemsize + 32 * 4  # KV, token id, hidden (E = 32 floats)
    assert store.nbytes <= policy.counters.forward_tokens * per_token


def _chunk(store: KVStore, below, toks, key=None):
    n = len(toks)
    kv = torch.arange(n, dtype=torch.float32).repeat(1, 2, 1, 1).reshape(1, 2, 1, n, 1) + 100 * len(toks)
    return store.insert(below, toks, kv.clone(), torch.zeros(n, 2), key)


def test_store_splits_keep_anchors_and_gather_exact():
    store = KVStore()
    a = _chunk(store, None, [1, 2, 3, 4, 5, 6], key="a")
    before = KVStore.gather([a])[0][0][0][0].clone()  # layer 0, keys, row 0: [H, W, D]
    b = _chunk(store, None, [1, 2, 3, 9], key="b")  # shares [1, 2, 3]: stored once, `a` split above it
    assert store.stored_tokens == 7 and store.chunks == 3
    assert a.end == 6 and store.find("a") is a and b.end == 4 and a.parent is b.parent
    assert KVStore.gather([a])[0][0][0][0].equal(before)  # the anchor still gathers the same KV
    (layers, mask) = KVStore.gather([a, b])
    assert mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert layers[0][0][1, 0, 2:5, 0].equal(before[0, 0:3, 0])  # the shared head, then b's own token
    ends = store.split_at([(a, 1), (a, 2), (a, 3)])  # three cuts of one chunk at once (deepest first inside)
    assert [e.end for e in ends] == [4, 5, 6] and ends[2] is a and store.stored_tokens == 7
    assert _chunk(store, None, [1, 2, 3], key="c") is b.parent  # a stored prefix is named, not stored again
    assert store.stored_tokens == 7


def test_eviction_takes_least_recent_leaves_and_never_pinned_or_inner_chunks():
    probe = KVStore()
    size = _chunk(probe, None, [7, 7]).nbytes
    store = KVStore(budget_bytes=3 * size)
    root = _chunk(store, None, [1, 1], key="root")
    left = _chunk(store, root, [2, 2], key="left")
    store.pin(left)
    right = _chunk(store, root, [3, 3], key="right")
    extra = _chunk(store, root, [4, 4], key="extra")  # over budget: the only unpinned leaf not just added goes
    assert "right" not in store and {"root", "left", "extra"} <= {k for k in ("root", "left", "extra") if k in store}
    assert store.evictions == 1 and store.nbytes <= store.budget
    store.reserve(2 * size)  # a batch in flight counts against the budget: leaves go, the pinned one stays
    assert "extra" not in store and "left" in store and "root" in store and store.peak_total <= 4 * size
    store.reserve(0)
    assert right.parent is root and extra.parent is root  # evicted chunks are simply dropped


def test_small_budget_bounds_store_and_batch_and_keeps_results_exact(char_tok):
    kw = dict(branching=2, branch_depth=2, max_depth=3, step_tokens=4, is_terminal=lambda s: False,
              temperature=0.0, seed=2, distinct=True)
    big = HFPolicy(tiny_model(char_tok, seed=7), char_tok)
    full = expand_tree(big, big.encode_prompt("Q: 9 -2 +1\n"), store=KVStore(), **kw)
    small = HFPolicy(tiny_model(char_tok, seed=7), char_tok)
    budget = 40_000
    store = KVStore(budget_bytes=budget)
    tight = expand_tree(small, small.encode_prompt("Q: 9 -2 +1\n"), store=store, **kw)
    n = full.tree.num_nodes
    assert tight.tree.tokens[: tight.tree.num_tokens].tolist() == full.tree.tokens[: full.tree.num_tokens].tolist()
    assert tight.tree.parent[:n].tolist() == full.tree.parent[:n].tolist()
    assert store.evictions > 0 and store.peak_total <= budget  # store + the batch in flight


def test_search_metrics_report_trie_compute_and_kv_memory_ratios(char_tok):
    from arbor.pipeline.config import load_config
    from arbor.stages.search import search_problem, summarize
    from arbor.tasks import build_task, make_splits

    cfg = load_config(None, {"search.eta.num_simulations": 8, "search.eta.step_tokens": 6,
                             "search.eta.max_depth": 3, "tracking.enabled": False})
    task = build_task(cfg.task)
    policy = _peaked_policy(char_tok, 8.0)
    store = KVStore()
    stats = [search_problem(policy, task, p, cfg.search, i, store)[1]
             for i, p in enumerate(make_splits(cfg.task, 2, 0, seed=5)[0])]
    m = summarize(stats, "eta_mcts")
    assert m["trie_tokens"] == sum(s["trie_tokens"] for s in stats) <= m["stored_tokens"]
    assert m["compute_ratio"] == pytest.approx(m["forward_tokens"] / m["trie_tokens"]) and m["compute_ratio"] <= 1.0
    assert m["forward_per_stored_token"] == pytest.approx(m["forward_tokens"] / m["stored_tokens"])
    # the store held each distinct prefix once: its KV, hidden state and id per token (E = 32 floats here)
    per_token = (store.kv_token_bytes + 4 + 32 * 4) / store.kv_token_bytes
    assert 0 < m["kv_memory_ratio"] <= per_token and "reuse_ratio" not in m


def test_clear_frees_the_chunks_at_once_without_the_garbage_collector():
    import gc
    import weakref

    store = KVStore()
    root = _chunk(store, None, [1, 2, 3])
    leaf = _chunk(store, root, [4, 5])
    refs = [weakref.ref(root.kv), weakref.ref(leaf.kv)]
    del root, leaf
    gc.disable()
    try:
        store.clear()  # parent <-> children links are a cycle: cut, so the tensors go now, not at the next GC
        assert all(r() is None for r in refs) and store.nbytes == 0 and store.chunks == 0
    finally:
        gc.enable()


# -- blank lines --------------------------------------------------------------------------------------------------
BLANK_START = "\n\n12\nAnswer: 12\n"


@pytest.fixture
def blank_first(char_tok, one_thread) -> HFPolicy:
    """A tiny llama overfit to answer "Q\\n" with `BLANK_START`: its first line is empty, as an instruct model's
    often is after the assistant prompt."""
    model = tiny_model(char_tok, seed=3)
    ids = torch.tensor([[char_tok.bos_token_id, *char_tok.encode("Q\n" + BLANK_START, add_special_tokens=False),
                         char_tok.eos_token_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    policy = HFPolicy(model.eval(), char_tok)
    prompt = policy.encode_prompt("Q\n")
    got = policy.sample([prompt], stop=StopRule(max_new_tokens=20), temperature=0, seed=0)[0]
    assert got.text == BLANK_START  # the fixture learned its answer
    return policy


def test_a_blank_line_joins_the_next_step(blank_first):
    """A step-end token ends nothing while the step is only whitespace: the empty first line and the line after it
    are one step (one tree node), with every token computed once and counted."""
    from arbor.critics.labels import step_ends
    from arbor.tasks import is_terminal_step

    policy = blank_first
    prompt = policy.encode_prompt("Q\n")
    stop = StopRule(at_newline=True, max_new_tokens=12)
    store = KVStore()
    before = policy.counters.snapshot()
    [[first]] = policy.expand([(prefix_key(prompt), prompt)], 1, stop=stop, temperature=0, seed=0, store=store)
    assert first.text == "\n\n12\n" and first.finish == "newline" and len(first.token_ids) == 5
    assert first.key == prefix_key(prompt + first.token_ids)  # continuable: its last token fed and stored
    assert policy.counters.since(before).forward_tokens == len(prompt) + 5
    path = prompt + first.token_ids
    [[second]] = policy.expand([(first.key, path)], 1, stop=stop, temperature=0, seed=0, store=store)
    assert second.text == "Answer: 12\n" and second.finish == "newline"
    draws = [[(c.token_ids, c.finish) for c in policy.expand([(prefix_key(prompt), prompt)], 3, stop=stop,
                                                              temperature=1.5, seed=7, store=KVStore())[0]]
             for _ in range(2)]
    assert draws[0] == draws[1]  # deterministic in the seed
    # a trajectory cuts its lines the same way: one blank-led line, then the answer line
    one = StopRule.trajectory(step_tokens=12, max_depth=1, is_terminal=is_terminal_step)
    assert policy.sample([prompt], stop=one, temperature=0, seed=0)[0].text == "\n\n12\n"
    full = policy.sample([prompt], stop=StopRule.trajectory(step_tokens=12, max_depth=3, is_terminal=is_terminal_step),
                         temperature=0, seed=0)[0]
    assert full.text == BLANK_START and full.finish == "stop"
    # and so do the critics' read-outs and completion labels
    assert step_ends(full.token_ids, lambda t: policy.decode([t]), step_tokens=12,
                     is_terminal=is_terminal_step) == [5, len(full.token_ids)]
