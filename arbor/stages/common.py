"""Shared scaffolding of stage CLIs: `main()` parses params + overrides, opens tracking, calls `run`.

A stage module defines `run(cfg, ..., tracker=NullTracker()) -> metrics` (pure, testable without DVC or
MLflow) and a thin `main(argv)` built with `stage_cli`. Every option of `ArborConfig` is a `--section.key`
flag documented in `--help`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from arbor.pipeline.config import (
    ArborConfig,
    ConfigError,
    add_arguments,
    load_config,
    overrides_from_args,
    to_dict,
)
from arbor.pipeline.tracking import Tracker, make_tracker

log = logging.getLogger("arbor")


def stage_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Parser with `--params` and every config option; stages add their path options to it."""
    p = argparse.ArgumentParser(prog=f"arbor {name}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="YAML params file ('' for built-in defaults).")
    add_arguments(p)
    return p


def stage_cli(name: str, description: str, add_paths: Callable[[argparse.ArgumentParser], None],
              run: Callable[[ArborConfig, argparse.Namespace, Tracker], dict[str, Any]],
              argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse, load config, open a tracker, call `run(cfg, args, tracker)`, close the run (FAILED on error)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = stage_parser(name, description)
    add_paths(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params or None, overrides_from_args(args))
    except (ConfigError, FileNotFoundError) as e:
        parser.exit(2, f"arbor {name}: {e}\n")
    tracker = make_tracker(enabled=cfg.tracking.enabled, stage=name, experiment=cfg.tracking.experiment,
                           uri=cfg.tracking.uri)
    try:
        tracker.log_params(to_dict(cfg))
        metrics = run(cfg, args, tracker)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
    log.info("%s: %s", name, metrics)
    return metrics


def exit_main(fn: Callable[[Sequence[str] | None], Any]) -> None:
    """Run a stage `main` as a script: clear one-line errors for bad input instead of a traceback."""
    try:
        fn(None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
