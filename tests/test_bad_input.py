"""Bad input → one clear line `arbor <stage>: error: ...` naming the file, key or row and what was expected,
exit code 2, no traceback (unless `--debug`), and existing outputs left untouched (issue #8).

The params cases are generated from the config dataclasses (a new key is covered automatically); each runs
in-process through a stage's `main(argv)`. A handful run as real subprocesses to check the exit code and stderr.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from arbor.pipeline.config import ConfigError, _base_type, iter_fields, set_dotted
from arbor.pipeline.io import write_jsonl
from arbor.stages import bootstrap, evaluate, prepare, search

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
NO_TRACKING = ["--tracking.enabled", "false"]


# ---------------------------------------------------------------------------------------------------------------
# fixtures: a valid policy, valid problems and sentinel outputs that no failing stage may touch

@pytest.fixture(scope="module")
def ws(tmp_path_factory, char_tok) -> Path:
    from .conftest import tiny_model

    d = tmp_path_factory.mktemp("bad_input")
    tiny_model(char_tok).save_pretrained(d / "policy")
    char_tok.save_pretrained(d / "policy")
    rows = [{"id": f"p{i}", "question": f"{i} +1", "answer": str(i + 1)} for i in range(3)]
    write_jsonl(d / "eval.jsonl", rows)
    write_jsonl(d / "train.jsonl", rows)
    return d


SENTINEL_FILES = ("metrics.json", "data/train.jsonl", "data/eval.jsonl", "model/config.json",
                  "trees/part-00000.parquet", "trees/_fingerprint.json")


@pytest.fixture()
def sentinels(tmp_path) -> dict[str, Path]:
    """Existing outputs of every stage, each file holding its own name; see `untouched`."""
    root = tmp_path / "outputs"
    for name in SENTINEL_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"sentinel {name}\n")
    return {"root": root, "metrics": root / "metrics.json", "data": root / "data", "model": root / "model",
            "trees": root / "trees"}


def untouched(s: dict[str, Path]) -> bool:
    """Whether the sentinel outputs are exactly as written: same files, same bytes, nothing added."""
    root = s["root"]
    found = {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}
    return found == {name: f"sentinel {name}\n" for name in SENTINEL_FILES}


def expect_error(capsys, main, argv: list[str], stage: str) -> str:
    """Run `main(argv)` in-process; it must exit 2 with exactly one error line and no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"arbor {stage}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def evaluate_argv(ws: Path, s: dict[str, Path], params: Path | str = "", *extra: str,
                  track: bool = False) -> list[str]:
    """`arbor evaluate` options: valid policy and problems, the sentinel metrics file, tracking off."""
    return ["--params", str(params), *([] if track else NO_TRACKING), "--policy", str(ws / "policy"),
            "--eval", str(ws / "eval.jsonl"), "--metrics", str(s["metrics"]), *extra]


# ---------------------------------------------------------------------------------------------------------------
# every params key, wrong type and out of range, generated from the config dataclasses

_WRONG_TYPE = {bool: "maybe", int: "many", float: "many", str: [1, 2], dict: [1], list: {"a": 1}}


def _out_of_range(f: dataclasses.Field) -> list[Any]:
    m, bad = f.metadata, []
    if "min" in m:
        bad.append(m["min"] - 1 if isinstance(m["min"], int) else m["min"] - 0.5)
    if "gt" in m:
        bad.append(m["gt"])
    if "max" in m:
        bad.append(m["max"] + 1)
    if "choices" in m:
        bad.append("bogus")
    if "pattern" in m:
        bad += [v for v in ("bogus", "") if not re.fullmatch(m["pattern"], v)]
    if "chars" in m:
        bad += ["", "/"]
    return bad


def _cases() -> list[tuple[str, Any, bool]]:
    """(dotted key, bad value, also as a command-line option)."""
    cases = []
    for key, f, tp in iter_fields():
        base = _base_type(tp)
        cases.append((key, _WRONG_TYPE[base], base not in (str, dict, list)))
        cases += [(key, v, True) for v in _out_of_range(f)]
        if base is float:
            cases += [(key, math.nan, True), (key, math.inf, True)]
    return cases


CASES = _cases()


