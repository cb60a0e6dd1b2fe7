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
    "train": {"epochs": 1.0, "batch_size": 4, "warmup_steps": 1},
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
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _disable_tracking(proj: Path) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(params))


def test_arbor_run_smoke(tmp_path):
    """The whole loop on a micro config: iteration 0 and two self-improvement iterations, every output, the
    MLflow runs, a second repro that does nothing, and a params change that reruns only what reads it."""
    proj = _project(tmp_path, copy_source=True)  # deps frozen: edits to the checkout meanwhile rerun nothing
    dvc = str(BIN / "dvc")
    _run([dvc, "init", "--no-scm", "-q"], proj)
    _run([str(BIN / "arbor"), "run"], proj)  # what `make run` does
    metrics = json.loads((proj / "metrics/iter_0.json").read_text())
    for key in ("greedy_pass1", "pass_at_k", "maj_at_k", "k", "forward_tokens", "eval_problems", "orm_best_of_n",
                "orm_vote", "prm_min_best_of_n"):
        assert key in metrics
    assert metrics["eval_problems"] == 6 and metrics["k"] == 2 and metrics["forward_tokens"] > 0
    decode = json.loads((proj / "metrics/decode_0.json").read_text())
    if decode["search_critics_gate"] is None:  # critics_0 passed the gate: they decoded the read-out
        assert decode["search_scorer"] == "critics" and decode["search_critic_forward_tokens"] > 0
    else:  # they did not: likelihood-scored read-out (evaluate.gated_critic_search off: no second decoding)
        assert decode["search_scorer"] == "likelihood" and decode["search_critic_forward_tokens"] == 0
        assert not any(k.startswith("critic_search") for k in decode)
    assert len((proj / "data/train.jsonl").read_text().splitlines()) == 64
    for k in range(3):
        for out in (f"models/iter_{k}/policy/model.safetensors", f"models/iter_{k}/critics/_manifest.json",
                    f"trees/iter_{k}/_manifest.json", f"metrics/iter_{k}.json", f"metrics/decode_{k}.json",
                    f"metrics/critics_{k}.json", f"metrics/search_{k}.json", f"plots/critics_{k}_reliability.png"):
            assert (proj / out).is_file(), out
    for k in (1, 2):
        assert (proj / f"prefs/iter_{k}/_manifest.json").is_file() and (proj / f"metrics/train_{k}.json").is_file()
    summary = json.loads((proj / "metrics/summary.json").read_text())
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1, 2]
    assert all(r["greedy_pass1"] is not None and r["search_pass1"] is not None for r in summary["iterations"])
    for png in ("accuracy.png", "tree_vs_chain.png"):
        assert (proj / "plots" / png).read_bytes()[:4] == b"\x89PNG"

    again = _run([dvc, "repro"], proj)  # nothing changed: no stage runs
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout

    shown = _run([dvc, "metrics", "show", "--json"], proj).stdout
    assert all(f"metrics/iter_{k}.json" in shown for k in range(3)) and "greedy_pass1" in shown
    plots = _run([dvc, "plots", "show", "--json"], proj).stdout
    assert "Accuracy per iteration" in plots and "tree_vs_chain.png" in plots and "critics_2_reliability" in plots

    # MLflow: one parent run for the invocation, closed FINISHED, one nested run per stage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("arbor")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("arbor_role") == "pipeline")
    stages = [r for r in runs if r is not parent]
    per = {(r.data.tags["arbor_stage"], r.data.tags.get("arbor_iteration")) for r in stages}
    want = {("prepare", None), ("bootstrap", None), ("report", None),
            *{(s, str(k)) for s in ("search", "critics", "evaluate") for k in range(3)},
            *{(s, str(k)) for s in ("prefs", "train") for k in (1, 2)}}
    assert want <= per and len(stages) == len(want) + 3  # + decode_0..2 (stage "evaluate", same iterations)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages)
    assert all(r.info.status == "FINISHED" for r in runs)
    versions = client.search_model_versions("name='arbor-policy'")
    assert sorted(int(v.tags["arbor_iteration"]) for v in versions) == [0, 1, 2]
    by_stage = {(r.data.tags["arbor_stage"], r.data.tags.get("arbor_iteration")): r for r in stages}
    assert by_stage[("bootstrap", None)].data.params["bootstrap.max_steps"] == "4"
    assert "train_loss" in by_stage[("bootstrap", None)].data.metrics  # Lightning's MLFlowLogger wrote into it

    # a changed param reruns only the stages that read it: sampling, not search decoding
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["evaluate"]["k"] = 3
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    out = _run([dvc, "repro"], proj).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate_0", "evaluate@0", "evaluate@1", "report"}, ran
    assert json.loads((proj / "metrics/iter_0.json").read_text())["k"] == 3


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


DVC_STAGES = {name: spec.get("do", spec)
              for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}
"""Each stage of dvc.yaml; a `foreach` stage by its `do` template."""


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


def test_make_run_installs_the_runtime_only_and_test_adds_the_dev_extras():
    run = _make_n(".venv/.arbor-installed")
    assert "install -q -e ." in run and "[dev]" not in run
    assert "install -q -e '.[dev]'" in _make_n(".venv/.arbor-dev-installed")
    assert "arbor-dev-installed" in _make_n("test") and "arbor-dev-installed" not in _make_n("run")


def test_make_run_uses_the_runner():
    run_lines = [line for line in _make_n("run").splitlines() if "arbor" in line]
    assert run_lines and run_lines[-1].strip() == ".venv/bin/arbor run"


def test_tiny_cuda_preset_is_the_tiny_default_on_a_gpu():
    """configs/tiny-cuda.yaml is the tiny default with a CUDA device (and bf16): any other difference is a
    preset left behind when the default changed."""
    from arbor.pipeline.config import load_config

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}

    tiny = flat(to_dict(load_config(ROOT / "configs" / "tiny.yaml")))
    cuda = flat(to_dict(load_config(ROOT / "configs" / "tiny-cuda.yaml")))
    assert {k for k in tiny if tiny[k] != cuda[k]} == {"device", "train.precision"}


def test_dvc_exp_run_sets_a_param_and_reruns_what_reads_it(tmp_path):
    """`dvc exp run -S key=value <stage>` (the README's sweep recipe) in a git repo: the param reaches the stage,
    the experiment is recorded with it, and the workspace holds its outputs."""
    proj = _project(tmp_path, copy_source=True)
    _disable_tracking(proj)
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = str(BIN / "dvc")
    _run(["git", "init", "-q"], proj)
    _run([dvc, "init", "-q"], proj)
    _run(["git", "add", "-A"], proj)
    _run(["git", "commit", "-qm", "base"], proj, **git)
    _run([dvc, "exp", "run", "-S", "prepare.n_train=40", "-n", "fewer", "prepare"], proj, **git)
    assert len((proj / "data" / "train.jsonl").read_text().splitlines()) == 40
    assert yaml.safe_load((proj / "params.yaml").read_text())["prepare"]["n_train"] == 40
    shown = json.loads(_run([dvc, "exp", "show", "--json"], proj).stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    names = {r.get("name") for e in exps for r in (e.get("revs") or [e])}
    assert "fewer" in names, shown
