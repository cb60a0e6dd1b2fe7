"""The project lock: one pipeline run per project directory at a time.

`arbor run` takes an exclusive `fcntl.flock` on `<project>/.arbor.lock` for the whole pipeline and tells its
descendants so through `ARBOR_LOCK_PID` / `ARBOR_LOCK_FILE`; a stage started by it (through `dvc repro`) sees
that the holder is its ancestor and takes nothing. A stage started any other way (plain `dvc repro`, `arbor
search` by hand) takes the lock itself for its own duration. A second holder is refused at once with one line
naming the holder's pid and command, and exit code 2. The kernel drops a flock when its process dies, so a
killed run never leaves a stale lock; the file itself stays (deleting a lock file races with its next holder).

DVC has its own locks: `.dvc/tmp/lock` only while it reads or writes dvc.lock, and a per-path rwlock
(`.dvc/tmp/rwlock`) while a stage runs, so a second `dvc repro` of a running stage fails at once ("... is busy,
it is being blocked by: (PID n)") while repros of disjoint stages run side by side. This lock covers what DVC's
do not: `arbor run` as a whole and stages run by hand.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from types import TracebackType

from arbor.pipeline.procs import ancestors

LOCK_NAME = ".arbor.lock"
ENV_PID = "ARBOR_LOCK_PID"
ENV_FILE = "ARBOR_LOCK_FILE"
EXIT_LOCKED = 2


class LockHeld(RuntimeError):
    """Another process holds the project lock; the message names its pid and command."""


def lock_path(project_dir: str | os.PathLike[str] = ".") -> Path:
    """The lock file of a project directory (absolute)."""
    return Path(project_dir).resolve() / LOCK_NAME


def read_holder(path: Path) -> tuple[int | None, str]:
    """(pid, command) written by the current holder; (None, "") if unreadable or not yet written."""
    try:
        first, _, rest = path.read_text().partition("\n")
        return int(first), rest.strip()
    except (OSError, ValueError):
        return None, ""


class ProjectLock:
    """Exclusive, non-blocking flock on `<project>/.arbor.lock`; records `pid` and `command` inside it."""

    def __init__(self, project_dir: str | os.PathLike[str] = ".", command: str = "arbor") -> None:
        self.path = lock_path(project_dir)
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> ProjectLock:
        """Take the lock or raise `LockHeld` naming the holder. Returns self."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, command = read_holder(self.path)
            who = f"pid {pid} ({command or 'unknown command'})" if pid else "another process"
            raise LockHeld(f"{self.path} is held by {who}: another pipeline run is using this project; "
                           f"wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{self.command}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def child_env(self) -> dict[str, str]:
        """Environment entries telling descendants that this process holds the lock for them."""
        return {ENV_PID: str(os.getpid()), ENV_FILE: str(self.path)}

    def __enter__(self) -> ProjectLock:
        return self if self.held else self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def held_by_ancestor(project_dir: str | os.PathLike[str] = ".") -> bool:
    """Whether an ancestor process (an `arbor run`) holds this project's lock on our behalf."""
    pid = os.environ.get(ENV_PID, "")
    return (pid.isdigit() and os.environ.get(ENV_FILE) == str(lock_path(project_dir))
            and int(pid) in ancestors())


RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
"""Set by distributed launchers: Lightning's DDP launcher for the ranks it starts, torchrun, SLURM."""


def worker_rank() -> bool:
    """Whether this process is a rank other than 0 of a distributed launch (a DDP training stage started on N
    devices): rank 0 holds the lock, tracks and writes for all of them (arbor/train/strategy.py)."""
    return any(os.environ.get(v, "0").strip() not in ("", "0") for v in RANK_VARS)


def lock_or_exit(command: str, project_dir: str | os.PathLike[str] = ".") -> ProjectLock:
    """The lock a stage or runner holds while it works: acquired, or not needed (an ancestor holds it, or this
    is a rank > 0 of a distributed launch whose rank 0 holds it).

    If another process holds it, print one line naming that process and exit with code 2.
    """
    lock = ProjectLock(project_dir, command)
    if held_by_ancestor(project_dir) or worker_rank():
        return lock
    try:
        return lock.acquire()
    except LockHeld as e:
        print(f"{command}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_LOCKED) from None
