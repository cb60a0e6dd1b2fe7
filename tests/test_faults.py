"""Fault injection: every stage, run as its own process, is SIGKILLed at seeded random moments and re-run.

For each stage: the final outputs equal an uninterrupted run's (timings aside); after every kill, whatever
output exists is complete and intact (no partial output is ever accepted); the re-run resumes from exactly what
was committed before the kill (search: every finished problem; bootstrap: the last checkpoint). Damaged files
(a truncated tree shard, a truncated or altered `model.safetensors`, a truncated metrics file) are detected and
redone or reported, never read as valid.

Kill moments are seeded random levels of progress plus random delays, timed on the uninterrupted reference
run (see `_kill_and_rerun`); `KILLS` per stage here, more in the slow variant.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from arbor.pipeline.manifest import CorruptOutputError, check_record, verified_files, verify

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "tracking": {"enabled": False},
    "prepare": {"n_train": 64, "n_eval": 6},
    "task": {"max_ops": 3},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_positions": 96},
    "bootstrap": {"max_steps": 24, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 4},
    "evaluate": {"k": 2, "max_new_tokens": 24, "batch_size": 16, "search": False},
    "search": {"n_problems": 6, "shard_size": 4, "eta": {"num_simulations": 4, "step_tokens": 6, "max_depth": 3}},
}
N_PROBLEMS, SHARD, MAX_STEPS, EVERY = 6, 4, 24, 4
ORDER = ("prepare", "bootstrap", "search", "evaluate")
INPUTS = {"prepare": (), "bootstrap": ("data",), "search": ("data", "models"), "evaluate": ("data", "models")}
MARKERS = {"bootstrap": "checkpoints/bootstrap/_fingerprint.json", "search": "trees/iter_0/_fingerprint.json"}
POLICY, TREES = "models/iter_0/policy", "trees/iter_0"
KILLS = 2


@dataclass
class Launch:
    """One stage process: exit code (None when killed), stderr, and when (seconds after its start) it reached
    each level of progress: levels[0] = its marker (the start, for stages without one), levels[j] = j units
    committed (search: problems; bootstrap: checkpoints)."""

    rc: int | None
    stderr: str
    levels: list[float]
    t_total: float


def _params(proj: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            merge(dst[k], v) if isinstance(v, dict) else dst.__setitem__(k, v)

    merge(params, TINY)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))


def _progress(proj: Path, stage: str) -> int:
    """Units committed so far, from file names only (cheap enough to poll; racing a rename just reads low)."""
    if stage == "search":  # problems in merged shards, plus committed problems of the other shards
        trees = proj / TREES
        merged = {int(p.name[5:10]) for p in trees.glob("part-*.stats.json")}
        loose = {int(p.name[2:8]) for p in trees.glob("_work/i-*.json")}
        return sum(min(SHARD, N_PROBLEMS - si * SHARD) for si in merged) + \
            len({i for i in loose if i // SHARD not in merged})
    if stage == "bootstrap":
        return max((int(p.name[5:13]) // EVERY for p in (proj / "checkpoints/bootstrap").glob("step-*.json")),
                   default=0)
    return 0


def _launch(proj: Path, stage: str, kill: tuple[int, float] | None = None) -> Launch:
    """Run `python -m arbor.stages.<stage>` with the source snapshot.

    `kill = (level, delay)`: SIGKILL it `delay` seconds after it reaches progress `level` (0 = its marker).
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.environ["ARBOR_FAULTS_SRC"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    err = proj / f".stderr-{stage}"
    marker = proj / MARKERS[stage] if stage in MARKERS else None
    t0 = time.perf_counter()
    levels: list[float] = [] if marker else [0.0]
    with err.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", f"arbor.stages.{stage}", "--params", "params.yaml"],
                                cwd=proj, env=env, stdout=subprocess.DEVNULL, stderr=f)
        while proc.poll() is None:
            now = time.perf_counter() - t0
            if not levels and marker.exists():
                levels.append(now)
            if levels:
                levels += [now] * max(0, _progress(proj, stage) + 1 - len(levels))
            if kill is not None and len(levels) > kill[0] and now - levels[kill[0]] >= kill[1]:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return Launch(None, err.read_text(), levels, now)
            if now > 300:
                proc.kill()
                pytest.fail(f"{stage} did not finish in 300 s")
            time.sleep(0.005)
    return Launch(proc.returncode, err.read_text(), levels, time.perf_counter() - t0)


