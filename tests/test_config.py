import subprocess
import sys

import pytest

from arbor.pipeline.config import ArborConfig, ConfigError, load_config, to_dict


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("seed: 5\nbootstrap:\n  from: /models/x\n  lr: 0.01\ntask:\n  max_ops: 3\n")
    cfg = load_config(p, {"evaluate.k": "4", "bootstrap.lr": "0.02"})
    assert cfg.seed == 5 and cfg.bootstrap.from_ == "/models/x"
    assert cfg.bootstrap.lr == 0.02 and cfg.evaluate.k == 4 and cfg.task.max_ops == 3
    assert to_dict(cfg)["bootstrap"]["from"] == "/models/x"
    assert load_config(None) == ArborConfig()


@pytest.mark.parametrize(
    ("yaml_text", "fragment"),
    [
        ("bootstrap:\n  lrr: 1\n", "unknown key(s) bootstrap.lrr"),
        ("evaluate:\n  k: many\n", "evaluate.k: expected an integer, got 'many'"),
        ("tracking:\n  enabled: maybe\n", "tracking.enabled: expected true/false"),
        ("task: 3\n", "task: expected a section"),
        ("bootstrap:\n  error_rate: 1.5\n", "bootstrap.error_rate: expected a finite number in [0, 1], got 1.5"),
        ("task:\n  min_ops: 5\n  max_ops: 2\n", "task.min_ops=5"),
        ("task:\n  name: chess\n", "task.name: expected one of synthetic, gsm8k, reasoning_gym, got 'chess'"),
        ("search:\n  eta:\n    c: .nan\n", "search.eta.c: expected a finite number >= 0, got nan"),
        ("model:\n  num_heads: 0\n", "model.num_heads: expected an integer >= 1, got 0"),
        ("device: gpu\n", "device: expected cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("seed: 1\nseed: 2\n", "line 2: duplicate key 'seed' (first set at line 1)"),
        ("search:\n  eta:\n    c: 1\n    rule: uct\n    c: 2\n", "line 5: duplicate key 'c' (first set at line 3)"),
        ("1: 2\n", "unknown key(s) 1"),
        ("- a\n- b\n", "expected a mapping at the top level"),
        ("a: [\n", "invalid YAML"),
    ],
)
def test_bad_params_name_file_key_and_expectation(tmp_path, yaml_text, fragment):
    p = tmp_path / "params.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert fragment in str(e.value) and "params.yaml" in str(e.value)


def test_missing_params_file():
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_config("nope.yaml")


def test_cli_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "arbor.stages.bootstrap", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for opt in ("--bootstrap.from", "--bootstrap.error_rate", "--task.operators", "--evaluate.k", "--seed",
                "--device", "--train", "--out"):
        assert opt in out
    assert "Fraction of solution steps" in out  # help text comes from the dataclass metadata


def test_cli_bad_value_exits_with_clear_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "arbor.cli", "prepare", "--params", "", "--prepare.n_train", "x"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert "prepare.n_train: expected an integer, got 'x'" in r.stderr


def test_every_preset_and_params_yaml_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [root / "params.yaml", *sorted((root / "configs").glob("*.yaml"))]
    assert len(files) >= 3
    for f in files:
        load_config(f)
    assert (root / "params.yaml").read_text() == (root / "configs/tiny.yaml").read_text()


def test_threads_key_sets_the_torch_threads_of_a_stage():
    import torch

    from arbor.stages.common import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(load_config(None, {"threads": "1"}).threads)
        assert torch.get_num_threads() == 1
        set_threads(load_config(None, {}).threads)  # null: torch's default is left alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
