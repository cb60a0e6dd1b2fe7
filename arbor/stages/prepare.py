"""Stage `prepare`: write the task's train and eval problems to `data/{train,eval}.jsonl`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arbor.pipeline.config import ArborConfig
from arbor.pipeline.io import write_jsonl
from arbor.pipeline.seeds import derive_seed
from arbor.pipeline.tracking import NullTracker, Tracker
from arbor.tasks import make_splits


def run(cfg: ArborConfig, *, out_dir: str | Path = "data", tracker: Tracker | None = None) -> dict[str, Any]:
    """Generate/read the splits (all input checked first) and write them atomically; returns counts."""
    train, evals = make_splits(cfg.task, cfg.prepare.n_train, cfg.prepare.n_eval, derive_seed(cfg.seed, "prepare"))
    out_dir = Path(out_dir)
    n_train = write_jsonl(out_dir / "train.jsonl", (p.to_dict() for p in train))
    n_eval = write_jsonl(out_dir / "eval.jsonl", (p.to_dict() for p in evals))
    return {"train_problems": n_train, "eval_problems": n_eval}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`arbor prepare`: parse params and options, run the stage; bad input exits 2 with one line."""
    from arbor.stages.common import stage_cli

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out-dir", default="data", help="Where train.jsonl and eval.jsonl are written.")

    return stage_cli("prepare", __doc__ or "", paths,
                     lambda cfg, a, tr: run(cfg, out_dir=a.out_dir, tracker=tr or NullTracker()), argv,
                     uses_device=False)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
