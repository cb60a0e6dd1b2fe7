"""MLflow tracking: killed runs are closed KILLED, one parent per `arbor run` / `dvc repro`, metrics artifacts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from arbor.pipeline import procs, tracking
from arbor.pipeline.lock import ProjectLock
from arbor.pipeline.tracking import OWNER_DVC, OWNER_RUNNER, OWNER_STAGE, _closing_status, make_tracker

BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBOR_") and k != "MLFLOW_TRACKING_URI"}
    return {**env, "PATH": str(BIN) + os.pathsep + env["PATH"], **extra}


def _client(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _runs(db: Path, experiment: str = "arbor") -> list:
    client = _client(db)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow database with its tables made (creating them costs seconds); copy it, never use it."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    _client(db).search_experiments()
    return db


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("ARBOR_PIPELINE_ID", "ARBOR_LOCK_PID", "ARBOR_LOCK_FILE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)


def test_closing_status_of_a_parent_whose_owner_is_gone():
    assert _closing_status(OWNER_DVC, ["FINISHED", "FINISHED"]) == "FINISHED"
    assert _closing_status(OWNER_DVC, ["FINISHED", "FAILED"]) == "FAILED"
    assert _closing_status(OWNER_DVC, ["FAILED", "KILLED"]) == "KILLED"
    assert _closing_status(OWNER_DVC, ["FINISHED", "RUNNING"]) is None  # a stage still runs: wait
    assert _closing_status(OWNER_RUNNER, ["FINISHED"]) == "KILLED"  # `arbor run` closes its parent unless killed
    assert _closing_status(OWNER_STAGE, []) == "FINISHED"


@pytest.mark.parametrize(("argv", "is_dvc"), [
    (["/x/.venv/bin/dvc", "repro"], True),
    (["/usr/bin/python3.11", "/x/.venv/bin/dvc", "repro"], True),
    (["python", "-m", "dvc", "repro"], True),
    (["/x/.venv/bin/python", "-m", "pytest"], False),
    (["sh", "-c", "dvc repro"], False),
    ([], False),
])
def test_is_dvc_command(argv, is_dvc):
    assert procs.is_dvc_command(argv) is is_dvc


def test_dvc_ancestor_is_found_through_a_shell(tmp_path):
    """A stage started by `dvc` through `sh -c` finds that dvc process: its pid keys the pipeline."""
    probe = "from arbor.pipeline.tracking import stage_pipeline; print(stage_pipeline()[0])"
    fake_dvc = tmp_path / "dvc"  # a script named dvc, run as `python .../dvc`, as the venv's dvc is
    fake_dvc.write_text("import os, subprocess, sys\n"
                        "print(os.getpid(), flush=True)\n"
                        f"subprocess.run(['sh', '-c', {f'{sys.executable} -c {probe!r}'!r}])\n")
    out = subprocess.run([sys.executable, str(fake_dvc)], capture_output=True, text=True, env=_env(),
                         timeout=60).stdout.split()
    dvc_pid = int(out[0])
    assert out[1].startswith(f"dvc-{dvc_pid}-")
    assert procs.dvc_ancestor() is None  # pytest itself runs under no dvc


def test_killed_stage_run_is_closed_killed_by_the_next_tracker(tmp_path, clean_env, mlflow_template):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stage = subprocess.Popen(
        [sys.executable, "-c", "import time; from arbor.pipeline.tracking import make_tracker; "
         f"t = make_tracker(enabled=True, stage='search', experiment='arbor', uri={uri!r}); "
         "print(t.run_id, flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=_env(ARBOR_PIPELINE_ID="p-killed"))
    try:
        run_id = stage.stdout.readline().strip()
    finally:
        stage.send_signal(signal.SIGKILL)  # cannot be caught: nobody closes the run
        stage.wait()
    assert run_id
    client = _client(tmp_path / "mlflow.db")
    assert client.get_run(run_id).info.status == "RUNNING"
    parent_id = client.get_run(run_id).data.tags["mlflow.parentRunId"]

    other = make_tracker(enabled=True, stage="evaluate", experiment="arbor", uri=uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(parent_id).info.status == "KILLED"  # its only stage was killed
    assert other.swept == {run_id: "KILLED", parent_id: "KILLED"}
    assert client.get_run(other.run_id).info.status == "RUNNING"  # a live run is left alone
    assert make_tracker(enabled=True, stage="x", experiment="arbor", uri=uri).swept == {}
    other.close()


def test_stage_logs_its_metrics_as_an_artifact(tmp_path, monkeypatch, clean_env, mlflow_template):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    from arbor.stages.common import stage_cli

    monkeypatch.chdir(tmp_path)
    metrics = {"greedy_pass1": 0.5, "problems": 3, "note": "text"}
    stage_cli("evaluate", "", lambda p: None, lambda cfg, args, tr: dict(metrics),
              ["--params", "", "--tracking.uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    (run,) = _runs(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED" and run.data.metrics["greedy_pass1"] == 0.5
    client = _client(tmp_path / "mlflow.db")
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == metrics
    assert (tmp_path / "mlartifacts").is_dir()  # beside mlflow.db, not ./mlruns
    assert run.data.tags[tracking.TAG_PID] == str(os.getpid()) and tracking.TAG_HOST in run.data.tags


def test_stage_runs_are_tagged_with_iteration_and_dvc_experiment(tmp_path, monkeypatch, clean_env,
                                                                 mlflow_template):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    from arbor.stages.common import stage_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-lr")
    stage_cli("evaluate", "", lambda p: p.add_argument("--iter", type=int, default=0), lambda cfg, a, tr: {},
              ["--params", "", "--tracking.uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--iter", "2"])
    (run,) = _runs(tmp_path / "mlflow.db")
    assert run.data.tags[tracking.TAG_ITERATION] == "2" and run.data.tags[tracking.TAG_DVC_EXP] == "sweep-lr"


def test_policies_are_registered_one_version_per_distinct_model(tmp_path, clean_env, mlflow_template):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pol = [tmp_path / "iter_0" / "policy", tmp_path / "iter_1" / "policy"]
    for i, d in enumerate(pol):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(bytes([i]) * 64)
    tr = make_tracker(enabled=True, stage="evaluate", experiment="arbor", uri=uri)
    assert tr.register_policy(pol[0], 0, {"greedy_pass1": 0.5, "note": "x"}) == "1"
    assert tr.register_policy(pol[1], 1, {"greedy_pass1": 0.625}) == "2"
    assert tr.register_policy(pol[0], 0, {"greedy_pass1": 0.5}) == "1"  # evaluated again: same version
    tr.close()
    versions = {str(v.version): v for v in _client(tmp_path / "mlflow.db").search_model_versions(
        f"name='{tracking.POLICY_MODEL}'")}
    assert sorted(versions) == ["1", "2"]
    assert versions["2"].tags[tracking.TAG_ITERATION] == "1" and versions["2"].tags["greedy_pass1"] == "0.625"
    assert versions["1"].source == str(pol[0].resolve()) and versions["2"].run_id == tr_run_id(tmp_path)


def tr_run_id(tmp_path: Path) -> str:
    (run,) = _runs(tmp_path / "mlflow.db")
    return run.info.run_id


# --- whole pipelines of small `arbor prepare` stages in a temp project ---------------------------------------

def _mini_project(tmp_path: Path, template_db: Path, second_stage_args: str = "--prepare.n_train 8") -> Path:
    """Two chained `arbor prepare` stages in a temp project; the second one gets `second_stage_args`."""
    proj = tmp_path / "proj"
    proj.mkdir()
    stages = {
        "prepare": {"cmd": "arbor prepare", "outs": ["data/train.jsonl", "data/eval.jsonl"]},
        "prepare_again": {"cmd": f"arbor prepare --out-dir data2 {second_stage_args}",
                          "deps": ["data/train.jsonl"], "outs": ["data2/train.jsonl", "data2/eval.jsonl"]},
    }
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (proj / "params.yaml").write_text(yaml.safe_dump({"prepare": {"n_train": 16, "n_eval": 4}}))
    shutil.copy(template_db, proj / "mlflow.db")
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=proj, check=True, env=_env())
    return proj


def _pipeline(db: Path) -> tuple:
    """(the one parent run, its nested stage runs) of the experiment."""
    runs = _runs(db)
    parents = [x for x in runs if x.data.tags.get(tracking.TAG_ROLE) == "pipeline"]
    assert len(parents) == 1, [x.info.run_name for x in runs]
    children = [x for x in runs if x is not parents[0]]
    assert all(x.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for x in children)
    return parents[0], children


def test_arbor_run_closes_its_parent_finished_with_nested_stage_runs(tmp_path, clean_env, mlflow_template):
    proj = _mini_project(tmp_path, mlflow_template)
    r = subprocess.run([str(BIN / "arbor"), "run"], cwd=proj, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    parent, children = _pipeline(proj / "mlflow.db")
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.TAG_OWNER] == OWNER_RUNNER
    assert [x.info.status for x in children] == ["FINISHED", "FINISHED"]
    artifacts = {a.path for a in _client(proj / "mlflow.db").list_artifacts(parent.info.run_id)}
    assert artifacts == {"params.yaml", "dvc.lock"}
    ProjectLock(proj).acquire().release()  # the runner let go of the project lock


@pytest.mark.parametrize(("second_stage_args", "final"), [
    ("--prepare.n_train 8", "FINISHED"),
    pytest.param("--task.name gsm8k --task.train_file missing.jsonl", "FAILED",  # fails after its run opened
                 marks=pytest.mark.slow),
])
def test_plain_dvc_repro_gives_one_parent_closed_once_dvc_exits(tmp_path, clean_env, mlflow_template,
                                                                 second_stage_args, final):
    proj = _mini_project(tmp_path, mlflow_template, second_stage_args)
    r = subprocess.run([str(BIN / "dvc"), "repro"], cwd=proj, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert (r.returncode == 0) is (final == "FINISHED"), r.stdout[-2000:] + r.stderr[-2000:]
    parent, children = _pipeline(proj / "mlflow.db")
    assert parent.data.tags[tracking.TAG_OWNER] == OWNER_DVC and parent.info.status == "RUNNING"
    assert sorted(x.info.status for x in children) == sorted(["FINISHED", final])

    later = make_tracker(enabled=True, stage="evaluate", experiment="arbor", uri=f"sqlite:///{proj / 'mlflow.db'}")
    later.close()  # starting any tracker sweeps: dvc has exited, so its parent is closed
    assert _client(proj / "mlflow.db").get_run(parent.info.run_id).info.status == final


def test_arbor_run_stopped_by_sigterm_closes_its_parent_killed(tmp_path, clean_env, mlflow_template):
    proj = _mini_project(tmp_path, mlflow_template)
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": {"cmd": "touch started && sleep 60"}}}))
    runner = subprocess.Popen([str(BIN / "arbor"), "run"], cwd=proj, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (proj / "started").exists() and runner.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=120) == 130, runner.stderr.read()
    parent, children = _pipeline(proj / "mlflow.db")
    assert parent.info.status == "KILLED" and children == []
    ProjectLock(proj).acquire().release()
