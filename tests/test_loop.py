"""The loop's shape in params.yaml (`loop.iterations`), `arbor iterate --more N` and `arbor status`."""

import json
import os
import subprocess
import sys

import pytest

from arbor.pipeline.config import ConfigError, load_config
from arbor.pipeline.lock import ProjectLock
from arbor.pipeline.loop import append_iterations, iteration_items
from arbor.stages import iterate, status

PARAMS = """seed: 7   # root seed
loop:   # the loop
  iterations:   # one per iteration
    - {it: 1, prev: 0}
    - {it: 2, prev: 1}
tracking:
  enabled: false
"""


def test_items_name_their_predecessor():
    assert iteration_items(3) == [{"it": 1, "prev": 0}, {"it": 2, "prev": 1}, {"it": 3, "prev": 2}]


@pytest.mark.parametrize(("yaml_items", "fragment"), [
    ("[{it: 1, prev: 0}, {it: 3, prev: 2}]", "loop.iterations[1]: expected {'it': 2, 'prev': 1}"),
    ("[{it: 1, prev: 1}]", "loop.iterations[0]: expected {'it': 1, 'prev': 0}"),
    ("[1, 2]", "expected a list of {it: k, prev: k-1} items"),
    ("3", "expected a list, got 3"),
    ("[]", "expected at least one iteration"),
])
def test_bad_iteration_lists_are_refused_by_key(tmp_path, yaml_items, fragment):
    p = tmp_path / "params.yaml"
    p.write_text(f"loop:\n  iterations: {yaml_items}\n")
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("{", r"\{")):
        load_config(p)


def test_append_keeps_comments_and_checks_the_result():
    text, n = append_iterations(PARAMS, 2)
    assert n == 4
    assert "# root seed" in text and "# one per iteration" in text and text.endswith("  enabled: false\n")
    assert "    - {it: 3, prev: 2}\n    - {it: 4, prev: 3}\ntracking:" in text
    empty, n = append_iterations("loop:\n  iterations: []   # none yet\n", 1)
    assert n == 1 and "- {it: 1, prev: 0}" in empty
    with pytest.raises(ConfigError, match="no top-level `loop:` section"):
        append_iterations("seed: 1\n", 1)
    with pytest.raises(ConfigError, match="one `- {it: k, prev: k-1}` per line"):
        append_iterations("loop:\n  iterations: [{it: 1, prev: 0}]\n", 1)


def test_iterate_appends_under_the_lock_and_a_second_run_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS)
    iterate.main(["--more", "1", "--no-run"])
    assert load_config("params.yaml").loop.count == 3
    assert "loop.iterations 2 -> 3" in capsys.readouterr().err
    held = ProjectLock(tmp_path, "arbor iterate --more 1").acquire()
    try:  # the holder is another process in real life; a child process sees the lock as taken
        r = subprocess.run([sys.executable, "-m", "arbor.cli", "iterate", "--more", "1", "--no-run"],
                           cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(_repo())})
    finally:
        held.release()
    assert r.returncode == 2 and "is held by pid" in r.stderr and "arbor iterate --more 1" in r.stderr
    assert load_config("params.yaml").loop.count == 3  # the refused run changed nothing


def test_iterate_refuses_a_params_file_it_cannot_extend(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("loop:\n  iterations: [{it: 1, prev: 0}]\n")
    before = (tmp_path / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match="params.yaml: loop.iterations must be written one"):
        iterate.main(["--more", "1", "--no-run"])
    assert (tmp_path / "params.yaml").read_bytes() == before


def test_status_reports_iterations_lock_holder_and_trend(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS)
    m = tmp_path / "metrics"
    m.mkdir()
    (m / "iter_0.json").write_text(json.dumps({"greedy_pass1": 0.5, "pass_at_k": 0.8}))
    (m / "decode_0.json").write_text(json.dumps({"search_pass1": 0.55}))
    (m / "iter_1.json").write_text(json.dumps({"greedy_pass1": 0.625, "pass_at_k": 0.85}))
    (m / "iter_2.json").write_text("{trunc")
    text = status.main([])
    assert "iterations configured: 0..2" in text and "last finished iteration: 1" in text
    assert "running now: nothing" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("iter "))
    assert header.split() == ["iter", "greedy_pass1", "pass_at_k", "search_pass1"]
    assert lines[lines.index(header) + 1].split() == ["0", "0.500", "0.800", "0.550"]
    assert lines[lines.index(header) + 2].split() == ["1", "0.625", "0.850"]
    assert "2  unreadable (JSONDecodeError)" in text
    held = ProjectLock(tmp_path, "arbor run").acquire()
    try:
        r = subprocess.run([sys.executable, "-m", "arbor.cli", "status"], cwd=tmp_path, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(_repo())})
    finally:
        held.release()
    assert f"running now: pid {os.getpid()}: arbor run" in r.stdout


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]
