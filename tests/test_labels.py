"""Critic labels on a hand-built tree with hand-computed Monte Carlo / Math-Shepherd labels, and the split."""

from __future__ import annotations

import numpy as np
import pytest

from arbor.critics.labels import (
    TreeArrays,
    assign_splits,
    build_labels,
    hard_label,
    label_counts,
    mc_counts,
    path_owner,
    read_tree_files,
    write_labels,
)
from arbor.mcts.tree import add_child, new_tree
from arbor.mcts.treeio import tree_rows, write_trees

from .conftest import StepWorld

PROMPT = "Q\n"


def enc(text: str) -> list[int]:
    return [ord(c) for c in text]


def dec(ids) -> str:
    return "".join(chr(int(i)) for i in ids)


def hand_tree():
    """0 prompt ─┬─ 1 "a" ─┬─ 3 "Answer: 1" (reward 1)        4 has partial credit 0.01: not solved
                 │         └─ 4 "Answer: 2" (reward 0.01)
                 └─ 2 "b" ─┬─ 5 "c"  (open leaf, no terminal below)
                           └─ 6 "Answer: 1" (reward 1)"""
    tree = new_tree(16, 256, enc(PROMPT))
    for parent, text, terminal, reward in [(0, "a\n", False, np.nan), (0, "b\n", False, np.nan),
                                           (1, "Answer: 1\n", True, 1.0), (1, "Answer: 2\n", True, 0.01),
                                           (2, "c\n", False, np.nan), (2, "Answer: 1\n", True, 1.0)]:
        add_child(tree, parent, enc(text), terminal=terminal, reward=reward)
    return tree


def reward(text: str) -> float:
    return float(text.rstrip().endswith("Answer: 1"))


@pytest.fixture
def tree_table(tmp_path):
    write_trees(tmp_path / "part-0.parquet", [tree_rows("p0", hand_tree(), dec)])
    return read_tree_files([tmp_path / "part-0.parquet"])


def test_mc_counts_and_owner_kernels_by_hand(tree_table):
    t = TreeArrays(tree_table)
    z = np.zeros(len(t), np.int64)
    n, correct, total = mc_counts(t.parent, t.terminal, t.reward, t.solved, z, z, z.astype(float))
    assert n.tolist() == [3, 2, 1, 1, 1, 0, 1]
    assert correct.tolist() == [2, 1, 1, 1, 0, 0, 1]
    np.testing.assert_allclose(total, [2.01, 1.01, 1.0, 1.0, 0.01, 0.0, 1.0], atol=1e-6)
    # first-child chains: 0 -> 1 -> 3, 2 -> 5; every other node is its own leaf
    assert path_owner(t.parent).tolist() == [3, 3, 5, 3, 4, 5, 6]


def test_labels_from_tree_only(tree_table):
    lab = build_labels(tree_table, estimate="mean").to_pydict()
    assert lab["node"] == [0, 1, 2, 3, 4, 6]  # node 5 has no completion: unlabelled
    np.testing.assert_allclose(lab["value"], [2.01 / 3, 1.01 / 2, 1.0, 1.0, 0.01, 1.0], atol=1e-6)
    np.testing.assert_allclose(lab["prm_soft"], [2 / 3, 0.5, 1.0, 1.0, 0.0, 1.0], atol=1e-6)
    assert lab["prm_hard"] == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert lab["orm"] == [None, None, None, 1.0, 0.0, 1.0]
    assert lab["n_completions"] == [3, 2, 1, 1, 1, 1]
    i4 = lab["node"].index(4)
    assert lab["prefix"][i4] == "Q\na\n" and lab["step"][i4] == "Answer: 2\n"
    assert dec(lab["tokens"][i4]) == "Q\na\nAnswer: 2\n" and lab["prefix_len"][i4] == 4
    assert lab["step"][0] == PROMPT and lab["prefix"][0] == "" and lab["prefix_len"][0] == 0


