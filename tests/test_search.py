"""eta-MCTS, Tree-GRPO and chains on a scripted step world with known rewards."""

import numpy as np
import pytest

from arbor.lm.kvcache import KVStore
from arbor.mcts.grow import TreeBuilder
from arbor.mcts.samplers import tree_grpo
from arbor.mcts.scoring import LikelihoodScorer, RewardScorer
from arbor.mcts.search import branching_target, eta_mcts
from arbor.pipeline.config import EtaMCTSConfig
from arbor.tasks import is_terminal_step
from arbor.tasks.answers import answer_key

from .conftest import StepWorld

GOAL = "b\nc\na\nAnswer: 1\n"


def decoys(solution: str) -> list[str]:
    """Three choices per step for three steps, then the answer: 27 paths, one rewarded."""
    if solution.count("\n") >= 3:
        return ["Answer: 1\n"]
    return ["a\n", "b\n", "c\n"]


def reward(text: str) -> float:
    return float(text == GOAL)


def _search(seed=0, sims=80, vote_key=answer_key, **kw):
    world = StepWorld(decoys)
    cfg = EtaMCTSConfig(num_simulations=sims, c_min=3, c_max=3, c_max_root=3, batch_leaves=2, **kw)
    res = eta_mcts(world, world.encode_prompt("Q\n"), scorer=RewardScorer(reward), is_terminal=is_terminal_step,
                   cfg=cfg, seed=seed, store=KVStore(), vote_key=vote_key)
    return world, res


def test_eta_mcts_finds_the_one_rewarded_path_among_decoys():
    _, res = _search()
    b = res.builder
    assert b.text(res.greedy_leaf) == GOAL
    assert b.text(res.best_leaf) == GOAL and b.text(res.rerank_leaf) == GOAL
    assert res.vote_answer == "1"
    _, other = _search(vote_key=lambda text: "same key for all")  # the task's answer rule names the votes
    assert other.vote_answer == "same key for all"
    tree = b.tree
    assert tree.virtual[: tree.num_nodes].sum() == 0
    assert tree.visits[0] == tree.visits[tree.children(0)].sum()  # every backup passed through a child


def test_same_seed_same_tree_and_seed_matters():
    a, b, c = _search(seed=3, sims=20)[1], _search(seed=3, sims=20)[1], _search(seed=4, sims=20)[1]
    n = a.builder.tree.num_nodes
    for name in ("parent", "visits", "value_sum", "tok_start", "tok_len"):
        assert np.array_equal(getattr(a.builder.tree, name)[:n], getattr(b.builder.tree, name)[:n])
    def toks(r):
        return r.builder.tree.tokens[: r.builder.tree.num_tokens].tolist()

    assert toks(a) == toks(b) and toks(c) != toks(a)


def test_branching_target_formula():
    cfg = EtaMCTSConfig(alpha=4.0, c_min=2, c_max=4, c_max_root=6)
    assert branching_target(0.0, 1, cfg) == 2  # children agree: c_min
    assert branching_target(0.3, 1, cfg) == 2  # floor(1.2) + 1
    assert branching_target(0.5, 1, cfg) == 3
    assert branching_target(1.0, 1, cfg) == 4  # capped at c_max(t>0)
    assert branching_target(1.0, 0, cfg) == 5  # floor(4) + 1 under the root's cap of 6
    assert branching_target(float("nan"), 3, cfg) == 2


def test_adaptive_branching_widens_where_children_disagree():
    # at the root, the first step decides everything (x: always right, y: always wrong): children disagree;
    # below "x", every step is right: children agree
    def world(solution):
        if solution.count("\n") >= 2:
            return ["Answer: 1\n" if solution.startswith("x") else "Answer: 0\n"]
        if solution == "":
            return ["x\n", "y\n"]
        return ["p\n", "q\n", "r\n", "s\n"]

    w = StepWorld(world)
    # 8 simulations: the importance-weighted targets are met before any progressive reopening kicks in (PUCT,
    # sibling-normalised priors: by 10, selection has exhausted the x subtree and reopens the root)
    cfg = EtaMCTSConfig(num_simulations=8, alpha=8.0, c_min=2, c_max=4, c_max_root=4, batch_leaves=1,
                        merge_distance=-1)
    scorer = RewardScorer(lambda t: float(t.endswith("Answer: 1\n")), n_rollouts=4, rollout_tokens=32)
    res = eta_mcts(w, w.encode_prompt("Q\n"), scorer=scorer, is_terminal=is_terminal_step, cfg=cfg, seed=1,
                   store=KVStore())
    tree = res.builder.tree
    root_kids = tree.children(0)
    x_nodes = [int(k) for k in root_kids if res.builder.text(int(k)) == "x\n" and tree.num_children[k] > 0]
    assert tree.num_children[0] == 4  # |v(x) - v(y)| ~ 1: widened to c_max_root
    assert x_nodes and all(tree.num_children[x] == 2 for x in x_nodes)  # all agree: stays at c_min


