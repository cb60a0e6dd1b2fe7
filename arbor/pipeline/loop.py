"""The self-improvement loop's shape: which iterations exist, as the `loop` section of params.yaml.

dvc.yaml runs iteration 0 (search_0 with policy_0 and the oracle reward → critics_0 → evaluation) and then a
`foreach` over `loop.iterations`, one item `{it: k, prev: k-1}` per iteration k ≥ 1 (search_k with policy and
critics of k−1 → prefs_k → train_k → critics_k → evaluation_k). The count of iterations is the list's length;
`arbor iterate --more N` appends N items (`append_iterations`) and runs them. The list is spelled out because
DVC's `foreach` iterates over data, not over a count.

The params file is edited as text (its comments stay), the edited text is parsed and checked before it
replaces the file atomically, and a file in another shape is refused with a message saying what was expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arbor.pipeline.fields import ConfigError
from arbor.pipeline.fields import config_field as _f

ITEM = re.compile(r"^(?P<indent>\s*)- \{it: (?P<it>\d+), prev: (?P<prev>\d+)\}\s*(#.*)?$")


def iteration_items(n: int) -> list[dict[str, int]]:
    """`[{it: 1, prev: 0}, ..., {it: n, prev: n-1}]`: the foreach items of n iterations."""
    return [{"it": k, "prev": k - 1} for k in range(1, n + 1)]


def check_items(items: Any, where: str = "loop.iterations") -> None:
    """Raise `ConfigError` unless `items` is `iteration_items(len(items))` (consecutive, each naming k-1)."""
    if not isinstance(items, list) or any(not isinstance(x, dict) for x in items):
        raise ConfigError(f"{where}: expected a list of {{it: k, prev: k-1}} items, got {items!r}")
    if not items:
        raise ConfigError(f"{where}: expected at least one iteration (dvc.yaml's report reads the last one), got []")
    want = iteration_items(len(items))
    for i, (got, exp) in enumerate(zip(items, want, strict=True)):
        if got != exp:
            raise ConfigError(f"{where}[{i}]: expected {exp} (iterations are numbered 1, 2, ... and each names "
                              f"its predecessor), got {got!r}")


@dataclass
class LoopConfig:
    """The self-improvement loop: iterations k >= 1 after iteration 0 (see arbor/pipeline/loop.py)."""

    iterations: list = _f(iteration_items(2), "One item {it: k, prev: k-1} per iteration k >= 1 (dvc.yaml "
                                                "foreach); `arbor iterate --more N` appends N.",
                          expect="a list of {it: k, prev: k-1} items")

    def __post_init__(self) -> None:
        check_items(self.iterations)

    @property
    def count(self) -> int:
        """Self-improvement iterations after iteration 0."""
        return len(self.iterations)


def append_iterations(text: str, more: int, source: str = "params.yaml") -> tuple[str, int]:
    """`text` of a params file with `more` iteration items appended to `loop.iterations`; and the new count.

    The items must be written one per line in flow style (`    - {it: 1, prev: 0}`), as the presets are.
    """
    if more < 1:
        raise ConfigError(f"--more {more}: expected an integer >= 1")
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^loop:\s*(#.*)?$", line)), None)
    if start is None:
        raise ConfigError(f"{source}: no top-level `loop:` section (expected `loop:` / `  iterations:` / "
                          "`    - {it: 1, prev: 0}` lines)")
    head = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s+iterations:", lines[i])), None)
    if head is None:
        raise ConfigError(f"{source}: `loop:` has no `iterations:` list")
    last, indent, count = head, None, 0
    for i in range(head + 1, len(lines)):
        m = ITEM.match(lines[i].rstrip("\n"))
        if m:
            last, indent, count = i, m["indent"], int(m["it"])
        elif lines[i].strip() and not lines[i].lstrip().startswith("#"):
            break
    if count == 0:  # only `iterations: []` can be extended without items to copy the layout from
        if lines[head].split("#")[0].strip().replace(" ", "") != "iterations:[]":
            raise ConfigError(f"{source}: loop.iterations must be written one `- {{it: k, prev: k-1}}` per line "
                              "(or `iterations: []`) for `arbor iterate` to extend it")
        lines[head] = lines[head].replace("[]", "", 1)
        indent = re.match(r"^\s*", lines[head])[0] + "  "
    new = [f"{indent}- {{it: {k}, prev: {k - 1}}}\n" for k in range(count + 1, count + more + 1)]
    if not lines[last].endswith("\n"):
        lines[last] += "\n"
    out = "".join(lines[: last + 1] + new + lines[last + 1 :])
    return out, count + more


def write_more_iterations(params: str | Path, more: int) -> int:
    """Append `more` iterations to the params file in place (atomically, checked first); the new count."""
    from arbor.pipeline.config import load_config
    from arbor.pipeline.io import atomic_path

    path = Path(params)
    load_config(path)  # the file as it is must be valid
    text, count = append_iterations(path.read_text(), more, str(path))
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        cfg = load_config(tmp)  # and so must the result, before it replaces the file
        if cfg.loop.count != count:
            raise ConfigError(f"{path}: appending {more} iteration(s) gave {cfg.loop.count}, expected {count}")
    return count