def test_extra_completions_fill_thin_nodes_and_count_for_ancestors(tree_table):
    def options(solution: str) -> list[str]:
        return ["c\n"] if solution.endswith("b\n") else ["Answer: 1\n"]

    world = StepWorld(options, prompt=PROMPT)
    lab = build_labels(tree_table, min_completions=2, policy=world, rewards={"p0": reward}, estimate="mean").to_pydict()
    row = {n: i for i, n in enumerate(lab["node"])}
    # node 5 gets 2 extra completions (both correct), node 2 one more ("c\nAnswer: 1\n", correct); root none
    assert [lab["n_extra"][row[n]] for n in (0, 1, 2, 5)] == [0, 0, 1, 2]
    assert lab["n_completions"][row[5]] == 2 and lab["value"][row[5]] == 1.0
    assert lab["n_completions"][row[2]] == 4 and lab["n_correct"][row[2]] == 4
    assert lab["n_completions"][row[0]] == 6 and lab["n_correct"][row[0]] == 5
    assert lab["value"][row[0]] == pytest.approx(5.01 / 6)
    assert lab["owner"][row[2]] == 5


def test_extra_completions_call_the_policy_with_parents_in_order_of_length(tmp_path, monkeypatch):
    """Parents are left-padded to the longest of their call: thin nodes are taken shortest path first (not tree by
    tree), so a call's parents have similar lengths. The labels do not depend on the grouping."""
    shallow = new_tree(4, 64, enc(PROMPT))
    add_child(shallow, 0, enc("a\n"))  # p1: the root and node 1 have no terminal below (paths of 2 and 4 tokens)
    write_trees(tmp_path / "part-0.parquet", [tree_rows("p0", hand_tree(), dec), tree_rows("p1", shallow, dec)])
    table = read_tree_files([tmp_path / "part-0.parquet"])

    def options(solution: str) -> list[str]:
        return ["c\n"] if solution.endswith("b\n") else ["Answer: 1\n"]

    world = StepWorld(options, prompt=PROMPT)
    kw = {"min_completions": 2, "policy": world, "rewards": {"p0": reward, "p1": reward}}
    whole = build_labels(table, **kw).to_pydict()
    lengths: list[list[int]] = []
    expand = world.expand
    monkeypatch.setattr(world, "expand", lambda parents, *a, **k: lengths.append([len(p) for _, p in parents])
                        or expand(parents, *a, **k))
    one_by_one = build_labels(table, rows_per_call=1, **kw).to_pydict()
    # p1's root (2 tokens), p0's node 2 and p1's node 1 (4), p0's node 5 (6): tree by tree would be 4, 6, 2, 4
    assert lengths == [[2], [4], [4], [6]]
    assert one_by_one == whole


def test_completion_rows_label_each_extra_completion_step_by_its_outcome(tree_table):
    def options(solution: str) -> list[str]:
        return ["c\n"] if solution.endswith("b\n") else ["Answer: 1\n"]

    world = StepWorld(options, prompt=PROMPT)
    plain = build_labels(tree_table, min_completions=2, policy=world, rewards={"p0": reward})
    lab = build_labels(tree_table, min_completions=2, policy=world, rewards={"p0": reward},
                       completion_rows=True).to_pydict()
    tree_rows_ = [i for i, n in enumerate(lab["node"]) if n >= 0]
    assert {k: [v[i] for i in tree_rows_] for k, v in lab.items()} == plain.to_pydict()  # tree labels unchanged
    extra = [i for i, n in enumerate(lab["node"]) if n < 0]
    # node 2's completion "c\nAnswer: 1\n" -> two rows on one sequence; node 5's two completions -> one row each
    assert [lab["step"][i] for i in extra] == ["c\n", "Answer: 1\n", "Answer: 1\n", "Answer: 1\n"]
    assert [lab["node"][i] for i in extra] == [-1, -2, -3, -4] and [lab["owner"][i] for i in extra] == [-2, -2, -3, -4]
    assert [lab["depth"][i] for i in extra] == [2, 3, 3, 3] and [lab["orm"][i] for i in extra] == [None, 1.0, 1.0, 1.0]
    assert [lab["value"][i] for i in extra] == [1.0] * 4 and [lab["terminal"][i] for i in extra] == [0, 1, 1, 1]
    i = extra[1]
    assert dec(lab["tokens"][i]) == "Q\nb\nc\nAnswer: 1\n" and lab["prefix_len"][i] == len("Q\nb\nc\n")
    assert lab["parent"][i] == lab["node"][i]  # its own parent: no sibling pairs with tree steps
    assert label_counts(pa_table(lab))["completion_rows"] == 4


