"""Experiment tracking: MLflow on a SQLite store, or a no-op tracker with the same methods.

MLflow >= 3.13 refuses the `./mlruns` file store, so the URI is always explicit: `MLFLOW_TRACKING_URI` if set,
else `tracking.uri` from params, else `sqlite:///<cwd>/mlflow.db`. Code never branches on "is tracking on": it
gets a tracker and calls it (nanochat's DummyWandb idea).

One pipeline invocation = one parent run. DVC runs each stage in its own process, so the parent is found by the
`ARBOR_PIPELINE_ID` environment variable (`make run` sets it to a timestamp); each stage opens a nested child run
under it named after the stage. Without that variable a stage is a top-level run of its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """What stages and trainers call; `MlflowTracker` and `NullTracker` implement it."""

    run_id: str | None
    tracking_uri: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | os.PathLike[str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracker that records nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike[str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def resolve_tracking_uri(configured: str | None) -> str:
    """`MLFLOW_TRACKING_URI` > params `tracking.uri` > `sqlite:///<cwd>/mlflow.db`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowTracker:
    """A nested MLflow run for one stage under the pipeline's parent run."""

    def __init__(self, *, stage: str, experiment: str, tracking_uri: str, pipeline_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        exp = self._client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self._client.create_experiment(experiment)
        tags = {"arbor_stage": stage}
        if pipeline_id:
            tags |= {"arbor_pipeline_id": pipeline_id, "mlflow.parentRunId": self._parent(exp_id, pipeline_id)}
        run = self._client.create_run(exp_id, run_name=stage, tags=tags)
        self.run_id: str | None = run.info.run_id

    def _parent(self, exp_id: str, pipeline_id: str) -> str:
        """Run id of the pipeline's parent run, created by the first stage that asks."""
        found = self._client.search_runs(
            [exp_id],
            filter_string=f"tags.arbor_pipeline_id = '{pipeline_id}' and tags.arbor_role = 'pipeline'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        tags = {"arbor_pipeline_id": pipeline_id, "arbor_role": "pipeline"}
        return self._client.create_run(exp_id, run_name=f"pipeline-{pipeline_id}", tags=tags).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._client.log_metric(self.run_id, k, float(v), step=step or 0)

    def log_artifact(self, path: str | os.PathLike[str]) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)
            self.run_id = None


def make_tracker(*, enabled: bool, stage: str, experiment: str, uri: str | None) -> Tracker:
    """Build the tracker a stage uses: MLflow when enabled, else a no-op."""
    if not enabled:
        return NullTracker()
    pipeline_id = os.environ.get("ARBOR_PIPELINE_ID") or None
    return MlflowTracker(
        stage=stage, experiment=experiment, tracking_uri=resolve_tracking_uri(uri), pipeline_id=pipeline_id
    )
