"""End to end: `dvc repro` of prepare -> bootstrap -> evaluate on a tiny config in a temp dir, with MLflow."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "prepare": {"n_train": 64, "n_eval": 6},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_positions": 96},
    "bootstrap": {"max_steps": 4, "batch_size": 8, "warmup_steps": 1},
    "evaluate": {"k": 2, "max_new_tokens": 24, "batch_size": 16, "search_simulations": 2},
    "task": {"max_ops": 3},
    "search": {"n_problems": 3, "shard_size": 2},
}


def _project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    os.symlink(ROOT / "arbor", proj / "arbor")  # the stages' source deps
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["search"]["eta"].update({"num_simulations": 4, "step_tokens": 6, "max_depth": 3})
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    return proj


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    bindir = str(Path(sys.executable).parent)
    full_env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], **env}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_dvc_repro_smoke(tmp_path):
    proj = _project(tmp_path)
    dvc = str(Path(sys.executable).parent / "dvc")
    _run([dvc, "init", "--no-scm", "-q"], proj)
    _run([dvc, "repro"], proj, ARBOR_PIPELINE_ID="smoke-1")
    metrics = json.loads((proj / "metrics/iter_0.json").read_text())
    for key in ("greedy_pass1", "pass_at_k", "maj_at_k", "k", "forward_tokens", "eval_problems", "search_pass1"):
        assert key in metrics
    assert metrics["eval_problems"] == 6 and metrics["k"] == 2 and metrics["forward_tokens"] > 0
    assert (proj / "models/iter_0/policy/model.safetensors").exists()
    assert len((proj / "data/train.jsonl").read_text().splitlines()) == 64

    again = _run([dvc, "repro"], proj)  # nothing changed: no stage runs
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout

    shown = _run([dvc, "metrics", "show", "--json"], proj).stdout
    assert "greedy_pass1" in shown

    # MLflow: one parent run for the invocation, one nested run per stage, with params and metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("arbor")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.arbor_pipeline_id = 'smoke-1'")
    by_stage = {r.data.tags.get("arbor_stage", "parent"): r for r in runs}
    stages = ("prepare", "bootstrap", "evaluate", "search")
    assert set(by_stage) == {"parent", *stages}
    parent_id = by_stage["parent"].info.run_id
    assert all(by_stage[s].data.tags["mlflow.parentRunId"] == parent_id for s in stages)
    assert by_stage["search"].data.metrics["problems"] == 3
    assert len(list((proj / "trees/iter_1").glob("part-*.parquet"))) == 2
    assert by_stage["evaluate"].data.metrics["eval_problems"] == 6
    assert by_stage["bootstrap"].data.params["bootstrap.max_steps"] == "4"
    assert "train_loss" in by_stage["bootstrap"].data.metrics  # Lightning's MLFlowLogger wrote into the run


def test_changed_param_reruns_only_downstream(tmp_path):
    proj = _project(tmp_path)
    dvc = str(Path(sys.executable).parent / "dvc")
    _run([dvc, "init", "--no-scm", "-q"], proj)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    _run([dvc, "repro"], proj)
    params["evaluate"]["k"] = 3
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    out = _run([dvc, "repro"], proj).stdout
    assert "Running stage 'evaluate'" in out and "Running stage 'bootstrap'" not in out
    assert "Running stage 'search'" not in out
    assert json.loads((proj / "metrics/iter_0.json").read_text())["k"] == 3
    assert not (proj / "mlflow.db").exists()


@pytest.mark.parametrize("stage", ["prepare", "bootstrap", "evaluate", "search"])
def test_stage_is_runnable_as_module(stage):
    r = subprocess.run([sys.executable, "-m", f"arbor.stages.{stage}", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and f"arbor {stage}" in r.stdout
