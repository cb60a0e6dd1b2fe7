"""The pipeline: `arbor run` / `dvc repro` on a tiny config in a temp dir, with MLflow; what dvc.yaml, params,
.dvcignore and the Makefile must hold so that a change reruns exactly the stages it affects."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arbor.pipeline.config import ArborConfig, to_dict

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "prepare": {"n_train": 64, "n_eval": 6},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_positions": 96},
    "bootstrap": {"max_steps": 4, "batch_size": 8, "warmup_steps": 1},
    "evaluate": {"k": 2, "max_new_tokens": 24, "batch_size": 16, "search_simulations": 2},
    "task": {"max_ops": 3},
    "search": {"n_problems": 3, "shard_size": 2},
    "critics": {"max_epochs": 2, "completion_tokens": 12, "min_completions": 1},
}


def _project(tmp_path: Path, copy_source: bool = False) -> Path:
    """A temp project with this repo's dvc.yaml and .dvcignore and the TINY params; `arbor/` is a symlink to
    the sources (the stages' deps), or a copy when the test writes into it or needs the deps to stay put."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", proj / ".dvcignore")
    if copy_source:
        shutil.copytree(ROOT / "arbor", proj / "arbor", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        os.symlink(ROOT / "arbor", proj / "arbor")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["search"]["eta"].update({"num_simulations": 4, "step_tokens": 6, "max_depth": 3})
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    return proj


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ARBOR_") and k != "MLFLOW_TRACKING_URI"}
    full_env = {**full_env, "PATH": str(BIN) + os.pathsep + os.environ["PATH"], **env}
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _disable_tracking(proj: Path) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(params))


def test_arbor_run_smoke(tmp_path):
    proj = _project(tmp_path, copy_source=True)  # deps frozen: edits to the checkout meanwhile rerun nothing
    dvc = str(BIN / "dvc")
    _run([dvc, "init", "--no-scm", "-q"], proj)
    _run([str(BIN / "arbor"), "run"], proj)  # what `make run` does
    metrics = json.loads((proj / "metrics/iter_0.json").read_text())
    for key in ("greedy_pass1", "pass_at_k", "maj_at_k", "k", "forward_tokens", "eval_problems", "search_pass1",
                "orm_best_of_n", "orm_vote", "prm_min_best_of_n", "search_critic_forward_tokens"):
        assert key in metrics
    assert metrics["eval_problems"] == 6 and metrics["k"] == 2 and metrics["forward_tokens"] > 0
    assert metrics["search_scorer"] == "critics" and metrics["search_critic_forward_tokens"] > 0
    assert (proj / "models/iter_0/policy/model.safetensors").exists()
    assert len((proj / "data/train.jsonl").read_text().splitlines()) == 64

    again = _run([dvc, "repro"], proj)  # nothing changed: no stage runs
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout

    shown = _run([dvc, "metrics", "show", "--json"], proj).stdout
    assert "greedy_pass1" in shown

    # MLflow: one parent run for the invocation, closed FINISHED, one nested run per stage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("arbor")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {r.data.tags.get("arbor_stage", "parent"): r for r in runs}
    stages = ("prepare", "bootstrap", "evaluate", "search", "critics")
    assert set(by_stage) == {"parent", *stages} and len(runs) == 6
    parent_id = by_stage["parent"].info.run_id
    assert all(by_stage[s].data.tags["mlflow.parentRunId"] == parent_id for s in stages)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert by_stage["search"].data.metrics["problems"] == 3
    assert len(list((proj / "trees/iter_0").glob("part-*.parquet"))) == 2
    assert (proj / "models/iter_0/critics/_manifest.json").is_file() and (proj / "metrics/critics_0.json").is_file()
    assert by_stage["evaluate"].data.metrics["eval_problems"] == 6
    assert by_stage["bootstrap"].data.params["bootstrap.max_steps"] == "4"
    assert "train_loss" in by_stage["bootstrap"].data.metrics  # Lightning's MLFlowLogger wrote into the run
    logged = client.download_artifacts(by_stage["evaluate"].info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(Path(logged).read_text()) == metrics  # the metrics JSON, as an artifact

    # a changed param reruns only the stages that read it
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["evaluate"]["k"] = 3
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    out = _run([dvc, "repro"], proj).stdout
    assert "Running stage 'evaluate'" in out and "Running stage 'bootstrap'" not in out
    assert "Running stage 'search'" not in out and "Running stage 'prepare'" not in out
    assert "Running stage 'critics'" not in out
    assert json.loads((proj / "metrics/iter_0.json").read_text())["k"] == 3


def test_bytecode_and_numba_caches_are_not_stage_deps(tmp_path):
    """`make test` writes __pycache__/*.pyc and numba's *.nbi/*.nbc next to the sources: no stage reruns."""
    proj = _project(tmp_path, copy_source=True)
    dvc = str(BIN / "dvc")
    _run([dvc, "init", "--no-scm", "-q"], proj)
    _disable_tracking(proj)
    caches = ["tasks/__pycache__/base.cpython-311.pyc", "tasks/__pycache__/synthetic.make-1.py311.nbi",
              "pipeline/__pycache__/io.write-2.py311.1.nbc", "tasks/synthetic.make-3.py311.nbi"]
    (proj / "arbor" / caches[0]).parent.mkdir(parents=True, exist_ok=True)
    (proj / "arbor" / caches[0]).write_bytes(b"before the run")
    _run([dvc, "repro", "prepare"], proj)
    assert not (proj / "mlflow.db").exists()  # tracking.enabled: false logs nothing
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    recorded = {d["path"]: d for d in lock["stages"]["prepare"]["deps"]}
    assert recorded["arbor/tasks"]["nfiles"] == len(list((ROOT / "arbor/tasks").glob("*.py")))

    for rel in caches:
        (proj / "arbor" / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / "arbor" / rel).write_bytes(b"written by a later test run")
    (proj / ".arbor.lock").write_text("1\narbor run\n")
    status = _run([dvc, "status", "prepare"], proj).stdout
    assert "up to date" in status, status
    (proj / "arbor/tasks/base.py").write_text((proj / "arbor/tasks/base.py").read_text() + "\n# edited\n")
    assert "modified:" in _run([dvc, "status", "prepare"], proj).stdout  # a real source change still counts


# --- what dvc.yaml and params.yaml must hold --------------------------------------------------------------------

def _module_file(module: str) -> Path | None:
    path = ROOT / Path(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _arbor_imports(module: str) -> set[str]:
    """The arbor modules `module` imports anywhere in its code (function bodies included: lazy imports)."""
    file = _module_file(module)
    assert file is not None, module
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "arbor":  # the module and every package on its way (their __init__ runs too)
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if _module_file(".".join(parts[:i]))}
    return found


def _closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_arbor_imports(m))
    return seen


def _inert(file: Path) -> bool:
    """A module that cannot change a result: only a docstring and `__version__`."""
    body = ast.parse(file.read_text()).body
    return all((isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
               or (isinstance(s, ast.Assign) and [getattr(t, "id", "") for t in s.targets] == ["__version__"])
               for s in body)


DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(DVC_STAGES))
def test_stage_deps_cover_every_arbor_module_it_imports(stage):
    spec = DVC_STAGES[stage]
    command = spec["cmd"].split()
    assert command[0] == "arbor", spec["cmd"]
    files = {_module_file(m).relative_to(ROOT).as_posix() for m in _closure(f"arbor.stages.{command[1]}")}
    assert f"arbor/stages/{command[1]}.py" in files and "arbor/stages/common.py" in files
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    uncovered = sorted(f for f in files
                       if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)
                       and not _inert(ROOT / f))
    assert not uncovered, f"dvc.yaml stage {stage!r} imports {uncovered} but does not list them (or a parent) in deps"


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "rg_config":  # rg_config is a free-form mapping value
            keys |= _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


