"""Stage `bootstrap`: training from scratch writes a loadable policy; `bootstrap.from` copies a local model in."""

import numpy as np
import pytest

from arbor.lm.base import StopRule
from arbor.lm.hf import HFPolicy
from arbor.pipeline.config import load_config
from arbor.pipeline.io import write_jsonl
from arbor.stages import bootstrap
from arbor.tasks import make_splits

from .conftest import tiny_model

TINY = {"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 64,
        "bootstrap.max_steps": 3, "bootstrap.batch_size": 4, "bootstrap.warmup_steps": 1,
        "tracking.enabled": False}


def test_bootstrap_from_scratch_writes_safetensors_policy(tmp_path):
    cfg = load_config(None, TINY)
    train, _ = make_splits(cfg.task, 20, 2, seed=0)
    write_jsonl(tmp_path / "train.jsonl", [p.to_dict() for p in train])
    m = bootstrap.run(cfg, train_file=tmp_path / "train.jsonl", out=tmp_path / "policy")
    assert m["parameters"] > 0 and m["final_train_loss"] == m["final_train_loss"]  # not NaN
    assert (tmp_path / "policy/model.safetensors").exists()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    policy = HFPolicy.from_pretrained(tmp_path / "policy")
    out = policy.sample([policy.encode_prompt("Q: 1 +2\n")], stop=StopRule(max_new_tokens=4), temperature=0, seed=0)
    assert len(out[0].token_ids) >= 1


def test_bootstrap_from_local_model_dir(char_tok, tmp_path):
    src = tmp_path / "pretrained"
    model = tiny_model(char_tok, "gpt2")
    model.save_pretrained(src)
    char_tok.save_pretrained(src)
    cfg = load_config(None, {**TINY, "bootstrap.from": str(src)})
    m = bootstrap.run(cfg, out=tmp_path / "policy")
    assert m["parameters"] == sum(p.numel() for p in model.parameters())
    prompt = [1, 50, 51]
    ref = HFPolicy(model, char_tok).sample([prompt], stop=StopRule(max_new_tokens=5), temperature=0, seed=0)
    got = HFPolicy.from_pretrained(tmp_path / "policy").sample([prompt], stop=StopRule(max_new_tokens=5),
                                                               temperature=0, seed=0)
    assert got[0].token_ids == ref[0].token_ids


def test_bootstrap_from_missing_path_is_clear(tmp_path):
    cfg = load_config(None, {**TINY, "bootstrap.from": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        bootstrap.run(cfg, out=tmp_path / "policy")
    assert not (tmp_path / "policy").exists()


def test_non_synthetic_task_refuses_error_injection(tmp_path):
    (tmp_path / "g.jsonl").write_text('{"question": "q?", "answer": "1+1=2\\n#### 2"}\n' * 3)
    cfg = load_config(None, {**TINY, "task.name": "gsm8k", "task.train_file": str(tmp_path / "g.jsonl")})
    train, _ = make_splits(cfg.task, 3, 1, seed=0)
    write_jsonl(tmp_path / "train.jsonl", [p.to_dict() for p in train])
    with pytest.raises(ValueError, match="bootstrap.error_rate"):
        bootstrap.run(cfg, train_file=tmp_path / "train.jsonl", out=tmp_path / "policy")


def test_bootstrap_from_gguf_file(char_tok, tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from .gguf_writer import write_llama_gguf

    model = tiny_model(char_tok, "llama", seed=2)
    gguf_path = write_llama_gguf(model, char_tok, tmp_path / "tiny.gguf")
    direct = HFPolicy.from_pretrained(gguf_path)  # the policy loads a .gguf file as it is
    text = "Q: 7 +5\n7+5=12\n"
    assert direct.encode(text) == char_tok.encode(text, add_special_tokens=False)
    assert direct.decode(direct.encode(text)) == text
    cfg = load_config(None, {**TINY, "bootstrap.from": str(gguf_path)})
    bootstrap.run(cfg, out=tmp_path / "policy")
    assert (tmp_path / "policy/model.safetensors").exists()
    prompt = [1, *char_tok.encode("Q: 2 +2\n", add_special_tokens=False)]
    stop = StopRule(max_new_tokens=6)
    ref = HFPolicy(model, char_tok).sample([prompt], stop=stop, temperature=0, seed=0)[0]
    for policy in (direct, HFPolicy.from_pretrained(tmp_path / "policy")):
        out = policy.sample([prompt], stop=stop, temperature=0, seed=0)[0]
        assert out.token_ids == ref.token_ids
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
