"""The task abstraction: problems with verifiable answers, a prompt format and a reward.

A `Problem` is one row of `data/{train,eval}.jsonl`. A `Task` turns it into a prompt, scores a completion
(reward in [0, 1]) and, where it can, writes training solutions for the bootstrap policy. Solutions are one
reasoning step per line, ending with a line `Answer: N`; a search node is one such line (DESIGN.md, "options").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from arbor.pipeline.config import ArborInputError
from arbor.tasks.answers import answer_key, answers_match, extract_answer


@dataclass(frozen=True)
class Problem:
    """One problem: `answer` is the gold final answer as a string; `solution` optional worked steps."""

    id: str
    question: str
    answer: str
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROMPT_TEMPLATE = "Q: {question}\n"
SOLVED_REWARD = 1.0


def is_solved(reward: float) -> bool:
    """The one definition of a correct trajectory: its outcome reward is the full reward, 1.0.

    Every task's `reward` is 1.0 exactly for a correct final answer; partial credit and consolation scores
    (reasoning-gym's verifier gives 0.01 for a wrong answer) are never correct. NaN (unscored) is not correct.

    >>> is_solved(1.0), is_solved(0.01), is_solved(0.99), is_solved(float("nan"))
    (True, False, False, False)
    """
    return bool(reward >= SOLVED_REWARD)


class Task(Protocol):
    """What stages need from a task."""

    name: str

    def prompt(self, problem: Problem) -> str:
        """The text the policy continues; its solution follows directly."""
        ...

    def reward(self, problem: Problem, completion: str) -> float:
        """Outcome reward in [0, 1] of a complete solution (1 = correct final answer)."""
        ...

    def is_correct(self, problem: Problem, completion: str) -> bool:
        """Whether `completion` solves `problem`: `is_solved(reward(problem, completion))`."""
        ...

    def vote_key(self, completion: str) -> str | None:
        """What majority votes compare for `completion` (its stated answer, normalised), None if it states none."""
        ...

    def training_solution(self, problem: Problem, rng: np.random.Generator, error_rate: float,
                          misconception_rate: float = 0.0) -> str:
        """A solution to train the bootstrap policy on, with random slips (`error_rate` of steps) and, where
        the task defines one, a systematic misconception (applied at `misconception_rate`)."""
        ...

    def diagnostics(self, completions: Sequence[str]) -> dict[str, float]:
        """Task-specific error rates over solutions (e.g. how often a known misconception appears), reported
        beside accuracy so that a change in accuracy can be traced to its cause; {} when the task has none."""
        ...


class NumericTask:
    """Shared behaviour of tasks whose answer is a number: prompt template and number-matching reward.

    `prompt_template` (`task.prompt_template`, set by `build_task`): `{question}` is replaced by the problem's
    question (a plain replacement: other braces in the template or the question are kept as written).
    """

    name = "numeric"
    prompt_template = PROMPT_TEMPLATE
    answer_rule = "marked"  # task.answer_rule (arbor/tasks/answers.py): marked | last_number

    def prompt(self, problem: Problem) -> str:
        return self.prompt_template.replace("{question}", problem.question)

    def reward(self, problem: Problem, completion: str) -> float:
        return float(answers_match(extract_answer(completion, self.answer_rule), problem.answer))

    def vote_key(self, completion: str) -> str | None:
        return answer_key(completion, self.answer_rule)

    def is_correct(self, problem: Problem, completion: str) -> bool:
        return is_solved(self.reward(problem, completion))

    def training_solution(self, problem: Problem, rng: np.random.Generator, error_rate: float,
                          misconception_rate: float = 0.0) -> str:
        if error_rate > 0 or misconception_rate > 0:
            raise ArborInputError(
                f"task {self.name!r} cannot inject step errors; set bootstrap.error_rate and "
                "bootstrap.misconception_rate to 0 "
                "or start from a pretrained model with bootstrap.from"
            )
        if not problem.solution:
            raise ArborInputError(f"task {self.name!r}: problem {problem.id} has no solution to train on")
        return problem.solution

    def diagnostics(self, completions: Sequence[str]) -> dict[str, float]:
        return {}


def read_problems(path: str | Path) -> list[Problem]:
    """Read a `data/*.jsonl` split written by `arbor prepare`; errors name the file, row and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run `arbor prepare` first)")
    out = []
    with path.open() as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ArborInputError(f"{path}: row {i}: invalid JSON ({e})") from e
            for key in ("id", "question", "answer"):
                if not isinstance(row.get(key), str):
                    raise ArborInputError(f"{path}: row {i}: field {key!r} missing or not a string")
            out.append(Problem(row["id"], row["question"], row["answer"], row.get("solution"),
                               row.get("meta") or {}))
    if not out:
        raise ArborInputError(f"{path}: no problems (expected one JSON object per line with id, question, answer;"
                              " re-run `arbor prepare`)")
    return out
