"""GSM8K-format problems from local files: rows with `question` and `answer` ending in `#### N`.

Read with `datasets` (jsonl or parquet); nothing is downloaded. The worked answer is converted to our step
format: one step per non-empty line, calculator annotations `<<48/2=24>>` removed, and `#### N` rewritten as
`Answer: N`. A malformed row raises a `ValueError` naming the file, the row (1-based) and the field.
"""

from __future__ import annotations

import re
from pathlib import Path

from arbor.tasks.answers import format_number, parse_number
from arbor.tasks.base import NumericTask, Problem

_CALC = re.compile(r"<<[^>]*>>")


def _loader(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .parquet")


def load_gsm8k_file(path: str | Path, split: str) -> list[Problem]:
    """Problems from one GSM8K-format file."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: GSM8K-format file not found")
    try:
        ds = datasets.load_dataset(_loader(path), data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in several exception types
        raise ValueError(f"{path}: cannot be read as {_loader(path)} ({e})") from e
    problems = []
    for i, row in enumerate(ds, start=1):
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}: row {i}: field {key!r} missing or not a non-empty string")
        body, sep, final = row["answer"].rpartition("####")
        gold = parse_number(final) if sep else None
        if gold is None:
            raise ValueError(f"{path}: row {i}: field 'answer' does not end with '#### <number>'")
        steps = [_CALC.sub("", ln).strip() for ln in body.splitlines()]
        solution = "\n".join([s for s in steps if s] + [f"Answer: {format_number(gold)}"]) + "\n"
        problems.append(Problem(f"{split}-{i - 1:06d}", row["question"].strip(), format_number(gold), solution))
    return problems


class GSM8KTask(NumericTask):
    """GSM8K-style word problems with numeric answers."""

    name = "gsm8k"
