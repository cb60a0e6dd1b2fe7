"""Answer extraction and comparison: parse numbers from the final answer, never evaluate model text.

A solution's final answer is the number on its first line that starts with `Answer:` (our format) or `####`
(GSM8K's). Numbers may carry a sign, thousands separators (`1,234`), a decimal part, or be a fraction `a/b`.
"""

from __future__ import annotations

import re
from fractions import Fraction

ANSWER_PREFIXES = ("Answer:", "####")
_NUMBER = re.compile(r"[-+−]?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")


def parse_number(text: str) -> Fraction | None:
    """The first number in `text`, exactly, or None.

    >>> parse_number("Answer: -1,234.5 apples")
    Fraction(-2469, 2)
    >>> parse_number("= 3/4") == Fraction(3, 4)
    True
    >>> parse_number("no digits") is None
    True
    """
    m = _NUMBER.search(text)
    if m is None:
        return None
    s = m.group(0).replace(",", "").replace("$", "").replace(" ", "").replace("−", "-")
    try:
        if "/" in s:
            num, den = s.split("/")
            return None if Fraction(den) == 0 else Fraction(num) / Fraction(den)
        return Fraction(s)
    except ValueError:  # pragma: no cover - the regex only admits parseable strings
        return None


def final_answer_line(text: str) -> str | None:
    """The text after the first `Answer:`/`####` marker at the start of a line, or None."""
    for line in text.splitlines():
        stripped = line.strip()
        for prefix in ANSWER_PREFIXES:
            if stripped.startswith(prefix):
                return stripped[len(prefix):].strip()
    return None


def extract_answer(text: str) -> Fraction | None:
    """The final numeric answer of a solution, or None if it gives none.

    >>> extract_answer("3+4=7\\nAnswer: 7\\n")
    Fraction(7, 1)
    >>> extract_answer("3+4=7\\n") is None
    True
    """
    line = final_answer_line(text)
    return None if line is None else parse_number(line)


def is_terminal_step(step: str) -> bool:
    """True if this step (one line) states the final answer."""
    s = step.strip()
    return any(s.startswith(p) for p in ANSWER_PREFIXES)


def answers_match(predicted: Fraction | None, gold: str | Fraction, tol: float = 1e-6) -> bool:
    """Numeric equality of a parsed prediction and a gold answer (string or Fraction)."""
    if predicted is None:
        return False
    g = parse_number(gold) if isinstance(gold, str) else gold
    return g is not None and abs(float(predicted - g)) <= tol * max(1.0, abs(float(g)))


def format_number(x: Fraction | int) -> str:
    """Canonical string of a number: integers without decimals, else a reduced decimal/fraction."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    return f"{float(x):.6g}"
