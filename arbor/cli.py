"""`arbor` console script: one subcommand per pipeline stage (`arbor prepare --help`, ...)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

STAGES = {
    "run": "The whole pipeline (dvc repro) under the project lock and one MLflow parent run.",
    "prepare": "Write the task's train/eval problems to data/.",
    "bootstrap": "Train (or copy in) the iteration-0 policy.",
    "search": "Tree search (eta-MCTS, Tree-GRPO, chains) over the train split; trees as parquet.",
    "critics": "Train the value, PRM and ORM critics on an iteration's trees; held-out AUROC/P/R/ECE.",
    "evaluate": "Greedy pass@1, pass@k, maj@k (and search decoding) of a policy on the eval split.",
    "prefs": "Step-level preference pairs and Tree-GRPO trajectories from iteration k's trees.",
    "train": "The policy of iteration k (step-DPO, Tree-GRPO or SFT-best) from prefs_k and policy_{k-1}.",
    "show-tree": "Render one problem's search tree as a self-contained HTML page.",
    "iterate": "Append N self-improvement iterations to params.yaml and run them (`--more N`, under the lock).",
    "status": "Last finished iteration, what is running now, and the metric trend per iteration.",
    "report": "Summary of every iteration (metrics/summary.json) and plots (accuracy, tree vs chain).",
}


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch `arbor [--debug] <stage> [options]` to `arbor.stages.<stage>.main`.

    Bad input ends with one line `arbor <stage>: error: ...` and exit code 2; `--debug` shows the traceback.
    """
    from arbor.stages.common import exit_main

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    argv = argv[1:] if debug else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: arbor [--debug] <stage> [--help] [options]\n\nstages:")
        for name, text in STAGES.items():
            print(f"  {name:<12} {text}")
        print("\n--debug: show the full traceback of an error (bad input otherwise prints one line, exit code 2)")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(f"arbor.stages.{argv[0].replace('-', '_')}")
    exit_main(lambda _: module.main(argv[1:]), name=argv[0], debug=debug)


if __name__ == "__main__":
    main()
