"""Process facts read from `/proc`: is a pid alive (and still the same process), its ancestors, its command.

The tracker uses these to tell a run whose process died (SIGKILL cannot be caught, so nobody closed the run)
from one still running, and to find the `dvc repro` process that started a stage; the project lock uses them
to check that the `arbor run` named in the environment is really this process's ancestor. A pid is paired
with its start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot) so that a recycled pid is not
taken for the process that once had it. Without `/proc` (not Linux) start times are None and liveness falls
back to `os.kill(pid, 0)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    """One process: its pid, parent pid, start time (None without /proc) and state letter ('Z' = zombie)."""

    pid: int
    ppid: int
    start: int | None
    state: str


def proc_info(pid: int) -> ProcInfo | None:
    """Facts about `pid` from /proc, or None if there is no such process (or no /proc)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces or ')': split after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    return ProcInfo(pid=pid, ppid=int(fields[1]), start=int(fields[19]), state=fields[0])


def start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (None if unknown)."""
    info = proc_info(pid)
    return info.start if info else None


def is_alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, if `start` is given and known, is the process that started then."""
    if pid <= 0:
        return False
    if PROC.is_dir():
        info = proc_info(pid)
        if info is None or info.state == "Z":
            return False
        return start is None or info.start is None or info.start == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> list[str]:
    """The argv of `pid` ([] if unknown)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def ancestors(pid: int | None = None) -> list[int]:
    """Parent, grandparent, ... of `pid` (default: this process), nearest first, up to (excluding) pid 1."""
    out: list[int] = []
    info = proc_info(os.getpid() if pid is None else pid)
    while info is not None and info.ppid > 1 and info.ppid not in out:
        out.append(info.ppid)
        info = proc_info(info.ppid)
    return out


def is_dvc_command(argv: list[str]) -> bool:
    """Whether argv runs DVC: `dvc ...`, `python /path/to/dvc ...` or `python -m dvc ...`."""
    if not argv:
        return False
    if Path(argv[0]).name == "dvc":
        return True
    if len(argv) > 1 and Path(argv[0]).name.startswith("python"):
        return Path(argv[1]).name == "dvc" or argv[1:3] == ["-m", "dvc"]
    return False


def dvc_ancestor() -> int | None:
    """Pid of the nearest ancestor process that is DVC (the `dvc repro` running this stage), else None."""
    for pid in ancestors():
        if is_dvc_command(cmdline(pid)):
            return pid
    return None