def test_every_key_has_a_case_and_every_number_a_declared_range():
    keys = {k for k, _, _ in CASES}
    assert keys == {k for k, _, _ in iter_fields()}
    for key, f, tp in iter_fields():
        if _base_type(tp) in (int, float):
            assert {"min", "max", "gt"} & set(f.metadata), f"{key}: numeric field without a declared range"


@pytest.mark.parametrize(("key", "value", "cli"), CASES, ids=[f"{k}={v!r}" for k, v, _ in CASES])
def test_bad_params_value(capsys, tmp_path, ws, sentinels, key, value, cli):
    data: dict[str, Any] = {}
    set_dotted(data, key, value)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    argv = evaluate_argv(ws, sentinels, p, track=key.startswith("tracking."))  # the file's value must count
    line = expect_error(capsys, evaluate.main, argv, "evaluate")
    assert f"{p}: {key}: expected" in line and "got" in line
    if cli:
        arg = "nan" if isinstance(value, float) and math.isnan(value) else str(value)
        line = expect_error(capsys, evaluate.main, evaluate_argv(ws, sentinels, "", f"--{key}", arg), "evaluate")
        assert f"command line: --{key}: expected" in line and "params" not in line
    assert untouched(sentinels)


# ---------------------------------------------------------------------------------------------------------------
# params files, task rows, models, devices

PARAMS_FILES = [
    ("evaluate:\n  kk: 1\n", "unknown key(s) evaluate.kk; known: k, temperature"),
    ("a: [\n", "invalid YAML"),
    (b"seed: \xff\xfe\n", "cannot read params file"),
    ("seed: 1\nevaluate:\n  k: 2\n  k: 3\n", "line 4: duplicate key 'k' (first set at line 3)"),
    ("- 1\n- 2\n", "expected a mapping at the top level, got list"),
    ("task: 3\n", "task: expected a section (mapping), got 3"),
    ("device: gpu\n", "device: expected cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("search:\n  eta:\n    c_min: 5\n    c_max: 3\n", "search.eta.c_min=5, c_max=3"),
]


@pytest.mark.parametrize(("text", "fragment"), PARAMS_FILES, ids=[f[1][:30] for f in PARAMS_FILES])
def test_bad_params_file(capsys, tmp_path, ws, sentinels, text, fragment):
    p = tmp_path / "params.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = expect_error(capsys, evaluate.main, evaluate_argv(ws, sentinels, p), "evaluate")
    assert str(p) in line and fragment in line
    assert untouched(sentinels)


def test_missing_params_file(capsys, tmp_path, ws, sentinels):
    line = expect_error(capsys, evaluate.main, evaluate_argv(ws, sentinels, tmp_path / "nope.yaml"), "evaluate")
    assert "nope.yaml: params file not found" in line and untouched(sentinels)


def test_cross_field_error_from_the_command_line_names_it(capsys, tmp_path, ws, sentinels):
    p = tmp_path / "params.yaml"
    p.write_text("task:\n  max_ops: 3\n")
    line = expect_error(capsys, evaluate.main, evaluate_argv(ws, sentinels, p, "--task.min_ops", "5"), "evaluate")
    assert f"{p} with command-line --task.min_ops: task.min_ops=5, task.max_ops=3" in line


GSM8K = {
    "empty": ("", "empty file; expected GSM8K rows"),
    "blank": ("\n\n", "empty file"),
    "bad_row": ('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "no number"}\n',
                "row 2: field 'answer' does not end with '#### <number>'"),
    "no_question": ('{"question": "q", "answer": "#### 1"}\n{"answer": "#### 2"}\n', "row 2: field 'question'"),
    "too_few": ('{"question": "q", "answer": "#### 1"}\n' * 3,
                "3 rows, but prepare.n_eval=5 of them are split off for evaluation, leaving no training problems"),
    "not_json": ("{oops\n", "cannot be read as json (ArrowInvalid: JSON parse error"),
}


@pytest.mark.parametrize("case", GSM8K)
def test_bad_gsm8k_file(capsys, tmp_path, sentinels, case):
    text, fragment = GSM8K[case]
    f = tmp_path / "gsm8k.jsonl"
    f.write_text(text)
    argv = ["--params", "", "--task.name", "gsm8k", "--task.train_file", str(f), "--prepare.n_eval", "5",
            "--out-dir", str(sentinels["data"])]
    line = expect_error(capsys, prepare.main, argv, "prepare")
    assert f"{f}: " in line and fragment in line
    assert untouched(sentinels)


@pytest.mark.parametrize(("rows", "fragment"), [
    ("", "no problems"),
    ('{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": "q"}\n', "row 2: field 'answer'"),
    ('{"id": "a", "question": "q", "answer": "1"}\n{not json\n', "row 2: invalid JSON"),
])
def test_bad_eval_rows(capsys, tmp_path, ws, sentinels, rows, fragment):
    f = tmp_path / "eval.jsonl"
    f.write_text(rows)
    argv = evaluate_argv(ws, sentinels)
    argv[argv.index("--eval") + 1] = str(f)
    line = expect_error(capsys, evaluate.main, argv, "evaluate")
    assert str(f) in line and fragment in line and untouched(sentinels)


def _model_dir(ws: Path, tmp: Path, keep: tuple[str, ...], truncate: bool = False, config: str | None = None) -> Path:
    d = tmp / "broken_model"
    d.mkdir()
    for name in keep:
        (d / name).write_bytes((ws / "policy" / name).read_bytes())
    if truncate:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) - 100])
    if config is not None:
        (d / "config.json").write_text(config)
    return d


