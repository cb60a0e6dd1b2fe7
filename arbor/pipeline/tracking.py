"""Experiment tracking: MLflow on a SQLite store, or a no-op tracker with the same methods.

MLflow >= 3.13 refuses the `./mlruns` file store, so the URI is always explicit: `MLFLOW_TRACKING_URI` if set,
else `tracking.uri` from params, else `sqlite:///<cwd>/mlflow.db`. Artifacts of a new experiment on a SQLite
store go to `mlartifacts/` beside the database. Code never branches on "is tracking on": it gets a tracker and
calls it (nanochat's DummyWandb idea).

One pipeline invocation = one parent run, one nested run per stage. DVC runs each stage in its own process, so
the stages find their parent by a pipeline id: `ARBOR_PIPELINE_ID` when set (`arbor run` sets it and opens and
closes the parent itself), else, under a plain `dvc repro`, the pid and start time of the nearest ancestor
`dvc` process, so all stages of one `dvc repro` share a parent. A stage run by hand is a top-level run.

Every run is tagged with the pid (and its start time) of the process that owns it and the host. SIGKILL cannot
be caught, so a killed process leaves its run RUNNING; instead, whenever a tracker starts it sweeps the
experiment: a RUNNING stage run whose process on this host is gone becomes KILLED; a RUNNING parent whose
owner is gone is closed too: KILLED if its owner was `arbor run` (which always closes its parent when it can)
or a stage was killed, FAILED if a stage failed, else FINISHED (the `dvc repro` that owned it just ended).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from arbor.pipeline import procs

ENV_PIPELINE = "ARBOR_PIPELINE_ID"
TAG_STAGE, TAG_PIPELINE, TAG_ROLE = "arbor_stage", "arbor_pipeline_id", "arbor_role"
TAG_PID, TAG_PID_START, TAG_HOST, TAG_OWNER = "arbor_pid", "arbor_pid_start", "arbor_host", "arbor_owner"
ROLE_PIPELINE = "pipeline"
OWNER_RUNNER, OWNER_DVC, OWNER_STAGE = "arbor run", "dvc", "stage"
TAG_ITERATION, TAG_DVC_EXP = "arbor_iteration", "dvc_experiment"
POLICY_MODEL = "arbor-policy"
"""Registered-model name of the trained policies: one MLflow model version per iteration's policy."""


class Tracker(Protocol):
    """What stages and trainers call; `MlflowTracker` and `NullTracker` implement it."""

    run_id: str | None
    tracking_uri: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | os.PathLike[str]) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...
    def register_policy(self, path: str | os.PathLike[str], iteration: int,
                        metrics: dict[str, Any]) -> str | None: ...
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

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        pass

    def sweep(self) -> dict[str, str]:
        return {}

    def register_policy(self, path: str | os.PathLike[str], iteration: int, metrics: dict[str, Any]) -> str | None:
        return None

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


@dataclass(frozen=True)
class Owner:
    """The process a run belongs to: while it lives the run may be RUNNING; `kind` is who it is."""

    pid: int
    start: int | None
    kind: str

    @classmethod
    def this_process(cls, kind: str) -> Owner:
        """This process as the owner of a run."""
        return cls(os.getpid(), procs.start_time(os.getpid()), kind)

    def tags(self) -> dict[str, str]:
        """The run tags that record this owner."""
        return {TAG_PID: str(self.pid), TAG_PID_START: "" if self.start is None else str(self.start),
                TAG_HOST: socket.gethostname(), TAG_OWNER: self.kind}


def _owner_alive(tags: dict[str, str]) -> bool:
    """Whether the process recorded in a run's tags still runs (True if the tags name no pid)."""
    pid = tags.get(TAG_PID, "")
    if not pid.isdigit():
        return True
    start = tags.get(TAG_PID_START, "")
    return procs.is_alive(int(pid), int(start) if start.isdigit() else None)