def _ok(launch: Launch, stage: str) -> str:
    assert launch.rc == 0, f"{stage} failed ({launch.rc}):\n{launch.stderr[-3000:]}"
    return launch.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Iterator[tuple[Path, dict[str, Launch]]]:
    """The uninterrupted run of all four stages, with each stage's timing.

    The stages run from a snapshot of the arbor source, so that the resume fingerprints (which include the
    source) stay fixed while the checkout is being edited.
    """
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "arbor", src / "arbor")  # with __pycache__ and mtimes: numba's cache stays valid
    mp = pytest.MonkeyPatch()
    mp.setenv("ARBOR_FAULTS_SRC", str(src))
    proj = tmp_path_factory.mktemp("reference")
    _params(proj)
    runs = {}
    for stage in ORDER:
        runs[stage] = _launch(proj, stage)
        _ok(runs[stage], stage)
    yield proj, runs
    mp.undo()


def _copy_inputs(ref: Path, proj: Path, stage: str) -> None:
    _params(proj)
    for d in INPUTS[stage]:
        shutil.copytree(ref / d, proj / d)


def _untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if "seconds" not in k and k != "bookkeeping_fraction"}


def _trees(proj: Path) -> dict:
    return pa.concat_tables([pq.read_table(f) for f in verified_files(proj / TREES)]).to_pydict()


# ---------------------------------------------------------------------------------------------------------------
# per stage: what a killed run may leave (checked), what it committed (returned), what the re-run resumes

def _state_prepare(proj: Path, ref: Path) -> None:
    for name in ("data/train.jsonl", "data/eval.jsonl"):  # absent or complete, never partial
        assert not (proj / name).exists() or (proj / name).read_bytes() == (ref / name).read_bytes()


def _state_bootstrap(proj: Path, ref: Path) -> int:
    if (proj / POLICY).exists():
        verify(proj / POLICY)
        assert (proj / POLICY / "model.safetensors").read_bytes() == (ref / POLICY / "model.safetensors").read_bytes()
    steps = []
    for record in sorted((proj / "checkpoints/bootstrap").glob("step-*.json")):  # a record means a whole file
        rec = json.loads(record.read_text())
        assert check_record(record.with_suffix(".ckpt"), rec["file"]) is None and rec["step"] % EVERY == 0
        steps.append(rec["step"])
    return max(steps, default=0)


def _state_search(proj: Path, ref: Path) -> int:
    trees = proj / TREES
    if (trees / "_manifest.json").exists():
        assert _trees(proj) == _trees(ref)
    merged = set()
    for side in trees.glob("part-*.stats.json"):  # every record present matches its file
        rec = json.loads(side.read_text())
        assert check_record(side.with_name(side.name.replace(".stats.json", ".parquet")), rec["file"]) is None
        si = int(side.name[5:10])
        merged |= set(range(si * SHARD, si * SHARD + len(rec["stats"])))
    loose = set()
    for record in (trees / "_work").glob("i-*.json"):
        assert check_record(record.with_suffix(".parquet"), json.loads(record.read_text())["file"]) is None
        loose.add(int(record.stem[2:]))
    return len(merged | loose)


def _state_evaluate(proj: Path, ref: Path) -> None:
    out = proj / "metrics/iter_0.json"
    assert not out.exists() or _untimed(json.loads(out.read_text())) == \
        _untimed(json.loads((ref / "metrics/iter_0.json").read_text()))


STATE = {"prepare": _state_prepare, "bootstrap": _state_bootstrap, "search": _state_search,
         "evaluate": _state_evaluate}


def _check_resume(stage: str, committed: int | None, stderr: str) -> None:
    """The re-run resumed from exactly what the kill left committed (when it got far enough to say)."""
    if stage == "search" and "problems already done" in stderr:
        assert f"search: {committed} of {N_PROBLEMS} problems already done" in stderr
    if stage == "bootstrap" and "arbor.bootstrap" in stderr:
        resumed = re.search(r"resuming from \S+ \(step (\d+) of", stderr)
        assert (int(resumed[1]) if resumed else 0) == committed


def _check_final(stage: str, proj: Path, ref: Path) -> None:
    """The outputs equal the uninterrupted run's."""
    if stage == "prepare":
        _state_prepare(proj, ref)
        assert (proj / "data/train.jsonl").exists() and (proj / "data/eval.jsonl").exists()
    elif stage == "bootstrap":
        assert verify(proj / POLICY)["files"] == verify(ref / POLICY)["files"]  # every file's sha256
        assert not list((proj / "checkpoints/bootstrap").glob("step-*"))
    elif stage == "search":
        assert _trees(proj) == _trees(ref)
        assert not (proj / TREES / "_work").exists()
    metrics = {"bootstrap": "metrics/bootstrap.json", "search": "metrics/search_0.json",
               "evaluate": "metrics/iter_0.json"}.get(stage)
    if metrics:
        assert _untimed(json.loads((proj / metrics).read_text())) == \
            _untimed(json.loads((ref / metrics).read_text()))