MODELS = {
    "missing": (None, "model not found"),
    "only_config": ((("config.json",), False, None), "no model.safetensors or model.safetensors.index.json"),
    "no_tokenizer": ((("config.json", "model.safetensors"), False, None), "no tokenizer files"),
    "truncated": ((("config.json", "model.safetensors", "tokenizer.json"), True, None),
                  "but its header describes"),
    "bad_config": ((("model.safetensors", "tokenizer.json"), False, "{not json"), "config.json: invalid JSON"),
    "config_without_type": ((("model.safetensors", "tokenizer.json"), False, "{}"), "'model_type'"),
}


@pytest.mark.parametrize("case", MODELS)
def test_bad_model_dir(capsys, tmp_path, ws, sentinels, case):
    spec, fragment = MODELS[case]
    policy = _model_dir(ws, tmp_path, *spec) if spec else tmp_path / "nowhere"
    argv = evaluate_argv(ws, sentinels)
    argv[argv.index("--policy") + 1] = str(policy)
    line = expect_error(capsys, evaluate.main, argv, "evaluate")
    assert str(policy) in line and fragment in line and untouched(sentinels)


def test_pickled_weights_are_refused_never_unpickled(capsys, tmp_path, ws, sentinels):
    """Safe loading: a directory whose only weights are a pickle (`pytorch_model.bin`) is refused by name."""
    policy = _model_dir(ws, tmp_path, ("config.json", "tokenizer.json"))
    (policy / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    argv = evaluate_argv(ws, sentinels)
    argv[argv.index("--policy") + 1] = str(policy)
    line = expect_error(capsys, evaluate.main, argv, "evaluate")
    assert "(other weights: ['pytorch_model.bin']); expected safetensors weights" in line and untouched(sentinels)


def test_search_with_a_broken_policy_keeps_the_trees(capsys, tmp_path, ws, sentinels):
    policy = _model_dir(ws, tmp_path, ("config.json", "model.safetensors", "tokenizer.json"), truncate=True)
    argv = ["--params", "", *NO_TRACKING, "--policy", str(policy), "--train", str(ws / "train.jsonl"),
            "--out", str(sentinels["trees"]), "--metrics", str(sentinels["metrics"])]
    line = expect_error(capsys, search.main, argv, "search")
    assert "model.safetensors" in line and "truncated" in line and untouched(sentinels)


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("random.gguf", b"\x00\x01not a gguf file",
     "not a GGUF file (starts with b'\\x00\\x01no', expected the magic b'GGUF')"),
    ("rows.jsonl", b'{"a": 1}\n', "expected a local HF model directory"),
])
def test_bad_bootstrap_from(capsys, tmp_path, sentinels, name, content, fragment):
    src = tmp_path / name
    src.write_bytes(content)
    argv = ["--params", "", *NO_TRACKING, "--bootstrap.from", str(src), "--out", str(sentinels["model"]),
            "--metrics", str(sentinels["metrics"])]
    line = expect_error(capsys, bootstrap.main, argv, "bootstrap")
    assert str(src) in line and fragment in line and untouched(sentinels)


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_training_file(capsys, tmp_path, sentinels, text):
    """A hand-emptied data/train.jsonl is one clear line, not a numpy traceback deep in training."""
    f = tmp_path / "train.jsonl"
    f.write_text(text)
    argv = ["--params", "", *NO_TRACKING, "--train", str(f), "--out", str(sentinels["model"]),
            "--metrics", str(sentinels["metrics"]), "--checkpoints", str(tmp_path / "ckpt")]
    line = expect_error(capsys, bootstrap.main, argv, "bootstrap")
    assert f"{f}: no problems" in line and untouched(sentinels)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error of a CPU-only torch")
