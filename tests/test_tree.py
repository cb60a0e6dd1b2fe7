import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arbor.mcts.kernels import (
    PUCT,
    UCT,
    backup_values,
    best_leaf,
    greedy_path,
    select,
    sibling_stats,
    terminal_nodes,
)
from arbor.mcts.pytree import PyTree
from arbor.mcts.tree import NO_PARENT, ROOT, TreeFullError, add_child, new_tree

from .treeops import random_program, run_numba, run_python

GOLDEN = Path(__file__).parent / "golden"


def _small_tree():
    t = new_tree(16, 64, [1, 2, 3])
    a = add_child(t, ROOT, [4, 5])
    b = add_child(t, ROOT, [6], log_prior=np.log(0.25))
    c = add_child(t, a, [7, 8, 9], terminal=True, reward=1.0)
    return t, a, b, c


def test_layout_and_paths():
    t, a, b, c = _small_tree()
    assert (t.num_nodes, t.num_tokens) == (4, 9)
    assert t.parent[:4].tolist() == [NO_PARENT, 0, 0, 1] and t.depth[:4].tolist() == [0, 1, 1, 2]
    assert t.children(ROOT).tolist() == [a, b] and t.children(b).tolist() == []
    assert t.path(c).tolist() == [0, a, c]
    assert t.path_tokens(c).tolist() == [1, 2, 3, 4, 5, 7, 8, 9]
    assert terminal_nodes(t).tolist() == [c] and t.reward[c] == 1.0 and np.isnan(t.reward[b])


def test_capacity_overflow_raises_instead_of_writing_out_of_bounds():
    t = new_tree(2, 5, [1, 2])
    add_child(t, ROOT, [3])
    with pytest.raises(TreeFullError, match="2/2 nodes"):
        add_child(t, ROOT, [4])
    t = new_tree(8, 5, [1, 2])
    with pytest.raises(TreeFullError, match="tokens"):
        add_child(t, ROOT, [3, 4, 5, 6])
    assert t.num_nodes == 1 and t.num_tokens == 2  # nothing was written
    with pytest.raises(IndexError, match="parent 7"):
        add_child(t, 7, [1])
    with pytest.raises(TreeFullError):
        new_tree(4, 2, [1, 2, 3])


def test_uct_and_puct_match_hand_computation():
    t, a, b, _ = _small_tree()
    expanded = np.zeros(16, bool)
    expanded[ROOT] = True
    # unvisited children are taken first under UCT, in creation order
    assert select(t, expanded, 1, rule=UCT).tolist() == [a]
    backup_values(t, np.array([a]), np.array([0.2]))
    assert select(t, expanded, 1, rule=UCT).tolist() == [b]
    backup_values(t, np.array([b]), np.array([0.9]))
    # N(root)=2: UCT(a) = 0.2 + sqrt(ln 2 / 1), UCT(b) = 0.9 + same -> b
    assert select(t, expanded, 1, rule=UCT).tolist() == [b]
    backup_values(t, np.array([b]), np.array([0.0]))
    # N=3, Q(a)=0.2 N(a)=1, Q(b)=0.45 N(b)=2: UCT a = 0.2+sqrt(ln3)=1.248, b = 0.45+sqrt(ln3/2)=1.191 -> a
    assert select(t, expanded, 1, c=1.0, rule=UCT).tolist() == [a]
    backup_values(t, np.array([a]), np.array([0.2]))
    # PUCT with priors a=1.0, b=0.25: N=4; a: 0.2 + 1*2/3 = 0.867; b: 0.45 + 0.25*2/3 = 0.617 -> a
    assert select(t, expanded, 1, rule=PUCT).tolist() == [a]


def test_virtual_loss_spreads_a_batch_and_backup_undoes_it():
    t, a, b, _ = _small_tree()
    expanded = np.zeros(16, bool)
    expanded[ROOT] = True
    leaves = select(t, expanded, 2)
    assert sorted(leaves.tolist()) == [a, b]  # the second selection sees the first's virtual loss
    assert t.virtual[ROOT] == 2
    backup_values(t, leaves, np.array([1.0, 0.0]))
    assert t.virtual[: t.num_nodes].tolist() == [0, 0, 0, 0]
    assert t.visits[ROOT] == 2 and t.value_sum[ROOT] == 1.0


