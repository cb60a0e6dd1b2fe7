"""Step-level preference pairs and Tree-GRPO advantages on hand-built trees (values and advantages computed by
hand), and stage `prefs` (verified input, atomic output with manifest, `datasets`-readable, metrics)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from arbor.critics.labels import read_tree_files
from arbor.improve.advantages import leaf_advantages, standardize, tree_trajectories
from arbor.improve.config import PrefsConfig
from arbor.improve.prefs import ScoredTree, node_values, pair_counts, sibling_pairs, tree_pairs
from arbor.mcts.tree import add_child, new_tree
from arbor.mcts.treeio import tree_rows, write_trees
from arbor.pipeline.config import load_config
from arbor.pipeline.manifest import CorruptOutputError, verify, write_manifest
from arbor.stages import prefs as stage

PROMPT = "Q\n"


def enc(text: str) -> list[int]:
    return [ord(c) for c in text]


def dec(ids) -> str:
    return "".join(chr(int(i)) for i in ids)


def hand_tree():
    """0 prompt ─┬─ 1 "a" ─┬─ 4 "Answer: 1" (1)     MC values: 1: 0.5, 2: 0.0, 4: 1, 5: 0, 7: 0, 8: 0;
                 │         ├─ 5 "Answer: 2" (0)     3 and 6 are open leaves (no value)
                 │         └─ 6 "x" (open)
                 ├─ 2 "b" ─┬─ 7 "Answer: 2" (0)
                 │         └─ 8 "Answer: 3" (0)
                 └─ 3 "c" (open)"""
    tree = new_tree(16, 256, enc(PROMPT))
    for parent, text, terminal, reward in [(0, "a\n", False, np.nan), (0, "b\n", False, np.nan),
                                           (0, "c\n", False, np.nan), (1, "Answer: 1\n", True, 1.0),
                                           (1, "Answer: 2\n", True, 0.0), (1, "x\n", False, np.nan),
                                           (2, "Answer: 2\n", True, 0.0), (2, "Answer: 3\n", True, 0.0)]:
        add_child(tree, parent, enc(text), terminal=terminal, reward=reward)
    n = tree.num_nodes
    tree.visits[:n] = [6, 3, 2, 1, 1, 1, 1, 1, 1]
    tree.value_sum[:n] = [2.5, 1.5, 0.2, 0.5, 1.0, 0.0, 0.5, 0.1, 0.1]  # q = W / N
    tree.critic_score[:n] = [0.5, 0.9, 0.1, 0.5, 1.0, 0.0, 0.5, 0.0, 0.0]
    return tree


def scored(tmp_path, group=None, name="p0") -> ScoredTree:
    write_trees(tmp_path / f"{name}.parquet", [tree_rows(name, hand_tree(), dec, group)])
    return ScoredTree(read_tree_files([tmp_path / f"{name}.parquet"]))


def test_mc_values_and_sibling_pairs_by_hand(tmp_path):
    t = scored(tmp_path)
    value, terms = node_values(t, "mc")
    assert np.allclose(value, [0.25, 0.5, 0.0, np.nan, 1, 0, np.nan, 0, 0], equal_nan=True)
    assert terms.tolist() == [4, 2, 2, 0, 1, 1, 0, 1, 1]
    node, chosen, rejected = sibling_pairs(t.parent, value, 0.3)
    assert list(zip(node.tolist(), chosen.tolist(), rejected.tolist(), strict=True)) == [(0, 1, 2), (1, 4, 5)]
    assert sibling_pairs(t.parent, value, 0.6)[1].tolist() == [4]  # the 0.5 gap at the root is too small
    assert sibling_pairs(t.parent, value, 0.5)[1].tolist() == [1, 4]  # a gap equal to the margin counts


def test_policy_values_weight_children_by_the_policy(tmp_path):
    """0 ─┬─ 1 "a" ─┬─ 3 "Answer: 1" p=0.9 (1)     policy value of 1: 0.9 (plain mean: 1/3)
          │         ├─ 4 "Answer: 2" p=0.05 (0)
          │         └─ 5 "Answer: 11" p=0.05 (0)
          └─ 2 "b" ── 6 "c" ─┬─ 7 "Answer: 3" log p=-1000 (1)   log-priors far below float range still
                             └─ 8 "Answer: 4" log p=-1001 (0)   weigh e^0 : e^-1"""
    tree = new_tree(16, 256, enc(PROMPT))
    for parent, text, lp, terminal, reward in [
            (0, "a\n", -0.1, False, np.nan), (0, "b\n", -2.0, False, np.nan),
            (1, "Answer: 1\n", math.log(0.9), True, 1.0), (1, "Answer: 2\n", math.log(0.05), True, 0.0),
            (1, "Answer: 11\n", math.log(0.05), True, 0.0), (2, "c\n", 0.0, False, np.nan),
            (6, "Answer: 3\n", -1000.0, True, 1.0), (6, "Answer: 4\n", -1001.0, True, 0.0)]:
        add_child(tree, parent, enc(text), log_prior=lp, terminal=terminal, reward=reward)
    write_trees(tmp_path / "w.parquet", [tree_rows("w", tree, dec)])
    t = ScoredTree(read_tree_files([tmp_path / "w.parquet"]))
    v, _ = node_values(t, "policy")
    deep = 1 / (1 + math.exp(-1))
    p1, p2 = math.exp(-0.1), math.exp(-2.0)
    assert v[[1, 2, 6, 3, 4]] == pytest.approx([0.9, deep, deep, 1.0, 0.0])
    assert v[0] == pytest.approx((p1 * 0.9 + p2 * deep) / (p1 + p2))
    assert node_values(t, "mc")[0][1] == pytest.approx(1 / 3)
    every = tree_pairs(t, PrefsConfig(value="policy", margin=0.3, min_step_prob=0.0))
    assert list(zip(every["chosen_node"], every["rejected_node"], strict=True)) == [(3, 4), (3, 5), (7, 8)]
    # only steps the policy takes: 7 and 8 (log p -1000, -1001) are not paired, then not 4 and 5 (p = 0.05)
    assert tree_pairs(t, PrefsConfig(value="policy", margin=0.3, min_step_prob=0.01))["rejected_node"] == [4, 5]
    assert tree_pairs(t, PrefsConfig(value="policy", margin=0.3, min_step_prob=0.06))["rejected_node"] == []
    # the same rule for trajectories: 7 and 8 end paths through a step of log p -1000
    assert leaf_advantages(t, 0.01)["leaf"].tolist() == [3, 4, 5]
    assert leaf_advantages(t)["leaf"].tolist() == [3, 4, 5, 7, 8]
    # step_prob token: the floor bounds the geometric-mean token probability (p = 0.05 over the 10-11 tokens of
    # "Answer: 2" / "Answer: 11" is ~0.75 per token), so a floor of 0.5 keeps 4 and 5 where a per-step one does not
    assert tree_pairs(t, PrefsConfig(value="policy", margin=0.3, min_step_prob=0.5))["rejected_node"] == []
    per_token = PrefsConfig(value="policy", margin=0.3, min_step_prob=0.5, step_prob="token")
    assert tree_pairs(t, per_token)["rejected_node"] == [4, 5]
    assert np.allclose(t.step_logp(True)[4], math.log(0.05) / len("Answer: 2\n"))
    assert leaf_advantages(t, 0.5, per_token=True)["leaf"].tolist() == [3, 4, 5]
    assert leaf_advantages(t, 0.5)["leaf"].tolist() == [3]


def test_pairs_rows_depth_gap_and_tokens(tmp_path):
    t = scored(tmp_path)
    cols = tree_pairs(t, PrefsConfig(value="mc", margin=0.3))
    assert cols["depth"] == [1, 2] and cols["gap"] == [0.5, 1.0] and cols["node"] == [0, 1]
    assert cols["prefix"] == ["Q\n", "Q\na\n"] and cols["chosen"] == ["a\n", "Answer: 1\n"]
    assert cols["rejected"] == ["b\n", "Answer: 2\n"]
    assert cols["chosen_visits"] == [3, 1] and cols["rejected_visits"] == [2, 1]
    assert cols["chosen_terminals"] == [2, 1] and cols["rejected_terminals"] == [2, 1]
    assert dec(cols["prefix_ids"][1]) == "Q\na\n" and dec(cols["chosen_ids"][1]) == "Answer: 1\n"
    # every step needs 2 terminals below it: only the root's pair is left
    assert tree_pairs(t, PrefsConfig(value="mc", margin=0.3, min_terminals=2))["chosen_node"] == [1]
    # values from the search's Q (1: 0.5, 2: 0.1, 3: 0.5; 4: 1, 5: 0, 6: 0.5) or the critic score
    q = tree_pairs(t, PrefsConfig(value="q", margin=0.3))
    assert list(zip(q["chosen_node"], q["rejected_node"], strict=True)) == [(1, 2), (3, 2), (4, 5), (4, 6), (6, 5)]
    assert tree_pairs(t, PrefsConfig(value="q", margin=0.3, max_pairs_per_node=1))["rejected_node"] == [2, 5]
    c = tree_pairs(t, PrefsConfig(value="critic", margin=0.7))
    assert list(zip(c["chosen_node"], c["rejected_node"], strict=True)) == [(1, 2), (4, 5)]


def test_pair_counts_per_depth_and_gap_bucket(tmp_path):
    import pyarrow as pa

    from arbor.improve.prefs import PAIR_SCHEMA

    t = scored(tmp_path)
    table = pa.table(tree_pairs(t, PrefsConfig(value="q", margin=0.3)), schema=PAIR_SCHEMA)
    counts = pair_counts(table)  # gaps: 0.4, 0.4, 1.0, 0.5, 0.5
    assert counts["pairs"] == 5 and counts["pairs_depth_1"] == 2 and counts["pairs_depth_2"] == 3
    assert counts["pairs_gap_0.25_0.50"] == 2 and counts["pairs_gap_0.50_0.75"] == 2
    assert counts["pairs_gap_0.75_1.00"] == 1 and counts["pairs_gap_0.00_0.25"] == 0


def test_tree_grpo_advantages_by_hand(tmp_path):
    t = scored(tmp_path)
    adv = leaf_advantages(t)
    assert adv["leaf"].tolist() == [4, 5, 7, 8] and adv["tree"].tolist() == [1, 1, 2, 2]
    # intra: first-step subtrees {4: 1, 5: 0} -> +1, -1 and {7: 0, 8: 0} -> 0 (std 0)
    assert np.allclose(adv["adv_intra"], [1, -1, 0, 0])
    # inter: mean 0.25, population std sqrt(0.1875)
    s = math.sqrt(0.1875)
    assert np.allclose(adv["adv_inter"], [0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s])
    assert np.allclose(adv["advantage"], adv["adv_intra"] + adv["adv_inter"])
    rows = tree_trajectories(t)
    assert rows["text"] == ["a\nAnswer: 1\n", "a\nAnswer: 2\n", "b\nAnswer: 2\n", "b\nAnswer: 3\n"]
    assert dec(rows["prompt_ids"][0]) == "Q\n" and dec(rows["completion_ids"][2]) == "b\nAnswer: 2\n"


def test_tree_grpo_group_column_defines_the_trees(tmp_path):
    one_tree = np.array([-1, 0, 0, 0, 0, 0, 0, 0, 0], np.int32)  # Tree-GRPO sampling: all leaves in tree 0
    adv = leaf_advantages(scored(tmp_path, one_tree))
    assert adv["tree"].tolist() == [0, 0, 0, 0] and np.allclose(adv["adv_intra"], adv["adv_inter"])


def test_standardize_groups_independently():
    out = standardize(np.array([0, 1, 0, 1, 2]), np.array([1.0, 5.0, 3.0, 5.0, 7.0]))
    assert np.allclose(out, [-1, 0, 1, 0, 0])


def _trees_dir(tmp_path):
    d = tmp_path / "trees"
    d.mkdir()
    write_trees(d / "part-00000.parquet", [tree_rows("p0", hand_tree(), dec), tree_rows("p1", hand_tree(), dec)])
    write_manifest(d)
    return d


def test_prefs_stage_writes_verified_datasets_readable_output(tmp_path):
    import datasets

    cfg = load_config(None)
    m = stage.run(cfg, trees_dir=_trees_dir(tmp_path), out_dir=tmp_path / "prefs", iteration=1,
                  prefs=PrefsConfig(margin=0.3))
    assert m["problems"] == 2 and m["pairs"] == 4 and m["pairs_depth_1"] == 2 and m["pairs_depth_2"] == 2
    assert m["pairs_gap_0.50_0.75"] == 2 and m["pairs_gap_0.75_1.00"] == 2
    assert m["trajectories"] == 8 and m["solved_problems"] == 2 and m["trajectories_nonzero_advantage"] == 8
    manifest = verify(tmp_path / "prefs")
    assert set(manifest["files"]) == {"pairs.parquet", "trajectories.parquet"}
    assert manifest["files"]["pairs.parquet"]["rows"] == 4
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "prefs" / "pairs.parquet"), split="train")
    assert ds[0]["prefix"] == "Q\n" and ds[0]["gap"] == 0.5 and ds.num_rows == 4


def test_prefs_stage_refuses_damaged_trees(tmp_path):
    d = _trees_dir(tmp_path)
    os.truncate(d / "part-00000.parquet", 50)
    with pytest.raises(CorruptOutputError, match="part-00000.parquet"):
        stage.run(load_config(None), trees_dir=d, out_dir=tmp_path / "prefs")
    assert not (tmp_path / "prefs").exists()


def test_prefs_stage_replay_adds_the_previous_trees_built_on_their_own(tmp_path):
    """prefs.replay: the previous iteration's trees add their pairs and trajectories; the same problem ids in both
    sets stay two trees (one merged tree would give other pairs), and a damaged previous set is refused."""
    current = _trees_dir(tmp_path)
    previous = tmp_path / "previous"
    previous.mkdir()
    write_trees(previous / "part-00000.parquet", [tree_rows("p0", hand_tree(), dec)])
    write_manifest(previous)
    cfg = load_config(None)
    m = stage.run(cfg, trees_dir=current, out_dir=tmp_path / "prefs", iteration=2, prefs=PrefsConfig(margin=0.3),
                  replay_dir=previous)
    assert m["problems"] == 2 and m["replayed_pairs"] == 2 and m["replayed_trajectories"] == 4
    assert m["pairs"] == 6 and m["trajectories"] == 12
    pairs = pq.read_table(tmp_path / "prefs" / "pairs.parquet").to_pydict()
    assert pairs["problem_id"] == ["p0", "p0", "p1", "p1", "p0", "p0"]
    assert pairs["gap"][4:] == pairs["gap"][:2]
    assert verify(tmp_path / "prefs")["meta"]["replayed_trees"] == str(previous)
    os.truncate(previous / "part-00000.parquet", 50)
    with pytest.raises(CorruptOutputError, match="part-00000.parquet"):
        stage.run(cfg, trees_dir=current, out_dir=tmp_path / "prefs2", replay_dir=previous)
    assert not (tmp_path / "prefs2").exists()


def test_prefs_cli_replays_the_previous_iteration_only_when_configured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k in (0, 1):
        d = Path(f"trees/iter_{k}")
        d.mkdir(parents=True)
        write_trees(d / "part-00000.parquet", [tree_rows(f"p{k}", hand_tree(), dec)])
        write_manifest(d)
    common = ["--params", "", "--tracking.enabled", "false", "--iter", "1"]
    assert "replayed_pairs" not in stage.main([*common, "--prefs.replay", "false"])
    m = stage.main([*common, "--out", "prefs/r", "--metrics", "metrics/r.json"])  # replay is the default
    assert m["replayed_pairs"] == 2 and m["pairs"] == 4 and m["problems"] == 1
