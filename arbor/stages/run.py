"""`arbor run`: the whole pipeline (`dvc repro`) under the project lock and one MLflow parent run.

Takes the project lock (`.arbor.lock`; a second run exits 2 naming the holder), opens the parent run, runs
`dvc repro [ARGS]` as a child process with `ARBOR_PIPELINE_ID` set (every stage nests its run under the parent)
and closes the parent FINISHED, FAILED (dvc failed) or KILLED (Ctrl-C / SIGTERM). Extra arguments go to
`dvc repro` unchanged (`arbor run search`, `arbor run --force`). `make run` calls this.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from arbor.pipeline.config import load_config
from arbor.pipeline.lock import ProjectLock, lock_or_exit
from arbor.pipeline.tracking import ENV_PIPELINE, make_pipeline_tracker, new_pipeline_id

STOP_GRACE_S = 30.0


def dvc_command() -> list[str]:
    """The `dvc` of this environment (next to the running Python), else `python -m dvc`."""
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop dvc and its stage: SIGINT to their process group (as Ctrl-C would; dvc ignores it while a stage
    runs and lets the stage stop, which closes its run KILLED), then SIGTERM, then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=STOP_GRACE_S)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def repro(args: Sequence[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `dvc repro ARGS` in its own process group; returns (exit code, run status: FINISHED | FAILED |
    KILLED). Ctrl-C and SIGTERM reach this process only; it passes the stop on to dvc's group."""
    proc = subprocess.Popen([*dvc_command(), "repro", *args], env=env, process_group=0)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        return 130, "KILLED"
    finally:
        signal.signal(signal.SIGTERM, previous)
    return rc, "FINISHED" if rc == 0 else "FAILED"


def run_pipeline(dvc_args: Sequence[str], lock: ProjectLock, params: str = "params.yaml") -> int:
    """`dvc repro DVC_ARGS` under one MLflow parent run, while the caller holds the project `lock`; dvc's exit
    code. The parent ends FINISHED, FAILED or KILLED; dead stage runs are swept KILLED."""
    cfg = load_config(params)  # the file every stage of dvc.yaml reads
    pipeline_id = new_pipeline_id()
    tracker = make_pipeline_tracker(enabled=cfg.tracking.enabled, experiment=cfg.tracking.experiment,
                                    uri=cfg.tracking.uri, pipeline_id=pipeline_id)
    tracker.log_artifact(params)
    bindir = str(Path(sys.executable).parent)  # stages call `arbor`: this environment's
    env = {**os.environ, ENV_PIPELINE: pipeline_id, **lock.child_env(),
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    rc, status = repro(dvc_args, env)
    tracker.sweep()  # a stage killed outright (OOM, SIGKILL) is closed KILLED now, not at the next run
    if rc == 0 and Path("dvc.lock").exists():
        tracker.log_artifact("dvc.lock")
    tracker.close(status)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    """`arbor run [DVC REPRO ARGS]`; exits with dvc's code when it fails."""
    parser = argparse.ArgumentParser(prog="arbor run", usage="arbor run [-h] [DVC REPRO ARGS ...]",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _, dvc_args = parser.parse_known_args(argv)
    load_config("params.yaml")  # a broken params file is one line before the lock is taken
    return locked("arbor run", lambda lock: run_pipeline(dvc_args, lock))


def locked(command: str, body: Callable[[ProjectLock], int]) -> int:
    """Run `body(lock)` holding the project lock (exit 2 naming the holder if taken); exit with its code if
    nonzero, else return 0."""
    lock = lock_or_exit(command)
    try:
        rc = body(lock)
    finally:
        lock.release()
    if rc:
        raise SystemExit(rc)
    return 0


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
