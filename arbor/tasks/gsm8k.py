"""GSM8K-format problems from local files: rows with `question` and `answer` ending in `#### N`.

Read with `datasets` (jsonl or parquet); nothing is downloaded. The worked answer is converted to our step
format: one step per non-empty line, calculator annotations `<<48/2=24>>` removed, and `#### N` rewritten as
`Answer: N`. A missing file raises `FileNotFoundError`; an unreadable, empty or malformed file an
`ArborInputError` naming the file, the row (1-based) and the field.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from arbor.pipeline.config import ArborInputError
from arbor.tasks.answers import parse_number
from arbor.tasks.base import NumericTask, Problem

_CALC = re.compile(r"<<[^>]*>>")


def _loader(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise ArborInputError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .parquet")


def load_gsm8k_file(path: str | Path, split: str) -> list[Problem]:
    """Problems from one GSM8K-format file."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: GSM8K-format file not found")
    loader = _loader(path)
    if not path.is_file() or path.stat().st_size == 0 or (loader == "json" and not path.read_bytes().strip()):
        raise ArborInputError(f"{path}: {'not a file' if not path.is_file() else 'empty file'}; expected "
                              "GSM8K rows with 'question' and 'answer' ('... #### N')")
    ds_log = logging.getLogger("datasets")  # it logs parse errors itself; ours is the one line reported
    level = ds_log.level
    ds_log.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(loader, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in several exception types
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        raise ArborInputError(f"{path}: cannot be read as {loader} ({type(root).__name__}: {root})") from e
    finally:
        ds_log.setLevel(level)
    if len(ds) == 0:
        raise ArborInputError(f"{path}: no rows; expected GSM8K rows with 'question' and 'answer'")
    problems = []
    for i, row in enumerate(ds, start=1):
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ArborInputError(f"{path}: row {i}: field {key!r} missing or not a non-empty string")
        body, sep, final = row["answer"].rpartition("####")
        gold = parse_number(final) if sep else None
        if gold is None:
            raise ArborInputError(f"{path}: row {i}: field 'answer' does not end with '#### <number>'")
        steps = [_CALC.sub("", ln).strip() for ln in body.splitlines()]
        written = final.strip()  # the gold is kept as written (`0.0000015`, `1,234`); comparison parses it exactly
        solution = "\n".join([s for s in steps if s] + [f"Answer: {written}"]) + "\n"
        problems.append(Problem(f"{split}-{i - 1:06d}", row["question"].strip(), written, solution))
    return problems


class GSM8KTask(NumericTask):
    """GSM8K-style word problems with numeric answers."""

    name = "gsm8k"
