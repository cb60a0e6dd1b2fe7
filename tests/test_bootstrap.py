"""Stage `bootstrap`: training from scratch writes a loadable policy; `bootstrap.from` copies a local model in;
a killed training run resumes from its checkpoint to the same weights."""

import os

import numpy as np
import pytest
import torch

from arbor.lm.base import StopRule
from arbor.lm.hf import HFPolicy
from arbor.pipeline.config import ArborInputError, load_config
from arbor.pipeline.io import write_jsonl
from arbor.pipeline.manifest import verify
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


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and resume

RESUMABLE = {**TINY, "bootstrap.max_steps": 7, "bootstrap.warmup_steps": 2, "bootstrap.checkpoint_every": 2}


class Killed(RuntimeError):
    """Stands in for SIGKILL in-process (tests/test_faults.py kills real processes)."""


@pytest.fixture()
def train_file(tmp_path):
    cfg = load_config(None, TINY)
    train, _ = make_splits(cfg.task, 20, 2, seed=0)
    write_jsonl(tmp_path / "train.jsonl", [p.to_dict() for p in train])
    return tmp_path / "train.jsonl"


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _kill_at(monkeypatch, step):
    from arbor.train.sft import SFTModule

    def on_train_batch_end(self, outputs, batch, batch_idx):  # runs after the checkpoint callback of the step
        if self.global_step == step:
            raise Killed(f"killed after step {step}")

    monkeypatch.setattr(SFTModule, "on_train_batch_end", on_train_batch_end)


def test_killed_training_resumes_to_the_same_weights(tmp_path, train_file, monkeypatch, caplog):
    cfg = load_config(None, RESUMABLE)
    ref = bootstrap.run(cfg, train_file=train_file, out=tmp_path / "ref", checkpoint_dir=tmp_path / "ref_ckpt")
    assert sorted(p.name for p in (tmp_path / "ref_ckpt").iterdir()) == ["_fingerprint.json"]  # cleared at the end
    verify(tmp_path / "ref")  # the policy carries its manifest
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _kill_at(m, 5)
        with pytest.raises(Killed):
            bootstrap.run(cfg, train_file=train_file, out=tmp_path / "policy", checkpoint_dir=ckpt)
    assert not (tmp_path / "policy").exists()
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000004.ckpt", "step-00000004.json"]
    loads, torch_load = [], torch.load

    def spy_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    with caplog.at_level("INFO", logger="arbor.bootstrap"):
        again = bootstrap.run(cfg, train_file=train_file, out=tmp_path / "policy", checkpoint_dir=ckpt)
    assert "resuming from" in caplog.text and "(step 4 of 7)" in caplog.text
    assert loads and all(w is True for w in loads)  # the checkpoint is read with weights_only=True (safe loading)
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "policy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["final_train_loss"] == ref["final_train_loss"]


def test_checkpoints_of_another_run_or_damaged_are_not_resumed(tmp_path, train_file, monkeypatch, caplog):
    cfg = load_config(None, RESUMABLE)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _kill_at(m, 5)
        with pytest.raises(Killed):
            bootstrap.run(cfg, train_file=train_file, out=tmp_path / "policy", checkpoint_dir=ckpt)
    os.truncate(ckpt / "step-00000004.ckpt", 100)  # damaged: never loaded
    with caplog.at_level("INFO"):
        bootstrap.run(cfg, train_file=train_file, out=tmp_path / "policy", checkpoint_dir=ckpt)
    assert "step-00000004.ckpt: size 100 bytes" in caplog.text and "resuming from" not in caplog.text
    caplog.clear()
    with monkeypatch.context() as m:
        _kill_at(m, 3)
        with pytest.raises(Killed):
            bootstrap.run(cfg, train_file=train_file, out=tmp_path / "policy", checkpoint_dir=ckpt)
    other = load_config(None, {**RESUMABLE, "bootstrap.lr": 1e-3})  # another run: its checkpoints are removed
    with caplog.at_level("INFO"):
        bootstrap.run(other, train_file=train_file, out=tmp_path / "policy", checkpoint_dir=ckpt)
    assert "resuming from" not in caplog.text


def test_checkpoint_dir_that_is_not_ours_is_refused(tmp_path, train_file):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    cfg = load_config(None, RESUMABLE)
    with pytest.raises(ArborInputError, match="not a bootstrap checkpoint directory"):
        bootstrap.run(cfg, train_file=train_file, out=tmp_path / "policy", checkpoint_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"


def test_sample_stream_resumes_at_the_same_position():
    from arbor.train.sft import SampleStream

    def draw(rng):
        return [int(rng.integers(100))], [int(rng.integers(100)) for _ in range(int(rng.integers(1, 4)))]

    full = [x for _, x in zip(range(10), SampleStream(draw, 7), strict=False)]
    tail = [x for _, x in zip(range(4), SampleStream(draw, 7, skip=6), strict=False)]
    assert tail == full[6:] and full[6:] != full[:4]
