"""`arbor` console script: one subcommand per pipeline stage (`arbor prepare --help`, ...)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

STAGES = {
    "prepare": "Write the task's train/eval problems to data/.",
    "bootstrap": "Train (or copy in) the iteration-0 policy.",
    "search": "Tree search (eta-MCTS, Tree-GRPO, chains) over the train split; trees as parquet.",
    "evaluate": "Greedy pass@1, pass@k, maj@k (and search decoding) of a policy on the eval split.",
    "show-tree": "Render one problem's search tree as a self-contained HTML page.",
}


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch `arbor <stage> [options]` to `arbor.stages.<stage>.main`."""
    from arbor.stages.common import exit_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: arbor <stage> [--help] [options]\n\nstages:")
        for name, text in STAGES.items():
            print(f"  {name:<12} {text}")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(f"arbor.stages.{argv[0].replace('-', '_')}")
    exit_main(lambda _: module.main(argv[1:]))


if __name__ == "__main__":
    main()
