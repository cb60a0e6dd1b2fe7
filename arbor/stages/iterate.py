"""`arbor iterate --more N`: schedule N more self-improvement iterations and run them through DVC.

Under the project lock (a second scheduled run exits 2 naming the holder, so cron or a systemd timer never
overlaps two rounds): appends N items to `loop.iterations` in params.yaml (comments kept, the result checked
before it replaces the file atomically), then runs `dvc repro` under one MLflow parent run, exactly as
`arbor run`. DVC reruns only what is missing or changed, so a killed round is resumed by running the same
command with `--more 0`, or plain `arbor run` (a finished stage is never redone; search resumes per problem).

    arbor iterate --more 1            # one more round now
    arbor iterate --more 0            # finish what a killed round left (no new iteration)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from arbor.pipeline.config import load_config
from arbor.pipeline.lock import ProjectLock
from arbor.pipeline.loop import write_more_iterations
from arbor.stages.run import locked, run_pipeline


def main(argv: Sequence[str] | None = None) -> int:
    """Append iterations (under the lock) and run the pipeline; exits with dvc's code when it fails."""
    p = argparse.ArgumentParser(prog="arbor iterate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--more", type=int, required=True, help="Iterations to append (0: just resume/finish).")
    p.add_argument("--params", default="params.yaml", help="The params file dvc.yaml reads.")
    p.add_argument("--no-run", action="store_true", help="Only append to the params file; do not run DVC.")
    a, dvc_args = p.parse_known_args(argv)
    if a.more < 0:
        p.error(f"--more {a.more}: expected an integer >= 0")
    before = load_config(a.params).loop.count

    def body(lock: ProjectLock) -> int:
        count = write_more_iterations(a.params, a.more) if a.more else before
        print(f"arbor iterate: {a.params}: loop.iterations {before} -> {count}", file=sys.stderr)
        return 0 if a.no_run else run_pipeline(dvc_args, lock, a.params)

    return locked("arbor iterate", body)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
