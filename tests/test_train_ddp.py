"""`train.strategy: ddp` on 2 CPU processes (gloo): the ranks end with equal weights, and the loss curve and
weights are those of one process with the doubled batch, so the rank-aware `SampleStream` gives each rank
its own half of that batch (issue #14). The DDP run is a separate script (tests/ddp_train.py) started with
subprocess, so that pytest's own process is never forked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from .ddp_train import STEPS, train
from .test_train import workspace as _train_workspace  # noqa: F401  (fixture: a policy and its prefs dir)

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):  # Lightning's own
        env.pop(var, None)
    return env


def test_ddp_two_cpu_ranks_train_like_one_process_with_the_doubled_batch(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tests.ddp_train", "--out", str(tmp_path / "ddp"), "--strategy",
                           "ddp", "--devices", "2", "--batch", "4"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tmp_path / "one", strategy="auto", devices=None, batch=8)
    finally:
        torch.set_num_threads(threads)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert [r["world"] for r in ranks] == [2, 2] and one["world"] == 1
    assert len(one["losses"]) == len(ranks[0]["losses"]) == STEPS
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trains on its own half of the batch
    np.testing.assert_allclose(np.mean([r["losses"] for r in ranks], axis=0), one["losses"], rtol=1e-5)
    w0, w1, w = (load_file(tmp_path / d / f"rank{r}.safetensors") for d, r in (("ddp", 0), ("ddp", 1), ("one", 0)))
    start = load_file(tmp_path / "one" / "rank0.safetensors")  # (for the keys)
    assert w0.keys() == w1.keys() == start.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # all-reduced gradients: the replicas never diverge
        torch.testing.assert_close(w0[k], w[k], rtol=1e-4, atol=1e-5)


def test_a_ddp_rank_started_by_the_launcher_takes_no_project_lock(tmp_path, monkeypatch):
    from arbor.pipeline.lock import ProjectLock, lock_or_exit, worker_rank

    held = ProjectLock(tmp_path, "arbor train").acquire()  # rank 0
    try:
        for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
            monkeypatch.delenv(var, raising=False)
        assert not worker_rank()
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert not worker_rank()
        monkeypatch.setenv("LOCAL_RANK", "1")  # as Lightning's launcher starts rank 1
        assert worker_rank() and not lock_or_exit("arbor train", tmp_path).held
    finally:
        held.release()


@pytest.mark.slow
def test_ddp_train_stage_from_the_command_line(request, tmp_path):
    """`arbor train` with train.strategy=ddp on 2 CPU processes: Lightning re-runs the command for rank 1, which
    takes no lock and no tracking run; rank 0 writes the policy (a manifested HF directory)."""
    from arbor.pipeline.manifest import verify

    workspace = request.getfixturevalue("_train_workspace")
    cmd = [sys.executable, "-m", "arbor.stages.train", "--params", "", "--iter", "1", "--prefs",
           str(workspace / "prefs"), "--policy", str(workspace / "policy"), "--out", str(tmp_path / "out"),
           "--metrics", str(tmp_path / "train_1.json"), "--checkpoints", str(tmp_path / "ckpt"),
           "--train.strategy", "ddp", "--train.devices", "2", "--train.batch_size", "2", "--train.epochs", "2",
           "--train.checkpoint_every", "2", "--tracking.enabled", "false"]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    verify(tmp_path / "out")
    assert json.loads((tmp_path / "train_1.json").read_text())["steps"] == 3  # ceil(2 * 3 items / 2)
