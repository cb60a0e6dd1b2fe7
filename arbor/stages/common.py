"""Shared scaffolding of stage CLIs: `main()` parses params + overrides, opens tracking, calls `run`.

A stage module defines `run(cfg, ..., tracker=NullTracker()) -> metrics` (pure, testable without DVC or
MLflow) and a thin `main(argv)` built with `stage_cli`. Every option of `ArborConfig` is a `--section.key`
flag documented in `--help`, with its accepted values and its effective default (params file and built-in).

Errors: bad user input (`ArborInputError`, which includes `ConfigError`, and `FileNotFoundError`) ends a stage
with one line `arbor <stage>: error: ...` on stderr and exit code 2, before anything is written; `--debug`
(or `ARBOR_DEBUG=1`) shows the traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from arbor.pipeline.config import (
    ArborConfig,
    ArborInputError,
    ConfigError,
    add_arguments,
    load_config,
    load_params,
    origin,
    overrides_from_args,
    to_dict,
)
from arbor.pipeline.lock import lock_or_exit, worker_rank
from arbor.pipeline.tracking import Tracker, make_tracker

log = logging.getLogger("arbor")

INPUT_ERRORS: tuple[type[BaseException], ...] = (ArborInputError, FileNotFoundError)
"""Exceptions that mean "the input is wrong" (one line, exit 2); everything else is a bug (traceback, exit 1)."""

DEBUG = contextvars.ContextVar("arbor_debug", default=False)
"""Set by the global `arbor --debug <stage>`; a stage's own `--debug` and `ARBOR_DEBUG=1` work as well."""


def debug_requested(flag: bool = False) -> bool:
    """Whether tracebacks of input errors should be shown."""
    return flag or DEBUG.get() or os.environ.get("ARBOR_DEBUG", "") not in ("", "0")


def _message(e: BaseException) -> str:
    """One line for an input error; a bare `FileNotFoundError(path)` (as pyarrow raises it) says what it is."""
    text = " ".join(str(e).split())
    if isinstance(e, FileNotFoundError) and "not found" not in text and "No such file" not in text:
        text += ": file or directory not found"
    return text


@contextlib.contextmanager
def input_errors(name: str, debug: bool = False) -> Iterator[None]:
    """Turn an input error raised inside into one line `arbor <name>: error: ...` and `SystemExit(2)`."""
    try:
        yield
    except INPUT_ERRORS as e:
        if debug_requested(debug):
            raise
        print(f"arbor {name}: error: {_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def set_threads(threads: int | None) -> None:
    """`torch.set_num_threads(threads)` for this process (params.yaml `threads`); None keeps torch's default."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def check_device(device: str, where: str) -> None:
    """Refuse a device this torch build cannot use, naming `where` the device was set (`params.yaml: device`)."""
    if device == "cpu":
        return
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{where}: 'mps' requested, but torch.backends.mps.is_available() is False; "
                              "use device: cpu")
        return
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"{where}: {device!r} requested, but torch.cuda.is_available() is False (torch "
                          f"{torch.__version__} is {build}); use device: cpu or install a CUDA build of torch")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{where}: {device!r} requested, but only {torch.cuda.device_count()} CUDA device(s) "
                          f"are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")


def _params_for_help(path: str) -> dict[str, Any] | None:
    """The params file's contents for `--help`, or None when it is absent or unreadable (help still works)."""
    if not path:
        return None
    try:
        return load_params(path)
    except ConfigError:
        return None


def stage_parser(name: str, description: str, argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Parser with `--params`, `--debug` and every config option; stages add their path options to it.

    `argv` is looked at for `--params` only, so that `--help` shows the values of the params file in use.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--params", default="params.yaml")
    params_path = pre.parse_known_args(argv)[0].params
    p = argparse.ArgumentParser(prog=f"arbor {name}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="YAML params file ('' for built-in defaults).")
    p.add_argument("--debug", action="store_true", help="Show the full traceback of an error (or ARBOR_DEBUG=1).")
    add_arguments(p, params=_params_for_help(params_path), params_name=params_path or "params.yaml")
    return p


NOISE = (  # messages of library warnings that tell a user of arbor nothing (regexes)
    r".*validation_step.*val_dataloader.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*does not have many workers.*",
    r".*Consider setting `persistent_workers=True`.*",
)


def quiet_libraries() -> None:
    """Keep the console to arbor's own lines: Lightning's banner INFO (accelerator, tips) at WARNING, and the
    library warnings in `NOISE` filtered. Other warnings still show."""
    import warnings

    # Importing lightning sets its package loggers back to INFO, so the leaf loggers that print the banner get
    # their own level, which that import leaves alone.
    for package in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        for name in (package, f"{package}.utilities.rank_zero"):
            logging.getLogger(name).setLevel(logging.WARNING)
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)


def stage_cli(name: str, description: str, add_paths: Callable[[argparse.ArgumentParser], None],
              run: Callable[[ArborConfig, argparse.Namespace, Tracker], dict[str, Any]],
              argv: Sequence[str] | None = None, *, uses_device: bool = True) -> dict[str, Any]:
    """Parse, load config, check the device, open a tracker, call `run(cfg, args, tracker)`, close the run.

    Bad input exits with code 2 and one line naming the file, key or row (see `input_errors`); the run is
    closed FAILED on any error. `uses_device=False` skips the device check (a stage that loads no model).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_libraries()
    parser = stage_parser(name, description, argv)
    add_paths(parser)
    args = parser.parse_args(argv)
    with input_errors(name, args.debug):
        overrides = overrides_from_args(args)
        cfg = load_config(args.params or None, overrides)
        if uses_device:
            check_device(cfg.device, origin("device", args.params or "<defaults>", frozenset(overrides)))
            set_threads(cfg.threads)
        lock = lock_or_exit(f"arbor {name}")  # one pipeline per project dir; exits 2 naming the holder
        tracker = make_tracker(enabled=cfg.tracking.enabled and not worker_rank(),  # DDP: rank 0 tracks for all
                               stage=name, experiment=cfg.tracking.experiment, uri=cfg.tracking.uri,
                               iteration=getattr(args, "iter", None))
        try:
            tracker.log_params(to_dict(cfg))
            metrics = run(cfg, args, tracker)
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            tracker.log_dict(metrics, "metrics.json")  # the stage's metrics JSON, as an artifact
        except BaseException as e:
            tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            lock.release()
        tracker.close()
    log.info("%s: %s", name, metrics)
    return metrics


def exit_main(fn: Callable[[Sequence[str] | None], Any], name: str | None = None, debug: bool = False) -> None:
    """Run a stage `main` as a script: one clear line and exit code 2 for bad input instead of a traceback.

    `name` defaults to the script's module (`python -m arbor.stages.show_tree` → `show-tree`); `debug` (the
    global `arbor --debug`) keeps tracebacks, also for stages that parse `--debug` themselves.
    """
    name = name or Path(sys.argv[0]).stem.replace("_", "-")
    token = DEBUG.set(debug or DEBUG.get())
    try:
        with input_errors(name):
            fn(None)
    finally:
        DEBUG.reset(token)