def _closing_status(owner_kind: str, child_statuses: list[str]) -> str | None:
    """Final status of a parent run whose owner is gone; None while a stage still runs."""
    if "RUNNING" in child_statuses:
        return None
    if owner_kind == OWNER_RUNNER or "KILLED" in child_statuses:
        return "KILLED"
    return "FAILED" if "FAILED" in child_statuses else "FINISHED"


def sweep_dead_runs(client: Any, experiment_id: str) -> dict[str, str]:
    """Close the RUNNING runs of this host whose owner process is gone; returns {run_id: new status}."""
    host = socket.gethostname().replace("'", "")
    running = client.search_runs([experiment_id], max_results=5000,
                                 filter_string=f"attributes.status = 'RUNNING' and tags.{TAG_HOST} = '{host}'")
    closed: dict[str, str] = {}
    stages = [r for r in running if r.data.tags.get(TAG_ROLE) != ROLE_PIPELINE]
    parents = [r for r in running if r.data.tags.get(TAG_ROLE) == ROLE_PIPELINE]
    for run in stages:
        if not _owner_alive(run.data.tags):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed[run.info.run_id] = "KILLED"
    for run in parents:
        if _owner_alive(run.data.tags):
            continue
        pipeline_id = run.data.tags.get(TAG_PIPELINE, "").replace("'", "")
        children = client.search_runs([experiment_id], max_results=5000,
                                      filter_string=f"tags.{TAG_PIPELINE} = '{pipeline_id}'")
        statuses = [closed.get(c.info.run_id, c.info.status) for c in children
                    if c.info.run_id != run.info.run_id]
        status = _closing_status(run.data.tags.get(TAG_OWNER, ""), statuses)
        if status is not None:
            client.set_terminated(run.info.run_id, status=status)
            closed[run.info.run_id] = status
    return closed


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """Id of experiment `name`, created if missing (artifacts beside a SQLite database, in mlartifacts/)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


class MlflowTracker:
    """One MLflow run (a stage's, or a pipeline's parent run); sweeps dead runs of the experiment first."""

    def __init__(self, *, name: str, experiment: str, tracking_uri: str, tags: dict[str, str],
                 parent_owner: Owner | None = None) -> None:
        """Open run `name` with `tags`; with a pipeline id in `tags` and `parent_owner` given, nest it under
        that pipeline's parent run (created, owned by `parent_owner`, if no stage made it yet)."""
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = _experiment_id(self._client, experiment, tracking_uri)
        self.swept = sweep_dead_runs(self._client, self.experiment_id)
        tags = dict(tags)
        if parent_owner is not None and tags.get(TAG_PIPELINE):
            tags["mlflow.parentRunId"] = self._parent(tags[TAG_PIPELINE], parent_owner)
        self.run_id: str | None = self._client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def _parent(self, pipeline_id: str, owner: Owner) -> str:
        """Run id of the pipeline's parent run, created by the first stage that asks."""
        found = self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{TAG_PIPELINE} = '{pipeline_id}' and tags.{TAG_ROLE} = '{ROLE_PIPELINE}'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        tags = {TAG_PIPELINE: pipeline_id, TAG_ROLE: ROLE_PIPELINE, **owner.tags()}
        return self._client.create_run(self.experiment_id, run_name=f"pipeline-{pipeline_id}", tags=tags).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log the numeric values of `metrics` at `step`, in batches of 1000 (one SQLite transaction each: 400
        values took 1.6 s as one `log_metric` per key, 0.07 s as one batch, on the idle 2-core box)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | os.PathLike[str]) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        """Store `data` as artifact `name` (JSON or YAML by the name's suffix)."""
        self._client.log_dict(self.run_id, data, name)

    def sweep(self) -> dict[str, str]:
        """Close the experiment's runs whose process died (see `sweep_dead_runs`)."""
        return sweep_dead_runs(self._client, self.experiment_id)

    def register_policy(self, path: str | os.PathLike[str], iteration: int, metrics: dict[str, Any]) -> str | None:
        """Register the policy directory `path` as a version of `arbor-policy`, tagged with its iteration and
        eval `metrics`, linked to this run; the version number. The same weights (same content key) evaluated
        again reuse their version (tags updated) instead of adding one."""
        from mlflow.exceptions import MlflowException

        from arbor.pipeline.manifest import input_key

        source = str(Path(path).resolve())
        key = input_key(path)
        with contextlib.suppress(MlflowException):  # already registered
            self._client.create_registered_model(POLICY_MODEL)
        tags = {TAG_ITERATION: str(iteration), "arbor_policy_key": key,
                **{k: f"{v:.6g}" for k, v in metrics.items() if isinstance(v, (int, float))}}
        same = [v for v in self._client.search_model_versions(f"name='{POLICY_MODEL}'")
                if v.tags.get("arbor_policy_key") == key and v.source == source]
        if same:
            version = same[0].version
        else:
            version = self._client.create_model_version(POLICY_MODEL, source=source, run_id=self.run_id).version
        for k, v in tags.items():
            self._client.set_model_version_tag(POLICY_MODEL, str(version), k, v)
        return str(version)

    def close(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)
            self.run_id = None