@pytest.mark.parametrize("params_file", ["params.yaml", *sorted(p.relative_to(ROOT).as_posix()
                                                                 for p in (ROOT / "configs").glob("*.yaml"))])
def test_every_config_key_is_written_out(params_file):
    """A default that only lives in code is invisible to DVC: every key must be in params.yaml and presets."""
    expected = _flat_keys(to_dict(ArborConfig()))
    written = _flat_keys(yaml.safe_load((ROOT / params_file).read_text()))
    assert not expected - written, f"{params_file} lacks {sorted(expected - written)}"
    assert not written - expected, f"{params_file} has unknown keys {sorted(written - expected)}"


def test_params_yaml_is_the_tiny_preset():
    tiny = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == tiny  # README: params.yaml is a copy of it


@pytest.mark.parametrize("stage", sorted(DVC_STAGES))
def test_stage_params_exist(stage):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted in DVC_STAGES[stage]["params"]:
        node = params
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"stage {stage}: param {dotted} not in params.yaml"
            node = node[part]


# --- Makefile ------------------------------------------------------------------------------------------------

def _make_n(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_clean_keeps_the_tracked_dvc_lock():
    out = _make_n("clean")
    assert "rm -rf" in out and "data" in out and "dvc.lock" not in out


def test_make_torch_index_is_optional():
    assert "--index-url" not in _make_n(".venv/.arbor-installed")
    assert "--index-url https://example.org/whl" in _make_n(".venv/.arbor-installed",
                                                            "TORCH_INDEX=https://example.org/whl")


def test_make_run_uses_the_runner():
    run_lines = [line for line in _make_n("run").splitlines() if "arbor" in line]
    assert run_lines and run_lines[-1].strip() == ".venv/bin/arbor run"
