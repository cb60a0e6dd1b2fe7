"""Resumable training: step checkpoints that a killed run (or `dvc repro` after a kill) resumes from.

`StepCheckpoint` saves the whole Lightning state (weights, optimizer, LR schedule, loop counters) every `every`
optimizer steps to `<dir>/step-<N>.ckpt`, atomically, and then its record `<dir>/step-<N>.json` (the step and
the file's size and sha256): a checkpoint counts only once its record matches it, so a kill mid-save leaves the
previous one in charge. Older checkpoints are removed once a newer one is recorded. `latest(dir)` finds the
newest intact checkpoint to pass as `ckpt_path`; a damaged one is reported and skipped, never loaded.

Which run a directory belongs to is recorded by `manifest.claim_dir` (config, data and source fingerprint);
checkpoints of another run are removed, never resumed from. Under DVC the directory must be a `persist: true`
out, or DVC deletes it before the stage runs again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Checkpoint

from arbor.pipeline.io import atomic_path, read_json, write_json
from arbor.pipeline.manifest import check_record, file_record

log = logging.getLogger("arbor.checkpoints")

OWN = re.compile(r"step-\d{8}\.(ckpt|json)")


@dataclass(frozen=True)
class Resume:
    """An intact checkpoint: where it is and after how many optimizer steps it was taken."""

    path: Path
    step: int


def _paths(directory: Path, step: int) -> tuple[Path, Path]:
    return directory / f"step-{step:08d}.ckpt", directory / f"step-{step:08d}.json"


def _steps(directory: Path) -> list[int]:
    return sorted({int(p.name[5:13]) for p in directory.glob("step-*") if OWN.fullmatch(p.name)})


def latest(directory: str | Path) -> Resume | None:
    """The newest checkpoint whose record matches it; None when there is none. Damaged ones are deleted."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for step in reversed(_steps(directory)):
        ckpt, record = _paths(directory, step)
        try:
            why = check_record(ckpt, read_json(record)["file"])
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            why = f"no valid record ({e})"
        if why is None:
            return Resume(ckpt, step)
        log.warning("%s: %s; not resumed from", ckpt, why)
        ckpt.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    return None


def clear(directory: str | Path) -> None:
    """Remove every checkpoint of `directory` (after the final model is safely written)."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if OWN.fullmatch(p.name):
                p.unlink()


class StepCheckpoint(Checkpoint):
    """Save a resumable checkpoint every `every` optimizer steps into `directory`, keeping only the newest."""

    def __init__(self, directory: str | Path, every: int) -> None:
        if every < 1:
            raise ValueError(f"checkpoint every={every}: expected >= 1 steps")
        self.directory, self.every = Path(directory), every

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and not _paths(self.directory, step)[1].exists():
            self.save(trainer, step)

    def save(self, trainer: Any, step: int) -> None:
        """Checkpoint file first (atomic), its record second; then drop the older checkpoints."""
        ckpt, record = _paths(self.directory, step)
        with atomic_path(ckpt) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)  # full state (optimizer, schedule, loops)
        write_json(record, {"step": step, "file": file_record(ckpt)})
        for old in _steps(self.directory):
            if old < step:
                for p in _paths(self.directory, old):
                    p.unlink(missing_ok=True)
