import json
import math
from fractions import Fraction

import numpy as np
import pytest

from arbor.pipeline.config import TaskConfig
from arbor.tasks import Problem, build_task, extract_answer, make_splits, parse_number, read_problems
from arbor.tasks.answers import answers_match, is_terminal_step
from arbor.tasks.gsm8k import load_gsm8k_file
from arbor.tasks.synthetic import SyntheticArithmetic


def test_synthetic_is_deterministic_under_seed_and_seed_matters():
    a = make_splits(TaskConfig(), 50, 10, seed=7)
    b = make_splits(TaskConfig(), 50, 10, seed=7)
    c = make_splits(TaskConfig(), 50, 10, seed=8)
    assert a == b
    assert [p.question for p in a[0]] != [p.question for p in c[0]]


def test_synthetic_respects_knobs_and_solutions_are_correct():
    cfg = TaskConfig(min_ops=3, max_ops=4, operand_max=5, value_max=40, operators="+-")
    train, evals = make_splits(cfg, 200, 30, seed=1)
    task = build_task(cfg)
    assert not {p.question for p in train} & {p.question for p in evals}
    for p in train:
        ops = p.meta["ops"]
        assert 3 <= len(ops) <= 4
        assert all(op in "+-" and 1 <= b <= 5 for op, b in ops)
        lines = p.solution.strip().split("\n")
        assert len(lines) == len(ops) + 1 and lines[-1] == f"Answer: {p.answer}"
        for line in lines[:-1]:  # every intermediate value within [0, value_max]
            assert 0 <= int(line.split("=")[1]) <= 40
        assert task.reward(p, p.solution) == 1.0


def test_training_solution_injects_errors_at_the_configured_rate():
    task = SyntheticArithmetic()
    (train, _) = make_splits(TaskConfig(), 400, 1, seed=3)
    rng = np.random.default_rng(0)
    assert all(task.training_solution(p, rng, 0.0) == p.solution for p in train[:50])
    wrong_steps = total = 0
    for p in train:
        noisy = task.training_solution(p, rng, 0.3)
        for line in noisy.strip().split("\n")[:-1]:  # check each step's arithmetic on its own operands
            lhs, rhs = line.split("=")
            op = next(c for c in "+-*" if c in lhs[1:])
            a, b = lhs[: lhs.index(op, 1)], lhs[lhs.index(op, 1) + 1 :]
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            wrong_steps += value != int(rhs)
            total += 1
    assert 0.25 < wrong_steps / total < 0.35


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 42", Fraction(42)),
        ("Answer: -7\n", Fraction(-7)),
        ("Answer: 1,234 apples and 5 pears", Fraction(1234)),
        ("step\n#### 3.5", Fraction(7, 2)),
        ("Answer: $ 12", Fraction(12)),
        ("Answer: 3/4", Fraction(3, 4)),
        ("Answer: −5", Fraction(-5)),
        ("12+3=15\n", None),  # no answer line
        ("Answer: none", None),  # answer line without a number
        ("My answer sheet: 5", None),  # "answer" without a marker (":", "is")
        ("answer: 42", Fraction(42)),  # real models' phrasings
        ("**Answer:** 42", Fraction(42)),
        ("so 6*7=42\nThe answer is 42.", Fraction(42)),
        ("Therefore, the final answer is $1,234.", Fraction(1234)),
        ("Final Answer: \\boxed{3/4}", Fraction(3, 4)),
        ("Answer: .5", Fraction(1, 2)),  # not 5
        ("Answer: 1 234", Fraction(1234)),  # not 1
        ("#### 0.0000015", Fraction(15, 10**7)),  # not 1.5
        ("Answer: 1.5e-06", Fraction(15, 10**7)),
        ("Answer: 1234567.25", Fraction(123456725, 100)),
        ("x\n  Answer: 9 because 2+7", Fraction(9)),
        ("Answer: 2\nAnswer: 3", Fraction(2)),  # the first answer line counts
        ("1. 6 + 0 = 6\n2. So, the answer is 6.", Fraction(6)),  # numbered steps (SmolLM2-135M-Instruct)
        ("3) Answer: 7", Fraction(7)),
        ("12. 3 + 4 = 7", None),  # a numbered step is not an answer
        ("15-4=11\nAnswer: 1-1", None),  # an expression states no answer (it was read as 1)
        ("Answer: 11+3", None),
        ("Answer: 1 2", None),  # two numbers
        ("Answer: 2+3=5", None),
        ("Answer: 4 x 3", None),
        ("Answer: 11\n", Fraction(11)),
        ("Answer: 5 (since 2+3=5)", Fraction(5)),  # words may follow the number
    ],
)
def test_extract_answer_tricky_strings(text, expected):
    assert extract_answer(text) == expected


