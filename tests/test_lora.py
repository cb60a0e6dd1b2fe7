"""LoRA helper (arbor/lm/lora.py): only adapters train, the wrapped model starts equal to its base, and both save
modes give a directory that the ordinary loader reads back to the trained model's outputs."""

import json

import pytest
import torch

from arbor.lm import lora
from arbor.lm.config import LoraConfig
from arbor.lm.hf import load_model_and_tokenizer
from arbor.pipeline.config import ArborInputError

from .conftest import tiny_model

pytest.importorskip("peft")


def _ids(tok):
    return torch.tensor([tok.encode("Q: 7 +5\n7+5=12\n", add_special_tokens=False)])


def _trained(char_tok, cfg: LoraConfig):
    """A tiny model wrapped with `cfg`, after two AdamW steps on a fixed sequence; returns (base copy, model)."""
    base = tiny_model(char_tok, seed=1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = lora.apply_lora(base, cfg)
    ids = _ids(char_tok)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model(char_tok, seed=1)(input_ids=ids).logits)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return before, model.eval()


def test_disabled_is_the_model_itself(char_tok):
    model = tiny_model(char_tok)
    assert lora.apply_lora(model, LoraConfig(enabled=False)) is model
    assert not lora.is_lora(model)


def test_only_adapters_train_and_base_weights_stay(char_tok):
    before, model = _trained(char_tok, LoraConfig(enabled=True, r=4, alpha=8.0))
    trainable, total = lora.trainable_parameters(model)
    assert 0 < trainable < total / 5
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B moved off 0
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in model.state_dict().items() if "lora_" not in k}
    for k, v in before.items():
        torch.testing.assert_close(base[k], v)


def test_named_targets_and_unknown_target(char_tok):
    model = lora.apply_lora(tiny_model(char_tok), LoraConfig(enabled=True, target_modules="q_proj,v_proj"))
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert wrapped == {"q_proj", "v_proj"}
    with pytest.raises(ArborInputError, match="lora.target_modules"):
        lora.apply_lora(tiny_model(char_tok), LoraConfig(enabled=True, target_modules="no_such_module"))


@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_saved_dir_loads_back_to_the_trained_outputs(char_tok, tmp_path, save):
    cfg = LoraConfig(enabled=True, r=4, alpha=8.0, save=save)
    _, model = _trained(char_tok, cfg)
    ids = _ids(char_tok)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    base_dir, out = tmp_path / "iter_0" / "policy", tmp_path / "iter_1" / "policy"
    tiny_model(char_tok, seed=1).save_pretrained(base_dir)
    char_tok.save_pretrained(base_dir)
    tmp = tmp_path / "iter_1" / ".policy.tmp"
    lora.save_trained(model, tmp, cfg, tokenizer=char_tok, base_dir=base_dir, final_dir=out)
    tmp.rename(out)  # as atomic_path does: the recorded base path is relative to the final place
    files = {p.name for p in out.iterdir()}
    if save == "adapter":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "../../iter_0/policy"
    else:
        assert "model.safetensors" in files and "adapter_config.json" not in files
    loaded, tok = load_model_and_tokenizer(out)
    assert not lora.is_lora(loaded) and tok.eos_token_id == char_tok.eos_token_id
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)


def test_adapter_with_missing_base_is_one_clear_error(char_tok, tmp_path):
    cfg = LoraConfig(enabled=True, r=2, save="adapter")
    model = lora.apply_lora(tiny_model(char_tok), cfg)
    lora.save_trained(model, tmp_path / "a", cfg, base_dir=tmp_path / "gone", final_dir=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="gone"):
        load_model_and_tokenizer(tmp_path / "a")


@pytest.mark.parametrize("wrapped", [False, True])
def test_checkpointed_activations_are_not_kept_and_give_the_same_gradients(char_tok, wrapped):
    """`checkpoint_activations`: the forward pass keeps far fewer tensors for backward (the decoder layers'
    activations are recomputed instead), and the loss and every gradient equal the plain model's."""
    ids = _ids(char_tok)

    def grads(checkpointed: bool) -> tuple[float, dict[str, torch.Tensor], int]:
        model = tiny_model(char_tok, seed=1)
        if wrapped:
            model = lora.apply_lora(model, LoraConfig(enabled=True, r=4))
        if checkpointed:
            lora.checkpoint_activations(model)
        model.train()
        kept = []  # elements of every tensor autograd keeps for backward (inside a checkpoint: none)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (kept.append(t.numel()), t)[1], lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, sum(kept)

    loss0, g0, kept0 = grads(False)
    loss1, g1, kept1 = grads(True)
    assert kept1 < kept0 / 2
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5)


def test_checkpointing_a_plain_module_is_one_clear_error():
    with pytest.raises(ArborInputError, match="gradient_checkpointing"):
        lora.checkpoint_activations(torch.nn.Linear(2, 2))


def test_without_peft_plain_models_train_and_save_and_lora_is_one_clear_error(char_tok, tmp_path, monkeypatch):
    """peft is an optional extra (`make run` installs the runtime only): the default path must not import it. A
    fresh-clone run failed in critics_0 when `is_lora` imported peft unconditionally."""
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError, as when not installed
    model = tiny_model(char_tok)
    assert not lora.is_lora(model) and lora.merge(model) is model
    lora.save_trained(model, tmp_path / "m", LoraConfig(), tokenizer=None)
    assert (tmp_path / "m" / "model.safetensors").exists()
    with pytest.raises(ArborInputError, match=r"lora.enabled: true needs peft.*\[lora\]"):
        lora.apply_lora(model, LoraConfig(enabled=True))
