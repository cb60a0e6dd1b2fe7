import json

import pytest

from arbor.pipeline.config import TaskConfig
from arbor.stages.evaluate import evaluate_policy, majority_correct
from arbor.tasks import Problem, build_task

from .conftest import ScriptedPolicy

TASK = build_task(TaskConfig())


def _p(i, q, a):
    return Problem(f"eval-{i}", q, a)


def test_metrics_on_a_scripted_policy_are_exact():
    problems = [_p(0, "1 +1", "2"), _p(1, "2 +2", "4"), _p(2, "3 +3", "6"), _p(3, "4 +4", "8")]
    script = {
        # greedy = first entry; samples cycle through the list (k = 4)
        "Q: 1 +1\n": ["Answer: 2\n", "Answer: 3\n", "Answer: 2\n", "Answer: 2\n"],  # greedy ok, maj ok
        "Q: 2 +2\n": ["Answer: 5\n", "Answer: 4\n", "Answer: 5\n", "Answer: 5\n"],  # greedy wrong, pass@k ok
        "Q: 3 +3\n": ["Answer: 7\n", "nothing", "Answer: 6\n", "Answer: 6\n"],  # maj ok despite greedy wrong
        "Q: 4 +4\n": ["Answer: 1\n", "Answer: 2\n", "Answer: 3\n", "no"],  # nothing right
    }
    m = evaluate_policy(ScriptedPolicy(script), TASK, problems, k=4, temperature=1.0, max_new_tokens=20,
                        batch_size=8, seed=0)
    assert m["greedy_pass1"] == 0.25
    assert m["pass_at_k"] == 0.75
    assert m["maj_at_k"] == 0.5
    assert m["sample_accuracy"] == pytest.approx((3 + 1 + 2 + 0) / 16)
    assert m["k"] == 4 and m["eval_problems"] == 4
    assert m["forward_tokens"] > m["greedy_forward_tokens"] > 0


def test_vote_key_and_ties():
    assert TASK.vote_key("x\nAnswer: 1,000\n") == TASK.vote_key("Answer: 1000") == "1000"
    assert TASK.vote_key("no answer") is None
    p = _p(0, "q", "5")
    assert majority_correct(TASK, p, ["Answer: 5", "Answer: 6"])  # tie: first seen wins
    assert not majority_correct(TASK, p, ["Answer: 6", "Answer: 5"])
    assert not majority_correct(TASK, p, ["none", "none"])


def test_majority_votes_under_the_tasks_answer_rule():
    """task.answer_rule last_number: unmarked solutions vote with their last number (and win here); marked
    ones vote as before, and a marked line that states no number is no vote for its last digit."""
    from arbor.pipeline.config import TaskConfig
    from arbor.tasks import build_task

    flexible = build_task(TaskConfig(answer_rule="last_number"))
    p = _p(0, "q", "5")
    sols = ["2+3=5", "so it is 5.", "Answer: 6"]
    assert not majority_correct(TASK, p, sols) and majority_correct(flexible, p, sols)
    assert flexible.vote_key("Answer: 1-5") == "1-5" and flexible.vote_key("no number") is None


def test_evaluate_stage_on_a_fixed_tiny_model(char_tok, tmp_path):
    from arbor.pipeline.io import write_jsonl
    from arbor.stages import evaluate

    from .conftest import tiny_model

    model = tiny_model(char_tok, seed=1)
    model.save_pretrained(tmp_path / "policy")
    char_tok.save_pretrained(tmp_path / "policy")
    write_jsonl(tmp_path / "eval.jsonl", [_p(i, f"{i} +1", str(i + 1)).to_dict() for i in range(5)])
    argv = ["--params", "", "--tracking.enabled", "false", "--evaluate.k", "3", "--evaluate.max_new_tokens",
            "8", "--policy", str(tmp_path / "policy"), "--eval", str(tmp_path / "eval.jsonl"),
            "--metrics", str(tmp_path / "m.json")]
    first = evaluate.main(argv)
    saved = json.loads((tmp_path / "m.json").read_text())
    for key in ("greedy_pass1", "pass_at_k", "maj_at_k", "k", "forward_tokens", "eval_problems"):
        assert key in saved
    assert saved["k"] == 3 and saved["eval_problems"] == 5
    # an untrained model: the prefill alone is 5 * (1 + 6) + 15 * 7 tokens, decode adds at least one per row
    assert saved["forward_tokens"] >= 5 * 7 + 15 * 7
    assert evaluate.main(argv)["forward_tokens"] == first["forward_tokens"]  # same seed, same work


def test_sampling_and_decoding_are_separate_parts_with_one_seed_for_every_iteration(char_tok, tmp_path):
    """`--part sample` and `--part decode` write disjoint read-outs (two DVC stages: a change of evaluate.k
    does not redo search decoding); the seed does not depend on the policy's path (iterations compare alike)."""
    import shutil

    from arbor.pipeline.io import write_jsonl
    from arbor.stages import evaluate

    from .conftest import tiny_model

    tiny_model(char_tok, seed=1).save_pretrained(tmp_path / "a")
    char_tok.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    write_jsonl(tmp_path / "eval.jsonl", [_p(i, f"{i} +1", str(i + 1)).to_dict() for i in range(3)])
    base = ["--params", "", "--tracking.enabled", "false", "--evaluate.k", "2", "--evaluate.max_new_tokens", "8",
            "--evaluate.search_simulations", "2", "--eval", str(tmp_path / "eval.jsonl")]
    sample = evaluate.main([*base, "--policy", str(tmp_path / "a"), "--part", "sample",
                            "--metrics", str(tmp_path / "s.json")])
    decode = evaluate.main([*base, "--policy", str(tmp_path / "a"), "--part", "decode",
                            "--metrics", str(tmp_path / "d.json")])
    assert "greedy_pass1" in sample and not any(k.startswith("search_") for k in sample)
    assert "search_pass1" in decode and "greedy_pass1" not in decode
    again = evaluate.main([*base, "--policy", str(tmp_path / "b"), "--part", "sample",
                           "--metrics", str(tmp_path / "s2.json")])
    assert again["forward_tokens"] == sample["forward_tokens"] and again["pass_at_k"] == sample["pass_at_k"]