def test_parse_and_match_never_evaluate_code():
    assert parse_number("__import__('os').system('x')") is None
    assert answers_match(parse_number("2+2"), "2")  # reads the first number, does not compute 2+2
    assert not answers_match(None, "4")
    assert not answers_match(Fraction(1, 3), "0.3333333333")  # exact: no tolerance
    assert not answers_match(Fraction(1_000_001), "1000000")  # off by one is wrong at any magnitude
    assert answers_match(Fraction(3, 2), "1.50") and answers_match(Fraction(1234), "1,234")
    assert is_terminal_step("Answer: 4\n") and not is_terminal_step("2+2=4\n")
    assert is_terminal_step("The answer is 4.") and not is_terminal_step("Answer:\n")


def test_one_definition_of_correct():
    from arbor.tasks import is_solved

    task = build_task(TaskConfig())
    p = Problem("p", "1 +1", "2")
    assert task.reward(p, "Answer: 2") == 1.0 and task.is_correct(p, "Answer: 2")
    assert not task.is_correct(p, "Answer: 3")
    # sampled siblings of the answer line: the right number followed by more is not the answer
    assert task.reward(p, "1+1=2\nAnswer: 2-1") == 0.0 and task.reward(p, "1+1=2\nAnswer: 2+0") == 0.0
    assert not is_solved(0.01) and not is_solved(0.5) and is_solved(1.0)


@pytest.mark.parametrize("name", ["synthetic", "reasoning_gym"])
def test_answer_rule_last_number_reads_unmarked_results_only(name):
    """`task.answer_rule`: marked needs an answer line; last_number also takes an unmarked solution's last
    number, but a marked line always wins, and one that states no number is still no answer."""
    cfg = {"name": name, **({"rg_dataset": "basic_arithmetic"} if name == "reasoning_gym" else {})}
    strict, flexible = build_task(TaskConfig(**cfg)), build_task(TaskConfig(**cfg, answer_rule="last_number"))
    p = Problem("p", "Calculate 3 - 3.", "0", None,
                {"entry": {"question": "Calculate 3 - 3.", "answer": "0", "metadata": {}}})
    for text, marked, last in [("3 - 3 = 0", 0, 1), ("3 - 3, which is 0.", 0, 1), ("Answer: 0", 1, 1),
                               ("3 - 3 = 0\nAnswer: 1", 0, 0), ("3 - 3 = 1\nso 0 + 0 = 1", 0, 0),
                               ("3 - 3 = 0\nAnswer: 0-0", 0, 0), ("no number", 0, 0)]:
        assert strict.is_correct(p, text) == bool(marked), text
        assert flexible.is_correct(p, text) == bool(last), text


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_gsm8k_golds_kept_as_written_and_compared_exactly(tmp_path):
    rows = [{"question": "tiny?", "answer": "x\n#### 0.0000015"},
            {"question": "big?", "answer": "y\n#### 1234567.25"},
            {"question": "sep?", "answer": "z\n#### 1,000,000"}]
    _write_jsonl(tmp_path / "g.jsonl", rows)
    probs = load_gsm8k_file(tmp_path / "g.jsonl", "train")
    assert [p.answer for p in probs] == ["0.0000015", "1234567.25", "1,000,000"]
    task = build_task(TaskConfig(name="gsm8k", train_file=str(tmp_path / "g.jsonl")))
    assert task.is_correct(probs[0], "Answer: 0.0000015") and not task.is_correct(probs[0], "Answer: 1.5")
    assert task.is_correct(probs[1], "The answer is 1234567.25.")
    assert not task.is_correct(probs[1], "Answer: 1234567")  # the old .6g gold 1.23457e+06 lost this
    assert task.is_correct(probs[2], "answer: 1000000") and not task.is_correct(probs[2], "Answer: 1000001")


def test_gsm8k_jsonl_and_parquet(tmp_path):
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "Half of 1,000?", "answer": "1000/2=<<1000/2=500>>500\n#### 500"},
    ]
    _write_jsonl(tmp_path / "g.jsonl", rows)
    probs = load_gsm8k_file(tmp_path / "g.jsonl", "train")
    assert [p.answer for p in probs] == ["7", "500"]
    assert probs[0].solution == "3+4=7\nAnswer: 7\n"
    task = build_task(TaskConfig(name="gsm8k", train_file=str(tmp_path / "g.jsonl")))
    assert task.reward(probs[1], probs[1].solution) == 1.0
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
    assert load_gsm8k_file(tmp_path / "g.parquet", "train") == probs


