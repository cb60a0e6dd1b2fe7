"""Shared helpers of the benchmarks: JSON results under bench/results/ and a printed table."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
SPEEDPROBE = Path("/work/shared/speedprobe.py")


def speedprobe() -> dict[str, Any] | None:
    """The machine's speed right now (the shared probe's JSON line: train step, decode token, matmul GFLOP/s), so
    that wall times measured on a shared, loaded CPU can be read against it; None where the probe is absent."""
    if not SPEEDPROBE.exists():
        return None
    out = subprocess.run([sys.executable, str(SPEEDPROBE)], capture_output=True, text=True, check=False)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def save(name: str, result: dict[str, Any]) -> Path:
    """Write `bench/results/<name>.json` (atomically) and return its path."""
    from arbor.pipeline.io import write_json

    result = {**result, "machine": machine(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = RESULTS / f"{name}.json"
    write_json(path, result)
    return path


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A plain-text table of `rows` restricted to `cols`."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