def _kill_and_rerun(reference, tmp_path: Path, stage: str, kills: int) -> list[tuple[int, float]]:
    """Kill `stage` at `kills` seeded moments, re-running it each time; then run it to the end and compare.

    A moment is a random level of progress (search: 0..5 problems committed, bootstrap: 0..5 checkpoints; 0 =
    the stage's marker or start) plus a random delay within the time that level took in the reference run, so
    kills land in start-up, in the middle of a unit of work and during writes alike. After each kill, all that
    was seen committed before it must still be intact. A run that finishes first is not counted, and a completed
    search is started over. Returns the (level, delay) of the runs that were killed (at least one).
    """
    ref, runs = reference
    proj = tmp_path / "proj"
    proj.mkdir()
    _copy_inputs(ref, proj, stage)
    levels = [*runs[stage].levels, runs[stage].t_total]
    rng = random.Random(f"arbor-faults-{stage}")
    moments: list[tuple[int, float]] = []
    committed = 0 if stage in ("bootstrap", "search") else None
    for _ in range(kills + 3):
        if len(moments) == kills:
            break
        level = rng.randrange(len(levels) - 1)
        delay = rng.uniform(0.0, max(0.01, levels[level + 1] - levels[level]))
        launch = _launch(proj, stage, kill=(level, delay))
        _check_resume(stage, committed, launch.stderr)
        if launch.rc is None:
            moments.append((level, round(delay, 2)))
            reached = len(launch.levels) - 1
        else:  # finished before the kill moment
            _ok(launch, stage)
            reached = 0
        committed = STATE[stage](proj, ref)
        if stage == "search" or (stage == "bootstrap" and not (proj / POLICY).exists()):
            assert committed >= reached * (1 if stage == "search" else EVERY)  # nothing seen done was lost
        if stage == "search" and (proj / TREES / "_manifest.json").exists():  # complete (and checked): start over
            shutil.rmtree(proj / TREES)
            committed = 0
    final = _ok(_launch(proj, stage), stage)
    _check_resume(stage, committed, final)
    _check_final(stage, proj, ref)
    assert moments, f"{stage}: every run finished before its kill moment"
    return moments


@pytest.mark.parametrize("stage", ORDER)
def test_killed_stage_reruns_to_the_same_outputs(reference, tmp_path, stage):
    _kill_and_rerun(reference, tmp_path, stage, KILLS)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ORDER)
def test_killed_stage_reruns_to_the_same_outputs_many_kills(reference, tmp_path, stage):
    _kill_and_rerun(reference, tmp_path, stage, 8)


# ---------------------------------------------------------------------------------------------------------------
# damaged files

def test_truncated_tree_shard_is_redone(reference, tmp_path):
    ref, _ = reference
    proj = tmp_path / "proj"
    proj.mkdir()
    _copy_inputs(ref, proj, "search")
    shutil.copytree(ref / TREES, proj / TREES)
    part = proj / TREES / "part-00001.parquet"
    os.truncate(part, part.stat().st_size // 2)
    with pytest.raises(CorruptOutputError, match="part-00001.parquet: size"):
        verified_files(proj / TREES)  # what critics/prefs call before reading trees
    err = _ok(_launch(proj, "search"), "search")
    assert "part-00001.parquet: size" in err and f"search: {SHARD} of {N_PROBLEMS} problems already done" in err
    _check_final("search", proj, ref)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_model_is_reported(reference, tmp_path, damage):
    ref, _ = reference
    proj = tmp_path / "proj"
    proj.mkdir()
    _copy_inputs(ref, proj, "search")
    weights = proj / POLICY / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    else:  # same size, one weight byte altered: only the manifest's sha256 can tell
        data = bytearray(weights.read_bytes())
        data[-7] ^= 0x55
        weights.write_bytes(bytes(data))
    for stage in ("search", "evaluate") if damage == "truncate" else ("search",):  # both load via check_model_path
        launch = _launch(proj, stage)
        assert launch.rc == 2 and "model.safetensors" in launch.stderr, launch.stderr[-2000:]
    assert not (proj / "metrics").exists() and not list((proj / TREES).glob("*.parquet"))
    with pytest.raises(CorruptOutputError, match="model.safetensors"):
        verify(proj / POLICY)  # and DVC sees the changed out: `dvc repro` re-runs bootstrap, which rewrites it


def test_truncated_metrics_file_is_reported_then_redone(reference, tmp_path):
    from arbor.pipeline.io import read_json

    ref, _ = reference
    proj = tmp_path / "proj"
    proj.mkdir()
    _copy_inputs(ref, proj, "evaluate")
    shutil.copytree(ref / "metrics", proj / "metrics")
    metrics = proj / "metrics/iter_0.json"
    os.truncate(metrics, metrics.stat().st_size // 2)
    with pytest.raises(ValueError, match="iter_0.json: invalid JSON"):
        read_json(metrics)
    _ok(_launch(proj, "evaluate"), "evaluate")
    _check_final("evaluate", proj, ref)
