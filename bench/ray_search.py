"""Search stage on Ray: 1 vs 2 workers against the local executor (issue #14).

    python -m bench.ray_search --params '' --policy /tmp/policy_iter0 --problems 48 --threads 1

Runs `arbor.stages.search.run` on the same problems three times, in `--order`: `search.executor: local` (this
process, torch on `--threads` threads) and `ray` with 1 and with 2 actors (`ray_cpus_per_worker` = `--threads`),
on one local Ray started first (its start-up is reported apart). Each run's wall time includes starting its
actors and loading their policies. Reports problems per second (end to end, and steady: from the first
committed result to the last, once the actors are up), forward tokens and whether every run wrote the same
trees (the parquet rows of the first run). Writes bench/results/ray_search.json and prints a table with the
speedprobe line of the moment (a shared CPU: read wall times against it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from bench.common import save, speedprobe, table


def _rows(directory: Path) -> list[dict[str, Any]]:
    from arbor.pipeline.manifest import verified_files

    return [r for f in verified_files(directory) for r in pq.read_table(f).to_pylist()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="models/iter_0/policy", help="Policy directory.")
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--simulations", type=int, default=32, help="search.eta.num_simulations")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per search process (each actor's CPUs).")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--order", default="local,ray1,ray2", help="Runs, in this order (the first is the reference "
                                                                  "for `same trees`; a shared CPU drifts: swap it).")
    a = p.parse_args(argv)

    import ray

    from arbor.pipeline.config import load_config
    from arbor.pipeline.io import write_jsonl
    from arbor.pipeline.shards import ShardedOutput
    from arbor.stages import search
    from arbor.tasks import make_splits

    torch.set_num_threads(a.threads)
    base = {"search.n_problems": a.problems, "search.shard_size": a.problems, "tracking.enabled": False,
            "search.eta.num_simulations": a.simulations}
    cfg = load_config(a.params or None, base)
    probe_before = speedprobe()
    tmp = Path(tempfile.mkdtemp(prefix="arbor-ray-bench-"))
    train, _ = make_splits(cfg.task, a.problems, 1, seed=cfg.seed)
    write_jsonl(tmp / "train.jsonl", [x.to_dict() for x in train])
    t0 = time.perf_counter()
    ray.init(num_cpus=2 * a.threads, include_dashboard=False, logging_level="WARNING")
    ray_init = time.perf_counter() - t0
    runs: list[dict[str, Any]] = []
    commits: list[float] = []  # when each problem's result was committed by the driver
    real_commit = ShardedOutput.commit

    def commit(self: ShardedOutput, *args: Any, **kw: Any) -> bool:
        commits.append(time.perf_counter())
        return real_commit(self, *args, **kw)

    ShardedOutput.commit = commit  # type: ignore[method-assign]
    try:
        for key in a.order.split(","):
            name = "local" if key == "local" else f"ray x{int(key.removeprefix('ray'))}"
            over = {} if key == "local" else {"search.executor": "ray", "search.ray_workers": int(key[3:])}
            c = load_config(a.params or None, {**base, **over, "search.ray_cpus_per_worker": a.threads})
            out = tmp / name.replace(" ", "_")
            commits.clear()
            t = time.perf_counter()
            m = search.run(c, policy_dir=a.policy, train_file=tmp / "train.jsonl", out_dir=out)
            wall = time.perf_counter() - t
            steady = (len(commits) - 1) / max(1e-9, commits[-1] - commits[0])  # actors up: first to last result
            runs.append({"executor": name, "problems": m["problems"], "wall_s": round(wall, 2),
                         "problems_per_s": m["problems"] / wall, "first_result_s": round(commits[0] - t, 2),
                         "steady_problems_per_s": steady, "search_s_sum": round(m["wall_seconds"], 2),
                         "forward_tokens": m["forward_tokens"], "nodes": m["nodes"], "rows": _rows(out)})
    finally:
        ShardedOutput.commit = real_commit  # type: ignore[method-assign]
        ray.shutdown()
    first = runs[0]["rows"]
    for r in runs:
        r["same_trees_as_first"] = r.pop("rows") == first
    same = all(r["same_trees_as_first"] for r in runs)
    by = {r["executor"]: r for r in runs}
    result = {"policy": str(a.policy), "order": a.order, "problems": a.problems, "simulations": a.simulations,
              "threads": a.threads,
              "ray_init_s": round(ray_init, 2), "runs": runs, "same_trees": same,
              "speedup_2_vs_1_workers": by["ray x1"]["wall_s"] / by["ray x2"]["wall_s"],
              "steady_speedup_2_vs_1_workers": by["ray x2"]["steady_problems_per_s"] / by["ray x1"][
                  "steady_problems_per_s"],
              "speedprobe_before": probe_before, "speedprobe_after": speedprobe()}
    path = save("ray_search", result)
    print(table(runs, ["executor", "problems", "wall_s", "problems_per_s", "first_result_s", "steady_problems_per_s",
                       "search_s_sum", "forward_tokens", "nodes", "same_trees_as_first"]))
    print(f"ray init {ray_init:.1f} s; 2 vs 1 workers: {result['speedup_2_vs_1_workers']:.2f}x end to end, "
          f"{result['steady_speedup_2_vs_1_workers']:.2f}x once the actors are up; same trees: {same}")
    print(f"speedprobe before {probe_before}\nspeedprobe after  {result['speedprobe_after']}\n-> {path}")
    return result


if __name__ == "__main__":
    main()
