"""Artifact IO: every output is written to a temporary sibling, fsynced, and renamed into place.

A crash, kill or power loss mid-write therefore leaves either the previous complete output or none, never a
half-written file that a later stage would read as valid:

- the temporary sibling is named `.tmp-<name>-<pid>-<random>`; it is fsynced (every file of a directory
  too) before the rename, and the parent directory is fsynced after it, so the rename never lands before the
  data does;
- a directory replaces an existing one in a single atomic exchange (`renameat2(RENAME_EXCHANGE)` on Linux);
  where that is unavailable, by two renames, between which the path is briefly absent (never partial);
- leftovers of killed writers are removed on the next write of the same path, but only temporaries whose
  owning process (the pid in the name) is dead: a concurrent writer's temporary is never touched;
- outputs get the usual permissions (0644 files, 0755 directories, less what the umask removes), not the
  0600/0700 of `mkstemp`/`mkdtemp`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from arbor.pipeline.config import ArborInputError

_TMP_OWNER = re.compile(r"(?P<pid>\d+)-[0-9a-f]+")
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of `path` left by killed writers; returns what was removed.

    A temporary is stale when the process id encoded in its name is dead. Temporaries without a parseable
    owner (written by arbor versions before owners were encoded) count as stale too.
    """
    path = Path(path)
    prefix = f".tmp-{path.name}-"
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(prefix + "*"):
        owner = _TMP_OWNER.fullmatch(tmp.name[len(prefix):])
        if owner is None or not pid_alive(int(owner["pid"])):
            _remove(tmp)
            removed.append(tmp)
    return removed


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")


def _new_tmp(path: Path, is_dir: bool) -> Path:
    """Create the temporary sibling of `path`, with umask-respecting permissions."""
    while True:
        tmp = _tmp_name(path)
        try:
            if is_dir:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync a file, or every file and directory below (and including) a directory."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for root, _dirs, files in os.walk(path, topdown=False):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    _fsync(Path(root, name))
            _fsync(Path(root))
    else:
        _fsync(path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _replace(tmp: Path, path: Path) -> None:
    """Move the finished `tmp` to `path` atomically; an old directory at `path` is removed afterwards."""
    if path.is_dir() and not path.is_symlink():
        if _exchange(tmp, path):  # `tmp` now holds the old directory
            _fsync(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = _tmp_name(path)  # a name owned by this process: stale, hence cleaned, if it is killed
        path.rename(old)
        tmp.rename(path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, path)
    _fsync(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and rename it to `path`, on error delete it.

    Use `is_dir=True` for directories (e.g. a `save_pretrained` model dir). The temporary is a sibling of
    `path` (same filesystem, so the rename is atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _new_tmp(path, is_dir)
    try:
        yield tmp
        fsync_tree(tmp)
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write `obj` as pretty JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Atomically write rows as JSON lines; returns the number of rows."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            n += 1
    return n


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArborInputError(f"{path}: invalid JSON ({e})") from e
