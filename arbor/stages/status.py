"""`arbor status`: where the self-improvement loop stands — configured and finished iterations, what is
running now (the project lock's holder), and the trend of the main metrics per iteration.

Reads only files (params.yaml, metrics/iter_<k>.json, metrics/decode_<k>.json, .arbor.lock): safe to run at
any time, also while a pipeline runs. A metrics file that cannot be read is listed as such, not skipped.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arbor.pipeline.config import load_config
from arbor.pipeline.lock import LockHeld, ProjectLock, held_by_ancestor, read_holder

TREND_KEYS = ("greedy_pass1", "pass_at_k", "maj_at_k", "orm_best_of_n", "search_pass1")


def finished_iterations(metrics_dir: Path) -> dict[int, dict[str, Any] | str]:
    """{k: metrics of iteration k (iter_<k>.json merged with decode_<k>.json), or why it cannot be read}."""
    out: dict[int, dict[str, Any] | str] = {}
    for f in metrics_dir.glob("iter_*.json"):
        m = re.fullmatch(r"iter_(\d+)\.json", f.name)
        if not m:
            continue
        k = int(m[1])
        try:
            row = json.loads(f.read_text())
            decode = metrics_dir / f"decode_{k}.json"
            if decode.exists():
                row |= json.loads(decode.read_text())
            out[k] = row
        except (OSError, ValueError) as e:
            out[k] = f"unreadable ({type(e).__name__})"
    return dict(sorted(out.items()))


def running(project: Path) -> str:
    """Who holds the project lock now, in words ("nothing" when it is free)."""
    if held_by_ancestor(project):
        return "this command's parent pipeline"
    lock = ProjectLock(project, "arbor status")
    try:
        lock.acquire()
    except LockHeld:
        pid, command = read_holder(lock.path)
        return f"pid {pid}: {command}" if pid else "another process (holder not recorded yet)"
    lock.release()
    return "nothing"


def trend_table(rows: dict[int, dict[str, Any] | str]) -> str:
    """One line per iteration with the trend metrics (blank where an iteration has no such metric)."""
    keys = [k for k in TREND_KEYS if any(isinstance(r, dict) and k in r for r in rows.values())]
    lines = ["iter  " + "  ".join(f"{k:>14}" for k in keys)]
    for it, r in rows.items():
        if isinstance(r, str):
            lines.append(f"{it:>4}  {r}")
            continue
        cells = [f"{r[k]:>14.3f}" if isinstance(r.get(k), (int, float)) else f"{'':>14}" for k in keys]
        lines.append(f"{it:>4}  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    """Print and return the status report."""
    p = argparse.ArgumentParser(prog="arbor status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--metrics-dir", default="metrics")
    a = p.parse_args(argv)
    configured = load_config(a.params).loop.count
    rows = finished_iterations(Path(a.metrics_dir))
    done = [k for k, r in rows.items() if isinstance(r, dict)]
    last = max(done) if done else None
    text = "\n".join([
        f"iterations configured: 0..{configured} ({a.params}: loop.iterations)",
        f"last finished iteration: {last if last is not None else 'none yet'}",
        f"running now: {running(Path('.'))}",
        "",
        trend_table(rows) if rows else "no metrics/iter_<k>.json yet (run `make run`)",
    ])
    print(text)
    return text


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