def pa_table(cols):
    import pyarrow as pa

    from arbor.critics.labels import LABEL_SCHEMA

    return pa.table(cols, schema=LABEL_SCHEMA)


def test_hard_label_from_a_fixed_number_of_completions(tree_table):
    rng = np.random.default_rng(0)
    assert hard_label(3, 1, 0, rng) == 1.0 and hard_label(3, 0, 0, rng) == 0.0  # N = 0: all completions
    assert hard_label(4, 1, 4, rng) == 1.0 and hard_label(30, 0, 4, rng) == 0.0 and hard_label(30, 30, 4, rng) == 1.0
    # 10 correct of 100, N = 4: P(any) = 1 - C(90, 4) / C(100, 4) = 0.3484
    freq = np.mean([hard_label(100, 10, 4, rng) for _ in range(4000)])
    assert abs(freq - 0.3484) < 0.03
    # the root (3 completions, 2 correct) and node 1 (2, 1) are drawn at N = 1; the rest have <= 1 completion
    draws = [build_labels(tree_table, hard_completions=1, seed=s, estimate="mean").to_pydict()["prm_hard"]
             for s in range(12)]
    assert draws[0] == build_labels(tree_table, hard_completions=1, seed=0, estimate="mean").to_pydict()["prm_hard"]
    assert all(d[2:] == [1.0, 1.0, 0.0, 1.0] for d in draws) and len({tuple(d[:2]) for d in draws}) > 1


def priced_tree_table(tmp_path):
    """`hand_tree` with the policy's step probabilities: 1 "a" 0.5, 2 "b" 0.3; 3 "Answer: 1" 0.9, 4 "Answer: 2"
    0.1; 5 "c" 0.6, 6 "Answer: 1" 0.2 (a node's children need not hold all of its mass)."""
    tree = new_tree(16, 256, enc(PROMPT))
    for parent, text, p, terminal, r in [(0, "a\n", 0.5, False, np.nan), (0, "b\n", 0.3, False, np.nan),
                                         (1, "Answer: 1\n", 0.9, True, 1.0), (1, "Answer: 2\n", 0.1, True, 0.01),
                                         (2, "c\n", 0.6, False, np.nan), (2, "Answer: 1\n", 0.2, True, 1.0)]:
        add_child(tree, parent, enc(text), log_prior=float(np.log(p)), terminal=terminal, reward=r)
    write_trees(tmp_path / "priced.parquet", [tree_rows("p0", tree, dec)])
    return read_tree_files([tmp_path / "priced.parquet"])


def test_policy_estimate_weights_children_by_the_policys_step_probability(tmp_path):
    """The default labels estimate the policy's success from a node: its valued children weighted by their step
    probability, renormalised over them; extra completions stand for the unexplored mass. By hand."""
    table = priced_tree_table(tmp_path)
    lab = build_labels(table).to_pydict()
    assert lab["node"] == [0, 1, 2, 3, 4, 6]
    v1, v0 = 0.9 * 1.0 + 0.1 * 0.01, (0.5 * (0.9 + 0.1 * 0.01) + 0.3 * 1.0) / 0.8  # node 2: only 6 is valued
    np.testing.assert_allclose(lab["value"], [v0, v1, 1.0, 1.0, 0.01, 1.0], atol=1e-6)
    np.testing.assert_allclose(lab["prm_soft"], [(0.5 * 0.9 + 0.3) / 0.8, 0.9, 1.0, 1.0, 0.0, 1.0], atol=1e-6)
    assert lab["n_completions"] == [3, 2, 1, 1, 1, 1]  # counts stay counts
    mean = build_labels(table, estimate="mean").to_pydict()
    assert mean["value"][0] == pytest.approx(2.01 / 3) and mean["value"][1] == pytest.approx(0.505)

    def options(solution: str) -> list[str]:  # from "b": "c" then a wrong answer
        return ["c\n"] if solution.endswith("b\n") else ["Answer: 2\n"] if solution.endswith("c\n") else ["?"]

    world = StepWorld(options, prompt=PROMPT)
    lab = build_labels(table, min_completions=2, policy=world, rewards={"p0": reward}).to_pydict()
    row = {n: i for i, n in enumerate(lab["node"])}
    assert [lab["n_extra"][row[n]] for n in (0, 1, 2, 5)] == [0, 0, 1, 2]
    assert lab["value"][row[5]] == 0.0  # no child: the mean of its two (wrong) extra completions
    # node 2: children 5 (0.6, V 0) and 6 (0.2, V 1) + (1 - 0.8) x its extra completion's mean (0)
    assert lab["value"][row[2]] == pytest.approx(0.2)
    assert lab["value"][row[0]] == pytest.approx((0.5 * v1 + 0.3 * 0.2) / 0.8)
    with pytest.raises(ValueError, match="estimate='median'"):
        build_labels(table, estimate="median")


