import numpy as np
import pytest

from arbor.lm.base import StopRule
from arbor.lm.hf import HFPolicy

from .conftest import tiny_model


def test_char_tokenizer_round_trip_and_save_load(char_tok, tmp_path):
    text = "Q: 7 +5 *3\n7+5=12\n12*3=36\nAnswer: -36, ok? ~{}\n"
    ids = char_tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert char_tok.decode(ids) == text
    assert char_tok.encode("\n", add_special_tokens=False) == [char_tok.convert_tokens_to_ids("\n")]
    char_tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(text, add_special_tokens=False) == ids
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_left_padded_sampling_equals_one_by_one(char_tok, arch):
    policy = HFPolicy(tiny_model(char_tok, arch), char_tok)
    prompts = [policy.encode_prompt(t) for t in ("Q: 1 +2\n", "Q: 12 +3 *4 -1\n", "Q: 9\n")]
    stop = StopRule(at_newline=False, max_new_tokens=12)
    batched = policy.sample(prompts, stop=stop, temperature=0.0, seed=0)
    for p, b in zip(prompts, batched, strict=True):
        single = policy.sample([p], stop=stop, temperature=0.0, seed=0)[0]
        assert single.token_ids == b.token_ids
        np.testing.assert_allclose(single.logprobs, b.logprobs, atol=1e-5)


def test_sampling_is_seed_deterministic_and_seed_sensitive(char_tok):
    policy = HFPolicy(tiny_model(char_tok), char_tok)
    prompts = [policy.encode_prompt("Q: 3 +4\n")] * 6
    stop = StopRule(max_new_tokens=10)
    a = [c.token_ids for c in policy.sample(prompts, stop=stop, temperature=1.0, seed=11)]
    b = [c.token_ids for c in policy.sample(prompts, stop=stop, temperature=1.0, seed=11)]
    c = [c.token_ids for c in policy.sample(prompts, stop=stop, temperature=1.0, seed=12)]
    assert a == b and a != c


def test_score_matches_sampled_logprobs_and_counts_tokens(char_tok):
    policy = HFPolicy(tiny_model(char_tok, seed=3), char_tok)
    prompts = [policy.encode_prompt("Q: 1 +2\n"), policy.encode_prompt("Q: 45 -6 *2\n")]
    outs = policy.sample(prompts, stop=StopRule(max_new_tokens=8), temperature=1.0, seed=0)
    before = policy.counters.snapshot()
    scored = policy.score(prompts, [o.token_ids for o in outs])
    for s, o in zip(scored, outs, strict=True):
        np.testing.assert_allclose(s, o.logprobs, atol=1e-4)
    used = policy.counters.since(before)
    real = sum(len(p) + len(o.token_ids) for p, o in zip(prompts, outs, strict=True))
    assert used.forward_tokens == real
    width = max(len(p) + len(o.token_ids) for p, o in zip(prompts, outs, strict=True))
    assert used.padded_positions == 2 * width - real


def test_decode_counts_only_live_rows_and_stops_at_newline(char_tok):
    policy = HFPolicy(tiny_model(char_tok), char_tok)
    nl = char_tok.convert_tokens_to_ids("\n")
    prompts = [policy.encode_prompt("Q: 1\n")] * 3
    outs = policy.sample(prompts, stop=StopRule(at_newline=True, max_new_tokens=50), temperature=1.0, seed=1)
    for o in outs:
        assert (o.finish == "newline") == (o.token_ids[-1] == nl)
        assert o.finish in ("newline", "eos", "length")
        if o.finish != "length":
            assert nl not in o.token_ids[:-1] and policy.eos_token_id not in o.token_ids[:-1]
    # prefill counts every prompt token; each decode step counts one token per row still running
    expected = sum(len(p) for p in prompts) + sum(len(o.token_ids) - 1 for o in outs)
    assert policy.counters.forward_tokens == expected


def test_from_pretrained_round_trip(char_tok, tmp_path):
    model = tiny_model(char_tok)
    model.save_pretrained(tmp_path, safe_serialization=True)
    char_tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    policy = HFPolicy.from_pretrained(tmp_path)
    p = [policy.encode_prompt("Q: 2 *3\n")]
    ref = HFPolicy(model, char_tok).sample(p, stop=StopRule(max_new_tokens=6), temperature=0, seed=0)
    assert policy.sample(p, stop=StopRule(max_new_tokens=6), temperature=0, seed=0)[0].token_ids == ref[0].token_ids


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HFPolicy.from_pretrained(tmp_path / "nowhere")


def test_padded_kv_positions_count_attention_over_left_padding(char_tok):
    policy = HFPolicy(tiny_model(char_tok), char_tok)
    short, long = policy.encode_prompt("Q: 1\n"), policy.encode_prompt("Q: 45 -6 *2\n")
    pad = len(long) - len(short)
    outs = policy.sample([short, long], stop=StopRule(max_new_tokens=7), temperature=0.0, seed=0)
    c = policy.counters
    assert c.padded_positions == pad  # only the prefill has padded query positions
    # each real query of the short row (its prompt, then each fed token) attends over its `pad` masked slots;
    # the long row has none
    assert c.padded_kv_positions == pad * (len(short) + len(outs[0].token_ids) - 1)
    before = c.snapshot()
    policy.score([short, long], [o.token_ids for o in outs])
    used = policy.counters.since(before)
    a, b = len(short) + len(outs[0].token_ids), len(long) + len(outs[1].token_ids)
    assert used.padded_kv_positions == min(a, b) * abs(a - b)


def test_line_stop_rule_ends_after_the_first_final_line_or_max_lines(char_tok):
    policy = HFPolicy(tiny_model(char_tok, seed=4), char_tok)
    nl = char_tok.convert_tokens_to_ids("\n")
    prompts = [policy.encode_prompt("Q: 3 *3\n")] * 8
    one = StopRule(max_new_tokens=40, line_tokens=3, final_line=lambda line: True)
    for o in policy.sample(prompts, stop=one, temperature=1.0, seed=2):
        # one line: up to its newline, or 3 tokens, or EOS
        assert len(o.token_ids) <= 3 and nl not in o.token_ids[:-1]
        assert o.finish in ("stop", "eos")
    two = StopRule(max_new_tokens=40, line_tokens=3, max_lines=2)
    for o in policy.sample(prompts, stop=two, temperature=1.0, seed=2):
        assert len(o.token_ids) <= 6 and o.finish in ("stop", "eos")
        if o.finish == "stop":  # exactly two lines
            lines, cur = 0, 0
            for t in o.token_ids:
                cur += 1
                if t == nl or cur == 3:
                    lines, cur = lines + 1, 0
            assert lines == 2 and cur == 0