def stage_pipeline() -> tuple[str | None, Owner]:
    """The pipeline this stage process belongs to and who owns its parent run.

    `ARBOR_PIPELINE_ID` if set; else under `dvc repro` the nearest `dvc` ancestor's pid and start time;
    else (a stage run by hand) no pipeline. The owner of a parent this stage creates is that `dvc` process,
    or the stage itself when there is none.
    """
    dvc_pid = procs.dvc_ancestor()
    dvc = Owner(dvc_pid, procs.start_time(dvc_pid), OWNER_DVC) if dvc_pid else None
    env_id = os.environ.get(ENV_PIPELINE) or None
    if env_id:
        return env_id, dvc or Owner.this_process(OWNER_STAGE)
    if dvc is not None:
        return f"dvc-{dvc.pid}-{dvc.start}", dvc
    return None, Owner.this_process(OWNER_STAGE)


def make_tracker(*, enabled: bool, stage: str, experiment: str, uri: str | None,
                 iteration: int | None = None) -> Tracker:
    """Build the tracker a stage uses: MLflow when enabled (nested in its pipeline's run), else a no-op.

    The run is tagged with the stage, its `iteration` (when it has one) and the DVC experiment's name when run
    by `dvc exp run` (DVC sets `DVC_EXP_NAME`)."""
    if not enabled:
        return NullTracker()
    pipeline_id, parent_owner = stage_pipeline()
    tags = {TAG_STAGE: stage, **Owner.this_process(OWNER_STAGE).tags()}
    if iteration is not None:
        tags[TAG_ITERATION] = str(iteration)
    if os.environ.get("DVC_EXP_NAME"):
        tags[TAG_DVC_EXP] = os.environ["DVC_EXP_NAME"]
    if pipeline_id:
        tags[TAG_PIPELINE] = pipeline_id
    return MlflowTracker(name=stage, experiment=experiment, tracking_uri=resolve_tracking_uri(uri), tags=tags,
                         parent_owner=parent_owner)


def new_pipeline_id() -> str:
    """A fresh pipeline id: local time and this process's pid."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"


def make_pipeline_tracker(*, enabled: bool, experiment: str, uri: str | None,
                          pipeline_id: str) -> MlflowTracker | NullTracker:
    """The parent run of one `arbor run`, owned by this process (stages nest under it by `pipeline_id`)."""
    if not enabled:
        return NullTracker()
    tags = {TAG_PIPELINE: pipeline_id, TAG_ROLE: ROLE_PIPELINE, **Owner.this_process(OWNER_RUNNER).tags()}
    return MlflowTracker(name=f"pipeline-{pipeline_id}", experiment=experiment, tracking_uri=resolve_tracking_uri(uri),
                         tags=tags)


def lightning_logger(tracker: Tracker, experiment: str) -> Any:
    """Lightning's `MLFlowLogger` writing into the tracker's run (explicit tracking URI and run id), or False
    (Lightning's "no logger") when tracking is off."""
    if tracker.run_id is None:
        return False
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=experiment, tracking_uri=tracker.tracking_uri, run_id=tracker.run_id)
