"""Benchmark: peak resident memory of `arbor search` against its KV budget.

    python -m bench.memory [--policy models/iter_0/policy] [--problems 64] [--kv-budget-mb 16]

Runs the search stage through its CLI entry (`arbor.stages.search.main`) in a subprocess, in a temporary
project directory (its own project lock, no tracking): first a warm-up search of one problem (loads the model,
compiles the numba kernels, initialises torch's allocator and thread pool), then the measured search of
`--problems` train problems with `search.kv_budget_mb`. Just before the measured run the child reads its
resident set (VmRSS: interpreter, libraries, model, compiled kernels) as the base and resets the kernel's
peak (`/proc/self/clear_refs` 5); after it, it reads the peak (VmHWM). The claim checked: the peak stays under
base + KV budget + model bytes (`within_budget`); `growth_mb` = peak - base is what searching costs beyond
the loaded process, to set against the budget. The parent's `getrusage(RUSAGE_CHILDREN).ru_maxrss` (the whole
child, warm-up included) is reported as a cross-check. Writes bench/results/memory.json and prints a line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import save

MB = 2**20


def _status_kb(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _search_argv(policy: str, train: Path, out: Path, n: int, budget_mb: float, extra: list[str]) -> list[str]:
    return ["--params", "", "--tracking.enabled", "false", "--search.n_problems", str(n),
            "--search.kv_budget_mb", str(budget_mb), "--policy", policy, "--train", str(train),
            "--out", str(out / "trees"), "--metrics", str(out / "search.json"), *extra]


def child(args: argparse.Namespace) -> None:
    """In the subprocess: warm up, reset the peak, run the measured search, print the numbers as JSON."""
    from arbor.stages.search import main as search_main

    work = Path.cwd()
    train = work / "train.jsonl"
    search_main(_search_argv(args.policy, train, work / "warm", 1, args.kv_budget_mb, args.extra))
    base_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    metrics = search_main(_search_argv(args.policy, train, work / "run", args.problems, args.kv_budget_mb,
                                       args.extra))
    print(json.dumps({"base_rss_mb": base_kb / 1024, "peak_rss_mb": _status_kb("VmHWM") / 1024,
                      "search_forward_tokens": metrics["forward_tokens"], "search_problems": metrics["problems"],
                      "search_wall_seconds": metrics["wall_seconds"]}))


def measure(policy: str, problems: int, kv_budget_mb: float, extra: list[str] | None = None,
            threads: int | None = None) -> dict:
    """Run the child in a temporary project directory with `problems` synthetic train problems."""
    from arbor.pipeline.config import TaskConfig
    from arbor.pipeline.io import write_jsonl
    from arbor.tasks import make_splits

    policy = str(Path(policy).resolve())
    model_bytes = sum(f.stat().st_size for f in Path(policy).glob("*.safetensors"))
    with tempfile.TemporaryDirectory(prefix="arbor-mem-") as tmp:
        train = make_splits(TaskConfig(), problems, 1, seed=4321)[0]
        write_jsonl(Path(tmp) / "train.jsonl", (p.to_dict() for p in train))
        cmd = [sys.executable, "-m", "bench.memory", "--child", "--policy", policy, "--problems", str(problems),
               "--kv-budget-mb", str(kv_budget_mb), "--", *(extra or [])]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"search subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        child_out = json.loads(proc.stdout.strip().splitlines()[-1])
    ru_maxrss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    growth = child_out["peak_rss_mb"] - child_out["base_rss_mb"]
    return {**child_out, "kv_budget_mb": kv_budget_mb, "model_mb": model_bytes / MB, "growth_mb": growth,
            "limit_mb": child_out["base_rss_mb"] + kv_budget_mb + model_bytes / MB,
            "within_budget": child_out["peak_rss_mb"] <= child_out["base_rss_mb"] + kv_budget_mb + model_bytes / MB,
            "growth_within_kv_budget": growth <= kv_budget_mb, "child_ru_maxrss_mb": ru_maxrss_mb,
            "problems": problems, "policy": policy, "extra_overrides": extra or [], "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="models/iter_0/policy")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--kv-budget-mb", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the search subprocess.")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="More `--section.key value` overrides for the search (after --).")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not Path(args.policy).exists():
        raise SystemExit(f"{args.policy}: no policy (train it first: `make run`) or pass --policy DIR")
    r = measure(args.policy, args.problems, args.kv_budget_mb, args.extra, args.threads)
    path = save("memory", r)
    print(f"arbor search, {r['problems']} problems, search.kv_budget_mb={r['kv_budget_mb']:g}: peak RSS "
          f"{r['peak_rss_mb']:.1f} MB = base {r['base_rss_mb']:.1f} MB (model {r['model_mb']:.1f} MB loaded) + "
          f"{r['growth_mb']:.1f} MB while searching; limit base + budget + model = {r['limit_mb']:.1f} MB -> "
          f"{'within' if r['within_budget'] else 'OVER'}; child ru_maxrss {r['child_ru_maxrss_mb']:.1f} MB; "
          f"{r['search_forward_tokens']} forward tokens -> {path}")


if __name__ == "__main__":
    main()