def test_gsm8k_splits_from_one_file(tmp_path):
    rows = [{"question": f"q{i}?", "answer": f"#### {i}"} for i in range(10)]
    _write_jsonl(tmp_path / "g.jsonl", rows)
    train, evals = make_splits(TaskConfig(name="gsm8k", train_file=str(tmp_path / "g.jsonl")), 100, 3, seed=0)
    assert len(evals) == 3 and len(train) == 7
    assert not {p.question for p in train} & {p.question for p in evals}


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        ({"question": "q", "answer": "no marker"}, "answer", "#### <number>"),
        ({"question": "q", "answer": "#### many"}, "answer", "#### <number>"),
        ({"question": "", "answer": "#### 1"}, "question", "question"),
        ({"answer": "#### 1"}, "question", "question"),
    ],
)
def test_gsm8k_malformed_row_names_file_row_field(tmp_path, row, field, fragment):
    good = {"question": "q", "answer": "#### 1", "extra": 1}
    _write_jsonl(tmp_path / "bad.jsonl", [good, good, {**{"extra": 1}, **row}])
    with pytest.raises(ValueError) as e:
        load_gsm8k_file(tmp_path / "bad.jsonl", "train")
    msg = str(e.value)
    assert "bad.jsonl" in msg and "row 3" in msg and fragment in msg


def test_gsm8k_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_gsm8k_file(tmp_path / "nope.jsonl", "train")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="x.csv.*unsupported"):
        load_gsm8k_file(tmp_path / "x.csv", "train")


def test_read_problems_errors_name_file_and_row(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl: row 2: field 'answer'"):
        read_problems(f)
    f.write_text('{"id": "a", "question": "q", "answer": "1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"train.jsonl: row 2: invalid JSON"):
        read_problems(f)


def test_reasoning_gym_adapter_uses_its_verifier():
    cfg = TaskConfig(name="reasoning_gym", rg_dataset="chain_sum")
    train, evals = make_splits(cfg, 5, 3, seed=0)
    task = build_task(cfg)
    assert len(train) == 5 and len(evals) == 3
    p = train[0]
    assert task.reward(p, f"some work\nAnswer: {p.answer}\n") == 1.0
    wrong = f"Answer: {int(p.answer) + 1}\n"
    assert task.reward(p, wrong) < 1.0 and not task.is_correct(p, wrong)
    assert task.is_correct(p, f"The answer is {p.answer}.")
    assert task.reward(p, "no answer line") == 0.0
    again, _ = make_splits(cfg, 5, 3, seed=0)
    assert [q.question for q in again] == [q.question for q in train]


def test_reasoning_gym_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="not_a_dataset"):
        build_task(TaskConfig(name="reasoning_gym", rg_dataset="not_a_dataset"))


def test_misconception_is_systematic_on_borrow_steps_only():
    from arbor.tasks.synthetic import needs_borrow, subtract_without_borrow

    assert needs_borrow(42, 7) and not needs_borrow(47, 2) and needs_borrow(50, 1)
    assert subtract_without_borrow(42, 7) == 45 and subtract_without_borrow(31, 9) == 38
    task = SyntheticArithmetic(operators="-", min_ops=1, max_ops=1, operand_max=9, value_max=99)
    p = Problem("x", "42 -7", "35", None, {"start": 42, "ops": [["-", 7]]})
    rng = np.random.default_rng(0)
    outs = [task.training_solution(p, rng, 0.0, misconception_rate=0.7) for _ in range(2000)]
    share = sum(o.startswith("42-7=45\n") for o in outs) / len(outs)
    assert 0.66 < share < 0.74 and all(o.startswith(("42-7=45\n", "42-7=35\n")) for o in outs)
    q = Problem("y", "47 -2", "45", None, {"start": 47, "ops": [["-", 2]]})
    assert all(task.training_solution(q, rng, 0.0, 1.0) == "47-2=45\nAnswer: 45\n" for _ in range(50))


def test_noisy_solutions_terminate_even_when_slips_go_negative():
    task = SyntheticArithmetic()
    p = Problem("z", "1 -1 -5", "-5", None, {"start": 1, "ops": [["-", 1], ["-", 5], ["-", 7]]})
    rng = np.random.default_rng(0)
    for _ in range(300):  # slips can make a value negative; the borrow rule must not loop on it
        assert task.training_solution(p, rng, 0.9, 1.0).endswith("\n")
    with pytest.raises(ValueError, match="a >= b >= 0"):
        from arbor.tasks.synthetic import subtract_without_borrow

        subtract_without_borrow(-15, 7)


def test_synthetic_diagnostics_count_the_borrow_misconception():
    from arbor.tasks.synthetic import SyntheticArithmetic

    d = SyntheticArithmetic().diagnostics(["4*9=36\n36-7=31\n31+1=32\nAnswer: 32\n",  # 36-7: misconception
                                           "42-7=35\n35-9=26\nAnswer: 26\n",  # two borrows, both right
                                           "40-3=42\n"])  # a borrow step wrong, but not the misconception
    assert d == {"step_error_rate": 2 / 6, "borrow_steps": 4.0, "borrow_misconception_rate": 1 / 4,
                 "borrow_error_rate": 2 / 4}
    assert math.isnan(SyntheticArithmetic().diagnostics(["Answer: 3"])["step_error_rate"])
    negative = SyntheticArithmetic().diagnostics(["5-3=-8\n-8+3=-5\n"])  # a wrong step, then a right one
    assert negative["step_error_rate"] == 1 / 2 and negative["borrow_steps"] == 0.0