def test_state_merge_merges_near_duplicates_and_only_them():
    steps = ["12+3=15\n", "12+3=16\n", "12*3=36\n", "12+3=15\n"]
    it = iter(range(100))

    def world(solution):
        return [steps[next(it) % 4]]  # the i-th sample gets steps[i % 4]

    w = StepWorld(world)
    b = TreeBuilder.start(w, w.encode_prompt("Q\n"), store=None, seed=0, is_terminal=is_terminal_step,
                          merge_distance=1)
    kids = b.expand([0], 4, seed=0)[0]
    texts = [b.text(k) for k in kids]
    assert texts == ["12+3=15\n", "12*3=36\n"]  # 16 is 1 edit from 15 (merged), the repeat too; 36 kept
    assert b.merged == 2
    b2 = TreeBuilder.start(w, w.encode_prompt("Q\n"), store=None, seed=0, is_terminal=is_terminal_step,
                           merge_distance=-1)
    assert len(b2.expand([0], 4, seed=0)[0]) == 4  # merge off: all kept


@pytest.mark.parametrize(("m", "l_rounds", "n"), [(2, 2, 2), (4, 1, 3), (3, 0, 1)])
def test_tree_grpo_produces_m_times_ln_plus_one_rollouts(m, l_rounds, n):
    w = StepWorld(decoys)
    b, group = tree_grpo(w, w.encode_prompt("Q\n"), m=m, l_rounds=l_rounds, n=n, step_tokens=16, max_depth=8,
                         is_terminal=is_terminal_step, temperature=1.0, seed=0, store=None)
    tree = b.tree
    leaves = [x for x in range(tree.num_nodes) if tree.first_child[x] == -1]
    assert len(leaves) == m * (l_rounds * n + 1)
    assert all(tree.terminal[x] for x in leaves)
    assert sorted(set(group[1:].tolist())) == list(range(m))
    for x in range(1, tree.num_nodes):  # a node's tree is its parent's (except first-level nodes)
        if tree.parent[x] != 0:
            assert group[x] == group[tree.parent[x]]


def test_likelihood_scorer_never_needs_the_answer():
    w = StepWorld(decoys)
    cfg = EtaMCTSConfig(num_simulations=10, c_min=2, c_max=2, c_max_root=2, batch_leaves=2)
    res = eta_mcts(w, w.encode_prompt("Q\n"), scorer=LikelihoodScorer(w), is_terminal=is_terminal_step, cfg=cfg,
                   seed=0, store=KVStore())
    scores = res.builder.tree.critic_score[1 : res.builder.tree.num_nodes]
    assert np.allclose(scores, np.exp(-0.1))  # every token has log-prob -0.1 in this world
    assert np.isnan(res.builder.tree.reward[: res.builder.tree.num_nodes]).all()  # no outcome was looked up


def test_children_table_is_sized_from_the_config_and_never_outgrown():
    # a wide, shallow world where selection keeps reaching terminals: progressive reopening widens nodes up to
    # widen_cap times, the most children eta-MCTS ever gives a node
    from arbor.mcts.search import max_children_bound

    def world(solution):
        return ["Answer: 1\n"] if solution.count("\n") >= 1 else [f"{i}\n" for i in range(40)]

    w = StepWorld(world)
    cfg = EtaMCTSConfig(num_simulations=400, c_min=2, c_max=3, c_max_root=5, widen_cap=12, max_attempts=2,
                        batch_leaves=2, merge_distance=0)
    res = eta_mcts(w, w.encode_prompt("Q\n"), scorer=RewardScorer(lambda t: 0.5), is_terminal=is_terminal_step,
                   cfg=cfg, seed=0, store=KVStore())
    tree = res.builder.tree
    assert max_children_bound(cfg) == 5 + 12
    assert tree.num_children[0] > cfg.c_max_root  # the root was reopened and widened past its target
    assert tree.num_children[: tree.num_nodes].max() <= max_children_bound(cfg)
    assert tree.max_children == max_children_bound(cfg)  # the table was never widened during the search


def test_tree_is_sized_by_the_simulation_budget_and_the_budget_is_spent():
    from arbor.mcts.search import max_nodes_bound

    def world(solution):  # wide and deep: no path ends before the budget does
        return [f"{i}\n" for i in range(40)] if solution.count("\n") < 10 else ["Answer: 1\n"]

    w = StepWorld(world)
    cfg = EtaMCTSConfig(num_simulations=30, c_min=2, c_max=5, c_max_root=3, batch_leaves=3)
    res = eta_mcts(w, w.encode_prompt("Q\n"), scorer=RewardScorer(lambda t: 0.5), is_terminal=is_terminal_step,
                   cfg=cfg, seed=0, store=KVStore())
    assert res.builder.tree.capacity == max_nodes_bound(cfg) == 1 + (30 + 3) * 5  # c_max > c_max_root counts
    assert res.simulations >= cfg.num_simulations  # the cap never cut the search short