def test_sibling_stats_and_readouts():
    t = new_tree(16, 64, [1])
    kids = [add_child(t, ROOT, [2]) for _ in range(3)]
    v = np.array([0.5, 0.1, 0.6, 0.9] + [np.nan] * 12)
    mean, imp = sibling_stats(t.children_index, t.num_children, np.array([0, 1], np.int32), v)
    assert mean[0] == pytest.approx((0.1 + 0.6 + 0.9) / 3) and imp[0] == pytest.approx(0.4)  # max |v - 0.5|
    assert np.isnan(mean[1]) and np.isnan(imp[1])  # a leaf has no children
    v[0] = np.nan  # unknown own value (the root): the children's mean stands in
    _, imp = sibling_stats(t.children_index, t.num_children, np.array([0], np.int32), v)
    assert imp[0] == pytest.approx(max(abs(x - 1.6 / 3) for x in (0.1, 0.6, 0.9)))
    for k, val, n in zip(kids, [0.1, 0.6, 0.9], [3, 2, 1], strict=True):
        for _ in range(n):
            backup_values(t, np.array([k]), np.array([val]))
            t.virtual[t.path(k)] += 1  # backup expects a pending virtual loss; give it one
    gp = greedy_path(t.children_index, t.num_children, t.visits, t.value_sum)
    assert gp.tolist() == [0, kids[2]]
    t.terminal[kids[1]] = True
    assert best_leaf(t.num_children, t.visits, t.value_sum, t.terminal, t.num_nodes, True) == kids[1]
    assert best_leaf(t.num_children, t.visits, t.value_sum, t.terminal, t.num_nodes, False) == kids[2]


def _golden_cases():
    return sorted(GOLDEN.glob("tree_*.json"))


def test_golden_trees_exist():
    assert len(_golden_cases()) >= 3


@pytest.mark.parametrize("path", _golden_cases(), ids=lambda p: p.stem)
def test_kernels_replay_golden_trees(path):
    case = json.loads(path.read_text())
    got = run_numba(case["program"])
    for key in ("selected", "visits", "parent", "virtual"):
        assert got[key] == case["expected"][key], key
    np.testing.assert_allclose(got["value_sum"], case["expected"]["value_sum"], rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 40))
def test_kernels_agree_with_python_reference_and_invariants_hold(seed, steps):
    prog = random_program(np.random.default_rng(seed), steps)
    got, ref = run_numba(prog), run_python(prog)
    assert got["selected"] == ref["selected"] and got["visits"] == ref["visits"]
    assert got["parent"] == ref["parent"]
    np.testing.assert_allclose(got["value_sum"], ref["value_sum"], rtol=1e-12)
    # virtual loss is fully undone
    assert all(v == 0 for v in got["virtual"])
    # visit counts add up: a node's visits = backups that ended at it + its children's visits
    visits, parent = np.array(got["visits"]), np.array(got["parent"])
    child_sum = np.zeros_like(visits)
    np.add.at(child_sum, parent[1:], visits[1:])
    ended = visits - child_sum
    assert (ended >= 0).all()
    assert visits[0] == ended.sum() == sum(len(set(s)) for s in got["selected"])


def test_python_reference_greedy_path_matches_kernel():
    prog = random_program(np.random.default_rng(3), 30)
    py = PyTree()
    # rebuild the same tree in both from the numba run's parents, then compare greedy read-outs
    res = run_numba(prog)
    t = new_tree(len(res["parent"]) + 1, 10_000, [1])
    for p in res["parent"][1:]:
        add_child(t, p, [1])
        py.add_child(p)
    t.visits[: len(res["visits"])] = res["visits"]
    t.value_sum[: len(res["value_sum"])] = res["value_sum"]
    for node, v, w in zip(py.nodes, res["visits"], res["value_sum"], strict=True):
        node.visits, node.value_sum = v, w
    assert greedy_path(t.children_index, t.num_children, t.visits, t.value_sum).tolist() == py.greedy_path()


