"""Answer extraction and comparison: parse numbers from the final answer, never evaluate model text.

A solution's final answer is on its first line that states one. Accepted phrasings (case-insensitive, with
optional markdown emphasis and a lead-in such as "So", "Thus", "Therefore"):

    Answer: 42            answer: 42          **Answer:** 42       #### 42
    The answer is 42.     Final answer: 42    The final answer is $42    ... \\boxed{42}
    2. So, the answer is 42.   (a numbered list item, as small instruct models write them)

Numbers may carry a sign, a dollar sign, thousands separators (`1,234` or `1 234`), a decimal part (`.5`,
`0.0000015`), an exponent (`1.5e-06`), or be a fraction `a/b`. Comparison is exact: both sides become
`fractions.Fraction`, so `1000001` never matches `1000000` and `0.0000015` never matches `1.5`.

The answer must state one number: words may follow it (`42 apples`, `5 (since 2+3=5)`), but an expression or a
second number may not (`1-1`, `11+3`, `1 2`, `2+3=5` state no answer). Reading the first number of `1-1` as 1
once scored such lines correct: sampling siblings without replacement at the last step produces them, and 26 of
the 254 correct terminals of a default critics_0 training split (10 of 100 held out) were of that kind.

Answer rules (`task.answer_rule`, `stated_answer`): `marked` (default) takes only a marked answer line as above.
`last_number` takes the marked line where there is one, and otherwise the last number of the whole solution
(lm-eval's "flexible-extract" for GSM8K). Small instruct models often end with a correct but unmarked result
(`3 - 3 = 0`, `... which is 0.`): in SmolLM2-135M's first trees 56 of 155 terminals had a marked answer line, 7
of them correct, while the last number was correct in 26. A marked line that states no number (`Answer: 1-1`)
stays no answer under both rules.
"""

from __future__ import annotations

import re
from fractions import Fraction

_SPACE = "[ \u00a0\u2009\u202f]"  # space-like thousands separators: space, no-break and thin spaces
_NUMBER = re.compile(
    r"(?<![\w.])[-+−]?\$?\s*"
    rf"(?:\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d{{1,3}}(?:{_SPACE}\d{{3}})+(?!\d)|\d+|(?=\.\d))"
    r"(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?"
)
_MARKER = re.compile(
    r"^[\s*_#>\-]*(?:\d{1,2}[.)]\s+)?(?:(?:so|thus|therefore|hence)\b[\s,]*)?(?:the\s+)?(?:final\s+)?answer[*_\s]*"
    r"(?:is\b[\s:]*|[:=])(?P<rest>.*)$"
    r"|^\s*####(?P<hash>.*)$",
    re.IGNORECASE,
)
_BOXED = re.compile(r"\\boxed\{(?P<box>[^{}]*)\}")
_CONTINUES = re.compile(r"\s*(?:[-+*/×xX÷=^]\s*)?\d")  # after the answer's number: an expression or another number


def _fraction(s: str) -> Fraction | None:
    """A matched `_NUMBER` string, exactly."""
    s = re.sub(_SPACE, "", s).replace(",", "").replace("$", "").replace("−", "-")
    try:
        if "/" in s:
            num, den = s.split("/")
            return None if Fraction(den) == 0 else Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):  # pragma: no cover - the regex only admits parseable strings
        return None


def parse_number(text: str) -> Fraction | None:
    """The first number in `text`, exactly, or None.

    >>> parse_number("Answer: -1,234.5 apples")
    Fraction(-2469, 2)
    >>> parse_number("= 3/4") == Fraction(3, 4)
    True
    >>> parse_number(".5"), parse_number("1 234"), parse_number("1.5e-06") == Fraction(15, 10**7)
    (Fraction(1, 2), Fraction(1234, 1), True)
    >>> parse_number("no digits") is None
    True
    """
    m = _NUMBER.search(text)
    return None if m is None else _fraction(m.group(0))


def answer_number(answer: str) -> Fraction | None:
    """The one number an answer text states (module docstring), or None: no number, or the number goes on as
    an expression or is followed by another number.

    >>> answer_number("42 apples"), answer_number("$1,234."), answer_number("5 (since 2+3=5)")
    (Fraction(42, 1), Fraction(1234, 1), Fraction(5, 1))
    >>> [answer_number(x) for x in ("1-1", "11+3", "1 2", "2+3=5", "4 x 3")]
    [None, None, None, None, None]
    """
    m = _NUMBER.search(answer)
    if m is None or _CONTINUES.match(answer, m.end()):
        return None
    return _fraction(m.group(0))


def answer_in_line(line: str) -> str | None:
    """The answer text a single line states (see module docstring), or None if it states none."""
    m = _MARKER.match(line.strip())
    if m is not None:
        rest = (m.group("rest") if m.group("rest") is not None else m.group("hash")).strip().strip("*_").strip()
        boxed = _BOXED.search(rest)
        rest = boxed.group("box").strip() if boxed else rest.removesuffix(".").rstrip()
        return rest or None
    boxed = _BOXED.search(line)
    return boxed.group("box").strip() or None if boxed else None


def final_answer_line(text: str) -> str | None:
    """The answer text of the first line of `text` that states a final answer, or None."""
    for line in text.splitlines():
        found = answer_in_line(line)
        if found is not None:
            return found
    return None


def stated_answer(text: str, rule: str = "marked") -> str | None:
    """The answer text a solution states under `rule` (module docstring): its first marked answer line, or with
    `last_number` and no marked line, its last number; None if it states none.

    >>> stated_answer("3 - 3 = 0\\nwhich is 0."), stated_answer("3 - 3 = 0\\nwhich is 0.", "last_number")
    (None, '0')
    >>> stated_answer("2+2=4\\nAnswer: 1-1", "last_number")
    '1-1'
    """
    line = final_answer_line(text)
    if line is not None or rule != "last_number":
        return line
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def answer_key(text: str, rule: str = "marked") -> str | None:
    """What majority votes compare: the number the stated answer gives (`str(Fraction)`), else the stated text
    itself; None if the solution states no answer.

    >>> answer_key("x\\nAnswer: 1,000\\n"), answer_key("Answer: 1-1"), answer_key("so 7", "last_number")
    ('1000', '1-1', '7')
    """
    stated = stated_answer(text, rule)
    if stated is None:
        return None
    num = answer_number(stated)
    return str(num) if num is not None else stated.strip()


def extract_answer(text: str, rule: str = "marked") -> Fraction | None:
    """The final numeric answer of a solution under `rule` (`stated_answer`), or None if it gives none.

    >>> extract_answer("3+4=7\\nAnswer: 7\\n")
    Fraction(7, 1)
    >>> extract_answer("3+4=7\\nThe answer is 7.") == 7
    True
    >>> extract_answer("3+4=7\\n") is None, extract_answer("3+4=7\\n", "last_number")
    (True, Fraction(7, 1))
    """
    stated = stated_answer(text, rule)
    return None if stated is None else answer_number(stated)


def is_terminal_step(step: str) -> bool:
    """True if this step (one line) states the final answer."""
    return answer_in_line(step) is not None


def answers_match(predicted: Fraction | None, gold: str | Fraction) -> bool:
    """Exact equality of a parsed prediction and a gold answer (string as written, or Fraction).

    >>> answers_match(Fraction(1000001), "1000000"), answers_match(Fraction(3, 2), "1.5")
    (False, True)
    """
    if predicted is None:
        return False
    g = parse_number(gold) if isinstance(gold, str) else gold
    return g is not None and predicted == g
