"""Where a stage's per-item work runs: in this process (`local`) or sharded across Ray actors (`ray`), issue #14.

A stage hands `Executor.map` the items still to do and a picklable `make_worker`: called once per process, it
loads what the work needs (a policy, critics) and returns the function that does one item. The executor yields
`(item, result)` as items finish, in any order; the stage's own process (the driver) commits each result itself,
atomically, exactly as it does locally (arbor/pipeline/shards.py). So a run killed anywhere resumes from what
was committed, and the output never depends on which worker did an item: per-item seeds come from the item,
never from a worker or an order.

Ray (https://docs.ray.io): `ray_workers` actors, each reserving `ray_cpus_per_worker` CPUs and
`ray_gpus_per_worker` GPUs (1 = one actor per GPU, 0.5 = two per GPU; Ray sets each actor's
`CUDA_VISIBLE_DEVICES`, so `device: cuda` is its own GPU), each holding its own model. Items are pulled by idle
actors (`ray.util.ActorPool`). A lost actor is restarted by Ray and its item retried (`max_restarts`,
`max_task_retries`); an item that still fails ends the run, and a re-run redoes only what was not committed.
The cluster is `ray_address` if set, else the `RAY_ADDRESS` environment variable, else a local Ray started for
the run (and stopped after it). Ray is an optional extra: `pip install -e '.[ray]'`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from arbor.pipeline.fields import ArborInputError

log = logging.getLogger("arbor.executors")

EXECUTORS = ("local", "ray")
EXECUTION_KEYS = frozenset({"executor", "ray_address", "ray_workers", "ray_cpus_per_worker", "ray_gpus_per_worker"})
"""Config keys that say where work runs, not what it computes (left out of output fingerprints)."""

Worker = Callable[[int], Any]


class _Actor:
    """One Ray actor: builds its worker once (its own model), then does items."""

    def __init__(self, make_worker: Callable[[], Worker], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.work = make_worker()

    def run(self, item: int) -> tuple[int, Any]:
        return item, self.work(item)


class Executor:
    """`local` or `ray` execution of per-item work (module docstring). Build it before touching any output, so
    that a missing Ray install is reported first."""

    def __init__(self, kind: str = "local", *, address: str | None = None, workers: int = 2,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, where: str = "search") -> None:
        if kind not in EXECUTORS:
            raise ArborInputError(f"{where}.executor={kind!r}: expected one of {', '.join(EXECUTORS)}")
        if kind == "ray" and importlib.util.find_spec("ray") is None:
            raise ArborInputError(f"{where}.executor=ray needs the ray package: pip install -e '.[ray]'")
        self.kind, self.address, self.workers = kind, address, workers
        self.cpus, self.gpus = cpus_per_worker, gpus_per_worker

    @classmethod
    def from_config(cls, cfg: Any, where: str = "search") -> Executor:
        """From a config section with the `EXECUTION_KEYS` fields (`SearchConfig`)."""
        return cls(cfg.executor, address=cfg.ray_address, workers=cfg.ray_workers,
                   cpus_per_worker=cfg.ray_cpus_per_worker, gpus_per_worker=cfg.ray_gpus_per_worker, where=where)

    def map(self, items: Sequence[int], make_worker: Callable[[], Worker],
            local_worker: Callable[[], Worker] | None = None) -> Iterator[tuple[int, Any]]:
        """`(item, worker(item))` for every item, as they finish. `local_worker` (local only) may reuse objects
        already loaded in this process; Ray actors always call `make_worker` (pickled) in their own process."""
        if not items:
            return
        if self.kind == "local":
            work = (local_worker or make_worker)()
            for i in items:
                yield i, work(i)
            return
        yield from self._ray_map(items, make_worker)

    def _ray_map(self, items: Sequence[int], make_worker: Callable[[], Worker]) -> Iterator[tuple[int, Any]]:
        import ray
        from ray.util import ActorPool

        started = not ray.is_initialized()
        if started:
            address = self.address or os.environ.get("RAY_ADDRESS") or None
            if address:
                ray.init(address=address, logging_level=logging.WARNING)
            else:  # a local Ray sized for the workers
                ray.init(num_cpus=max(1, math.ceil(self.workers * self.cpus)), include_dashboard=False,
                         logging_level=logging.WARNING)
        n = min(self.workers, len(items))
        remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=2, max_task_retries=2)(_Actor)
        threads = max(1, int(self.cpus))
        actors = [remote.remote(make_worker, threads) for _ in range(n)]
        log.info("executor: %d items on %d Ray actors (%s CPU, %s GPU each)", len(items), n, self.cpus, self.gpus)
        try:
            yield from ActorPool(actors).map_unordered(lambda a, i: a.run.remote(i), list(items))
        finally:
            for a in actors:
                ray.kill(a)
            if started:
                ray.shutdown()