def test_children_table_rows_hold_children_in_creation_order_and_grow_past_capacity():
    t = new_tree(64, 256, [1], max_children=2)
    kids = [add_child(t, ROOT, [2 + i]) for i in range(5)]  # 5 > 2 columns: the table doubles twice
    grand = add_child(t, kids[1], [9])
    assert t.max_children == 8 and t.children_index.shape == (64, 8)
    assert t.children(ROOT).tolist() == kids and t.children(kids[1]).tolist() == [grand]
    assert t.children_index[ROOT, 5:].tolist() == [-1, -1, -1]  # padding
    assert t.first_child[[ROOT, kids[0], kids[1]]].tolist() == [kids[0], -1, grand]
    expanded = np.zeros(64, bool)
    expanded[[ROOT, kids[1]]] = True
    assert select(t, expanded, 1, rule=UCT).tolist() == [kids[0]]  # the kernels read the widened table


def test_priors_are_log_space_and_puct_uses_the_sibling_softmax():
    t = new_tree(8, 8, [1])
    # a 40-token step at -3 nats per token: exp(-120) is 0 in float32, the old prior array's type
    lps = [40 * -3.0, 40 * -3.1, 40 * -2.9]
    kids = [add_child(t, ROOT, [2], log_prior=lp) for lp in lps]
    assert np.float32(np.exp(lps[0])) == 0.0
    p = t.prior[kids]
    assert (p > 0).all() and p.sum() == pytest.approx(1.0)
    assert p[2] > p[0] > p[1]  # ordered as the log priors
    np.testing.assert_allclose(p, np.exp(np.array(lps) - max(lps)) / np.exp(np.array(lps) - max(lps)).sum())
    assert t.log_prior[kids].tolist() == lps
    # PUCT at an unvisited root explores the most probable step first
    expanded = np.zeros(8, bool)
    expanded[ROOT] = True
    backup_values(t, np.array([ROOT]), np.array([0.0]), undo_virtual=False)  # N(root) = 1
    assert select(t, expanded, 1, rule=PUCT).tolist() == [kids[2]]


@pytest.mark.parametrize("rule", [UCT, PUCT])
def test_selection_survives_nan_values(rule):
    # a NaN value backed up into every child made every score NaN; NaN never beats -inf, so the old kernel
    # returned leaf -1 (and then indexed arrays with it). NaN Q now counts as 0, like an unknown node.
    t = new_tree(8, 16, [1])
    kids = [add_child(t, ROOT, [2]) for _ in range(3)]
    expanded = np.zeros(8, bool)
    expanded[ROOT] = True
    backup_values(t, np.array(kids), np.full(3, np.nan), undo_virtual=False)
    assert np.isnan(t.value_sum[kids]).all()
    leaves = select(t, expanded, 2, rule=rule)
    assert set(leaves.tolist()) <= set(kids) and leaves[0] == kids[0]  # all tie at Q = 0: the earliest child
    py = PyTree()
    for _ in range(3):
        py.add_child(0)
    py.nodes[0].expanded = True
    for k in kids:
        py.nodes[k].visits, py.nodes[k].value_sum = 1, float("nan")
    py.nodes[0].visits = 3
    assert py.select(2, rule=rule) == leaves.tolist()


def test_tree_parquet_roundtrip_and_old_prior_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from arbor.mcts.treeio import read_trees, tree_rows, write_trees

    t = new_tree(8, 64, [1])
    a = add_child(t, ROOT, [2], log_prior=-120.0)
    add_child(t, ROOT, [3], log_prior=-121.0)
    add_child(t, a, [4], log_prior=-0.5)
    write_trees(tmp_path / "new.parquet", [tree_rows("p0", t, lambda ids: "".join(map(str, ids)))])
    new = read_trees(tmp_path / "new.parquet")
    assert new.column("log_prior").to_pylist() == [0.0, -120.0, -121.0, -0.5]
    np.testing.assert_allclose(new.column("prior").to_pylist(), t.prior[:4])
    # a file of the old generation: `prior` float32 = the raw step probability (underflowed to 0 for node 1)
    old = new.drop(["log_prior"]).set_column(new.column_names.index("prior") - 1, "prior",
                                             pa.array(np.exp([0.0, -1.0, -2.0, -0.5]).astype(np.float32)))
    pq.write_table(old, tmp_path / "old.parquet")
    got = read_trees(tmp_path / "old.parquet")
    np.testing.assert_allclose(got.column("log_prior").to_pylist(), [0.0, -1.0, -2.0, -0.5], rtol=1e-6)
    e = np.exp([-1.0, -2.0])
    np.testing.assert_allclose(got.column("prior").to_pylist(), [1.0, *(e / e.sum()), 1.0], rtol=1e-6)