class SlowWorld(StepWorld):
    """A StepWorld whose model calls take 20 ms (as a real forward pass would)."""

    def expand(self, *args, **kw):
        import time

        time.sleep(0.02)
        return super().expand(*args, **kw)


def test_search_timing_splits_model_and_tree_work():
    w = SlowWorld(decoys)
    cfg = EtaMCTSConfig(num_simulations=12, c_min=2, c_max=2, c_max_root=2, batch_leaves=2)
    res = eta_mcts(w, w.encode_prompt("Q\n"), scorer=LikelihoodScorer(w), is_terminal=is_terminal_step, cfg=cfg,
                   seed=0, store=KVStore())
    t = res.timing
    calls = res.builder.timing.calls  # every model call of this search goes through the builder
    assert calls >= 3 and t.model >= 0.02 * calls
    assert t.model <= t.total and t.tree == pytest.approx(t.total - t.model)
    assert all(v >= -1e-6 for v in t.phases.values()) and t.phases["select"] > 0 and t.phases["expand"] > 0
    assert sum(t.phases.values()) == pytest.approx(t.tree, abs=2e-3)  # the phases cover all tree work
    assert t.bookkeeping_fraction < 0.5  # 20 ms model calls dominate a toy tree
    assert res.builder.policy is w  # the stopwatch is gone after the search


PER_TOKEN = {"a": -3.0, "b": -3.1, "c": -2.9}


class LongStepWorld(StepWorld):
    """Three 40-token steps at the root with -3.0, -3.1 and -2.9 nats per token (a real model's long step)."""

    def expand(self, *args, **kw):
        out = super().expand(*args, **kw)
        for conts in out:
            for c in conts:
                c.logprobs = np.full(len(c.token_ids), PER_TOKEN.get(c.text[0], -3.0), np.float32)
        return out


def test_long_steps_keep_a_usable_ordered_prior_and_likelihood():
    # 40 tokens at -3 nats: exp(-120) underflows float32 (the old `prior` column and array were 0 here)
    w = LongStepWorld(lambda s: [x * 39 + "\n" for x in "abc"] if s == "" else ["Answer: 1\n"])
    b = TreeBuilder.start(w, w.encode_prompt("Q\n"), store=None, seed=0, is_terminal=is_terminal_step,
                          exclude_existing=True, step_tokens=64)
    kids = b.expand([0], 3, seed=0)[0]
    tree = b.tree
    by_text = {b.text(k)[0]: k for k in kids}
    assert sorted(by_text) == ["a", "b", "c"]
    np.testing.assert_allclose([tree.log_prior[by_text[x]] for x in "abc"], [-120.0, -124.0, -116.0], rtol=1e-6)
    p = {x: tree.prior[by_text[x]] for x in "abc"}
    assert p["c"] > p["a"] > p["b"] > 0 and sum(p.values()) == pytest.approx(1.0)
    e = np.exp([0.0, -4.0, -8.0])  # softmax over the siblings: c, a, b are 0, 4, 8 nats below the best
    np.testing.assert_allclose([p["c"], p["a"], p["b"]], e / e.sum(), rtol=1e-4)  # float32 token log-probs
    scores = LikelihoodScorer(w)(b, [by_text[x] for x in "abc"], seed=0)
    np.testing.assert_allclose(scores, np.exp([-3.0, -3.1, -2.9]), rtol=1e-5)  # geometric-mean token prob


def test_complete_walk_finishes_a_greedy_walk_that_stops_at_an_inner_node():
    """A budget too small to reach an answer: the greedy read-out is -1 without completion; with it, the walk's
    end is completed step by step to a terminal (unvisited, so no other read-out sees it) and the search
    itself is unchanged."""
    world = StepWorld(decoys)
    cfg = EtaMCTSConfig(num_simulations=2, c_min=3, c_max=3, c_max_root=3, batch_leaves=2)

    def run(complete):
        return eta_mcts(world, world.encode_prompt("Q\n"), scorer=RewardScorer(reward), is_terminal=is_terminal_step,
                        cfg=cfg, seed=0, store=KVStore(), complete_walk=complete)

    plain, done = run(False), run(True)
    tree = done.builder.tree
    assert plain.greedy_leaf == -1
    assert not tree.terminal[done.walk_end] and done.walk_end == plain.walk_end
    assert done.greedy_leaf >= 0 and tree.terminal[done.greedy_leaf] and done.greedy_leaf != done.walk_end
    path = tree.path(done.greedy_leaf).tolist()
    tail = path[path.index(done.walk_end) + 1:]
    assert len(tail) >= 1 and all(tree.visits[x] == 0 for x in tail)
    assert world.decode(tree.path_tokens(done.greedy_leaf)[2:].tolist()).endswith("Answer: 1\n")
    assert (done.best_leaf, done.vote_answer, done.simulations) == (plain.best_leaf, plain.vote_answer,
                                                                    plain.simulations)
    assert tree.num_nodes == plain.builder.tree.num_nodes + len(tail)
