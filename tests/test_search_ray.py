"""Stage `search` on a local 2-worker Ray (`search.executor: ray`) writes the same trees as the local executor,
and resumes an output the local executor left unfinished; a lost actor's item is redone (issue #14)."""

import os
import shutil
import sys
from collections.abc import Callable
from functools import partial

import pyarrow.parquet as pq
import pytest

from arbor.pipeline.config import ArborInputError, load_config
from arbor.pipeline.io import write_jsonl
from arbor.pipeline.manifest import MANIFEST, verified_files
from arbor.stages import search
from arbor.tasks import make_splits

from .conftest import tiny_model

pytest.importorskip("ray")

FAST = {"search.n_problems": 4, "search.shard_size": 2, "search.eta.num_simulations": 6,
        "search.eta.step_tokens": 4, "search.eta.max_depth": 3, "search.eta.batch_leaves": 2,
        "tracking.enabled": False}
RAY = {"search.executor": "ray", "search.ray_workers": 2, "search.ray_cpus_per_worker": 1}


def _rows(directory):
    return [pq.read_table(f).to_pylist() for f in verified_files(directory)]


# `one_thread` (conftest): actors run torch on `ray_cpus_per_worker` = 1 thread; the local run must too for
# bitwise-equal priors (a different thread count sums in another order: priors differ in the 7th digit).


@pytest.fixture()
def local_ray(monkeypatch):
    """One local Ray (2 CPUs) for the test's runs; the executor uses a Ray that is already up and leaves it up."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # never a cluster the environment points at
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_ray_search_writes_the_local_trees_and_resumes_a_local_run(char_tok, tmp_path, one_thread, local_ray):
    tiny_model(char_tok, seed=4).save_pretrained(tmp_path / "policy")
    char_tok.save_pretrained(tmp_path / "policy")
    train, _ = make_splits(load_config(None, FAST).task, 5, 1, seed=0)
    write_jsonl(tmp_path / "train.jsonl", [p.to_dict() for p in train])

    def run(out, **over):
        cfg = load_config(None, {**FAST, **over})
        return search.run(cfg, policy_dir=tmp_path / "policy", train_file=tmp_path / "train.jsonl",
                          out_dir=tmp_path / out)

    local = run("local")
    shutil.copytree(tmp_path / "local", tmp_path / "resumed")
    for name in ("part-00001.parquet", "part-00001.stats.json", MANIFEST):  # a run that lost its second shard
        (tmp_path / "resumed" / name).unlink()
    kept = (tmp_path / "resumed" / "part-00000.parquet").stat().st_mtime_ns
    remote = run("ray", **RAY)
    resumed = run("resumed", **RAY)  # the executor is not part of the fingerprint: the local shard is kept
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "resumed") == _rows(tmp_path / "local")
    assert len(_rows(tmp_path / "ray")) == 2 and remote["problems"] == 4 and remote["nodes"] > 8
    assert (tmp_path / "resumed" / "part-00000.parquet").stat().st_mtime_ns == kept
    for key in ("nodes", "terminals", "forward_tokens", "unique_tokens", "solved_any"):
        assert remote[key] == resumed[key] == local[key], key


def test_unknown_executor_and_missing_ray_are_one_clear_error(monkeypatch):
    import importlib.util

    from arbor.pipeline.executors import Executor

    with pytest.raises(ArborInputError, match=r"search.executor='dask': expected one of local, ray"):
        Executor("dask")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ArborInputError, match=r"search.executor=ray needs the ray package"):
        Executor("ray")


def _dies_once_on_item_1(marker: str) -> Callable[[int], tuple[int, int]]:
    """A worker whose process dies the first time it meets item 1 (as a lost node would)."""

    def work(i: int) -> tuple[int, int]:
        if i == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return i, os.getpid()

    return work


@pytest.mark.slow
def test_a_lost_ray_actor_is_restarted_and_its_item_redone(tmp_path, local_ray):
    import ray

    from arbor.pipeline.executors import Executor

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    got = dict(Executor("ray", workers=1).map([0, 1, 2], partial(_dies_once_on_item_1, str(tmp_path / "died"))))
    assert sorted(got) == [0, 1, 2] and (tmp_path / "died").exists()
    assert got[0][1] != got[2][1]  # item 2 ran in the restarted actor
