"""Stage `prefs`: step-level preference pairs and the Tree-GRPO trajectory view of iteration k's trees.

Reads `trees/iter_<k>/*.parquet` through its manifest (`verified_files`: a damaged tree directory is refused,
never read) and writes `prefs/iter_<k>/`:

- `pairs.parquet`: one row per (prefix, chosen step, rejected step) from sibling subtrees whose values differ
  by at least `prefs.margin` (arbor/improve/prefs.py: problem_id, depth, gap, values, visit and terminal counts
  of both sides, texts and token ids);
- `trajectories.parquet`: every root-to-terminal trajectory with its reward and Tree-GRPO intra-/inter-tree
  advantages (arbor/improve/advantages.py); stage `train` picks the SFT-best paths from it too;
- `_manifest.json`, written last: the directory is written to a temporary sibling and renamed into place.

With `prefs.replay` the previous iteration's trees (`trees/iter_<k-1>`, search_0's for k = 1) add their pairs
and trajectories, each tree set built on its own (the same problem searched twice gives two trees, never one
merged tree); the metrics count them apart (`replayed_pairs`, `replayed_trajectories`).

Each file opens with `datasets.load_dataset("parquet", data_files=".../pairs.parquet")`. Metrics
(`metrics/prefs_<k>.json`): pair counts per depth and per gap bucket, trajectory and advantage counts.
The stage loads no model: it is cheap and deterministic, so it has no resume state of its own.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from arbor.improve.advantages import TRAJECTORY_SCHEMA, tree_trajectories
from arbor.improve.config import PrefsConfig
from arbor.improve.prefs import PAIR_SCHEMA, ScoredTree, pair_counts, tree_pairs
from arbor.pipeline.config import ArborConfig, to_dict
from arbor.pipeline.tracking import NullTracker, Tracker
from arbor.tasks import is_solved

PAIRS, TRAJECTORIES = "pairs.parquet", "trajectories.parquet"


def _table(parts: list[dict[str, list]], schema: pa.Schema) -> pa.Table:
    return pa.table({name: [v for p in parts for v in p[name]] for name in schema.names}, schema=schema)


def build(trees: pa.Table, cfg: PrefsConfig) -> tuple[pa.Table, pa.Table]:
    """(pairs, trajectories) of every problem's tree in `trees` (rows of arbor/mcts/treeio.py)."""
    pid_col = trees.column("problem_id")
    pairs, trajectories = [], []
    for pid in dict.fromkeys(pid_col.to_pylist()):
        tree = ScoredTree(trees.filter(pc.equal(pid_col, pid)))
        pairs.append(tree_pairs(tree, cfg))
        trajectories.append(tree_trajectories(tree, cfg.min_step_prob, cfg.step_prob == "token"))
    return _table(pairs, PAIR_SCHEMA), _table(trajectories, TRAJECTORY_SCHEMA)


def summarize(pairs: pa.Table, trajectories: pa.Table, problems: int) -> dict[str, Any]:
    """Stage metrics: pair counts (per depth, per gap bucket) and trajectory/advantage counts."""
    adv = np.asarray(trajectories.column("advantage").to_pylist(), np.float64)
    reward = np.asarray(trajectories.column("reward").to_pylist(), np.float64)
    solved = {pid for pid, r in zip(trajectories.column("problem_id").to_pylist(), reward.tolist(), strict=True)
              if is_solved(r)}
    return {"problems": problems, **pair_counts(pairs), "pairs_per_problem": pairs.num_rows / max(1, problems),
            "trajectories": trajectories.num_rows, "trajectory_reward_mean": float(reward.mean()) if len(reward)
            else 0.0, "trajectories_nonzero_advantage": int((np.abs(adv) > 1e-12).sum()),
            "solved_problems": len(solved)}


def run(cfg: ArborConfig, *, trees_dir: str | Path = "trees/iter_1", out_dir: str | Path = "prefs/iter_1",
        iteration: int = 1, tracker: Tracker | None = None, prefs: PrefsConfig | None = None,
        replay_dir: str | Path | None = None) -> dict[str, Any]:
    """Read the verified trees (and those of `replay_dir`, the previous iteration's, when given), build pairs and
    trajectories, write them atomically with a manifest. `problems` counts the problems of `trees_dir`."""
    from arbor.critics.labels import read_tree_files
    from arbor.pipeline.io import atomic_path
    from arbor.pipeline.manifest import verified_files, write_manifest

    tracker = tracker or NullTracker()
    p = prefs or getattr(cfg, "prefs", None) or PrefsConfig()
    t0 = time.perf_counter()
    trees = read_tree_files(verified_files(trees_dir))
    pairs, trajectories = build(trees, p)
    replayed: dict[str, Any] = {}
    if replay_dir is not None:  # built on its own: a problem of both sets stays two trees
        old_pairs, old_trajectories = build(read_tree_files(verified_files(replay_dir)), p)
        replayed = {"replayed_pairs": old_pairs.num_rows, "replayed_trajectories": old_trajectories.num_rows}
        pairs, trajectories = pa.concat_tables([pairs, old_pairs]), pa.concat_tables([trajectories, old_trajectories])
    with atomic_path(out_dir, is_dir=True) as tmp:
        pq.write_table(pairs, tmp / PAIRS)
        pq.write_table(trajectories, tmp / TRAJECTORIES)
        write_manifest(tmp, {"stage": "prefs", "iteration": iteration, "prefs": to_dict(p),
                             "replayed_trees": None if replay_dir is None else str(replay_dir)})
    problems = len(set(trees.column("problem_id").to_pylist()))
    return {**summarize(pairs, trajectories, problems), **replayed, "wall_seconds": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from arbor.pipeline.io import write_json
    from arbor.stages.common import stage_cli

    def paths(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--iter", type=int, default=1, help="Iteration k: reads trees/iter_<k>.")
        ap.add_argument("--trees", default=None, help="Tree directory (default trees/iter_<k>).")
        ap.add_argument("--replay-trees", default=None, metavar="DIR",
                        help="With prefs.replay: the previous trees (default trees/iter_<k-1>).")
        ap.add_argument("--out", default=None, help="Output directory (default prefs/iter_<k>).")
        ap.add_argument("--metrics", default=None, help="Metrics JSON (default metrics/prefs_<k>.json).")

    def go(cfg: ArborConfig, a: argparse.Namespace, tr: Tracker) -> dict[str, Any]:
        k = a.iter
        replay = (a.replay_trees or f"trees/iter_{k - 1}") if cfg.prefs.replay and k >= 1 else None
        m = run(cfg, trees_dir=a.trees or f"trees/iter_{k}", out_dir=a.out or f"prefs/iter_{k}", iteration=k,
                tracker=tr, replay_dir=replay)
        write_json(a.metrics or f"metrics/prefs_{k}.json", m)
        return m

    return stage_cli("prefs", __doc__ or "", paths, go, argv, uses_device=False)


if __name__ == "__main__":
    from arbor.stages.common import exit_main

    exit_main(main)
