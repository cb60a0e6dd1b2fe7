"""Policy objectives: each loss equals a hand-computed value on a tiny batch; step-DPO lowers its loss and raises
the chosen log-ratio in a few steps; the train stage writes a manifested HF policy and, killed mid-run, resumes
(stored reference, step checkpoint) to the same weights as an uninterrupted run."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from arbor.pipeline.config import ArborInputError, load_config
from arbor.pipeline.manifest import read_manifest, verify, write_manifest
from arbor.train import dpo, grpo
from arbor.train.config import TrainConfig
from arbor.train.dpo import StepDPOModule, attach_reference, dpo_loss
from arbor.train.grpo import TreeGRPOModule, grpo_loss
from arbor.train.logps import reference_logps, token_logps
from arbor.train.sft import SFTModule, collate_sft
from arbor.train.sft_best import best_paths

from .conftest import tiny_model


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def pair(tok, a: int, b: int, wrong: int) -> dict:
    return {"prefix": [1, *ids(tok, f"Q: {a} -{b}\n")], "chosen": ids(tok, f"{a}-{b}={a - b}\n"),
            "rejected": ids(tok, f"{a}-{b}={wrong}\n")}


def test_dpo_loss_by_hand():
    out = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-1.5, -2.0]),
                   torch.tensor([-2.5, -1.5]), beta=0.5)
    # log-ratios: chosen (0.5, 0), rejected (-0.5, 0.5); h = 0.5 * (1.0, -0.5)
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.25))) / 2
    assert out["loss"].item() == pytest.approx(expected)
    assert out["margin"].tolist() == pytest.approx([0.5, -0.25])
    assert out["reward_chosen"].tolist() == pytest.approx([0.25, 0.0])


def test_dpo_module_at_the_reference_is_log2_plus_the_chosen_nll(char_tok):
    model = tiny_model(char_tok)
    items = [pair(char_tok, 42, 7, 45)]
    attach_reference(items, reference_logps(model, dpo.reference_sequences(items), pad_id=0))
    module = StepDPOModule(model, beta=0.1, nll_weight=0.5)
    with torch.no_grad():
        got = module.losses(dpo.collate(items, 0))
        nll = model(**collate_sft([(items[0]["prefix"], items[0]["chosen"])], 0)).loss  # HF's own token NLL
    assert got["loss/dpo"].item() == pytest.approx(math.log(2), abs=1e-6)  # unchanged policy: log-ratios 0
    assert got["logratio/chosen"].item() == pytest.approx(0.0, abs=1e-5)
    assert got["loss/nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert got["loss"].item() == pytest.approx(math.log(2) + 0.5 * nll.item(), rel=1e-5)
    assert module.hparams.beta == 0.1 and module.hparams.nll_weight == 0.5


def test_grpo_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    old = torch.tensor([[-1.0, -2.5], [-0.5, 0.0]])
    ref = torch.tensor([[-1.5, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([2.0, -1.0])
    out = grpo_loss(logp, old, ref, mask, adv, clip_eps=0.2, kl_coef=0.1)
    r = math.exp(0.5)  # ratio of sequence 0, token 1: clipped to 1.2 (A > 0 takes the min)
    pg0 = (-2.0 * 1.0 + -2.0 * min(r, 1.2)) / 2
    kl0 = ((math.exp(-0.5) + 0.5 - 1) + 0.0) / 2
    pg1 = 1.0  # ratio 1, A = -1; its second token is masked out
    assert out["pg"].item() == pytest.approx((pg0 + pg1) / 2)
    assert out["kl"].item() == pytest.approx(kl0 / 2)
    assert out["loss"].item() == pytest.approx((pg0 + 0.1 * kl0 + pg1) / 2)
    assert out["clip_frac"].item() == pytest.approx((0.5 + 0.0) / 2)


def test_grpo_module_at_the_reference_is_minus_the_mean_advantage(char_tok):
    model = tiny_model(char_tok)
    items = [{"prompt": [1, *ids(char_tok, "Q: 5 +3\n")], "completion": ids(char_tok, c), "advantage": a}
             for c, a in (("5+3=8\nAnswer: 8\n", 1.5), ("5+3=9\nAnswer: 9\n", -0.5))]
    for it, r in zip(items, reference_logps(model, [(x["prompt"], x["completion"]) for x in items], pad_id=0),
                     strict=True):
        it["ref"] = r
    with torch.no_grad():
        got = TreeGRPOModule(model, clip_eps=0.2, kl_coef=0.5).losses(grpo.collate(items, 0))
    assert got["loss"].item() == pytest.approx(-(1.5 - 0.5) / 2, abs=1e-5) and got["kl"].item() == pytest.approx(0)


def test_sft_loss_is_the_mean_completion_token_nll(char_tok):
    model = tiny_model(char_tok)
    batch = collate_sft([([1, 5, 6], [7, 8, 2]), ([1, 9], [10, 11, 12, 2])], 0)
    with torch.no_grad():
        lp, mask = token_logps(model, batch)
        got = SFTModule(model).losses(batch)["loss"]
    assert got.item() == pytest.approx((-lp.sum() / mask.sum()).item(), rel=1e-5) and int(mask.sum()) == 7


def test_best_paths_pick_the_best_correct_leaf_per_problem():
    table = pa.table({"problem_id": ["a", "a", "a", "b", "c"], "leaf": [3, 5, 9, 2, 4],
                      "reward": [1.0, 1.0, 0.0, 0.0, 1.0], "leaf_visits": [1, 3, 9, 5, 1],
                      "prompt_ids": [[1]] * 5, "completion_ids": [[7], [8, 8], [9], [6], [5]]})
    got = best_paths(table, min_reward=1.0, eos_id=2)
    assert [(x["problem_id"], x["completion"]) for x in got] == [("a", [8, 8, 2]), ("c", [5, 2])]


def test_dpo_steps_lower_the_loss_and_raise_the_chosen_log_ratio(char_tok):
    model = tiny_model(char_tok)
    items = [pair(char_tok, a, b, w) for a, b, w in ((42, 7, 45), (53, 28, 35), (61, 9, 68), (30, 4, 34))]
    attach_reference(items, reference_logps(model, dpo.reference_sequences(items), pad_id=0))
    module = StepDPOModule(model, beta=0.5, nll_weight=1.0, lr=1e-2, warmup_steps=0, max_steps=12)
    batch = dpo.collate(items, 0)
    opt = module.configure_optimizers()["optimizer"]
    with torch.no_grad():
        before = module.losses(batch)
    for _ in range(12):
        opt.zero_grad()
        module.losses(batch)["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = module.losses(batch)
    assert after["loss/dpo"] < before["loss/dpo"] - 0.1
    assert after["logratio/chosen"] > 0.5 and after["rewards/accuracy"] == 1.0


# -- the stage -------------------------------------------------------------------------------------------------

class Killed(RuntimeError):
    """Stands in for SIGKILL in-process (tests/test_faults.py kills real processes)."""


@pytest.fixture()
def workspace(tmp_path, char_tok):
    """A saved tiny policy and a prefs directory made by stage `prefs` from a hand-built tree over its tokens."""
    from arbor.mcts.tree import add_child, new_tree
    from arbor.mcts.treeio import tree_rows, write_trees
    from arbor.stages import prefs

    model = tiny_model(char_tok)
    model.save_pretrained(tmp_path / "policy", safe_serialization=True)
    char_tok.save_pretrained(tmp_path / "policy")
    trees = tmp_path / "trees"
    trees.mkdir()
    rows = []
    for k, (a, b, wrong) in enumerate(((42, 7, 45), (53, 28, 35), (61, 9, 68))):
        tree = new_tree(32, 512, [1, *ids(char_tok, f"Q: {a} -{b} +1\n")])
        good = add_child(tree, 0, ids(char_tok, f"{a}-{b}={a - b}\n"))
        bad = add_child(tree, 0, ids(char_tok, f"{a}-{b}={wrong}\n"))
        add_child(tree, good, ids(char_tok, f"Answer: {a - b + 1}\n"), terminal=True, reward=1.0)
        add_child(tree, bad, ids(char_tok, f"Answer: {wrong + 1}\n"), terminal=True, reward=0.0)
        tree.visits[:5] = [2, 1, 1, 1, 1]
        rows.append(tree_rows(f"p{k}", tree, char_tok.decode))
    write_trees(trees / "part-00000.parquet", rows)
    write_manifest(trees)
    prefs.run(load_config(None), trees_dir=trees, out_dir=tmp_path / "prefs")
    return tmp_path


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


RESUMABLE = {"train.batch_size": 2, "train.accumulate_grad_batches": 2, "train.epochs": 6.0,
             "train.checkpoint_every": 2, "train.warmup_steps": 1, "train.lr": 1e-3}


@pytest.mark.parametrize("objective", ["dpo", "grpo", "sft_best"])
def test_train_stage_writes_a_manifested_policy(workspace, objective):
    from arbor.lm.hf import HFPolicy
    from arbor.stages import train

    cfg = load_config(None, {**RESUMABLE, "train.objective": objective, "train.checkpoint_every": 0})
    m = train.run(cfg, prefs_dir=workspace / "prefs", policy_dir=workspace / "policy", out=workspace / "out")
    assert m["objective"] == objective and m["items"] == 3 * (2 if objective == "grpo" else 1)
    assert m["steps"] == math.ceil(6 * m["items"] / 4)
    verify(workspace / "out")
    before, after = _weights(workspace / "policy"), _weights(workspace / "out")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    HFPolicy.from_pretrained(workspace / "out")  # a normal HF directory


def test_train_stage_loads_the_policy_as_configured(workspace):
    """Like every stage, train loads the policy through `load_policy` (a chat-template config needs the policy's
    template), but trains float32 master weights whatever `policy.dtype` is (bf16 would round updates away)."""
    from arbor.stages import train

    short = {**RESUMABLE, "train.checkpoint_every": 0, "train.epochs": 1.0}
    kw = {"prefs_dir": workspace / "prefs", "policy_dir": workspace / "policy"}
    with pytest.raises(ArborInputError, match="no chat template"):
        train.run(load_config(None, {**short, "policy.chat_template": True}), out=workspace / "chat", **kw)
    assert not (workspace / "chat").exists()
    train.run(load_config(None, {**short, "policy.dtype": "bfloat16"}), out=workspace / "out", **kw)
    before, after = _weights(workspace / "policy"), _weights(workspace / "out")
    assert all(w.dtype == torch.float32 for w in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_train_stage_with_lora_moves_only_the_adapters(workspace, monkeypatch, save):
    """train.lora: the policy's own weights stay frozen while the adapters train; the saved policy (adapters
    merged, or an adapter dir over the previous policy) loads with `load_policy` to the trained outputs."""
    from arbor.lm import lora
    from arbor.lm.loading import load_policy
    from arbor.stages import train

    ids = torch.tensor([ids_of(workspace)])
    seen = {}
    real = lora.save_trained

    def spy(model, out, cfg, **kw):
        assert lora.is_lora(model)
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            seen["logits"] = model(input_ids=ids).logits
        real(model, out, cfg, **kw)

    monkeypatch.setattr(lora, "save_trained", spy)
    cfg = load_config(None, {**RESUMABLE, "train.checkpoint_every": 0, "train.epochs": 2.0, "train.lora.enabled": True,
                             "train.lora.r": 4, "train.lora.save": save})
    m = train.run(cfg, prefs_dir=workspace / "prefs", policy_dir=workspace / "policy", out=workspace / "out")
    assert m["lora"] and m["steps"] == 2 and 0 < m["trainable_parameters"] < m["parameters"] / 5
    before = _weights(workspace / "policy")
    base = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in seen["state"].items()
            if "lora_" not in k}
    assert before.keys() <= base.keys() and all(torch.equal(base[k], before[k]) for k in before)  # frozen
    assert any(v.abs().sum() > 0 for k, v in seen["state"].items() if "lora_B" in k)  # the adapters moved
    verify(workspace / "out")
    assert (workspace / "out" / lora.ADAPTER_CONFIG).is_file() == (save == "adapter")
    policy = load_policy(workspace / "out", cfg)
    assert not lora.is_lora(policy.model)
    with torch.no_grad():
        torch.testing.assert_close(policy.model(input_ids=ids).logits, seen["logits"], atol=1e-5, rtol=1e-4)
    if save == "merged":  # only the adapted linear layers changed; embeddings and norms are the policy's
        after = _weights(workspace / "out")
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(k.endswith("_proj.weight") for k in changed)
        assert all(after[k].dtype == torch.float32 for k in after)


def ids_of(workspace) -> list[int]:
    from transformers import AutoTokenizer

    return ids(AutoTokenizer.from_pretrained(workspace / "policy"), "Q: 42 -7 +1\n42-7=35\n")


def test_lora_config_checks():
    from arbor.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="train.strategy: ddp or deepspeed"):
        load_config(None, {"train.lora.enabled": True, "train.strategy": "fsdp"})
    with pytest.raises(ConfigError, match="critics.freeze_backbone: false"):
        load_config(None, {"critics.lora.enabled": True, "critics.freeze_backbone": True})
    with pytest.raises(ConfigError, match="critics.lora.save: merged"):
        load_config(None, {"critics.lora.enabled": True, "critics.freeze_backbone": False,
                           "critics.lora.save": "adapter"})
    with pytest.raises(ConfigError, match="train.lora.r"):
        load_config(None, {"train.lora.r": 0})
    assert load_config(None, {"train.lora.enabled": True, "train.lora.r": 8}).train.lora.r == 8


def _kill_at(monkeypatch, step):
    def on_train_batch_end(self, outputs, batch, batch_idx):  # runs after the checkpoint callback of the step
        if self.global_step == step:
            raise Killed(f"killed after step {step}")

    monkeypatch.setattr(StepDPOModule, "on_train_batch_end", on_train_batch_end)


def test_killed_training_resumes_to_the_same_weights(workspace, monkeypatch, caplog):
    from arbor.stages import train
    from arbor.train import logps

    cfg = load_config(None, RESUMABLE)  # 3 pairs, 6 epochs, 4 pairs per step: 5 steps, checkpoints at 2, 4
    kw = {"prefs_dir": workspace / "prefs", "policy_dir": workspace / "policy"}
    ref = train.run(cfg, out=workspace / "ref", checkpoint_dir=workspace / "ref_ckpt", **kw)
    assert sorted(p.name for p in (workspace / "ref_ckpt").iterdir()) == ["_fingerprint.json"]  # cleared
    ckpt = workspace / "ckpt"
    with monkeypatch.context() as m:
        _kill_at(m, 3)
        with pytest.raises(Killed):
            train.run(cfg, out=workspace / "out", checkpoint_dir=ckpt, **kw)
    assert not (workspace / "out").exists()
    assert sorted(p.name for p in ckpt.iterdir() if p.name != "_fingerprint.json") == [
        "reference.json", "reference.parquet", "step-00000002.ckpt", "step-00000002.json"]
    calls = []
    monkeypatch.setattr(logps, "reference_logps", lambda *a, **k: calls.append(1))
    with caplog.at_level("INFO"):
        again = train.run(cfg, out=workspace / "out", checkpoint_dir=ckpt, **kw)
    assert not calls  # the stored reference log-probs were reused
    assert again["resumed_from_step"] == 2 and again["steps"] == ref["steps"] == 5
    a, b = _weights(workspace / "ref"), _weights(workspace / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_stage_with_empty_prefs_keeps_the_policy_and_refuses_missing_ones(workspace):
    import pyarrow.parquet as pq

    from arbor.stages import train

    cfg = load_config(None, {"train.objective": "sft_best", "train.sft_min_reward": 1.0})
    empty = workspace / "empty"
    empty.mkdir()
    table = pq.read_table(workspace / "prefs" / "trajectories.parquet")
    pq.write_table(table.filter(pa.compute.less(table.column("reward"), 1.0)), empty / "trajectories.parquet")
    pq.write_table(pq.read_table(workspace / "prefs" / "pairs.parquet"), empty / "pairs.parquet")
    write_manifest(empty)
    # no training items: the loop goes on with policy_k = policy_{k-1}, marked untrained in metrics and manifest
    m = train.run(cfg, prefs_dir=empty, policy_dir=workspace / "policy", out=workspace / "out")
    assert m["trained"] is False and m["items"] == 0
    assert read_manifest(workspace / "out")["meta"]["trained"] is False
    a, b = (load_file(d / "model.safetensors") for d in (workspace / "policy", workspace / "out"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ArborInputError, match="damaged or incomplete"):
        train.run(cfg, prefs_dir=workspace / "trees_missing", policy_dir=workspace / "policy", out=workspace / "o")
    assert not (workspace / "o").exists() and np.isfinite(TrainConfig().lr)


def test_train_stage_gradient_checkpointing_trains_the_same_weights(workspace, monkeypatch):
    """`train.gradient_checkpointing` reaches the model (activations recomputed) and changes no weight."""
    import arbor.lm.lora as lora
    from arbor.stages import train

    seen = []
    real = lora.checkpoint_activations
    monkeypatch.setattr(lora, "checkpoint_activations", lambda m: (seen.append(type(m).__name__), real(m))[1])
    short = {**RESUMABLE, "train.checkpoint_every": 0, "train.epochs": 2.0}
    kw = {"prefs_dir": workspace / "prefs", "policy_dir": workspace / "policy"}
    train.run(load_config(None, short), out=workspace / "plain", **kw)
    assert seen == []
    train.run(load_config(None, {**short, "train.gradient_checkpointing": True}), out=workspace / "ckpt", **kw)
    assert len(seen) == 1
    plain, ckpt = _weights(workspace / "plain"), _weights(workspace / "ckpt")
    assert any(not torch.equal(plain[k], _weights(workspace / "policy")[k]) for k in plain)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5)


def test_gpu_preset_training_code_runs_on_cpu(workspace):
    """What configs/gpu.yaml changes in training (policy in bfloat16, `train.precision: bf16-mixed`, gradient
    checkpointing) is the code a CUDA run takes; on the CPU it trains and saves float32 master weights."""
    from pathlib import Path

    from arbor.stages import train

    gpu = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml")
    assert gpu.train.precision == "bf16-mixed" and gpu.train.gradient_checkpointing and gpu.device == "cuda"
    cfg = load_config(None, {**RESUMABLE, "train.checkpoint_every": 0, "train.epochs": 2.0,
                             "policy.dtype": gpu.policy.dtype, "train.precision": gpu.train.precision,
                             "train.gradient_checkpointing": gpu.train.gradient_checkpointing})
    m = train.run(cfg, prefs_dir=workspace / "prefs", policy_dir=workspace / "policy", out=workspace / "out")
    assert m["steps"] > 0 and np.isfinite(m["final_train_loss"])
    before, after = _weights(workspace / "policy"), _weights(workspace / "out")
    assert all(w.dtype == torch.float32 for w in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_every_objective_states_the_padded_width_its_items_need():
    """`length(item)` (what `train.length_pool` sorts by) is the width `collate` pads the item to."""
    from arbor.train import sft_best
    from arbor.train.policy import OBJECTIVES

    items = {"dpo": {"prefix": [1, 5, 6], "chosen": [7, 2], "rejected": [8, 9, 10, 2], "ref_chosen": 0.0,
                     "ref_rejected": 0.0},
             "grpo": {"prompt": [1, 5], "completion": [7, 8, 2], "advantage": 1.0, "ref": np.zeros(3)},
             "sft_best": {"problem_id": "p", "prompt": [1, 5, 6, 7], "completion": [8, 2]}}
    assert set(items) == set(OBJECTIVES) and OBJECTIVES["sft_best"] is sft_best
    for name, mod in OBJECTIVES.items():
        assert mod.length(items[name]) == mod.collate([items[name]], 0)["input_ids"].shape[1], name
    assert dpo.length(items["dpo"]) == 7 and grpo.length(items["grpo"]) == 5
