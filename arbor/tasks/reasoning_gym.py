"""Adapter for `reasoning-gym` procedural datasets (Apache-2.0), scored by reasoning-gym's own verifier.

Problems are generated locally (`reasoning_gym.create_dataset(name, size=..., seed=...)`); the original entry
is kept in `Problem.meta["entry"]` so that `reward` can call the dataset's `score_answer(answer, entry)`.
The model's final answer is the text of its `Answer:` line (never evaluated as code).
"""

from __future__ import annotations

from typing import Any

from arbor.pipeline.config import ArborInputError
from arbor.tasks.answers import stated_answer
from arbor.tasks.base import NumericTask, Problem


class ReasoningGymTask(NumericTask):
    """A reasoning-gym dataset (e.g. chain_sum, basic_arithmetic, gsm_symbolic)."""

    name = "reasoning_gym"

    def __init__(self, dataset: str, config: dict[str, Any] | None = None) -> None:
        import reasoning_gym

        self.dataset = dataset
        self.config = dict(config or {})
        try:
            self._score = reasoning_gym.get_score_answer_fn(dataset)
        except Exception as e:
            raise ArborInputError(f"task.rg_dataset={dataset!r}: not a reasoning-gym dataset ({e})") from e

    def problems(self, n: int, seed: int, split: str) -> list[Problem]:
        """`n` problems generated with `seed`."""
        import reasoning_gym

        ds = reasoning_gym.create_dataset(self.dataset, size=n, seed=seed, **self.config)
        out = []
        for i in range(n):
            entry = ds[i]
            out.append(Problem(f"{split}-{i:06d}", str(entry["question"]), str(entry["answer"]), None,
                               {"entry": _jsonable(entry)}))
        return out

    def reward(self, problem: Problem, completion: str) -> float:
        answer = stated_answer(completion, self.answer_rule)
        if answer is None:
            return 0.0
        return float(self._score(answer, problem.meta["entry"]))


def _jsonable(x: Any) -> Any:
    """Entries may hold tuples; make them JSON-safe (lists) for the jsonl split files."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
