"""The project lock: one pipeline run per directory; a second one exits 2 with one line naming the holder."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from arbor.pipeline.lock import LOCK_NAME, LockHeld, ProjectLock, held_by_ancestor, lock_or_exit, read_holder

ARBOR = str(Path(sys.executable).parent / "arbor")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBOR_")}
    return {**env, "PATH": str(Path(sys.executable).parent) + os.pathsep + env["PATH"], **extra}


def test_lock_records_holder_and_is_reusable_after_release(tmp_path):
    lock = ProjectLock(tmp_path, "arbor run").acquire()
    assert read_holder(tmp_path / LOCK_NAME) == (os.getpid(), "arbor run")
    with pytest.raises(LockHeld, match=rf"pid {os.getpid()} \(arbor run\)"):
        ProjectLock(tmp_path, "arbor prepare").acquire()
    lock.release()
    with ProjectLock(tmp_path, "arbor prepare") as again:
        assert again.held and read_holder(tmp_path / LOCK_NAME) == (os.getpid(), "arbor prepare")
    assert not again.held


@pytest.mark.parametrize("cmd", [
    [ARBOR, "prepare", "--params", "", "--tracking.enabled", "false"],
    [sys.executable, "-m", "arbor.stages.prepare", "--params", "", "--tracking.enabled", "false"],
    [ARBOR, "run"],
])
def test_second_run_exits_2_naming_the_holder(tmp_path, cmd):
    (tmp_path / "params.yaml").write_text("tracking:\n  enabled: false\n")
    with ProjectLock(tmp_path, "arbor run"):
        r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"pid {os.getpid()} (arbor run)" in lines[0] and str(tmp_path / LOCK_NAME) in lines[0]
    assert not (tmp_path / "data").exists()  # refused before doing anything


def test_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from arbor.pipeline.lock import ProjectLock; "
         f"ProjectLock({str(tmp_path)!r}, 'arbor run').acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            ProjectLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    ProjectLock(tmp_path).acquire().release()  # SIGKILL cannot leave a stale lock


def test_descendants_of_the_holder_take_no_lock(tmp_path):
    probe = [sys.executable, "-c", "from arbor.pipeline.lock import held_by_ancestor; print(held_by_ancestor())"]
    with ProjectLock(tmp_path, "arbor run") as lock:
        child = subprocess.run(probe, cwd=tmp_path, env=_env(**lock.child_env()), capture_output=True, text=True)
        # the environment alone is not enough: the named holder must be an ancestor
        stranger = subprocess.run(probe, cwd=tmp_path, env=_env(**{**lock.child_env(), "ARBOR_LOCK_PID": "1"}),
                                  capture_output=True, text=True)
        elsewhere = subprocess.run(probe, cwd=tmp_path.parent, env=_env(**lock.child_env()),
                                   capture_output=True, text=True)
    assert child.stdout.strip() == "True"
    assert stranger.stdout.strip() == "False" and elsewhere.stdout.strip() == "False"
    assert not held_by_ancestor(tmp_path)  # this process holds it for itself, not for an ancestor


def test_lock_or_exit_exits_2(tmp_path, capsys):
    with ProjectLock(tmp_path, "arbor run"), pytest.raises(SystemExit) as exc:
        lock_or_exit("arbor search", tmp_path)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("arbor search: ") and f"pid {os.getpid()} (arbor run)" in err
