"""The policy's confidence beside the critics (arbor/critics/confidence.py): path features by hand, the same
numbers from a tree and from a sampled continuation, the fusion learning a planted signal, its file, and the
label column."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arbor.critics.calibration import auroc
from arbor.critics.confidence import Fusion, path_features, path_steps, sample_features, step_features
from arbor.mcts.tree import add_child, new_tree


def hand_tree():
    """0 prompt ─┬─ 1 (log-prob -2 over 4 tokens) ── 2 (-6 over 2 tokens)
                 └─ 3 (-1 over 1 token)"""
    tree = new_tree(8, 64, [1, 2, 3])
    add_child(tree, 0, [5, 6, 7, 8], log_prior=-2.0)
    add_child(tree, 1, [9, 9], log_prior=-6.0)
    add_child(tree, 0, [4], log_prior=-1.0)
    return tree


def test_path_features_by_hand():
    t = hand_tree()
    z = path_features(t.parent, t.log_prior, t.tok_len, np.arange(4, dtype=np.int64))
    np.testing.assert_allclose(z[0], [0.0, 0.0, 0.0])  # the root has no step
    np.testing.assert_allclose(z[1], [-0.5, -0.5, -0.5])
    np.testing.assert_allclose(z[2], [-8 / 6, -3.0, -3.0])  # path mean over 6 tokens, weakest = last step
    np.testing.assert_allclose(z[3], [-1.0, -1.0, -1.0])


def test_a_sampled_continuation_gets_the_features_its_tree_path_would():
    t = hand_tree()
    # node 2 as a continuation of node 1: one step of token log-probs summing to -6 over 2 tokens
    steps = path_steps(t.parent, t.log_prior, t.tok_len, 1)
    np.testing.assert_allclose(steps, [[-2.0, 4]])
    got = sample_features(np.array([-1.5, -4.5]), [2], steps)
    np.testing.assert_allclose(got[0], path_features(t.parent, t.log_prior, t.tok_len, np.array([2]))[0])
    # a continuation of the prompt with two steps: rows are the prefixes through each step
    lp = np.array([-0.5, -0.5, -0.5, -0.5, -3.0, -3.0, -9.0])  # the last token (EOS) lies past the last end
    np.testing.assert_allclose(sample_features(lp, [4, 6]),
                               path_features(t.parent, t.log_prior, t.tok_len, np.array([1, 2])))
    np.testing.assert_allclose(step_features([-2.0, -6.0], [4, 2]), sample_features(lp, [4, 6]))


def test_the_fusion_learns_a_planted_confidence_signal_the_critic_lacks():
    rng = np.random.default_rng(0)

    def draw(n):
        z = rng.normal(size=(n, 3))
        critic = rng.random(n)  # an uninformative critic
        y = rng.random(n) < 1 / (1 + np.exp(-(2.0 * z[:, 0] - 1.0 * z[:, 1])))
        return critic, z, y.astype(float)

    p, z, y = draw(3000)
    fusion = Fusion.fit({"orm": p}, {"orm": z}, {"orm": y})
    a, u1, u2, u3, _ = fusion.coef["orm"]
    assert abs(a) < 0.2 and u1 > 1.5 and u2 < -0.7 and abs(u3) < 0.2
    p2, z2, y2 = draw(2000)
    assert auroc(p2, y2 > 0.5) < 0.55 and auroc(fusion.apply("orm", p2, z2), y2 > 0.5) > 0.8
    np.testing.assert_allclose(fusion.apply("value", p2, z2), p2)  # a kind it was not fitted for: unchanged


def test_a_critic_that_already_knows_keeps_its_score_ranking():
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.4).astype(float)
    p = np.clip(0.7 * y + 0.15 + 0.1 * rng.normal(size=2000), 0.01, 0.99)
    z = rng.normal(size=(2000, 3))  # confidence carries nothing here
    fusion = Fusion.fit({"value": p}, {"value": z}, {"value": y})
    assert fusion.coef["value"][0] > 1.0
    assert auroc(fusion.apply("value", p, z), y > 0.5) > 0.99 * auroc(p, y > 0.5)
    assert Fusion.fit({"prm": p}, {"prm": z}, {"prm": np.ones(2000)}).coef["prm"] == [1.0, 0, 0, 0, 0]


def test_the_fusion_file_round_trips_and_bad_files_are_named(tmp_path):
    assert Fusion.load(tmp_path) is None  # critics trained without it
    f = Fusion({"value": [0.9, 1.0, -0.5, 0.25, 0.1], "orm": [1.1, 0.0, 2.0, 0.0, -0.3]})
    f.save(tmp_path)
    g = Fusion.load(tmp_path)
    z = np.array([[-0.5, -1.0, -0.2], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(g.apply("value", np.array([0.3, 0.8]), z), f.apply("value", np.array([0.3, 0.8]), z))
    path = tmp_path / "confidence.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "coef": {"value": [1.0, 2.0]}}))
    with pytest.raises(ValueError, match=r"confidence.json: key 'coef'"):
        Fusion.load(tmp_path)
    path.write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(ValueError, match=r"confidence.json: format 'other/9'"):
        Fusion.load(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="confidence.json: not valid JSON"):
        Fusion.load(tmp_path)


def test_label_rows_carry_the_features_of_their_node(tmp_path):
    from arbor.critics.labels import build_labels, read_tree_files
    from arbor.mcts.treeio import tree_rows, write_trees

    t = hand_tree()
    add_child(t, 2, [10, 11, 12], log_prior=-0.3, terminal=True, reward=1.0)
    add_child(t, 3, [13], log_prior=-4.0, terminal=True, reward=0.0)
    write_trees(tmp_path / "part-0.parquet", [tree_rows("p0", t, lambda ids: "".join(chr(65 + i) for i in ids))])
    lab = build_labels(read_tree_files([tmp_path / "part-0.parquet"]), estimate="mean").to_pydict()
    nodes = np.asarray(lab["node"], np.int64)
    assert sorted(nodes.tolist()) == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(np.asarray(lab["confidence"]), path_features(t.parent, t.log_prior, t.tok_len, nodes))
    np.testing.assert_allclose(lab["confidence"][nodes.tolist().index(4)], [-8.3 / 9, -3.0, -0.1])


def test_unlabelled_rows_are_left_out_and_non_finite_numbers_never_reach_a_score(tmp_path):
    rng = np.random.default_rng(2)
    z = rng.normal(size=(500, 3)) - 2.0
    p = rng.random(500)
    y = (rng.random(500) < 1 / (1 + np.exp(-z[:, 0]))).astype(float)
    y_nan = y.copy()
    y_nan[::7] = np.nan
    f = Fusion.fit({"value": p}, {"value": z}, {"value": y_nan})
    ok = ~np.isnan(y_nan)
    g = Fusion.fit({"value": p[ok]}, {"value": z[ok]}, {"value": y[ok]})
    np.testing.assert_allclose(f.coef["value"], g.coef["value"])  # as if the unlabelled rows were not there
    z_bad = z[:3].copy()
    z_bad[0, 1], z_bad[1, 0] = -np.inf, np.nan
    assert np.all(np.isfinite(f.apply("value", p[:3], z_bad)))
    f.save(tmp_path)
    meta = json.loads((tmp_path / "confidence.json").read_text())
    (tmp_path / "confidence.json").write_text(json.dumps({**meta, "coef": {"value": [1.0, float("nan"), 0, 0, 0]}}))
    with pytest.raises(ValueError, match="finite numbers"):
        Fusion.load(tmp_path)
