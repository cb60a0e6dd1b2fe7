"""Stage `report`: metrics/summary.json from every iteration's stage metrics, and its plots."""

import json

import pytest

from arbor.pipeline.config import ArborInputError, load_config
from arbor.stages import report


def _write(d, name, data):
    (d / name).write_text(json.dumps(data))


@pytest.fixture
def metrics(tmp_path):
    d = tmp_path / "metrics"
    d.mkdir()
    _write(d, "bootstrap.json", {"wall_seconds": 100.0})
    for k in range(3):
        _write(d, f"search_{k}.json", {"problems": 4, "forward_tokens": 4000, "trajectories": 40,
                                       "solved_any": 0.75, "critic_forward_tokens": 900 * k, "wall_seconds": 10.0})
        _write(d, f"critics_{k}.json", {"value_auroc": 0.7, "prm_auroc": 0.6, "orm_auroc": 0.8 + k / 100,
                                        "wall_seconds": 20.0})
        _write(d, f"iter_{k}.json", {"greedy_pass1": 0.5 + k / 10, "pass_at_k": 0.8, "maj_at_k": 0.6,
                                     "orm_best_of_n": 0.7, "eval_problems": 10, "k": 16, "forward_tokens": 2000,
                                     "greedy_forward_tokens": 400, "wall_seconds": 5.0,
                                     "rerank_critic_forward_tokens": 300,
                                     "greedy_borrow_misconception_rate": 0.9 - k / 10})
        decode = {"search_pass1": 0.55 + k / 10, "search_forward_tokens": 1500, "search_problems": 4,
                  "search_scorer": "critics", "search_critic_forward_tokens": 700, "search_wall_seconds": 7.0}
        if k == 1:  # critics below the gate: likelihood-scored read-out, the critics' decoding beside it
            decode = {**decode, "search_scorer": "likelihood", "search_critic_forward_tokens": 0,
                      "critic_search_pass1": 0.1, "critic_search_forward_tokens": 1400,
                      "critic_search_critic_forward_tokens": 650, "critic_search_wall_seconds": 9.0}
        _write(d, f"decode_{k}.json", decode)
        if k:
            _write(d, f"prefs_{k}.json", {"pairs": 12, "wall_seconds": 1.0})
            _write(d, f"train_{k}.json", {"forward_tokens": 3000, "wall_seconds": 30.0})
    return d


def test_summary_has_one_entry_per_iteration_with_tokens_and_walls(tmp_path, metrics):
    cfg = load_config(None)
    summary = report.run(cfg, metrics_dir=metrics, plots_dir=tmp_path / "plots")
    rows = summary["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert [r["greedy_pass1"] for r in rows] == [0.5, 0.6, 0.7]
    assert rows[2]["search_pass1"] == pytest.approx(0.75) and rows[0]["orm_auroc"] == 0.8
    assert rows[2]["policy_forward_tokens"] == {"search": 4000, "train": 3000, "iter": 2000, "decode": 1500}
    assert rows[2]["critic_forward_tokens"] == {"search": 1800, "iter": 300, "decode": 700}
    assert rows[0]["wall_seconds"]["bootstrap"] == 100.0 and rows[2]["wall_seconds"]["decode"] == 7.0
    assert (rows[2]["search_scorer"], rows[2]["critic_search_pass1"]) == ("critics", None)
    # gated critics: both decodings' tokens and seconds are the stage's; the critics' read-out beside
    assert rows[1]["policy_forward_tokens"]["decode"] == 2900 and rows[1]["critic_forward_tokens"]["decode"] == 650
    assert rows[1]["wall_seconds"]["decode"] == 16.0
    assert (rows[1]["search_scorer"], rows[1]["critic_search_pass1"]) == ("likelihood", 0.1)
    assert rows[1]["tree_vs_chain"]["chain_tokens_per_problem"] == 160.0  # sampling tokens only, not greedy's
    assert rows[1]["tree_vs_chain"]["tree_trajectories_per_problem"] == 10.0
    assert rows[1]["diagnostics"] == {"greedy_borrow_misconception_rate": 0.8}
    assert (rows[1]["eval_problems"], rows[1]["search_problems"]) == (10, 4)
    assert json.loads((metrics / "summary.json").read_text()) == summary
    for png in ("accuracy.png", "tree_vs_chain.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "plots" / "accuracy.json").read_text())[2]["greedy_pass1"] == 0.7


def test_a_missing_stage_file_is_named_and_nothing_is_written(tmp_path, metrics):
    (metrics / "prefs_2.json").unlink()
    with pytest.raises(ArborInputError, match=r"prefs_2.json: missing \(iteration 2's prefs stage"):
        report.run(load_config(None), metrics_dir=metrics, plots_dir=tmp_path / "plots")
    assert not (metrics / "summary.json").exists() and not (tmp_path / "plots").exists()