@pytest.mark.parametrize("where", ["params", "cli"])
def test_cuda_without_cuda(capsys, tmp_path, ws, sentinels, where):
    p = tmp_path / "params.yaml"
    p.write_text("device: cuda:1\n" if where == "params" else "seed: 1\n")
    extra = ["--device", "cuda"] if where == "cli" else []
    line = expect_error(capsys, evaluate.main, evaluate_argv(ws, sentinels, p, *extra), "evaluate")
    blame = "command line: --device: 'cuda'" if where == "cli" else f"{p}: device: 'cuda:1'"
    assert f"{blame} requested, but torch.cuda.is_available() is False" in line and untouched(sentinels)


def test_prepare_ignores_the_device(tmp_path):
    """prepare loads no model, so a config written for a GPU machine still prepares data on a CPU one."""
    m = prepare.main(["--params", "", "--device", "cuda", "--prepare.n_train", "4", "--prepare.n_eval", "2",
                      *NO_TRACKING, "--out-dir", str(tmp_path)])
    assert m == {"train_problems": 4, "eval_problems": 2}


# ---------------------------------------------------------------------------------------------------------------
# bugs keep their traceback; --debug shows the traceback of input errors

def test_internal_errors_are_not_swallowed(monkeypatch, tmp_path):
    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(prepare, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        prepare.main(["--params", "", *NO_TRACKING, "--out-dir", str(tmp_path)])


def test_debug_flag_raises_the_input_error(tmp_path):
    with pytest.raises(ConfigError, match="prepare.n_eval"):
        prepare.main(["--params", "", "--prepare.n_eval", "-1", "--debug", "--out-dir", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------------------
# a handful as real processes: exit code and stderr

def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(cwd)})


def _one_error_line(r: subprocess.CompletedProcess, stage: str) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"arbor {stage}: error: "), r.stderr
    return lines[0]


def test_subprocess_bad_device(tmp_path, ws, sentinels):
    device = "gpu" if HAS_CUDA else "cuda"
    r = _cli("-m", "arbor.cli", "evaluate", *evaluate_argv(ws, sentinels, "", "--device", device), cwd=tmp_path)
    assert "command line: --device" in _one_error_line(r, "evaluate")
    assert untouched(sentinels)


def test_subprocess_stage_module_and_debug(tmp_path):
    (tmp_path / "params.yaml").write_text("prepare:\n  n_train: 5\n  n_train: 6\n")
    r = _cli("-m", "arbor.stages.prepare", cwd=tmp_path)
    assert "params.yaml: invalid YAML (line 3: duplicate key 'n_train'" in _one_error_line(r, "prepare")
    r = _cli("-m", "arbor.cli", "--debug", "prepare", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError" in r.stderr
    r = _cli("-m", "arbor.cli", "show-tree", "--trees", str(tmp_path / "none"), cwd=tmp_path)
    assert f"{tmp_path / 'none'}: file or directory not found" in _one_error_line(r, "show-tree")
    assert not (tmp_path / "data").exists()


def test_help_shows_the_params_value(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")
    p = tmp_path / "params.yaml"
    p.write_text("prepare:\n  n_train: 64\n")
    with pytest.raises(SystemExit):
        prepare.main(["--params", str(p), "--help"])
    out = capsys.readouterr().out
    assert f"Expects an integer >= 1. ({p}: 64; built-in: 4000)" in out
    assert "Expects an integer >= 1. (built-in: 200)" in out  # n_eval is not in the file
