"""Stage `search` end to end on a tiny random model: parquet trees, per-problem resume, damage detection,
--out safety, fingerprint; `show-tree` HTML."""

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arbor.lm.hf import HFPolicy
from arbor.pipeline import manifest
from arbor.pipeline.config import ArborInputError, load_config
from arbor.pipeline.io import write_jsonl
from arbor.pipeline.manifest import MANIFEST, CorruptOutputError, verified_files
from arbor.stages import search, show_tree
from arbor.tasks import make_splits

from .conftest import tiny_model

FAST = {"search.n_problems": 3, "search.shard_size": 1, "search.eta.num_simulations": 6,
        "search.eta.step_tokens": 4, "search.eta.max_depth": 3, "search.eta.batch_leaves": 2,
        "search.chains": 3, "search.grpo_m": 2, "search.grpo_l": 1, "search.grpo_n": 1, "tracking.enabled": False,
        "search.lockstep": 2}
IDS = ["train-000000", "train-000001", "train-000002"]


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
    files = [str(p) for p in verified_files(setup / "trees")]
    assert [os.path.basename(f) for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    ds = datasets.load_dataset("parquet", data_files=str(setup / "trees" / "*.parquet"), split="train")
    assert len(ds) == m["nodes"]
    for col in ("problem_id", "node", "parent", "depth", "step_text", "tok_start", "tok_len", "visits", "q",
                "critic_score", "terminal", "reward"):
        assert col in ds.column_names
    assert sum(ds["terminal"]) == m["terminals"] == m["trajectories"]
    assert m["problems"] == 3 and m["forward_tokens"] > 0 and 0 <= m["solved_any"] <= 1
    assert 0 < m["model_seconds"] < m["wall_seconds"] and 0 < m["bookkeeping_fraction"] < 1
    roots = [r for r in ds if r["node"] == 0]
    assert len(roots) == 3 and all(r["parent"] == -1 and r["step_text"].startswith("Q: ") for r in roots)
    if algorithm == "tree_grpo":
        assert m["terminals"] == 3 * 2 * (1 * 1 + 1)  # problems * M * (L*N + 1)
    assert sorted(p.name for p in (setup / "trees").iterdir() if p.name.startswith(("_", "."))) == \
        ["_fingerprint.json", "_manifest.json"]  # the per-problem work files are gone


class Killed(BaseException):
    """Stands in for SIGKILL in-process (tests/test_faults.py kills real processes)."""


@pytest.fixture()
def searched(monkeypatch):
    """Problem ids searched by `search_problem`; `kill_after[0] = k` raises Killed when the k+1-th one starts."""
    calls, kill_after = [], [None]
    real = search.search_problem

    def counting(policy, task, problem, *a, **kw):
        if kill_after[0] is not None and len(calls) >= kill_after[0]:
            raise Killed
        calls.append(problem.id)
        return real(policy, task, problem, *a, **kw)

    monkeypatch.setattr(search, "search_problem", counting)
    return calls, kill_after


def _trees(tmp):
    return pa.concat_tables([pq.read_table(f) for f in verified_files(tmp / "trees")]).to_pydict()


TIMING = ("wall_seconds", "model_seconds", "bookkeeping_fraction")


def _same(a, b):
    return {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


@pytest.mark.parametrize("lockstep", [1, 2])
@pytest.mark.parametrize("kill_after", [1, 2])
def test_a_kill_loses_at_most_the_lockstep_group_in_flight(setup, searched, kill_after, lockstep):
    """Killed while problem `kill_after` starts: the re-run searches again from the start of that problem's
    lockstep group (the problem alone at lockstep 1; both problems of [0, 1] at lockstep 2 when it is problem
    1) and ends with the uninterrupted run's trees."""
    calls, kill = searched
    cfg = {"search.shard_size": 2, "search.lockstep": lockstep}
    reference, _ = _run(setup, **cfg)
    ref_trees = _trees(setup)
    shutil.rmtree(setup / "trees")
    calls.clear()
    kill[0] = kill_after
    with pytest.raises(Killed):
        _run(setup, **cfg)
    assert not (setup / "trees" / MANIFEST).exists()  # an unfinished output is never marked complete
    with pytest.raises(CorruptOutputError, match="_manifest.json: missing"):
        verified_files(setup / "trees")
    done = list(calls)
    kill[0] = None
    again, _ = _run(setup, **cfg)
    assert calls[len(done):] == IDS[kill_after // lockstep * lockstep:]  # only the rest
    assert _same(again, reference) and _trees(setup) == ref_trees


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_redone_never_read(setup, searched, damage):
    calls, _ = searched
    first, _ = _run(setup, **{"search.shard_size": 2})
    ref_trees = _trees(setup)
    part = setup / "trees" / "part-00001.parquet"
    if damage == "truncate":
        os.truncate(part, 100)
    else:
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))
    with pytest.raises(CorruptOutputError, match="part-00001.parquet"):
        verified_files(setup / "trees")  # what a later stage (critics, prefs) calls
    calls.clear()
    again, _ = _run(setup, **{"search.shard_size": 2})
    assert calls == ["train-000002"]  # the damaged shard's problem, nothing else
    assert _same(again, first) and _trees(setup) == ref_trees


def test_damaged_work_file_is_redone(setup, searched):
    calls, kill = searched
    kill[0] = 2
    with pytest.raises(Killed):
        _run(setup, **{"search.shard_size": 3})
    work = sorted((setup / "trees" / "_work").glob("*.parquet"))
    assert [w.name for w in work] == ["i-000000.parquet", "i-000001.parquet"]
    os.truncate(work[1], 50)
    (setup / "trees" / "_work" / "i-000002.parquet").write_bytes(b"PAR1 half")  # killed before its record
    calls.clear()
    kill[0] = None
    _run(setup, **{"search.shard_size": 3})
    assert calls == IDS  # problem 1's lockstep group is [0, 1]: searched whole, only 1 committed again
    assert len(_trees(setup)["node"]) > 0 and not (setup / "trees" / "_work").exists()


def test_out_dir_that_is_not_a_trees_dir_is_refused_untouched(setup):
    models = setup / "models"
    (models / "iter_0").mkdir(parents=True)
    (models / "iter_0" / "model.safetensors").write_bytes(b"weights")
    (models / "notes.txt").write_text("mine")
    cfg = load_config(None, FAST)
    with pytest.raises(ArborInputError, match="not a search trees directory .*iter_0, notes.txt"):
        search.run(cfg, policy_dir=setup / "policy", train_file=setup / "train.jsonl", out_dir=models)
    assert (models / "iter_0" / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in models.iterdir()) == ["iter_0", "notes.txt"]
    empty = setup / "empty"
    empty.mkdir()
    m, _ = _run(setup)
    assert search.run(cfg, policy_dir=setup / "policy", train_file=setup / "train.jsonl",
                      out_dir=empty)["problems"] == m["problems"]


def test_changed_config_clears_only_the_stage_files(setup):
    _run(setup)
    live = setup / "trees" / f".tmp-part-00000.parquet-{os.getppid()}-0badc0de"  # a concurrent writer's temp
    live.write_text("in progress")
    m, policy = _run(setup, **{"search.eta.c": 1.0})
    assert policy.counters.forward_tokens > 0  # another config: searched again
    assert m["problems"] == 3 and len(list((setup / "trees").glob("part-*.parquet"))) == 3
    assert live.exists() and verified_files(setup / "trees")


def _rows(trees):
    return [pq.read_table(f).to_pylist() for f in verified_files(trees)]


@pytest.mark.parametrize(("before", "after"), [(3, 5), (5, 3)])
def test_changing_n_problems_keeps_the_problems_already_searched(setup, before, after):
    """search.n_problems up: finished problems are kept (also those of a shard merged at the smaller count) and
    only the new ones are searched; down: the extra problems leave the output. Both equal a fresh run. (One
    problem at a time: in lockstep, the last group's trees depend on which problems share it.)"""
    fresh = setup / "fresh"
    fresh.mkdir()
    for name in ("policy", "train.jsonl"):
        os.symlink(setup / name, fresh / name)
    cfg = {"search.shard_size": 2, "search.lockstep": 1}
    want, _ = _run(fresh, **cfg, **{"search.n_problems": after})
    _, first = _run(setup, **cfg, **{"search.n_problems": before})
    got, second = _run(setup, **cfg, **{"search.n_problems": after})
    assert _same(got, want) and _rows(setup / "trees") == _rows(fresh / "trees")
    if after > before:
        assert 0 < second.counters.forward_tokens < first.counters.forward_tokens  # only problems 4 and 5
    else:
        assert second.counters.forward_tokens == 0


def test_changed_code_is_not_resumed_from(setup, monkeypatch):
    _, first = _run(setup)
    _, same = _run(setup)
    assert same.counters.forward_tokens == 0  # same code and config: everything resumed
    monkeypatch.setattr(manifest, "code_digest", lambda: "other code")
    _, other = _run(setup)
    assert other.counters.forward_tokens == first.counters.forward_tokens  # searched again from scratch


def test_fingerprint_does_not_read_the_model_weights(setup, monkeypatch):
    cfg = load_config(None, FAST)
    monkeypatch.setattr(manifest, "SMALL_FILE", 64)  # every weight file counts as large
    real_read = Path.read_bytes

    def guarded_read(self):
        assert self.suffix != ".safetensors", f"{self} read in full"
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", guarded_read)
    monkeypatch.setattr(manifest, "sha256_file", lambda p: pytest.fail(f"{p} hashed in full")
                        if str(p).endswith(".safetensors") else "x")
    large = search._fingerprint(cfg, setup / "policy", setup / "train.jsonl", 1)
    assert large == search._fingerprint(cfg, setup / "policy", setup / "train.jsonl", 1)
    os.utime(setup / "policy" / "model.safetensors", ns=(1, 1))  # rewritten (same size, same header)
    assert search._fingerprint(cfg, setup / "policy", setup / "train.jsonl", 1) != large


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


def test_show_tree_refuses_a_damaged_shard(setup):
    """A truncated shard is reported by name, never rendered (show-tree reads verified files only)."""
    from arbor.pipeline.manifest import CorruptOutputError

    _run(setup)
    shard = sorted((setup / "trees").glob("*.parquet"))[0]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CorruptOutputError, match=shard.name):
        show_tree.load_tree(setup / "trees", "train-000001")


def test_evaluate_can_decode_with_search(setup):
    from arbor.stages import evaluate

    write_jsonl(setup / "eval.jsonl", [{"id": "e0", "question": "1 +1", "answer": "2"},
                                       {"id": "e1", "question": "2 +2", "answer": "4"}])
    argv = ["--params", "", "--tracking.enabled", "false", "--evaluate.k", "2", "--evaluate.max_new_tokens", "6",
            "--evaluate.search", "true", "--evaluate.search_simulations", "4", "--search.eta.step_tokens", "4",
            "--search.eta.max_depth", "2", "--policy", str(setup / "policy"), "--eval", str(setup / "eval.jsonl"),
            "--metrics", str(setup / "m.json")]
    m = evaluate.main(argv)
    saved = json.loads((setup / "m.json").read_text())
    assert saved["search_simulations"] == 4 and 0 <= saved["search_pass1"] <= 1
    assert saved["search_forward_tokens"] > 0 and m["greedy_pass1"] == saved["greedy_pass1"]
