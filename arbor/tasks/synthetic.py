"""Built-in synthetic multi-step arithmetic: the default task, runnable offline on any laptop.

A problem is a start value and a chain of 2-6 operations applied left to right, e.g. question `7 +5 *3 -4`.
Its solution has one step per line and a final answer line:

    7+5=12
    12*3=36
    36-4=32
    Answer: 32

Operands come from 1..operand_max and every intermediate value stays in [0, value_max], so a tiny character
model can learn the arithmetic. For the bootstrap policy, `training_solution` writes imperfect solutions, with
two kinds of error, each carried forward to the final answer as a careless solver would:

- random slips: a fraction `error_rate` of steps have a result off by 1, 2 or 10. These are noise; the most
  likely next step is still the correct one, so they hurt sampling but not greedy decoding.
- a misconception: a fraction `misconception_rate` of subtractions that need a borrow are done without it,
  digit by digit, smaller from larger (`42-7=45`). Above 0.5 this is the policy's *preferred* answer, so greedy
  decoding repeats it, while sampling still finds the correct step. This is the room to improve that search
  and preference training can recover.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from arbor.pipeline.config import ArborInputError
from arbor.tasks.base import NumericTask, Problem

_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
SLIPS = (-10, -2, -1, 1, 2, 10)
_STEP = re.compile(r"^(-?\d+)([-+*])(\d+)=(-?\d+)$", re.M)  # a wrong running value may go negative


class SyntheticArithmetic(NumericTask):
    """Chains of `+ - *` over small integers (knobs: ops count, operand range, value range, operators)."""

    name = "synthetic"

    def __init__(self, *, min_ops: int = 2, max_ops: int = 6, operand_max: int = 9, value_max: int = 99,
                 operators: str = "+-*") -> None:
        self.min_ops, self.max_ops = min_ops, max_ops
        self.operand_max, self.value_max = operand_max, value_max
        self.operators = operators

    def _one(self, rng: np.random.Generator) -> tuple[int, list[tuple[str, int]]]:
        start = int(rng.integers(1, self.operand_max + 1))
        value, ops = start, []
        for _ in range(int(rng.integers(self.min_ops, self.max_ops + 1))):
            choices = [
                (op, b)
                for op in self.operators
                for b in range(1, self.operand_max + 1)
                if 0 <= _APPLY[op](value, b) <= self.value_max and not (op == "*" and b == 1)
            ]
            if not choices:  # only possible with operators="*" and a large value; stop the chain early
                break
            op, b = choices[int(rng.integers(len(choices)))]
            ops.append((op, b))
            value = _APPLY[op](value, b)
        return start, ops

    @staticmethod
    def render(start: int, ops: list[tuple[str, int]]) -> tuple[str, int]:
        """Correct solution text and final value."""
        lines, value = [], start
        for op, b in ops:
            result = _APPLY[op](value, b)
            lines.append(f"{value}{op}{b}={result}")
            value = result
        lines.append(f"Answer: {value}")
        return "\n".join(lines) + "\n", value

    def problems(self, n: int, seed: int, split: str, exclude: set[str] | None = None) -> list[Problem]:
        """`n` distinct problems, deterministic in `seed`; questions in `exclude` are skipped."""
        rng = np.random.default_rng(seed)
        seen = set(exclude or ())
        out: list[Problem] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ArborInputError(f"synthetic task: cannot draw {n} distinct problems with these knobs")
            start, ops = self._one(rng)
            question = f"{start} " + " ".join(f"{op}{b}" for op, b in ops)
            if question in seen or len(ops) < self.min_ops:
                continue
            seen.add(question)
            solution, answer = self.render(start, ops)
            out.append(Problem(f"{split}-{len(out):06d}", question, str(answer), solution,
                               {"start": start, "ops": [[op, b] for op, b in ops]}))
        return out

    def training_solution(self, problem: Problem, rng: np.random.Generator, error_rate: float,
                          misconception_rate: float = 0.0) -> str:
        ops = [(op, int(b)) for op, b in problem.meta["ops"]]
        lines, value = [], int(problem.meta["start"])
        for op, b in ops:
            if op == "-" and 0 <= b <= value and needs_borrow(value, b) and rng.random() < misconception_rate:
                result = subtract_without_borrow(value, b)
            else:
                result = _APPLY[op](value, b)
            if rng.random() < error_rate:
                result += int(rng.choice(SLIPS))
            lines.append(f"{value}{op}{b}={result}")
            value = result
        return "\n".join([*lines, f"Answer: {value}"]) + "\n"

    def diagnostics(self, completions: Sequence[str]) -> dict[str, float]:
        """Over every `a op b = c` line of `completions` (whatever came before it; NaN where there is none):
        `step_error_rate` = share of lines with c != a op b; `borrow_steps` = lines `a-b=c` whose subtraction
        borrows; `borrow_misconception_rate` = share of those with c = the digit-by-digit result (the bootstrap
        misconception); `borrow_error_rate` = share of those with any wrong c."""
        steps = wrong = borrow = misconceived = borrow_wrong = 0
        for text in completions:
            for a, op, b, c in _STEP.findall(text):
                a, b, c = int(a), int(b), int(c)
                ok = _APPLY[op](a, b) == c
                steps += 1
                wrong += not ok
                if op == "-" and 0 <= b <= a and needs_borrow(a, b):
                    borrow += 1
                    borrow_wrong += not ok
                    misconceived += c == subtract_without_borrow(a, b)
        nan = float("nan")
        return {"step_error_rate": wrong / steps if steps else nan, "borrow_steps": float(borrow),
                "borrow_misconception_rate": misconceived / borrow if borrow else nan,
                "borrow_error_rate": borrow_wrong / borrow if borrow else nan}


def needs_borrow(a: int, b: int) -> bool:
    """Whether column subtraction a - b (a >= b >= 0) borrows in some digit."""
    if not 0 <= b <= a:
        raise ValueError(f"needs_borrow({a}, {b}): defined for a >= b >= 0")
    while b:
        if a % 10 < b % 10:
            return True
        a, b = a // 10, b // 10
    return False


def subtract_without_borrow(a: int, b: int) -> int:
    """The classic error: subtract digit by digit, smaller from larger (42-7 -> 45).

    >>> subtract_without_borrow(42, 7), subtract_without_borrow(53, 28), subtract_without_borrow(40, 3)
    (45, 35, 43)
    """
    if not 0 <= b <= a:
        raise ValueError(f"subtract_without_borrow({a}, {b}): defined for a >= b >= 0")
    out, place = 0, 1
    while a or b:
        out += abs(a % 10 - b % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out
