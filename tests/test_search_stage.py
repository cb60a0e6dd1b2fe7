"""Stage `search` end to end on a tiny random model: parquet trees, resume, fingerprint; `show-tree` HTML."""

import json
from html.parser import HTMLParser

import pytest

from arbor.lm.hf import HFPolicy
from arbor.pipeline.config import load_config
from arbor.pipeline.io import write_jsonl
from arbor.stages import search, show_tree
from arbor.tasks import make_splits

from .conftest import tiny_model

FAST = {"search.n_problems": 3, "search.shard_size": 1, "search.eta.num_simulations": 6,
        "search.eta.step_tokens": 4, "search.eta.max_depth": 3, "search.eta.batch_leaves": 2,
        "search.chains": 3, "search.grpo_m": 2, "search.grpo_l": 1, "search.grpo_n": 1, "tracking.enabled": False}


@pytest.fixture()
def setup(char_tok, tmp_path):
    model = tiny_model(char_tok, seed=4)
    (tmp_path / "policy").mkdir()
    model.save_pretrained(tmp_path / "policy")
    char_tok.save_pretrained(tmp_path / "policy")
    cfg = load_config(None, FAST)
    train, _ = make_splits(cfg.task, 5, 1, seed=0)
    write_jsonl(tmp_path / "train.jsonl", [p.to_dict() for p in train])
    return tmp_path


def _run(tmp, algorithm="eta_mcts", **over):
    cfg = load_config(None, {**FAST, "search.algorithm": algorithm, **over})
    policy = HFPolicy.from_pretrained(tmp / "policy")
    m = search.run(cfg, policy_dir=tmp / "policy", train_file=tmp / "train.jsonl", out_dir=tmp / "trees",
                   policy=policy)
    return m, policy


@pytest.mark.parametrize("algorithm", ["eta_mcts", "tree_grpo", "chains"])
def test_trees_open_in_datasets(setup, algorithm):
    import datasets

    m, _ = _run(setup, algorithm)
    files = sorted(str(p) for p in (setup / "trees").glob("part-*.parquet"))
    assert len(files) == 3
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == m["nodes"]
    for col in ("problem_id", "node", "parent", "depth", "step_text", "tok_start", "tok_len", "visits", "q",
                "critic_score", "terminal", "reward"):
        assert col in ds.column_names
    assert sum(ds["terminal"]) == m["terminals"] == m["trajectories"]
    assert m["problems"] == 3 and m["forward_tokens"] > 0 and 0 <= m["solved_any"] <= 1
    roots = [r for r in ds if r["node"] == 0]
    assert len(roots) == 3 and all(r["parent"] == -1 and r["step_text"].startswith("Q: ") for r in roots)
    if algorithm == "tree_grpo":
        assert m["terminals"] == 3 * 2 * (1 * 1 + 1)  # problems * M * (L*N + 1)


def test_search_resumes_after_a_kill_and_ignores_half_written_files(setup):
    first, p1 = _run(setup)
    full_tokens = p1.counters.forward_tokens
    trees = setup / "trees"
    (trees / "part-00002.parquet").unlink()  # as if killed before the last shard landed
    (trees / ".tmp-part-00002.parquet-x").write_bytes(b"PAR1 half")  # and a half-written temp file
    again, p2 = _run(setup)
    assert 0 < p2.counters.forward_tokens < full_tokens  # only the missing shard was searched
    assert {k: v for k, v in again.items() if k != "wall_seconds"} == \
        {k: v for k, v in first.items() if k != "wall_seconds"}
    assert not list(trees.glob(".tmp-*"))


def test_changed_config_clears_old_shards(setup):
    _run(setup)
    m, _ = _run(setup, **{"search.n_problems": 2})
    assert m["problems"] == 2 and len(list((setup / "trees").glob("part-*.parquet"))) == 2


def test_changed_code_is_not_resumed_from(setup, monkeypatch):
    _, first = _run(setup)
    _, same = _run(setup)
    assert same.counters.forward_tokens == 0  # same code and config: everything resumed
    monkeypatch.setattr(search, "code_digest", lambda: "other code")
    _, other = _run(setup)
    assert other.counters.forward_tokens == first.counters.forward_tokens  # searched again from scratch


class _Details(HTMLParser):
    def __init__(self):
        super().__init__()
        self.nodes, self.best = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "details":
            self.nodes.append(int(a["data-node"]))
            if "best" in a.get("class", "").split():
                self.best.append(int(a["data-node"]))


def test_show_tree_html(setup):
    _run(setup)
    out = show_tree.main(["--trees", str(setup / "trees"), "--problem", "train-000001",
                          "--out", str(setup / "t.html")])
    page = out.read_text()
    parser = _Details()
    parser.feed(page)
    rows = show_tree.load_tree(setup / "trees", "train-000001")
    assert sorted(parser.nodes) == [r["node"] for r in rows]
    assert parser.best[0] == 0 and set(parser.best) == show_tree.best_path(rows)
    assert "<script" not in page and "train-000001" in page
    with pytest.raises(ValueError, match="nope"):
        show_tree.load_tree(setup / "trees", "nope")


def test_evaluate_can_decode_with_search(setup):
    from arbor.stages import evaluate

    write_jsonl(setup / "eval.jsonl", [{"id": "e0", "question": "1 +1", "answer": "2"},
                                       {"id": "e1", "question": "2 +2", "answer": "4"}])
    argv = ["--params", "", "--tracking.enabled", "false", "--evaluate.k", "2", "--evaluate.max_new_tokens", "6",
            "--evaluate.search", "true", "--evaluate.search_simulations", "4", "--search.eta.step_tokens", "4",
            "--search.eta.max_depth", "2", "--policy", str(setup / "policy"), "--eval", str(setup / "eval.jsonl"),
            "--out", str(setup / "m.json")]
    m = evaluate.main(argv)
    saved = json.loads((setup / "m.json").read_text())
    assert saved["search_simulations"] == 4 and 0 <= saved["search_pass1"] <= 1
    assert saved["search_forward_tokens"] > 0 and m["greedy_pass1"] == saved["greedy_pass1"]