def test_policy_estimate_leaves_unscored_terminals_out_of_both_labels(tmp_path):
    """A terminal without a reward is no completion: it weighs in neither V nor the soft label (not a failure)."""
    tree = new_tree(8, 64, enc(PROMPT))
    for text, p, r in [("Answer: 1\n", 0.6, 1.0), ("Answer: 3\n", 0.3, np.nan)]:
        add_child(tree, 0, enc(text), log_prior=float(np.log(p)), terminal=True, reward=r)
    write_trees(tmp_path / "u.parquet", [tree_rows("p0", tree, dec)])
    lab = build_labels(read_tree_files([tmp_path / "u.parquet"])).to_pydict()
    assert lab["node"] == [0, 1] and lab["value"] == [1.0, 1.0] and lab["prm_soft"] == [1.0, 1.0]


def test_policy_estimate_draws_hard_labels_as_n_policy_completions_would(tmp_path):
    """prm_hard = any of N completions right, drawn with probability 1 - (1 - prm_soft)^N (seeded)."""
    table = priced_tree_table(tmp_path)
    draws = np.array([build_labels(table, hard_completions=2, seed=s).to_pydict()["prm_hard"] for s in range(400)])
    assert (draws == build_labels(table, hard_completions=2, seed=7).to_pydict()["prm_hard"]).all(1)[7]  # seeded
    np.testing.assert_array_equal(draws[:, 2:], np.tile([1.0, 1.0, 0.0, 1.0], (400, 1)))  # soft 1 or 0: sure
    assert abs(draws[:, 1].mean() - (1 - 0.1 ** 2)) < 0.03  # node 1: soft 0.9, N = 2 -> 0.99
    assert abs(draws[:, 0].mean() - (1 - (1 - 0.9375) ** 2)) < 0.03
    one = np.array([build_labels(table, hard_completions=1, seed=s).to_pydict()["prm_hard"][1] for s in range(400)])
    assert abs(one.mean() - 0.9) < 0.045  # N = 1: the soft label itself


def test_split_is_by_problem_deterministic_and_complete():
    ids = [f"p{i}" for i in range(40)]
    a = assign_splits(ids, heldout_fraction=0.25, val_fraction=0.15, seed=3)
    assert a == assign_splits(list(reversed(ids)), heldout_fraction=0.25, val_fraction=0.15, seed=3)
    assert [sum(v == s for v in a.values()) for s in ("train", "val", "heldout")] == [24, 6, 10]
    assert a != assign_splits(ids, heldout_fraction=0.25, val_fraction=0.15, seed=4)


def test_label_set_opens_with_datasets(tree_table, tmp_path):
    import datasets

    table = build_labels(tree_table)
    write_labels(tmp_path / "labels.parquet", table)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "labels.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 6 and set(ds.column_names) >= {"problem_id", "node", "depth", "n_completions", "prefix",
                                                         "step", "value", "prm_soft", "prm_hard", "orm"}
    assert label_counts(table) == {"value_n": 6, "value_pos": 5, "prm_n": 5, "prm_pos": 4, "orm_n": 3,
                                   "orm_pos": 2, "problems": 1, "completion_rows": 0}


def test_outcome_rows_label_each_sampled_solution_step_by_its_outcome():
    """Whole solutions sampled from the prompts of problems without a tree: one row per step, the solution's
    reward on each, the ORM label at its answer line, the path's confidence features, negative node ids."""
    from arbor.critics.labels import outcome_labels

    def options(solution: str) -> list[str]:
        return ["a\n", "b\n"] if solution == "" else ["Answer: 1\n" if solution == "a\n" else "Answer: 2\n"]

    world = StepWorld(options, prompt=PROMPT)
    prompts = {"q1": enc(PROMPT), "q2": enc(PROMPT)}
    # the reward reads the solution text exactly (not the prompt with it)
    rewards = {"q1": lambda text: float(text == "a\nAnswer: 1\n"), "q2": lambda text: float(text == "b\nAnswer: 2\n")}
    table, got = outcome_labels(prompts, rewards, policy=world, samples=3, step_tokens=16, max_depth=4, seed=0)
    lab = table.to_pydict()
    assert len(lab["node"]) == 12 and len(got) == 6  # 2 problems x 3 solutions x 2 steps
    for p, right in (("q1", "a\n"), ("q2", "b\n")):
        rows = [i for i, q in enumerate(lab["problem_id"]) if q == p]
        assert [lab["node"][i] for i in rows] == [-1, -2, -3, -4, -5, -6]  # ids run per problem
        assert [lab["depth"][i] for i in rows] == [1, 2] * 3 and [lab["terminal"][i] for i in rows] == [0, 1] * 3
        for first, last in zip(rows[::2], rows[1::2], strict=True):
            solved = float(lab["step"][first] == right)
            assert lab["value"][first] == lab["value"][last] == lab["prm_soft"][first] == solved
            assert lab["orm"][first] is None and lab["orm"][last] == solved
            assert lab["owner"][first] == lab["owner"][last] == lab["node"][last]
            text = PROMPT + lab["step"][first] + lab["step"][last]
            assert dec(lab["tokens"][last]) == text and lab["prefix_len"][last] == len(PROMPT) + 2
            assert lab["prefix"][last] == PROMPT + lab["step"][first]
            assert lab["confidence"][last] == pytest.approx([-0.1, -0.1, -0.1])  # every token at log-prob -0.1
    assert {lab["step"][i] for i in range(0, 12, 2)} == {"a\n", "b\n"}  # both first steps were sampled
    solved = [lab["value"][i] for i in range(1, 12, 2)]
    assert got.tolist() == solved  # the rewards of all solutions, problem by problem, as the rows carry them


def test_outcome_rows_are_seeded_call_by_call():
    """Same seed, same rows; each call (here one problem each) draws with its own seed, so problems with the
    same prompt do not all get the same solutions."""
    from arbor.critics.labels import outcome_labels

    def options(solution: str) -> list[str]:
        return ["a\n", "b\n", "c\n", "d\n"] if solution == "" else ["Answer: 1\n"]

    prompts = {f"q{i}": enc(PROMPT) for i in range(6)}
    rewards = dict.fromkeys(prompts, reward)

    def draw(seed: int):
        table, _ = outcome_labels(prompts, rewards, policy=StepWorld(options, prompt=PROMPT), samples=3,
                                  step_tokens=16, max_depth=4, seed=seed, rows_per_call=3)
        d = table.to_pydict()
        return [tuple(s for s, q, dep in zip(d["step"], d["problem_id"], d["depth"], strict=True)
                      if q == p and dep == 1) for p in prompts]

    first = draw(5)
    assert draw(5) == first
    assert len(set(first)) > 1  # calls are not all seeded alike


def test_a_continuation_cut_by_a_limit_has_no_outcome_label():
    """A continuation that stops at a token or line limit before an answer line states no solution: its last
    step is not terminal and gets no ORM label (its steps keep the reward as value / PRM labels); one that the
    policy ends with EOS is a complete (wrong) solution."""
    from arbor.critics.labels import continuation_rows
    from arbor.lm.base import Continuation

    def rows(text: str, finish: str):
        cont = Continuation(enc(text), np.full(len(text), -0.1, np.float32), finish, text)
        return continuation_rows("p", enc(PROMPT), np.zeros((0, 2)), PROMPT, 0, cont, 0.0, -1, piece=chr,
                                 step_tokens=16, eos_token_id=0)

    cut = rows("a\nb\n", "length")
    assert cut["terminal"] == [False, False] and cut["orm"] == [None, None] and cut["value"] == [0.0, 0.0]
    ended = rows("a\nb\n\x00", "eos")
    assert ended["terminal"] == [False, True] and ended["orm"] == [None, 0.0]
    assert dec(ended["tokens"][-1]) == PROMPT + "a\nb\n"  # the EOS is no token of the path
    answered = rows("a\nAnswer: 1\n", "stop")
    assert answered["terminal"] == [False, True] and answered["orm"] == [None, 0.0]
