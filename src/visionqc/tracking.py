"""MLflow tracking for every stage. The only module that imports mlflow.

A Snakemake invocation opens one pipeline run (see `start_pipeline`, called from the workflow's
onstart handler). Each stage job opens a child run under it that holds the stage's resolved
options as params, its counts as metrics, its reports and plots as artifacts, and the sha256 of
every input and output as tags (`input.<name>.sha256`, `output.<name>.sha256`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from visionqc.io import sha256_tree, write_json

PIPELINE_FILE = "pipeline_run.json"
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")
MAX_PARAM_CHARS = 6000


@dataclass(frozen=True)
class TrackingSettings:
    """Where runs go. `uri` None disables tracking."""

    uri: str | None
    experiment: str = "visionqc"

    @property
    def store_dir(self) -> Path | None:
        """Folder of a sqlite store, where the pipeline-run file lives."""
        if self.uri and self.uri.startswith("sqlite:///"):
            return Path(self.uri.removeprefix("sqlite:///")).parent
        return None

    @property
    def artifact_location(self) -> str | None:
        """Artifacts beside a sqlite store (MLflow's default would be ./mlruns under the working directory)."""
        return (self.store_dir / "artifacts").resolve().as_uri() if self.store_dir else None


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def flatten(options: dict, prefix: str = "") -> dict[str, str]:
    """Nested options → {"a.b": "value"} strings that MLflow accepts as params."""
    flat: dict[str, str] = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def _experiment_id(mlflow, settings: TrackingSettings) -> str:
    mlflow.set_tracking_uri(settings.uri)
    experiment = mlflow.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
    except Exception:  # another process created it first
        return mlflow.get_experiment_by_name(settings.experiment).experiment_id


def ui_command(settings: TrackingSettings) -> str:
    return f"mlflow ui --backend-store-uri {settings.uri}"


def start_pipeline(settings: TrackingSettings, name: str, config: dict) -> str | None:
    """Create the store (once, before parallel jobs), open the pipeline run, record its id."""
    if not settings.uri:
        return None
    if settings.store_dir:
        settings.store_dir.mkdir(parents=True, exist_ok=True)
    mlflow = _mlflow()
    client = mlflow.MlflowClient(settings.uri)
    run = client.create_run(_experiment_id(mlflow, settings), run_name=name, tags={"visionqc.kind": "pipeline"})
    params = [mlflow.entities.Param(k, v) for k, v in sorted(flatten(config).items())]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    if settings.store_dir:
        write_json(settings.store_dir / PIPELINE_FILE, {"run_id": run.info.run_id, "name": name})
    return run.info.run_id


def end_pipeline(settings: TrackingSettings, status: str = "FINISHED") -> None:
    run_id = _pipeline_run_id(settings)
    if run_id:
        _mlflow().MlflowClient(settings.uri).set_terminated(run_id, status)


def _pipeline_run_id(settings: TrackingSettings) -> str | None:
    if settings.store_dir is None:
        return os.environ.get("VISIONQC_PIPELINE_RUN_ID")
    path = settings.store_dir / PIPELINE_FILE
    if path.exists():
        return json.loads(path.read_text())["run_id"]
    return None


@dataclass
class StageResult:
    """What a stage function returns: its report for the user, and everything tracking logs.

    A stage writes its files itself; this only says what to show and record about them.
    """

    report: dict
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # facts settled while running (the backend chosen, ...)
    artifacts: list[str | Path | tuple[str | Path, str]] = field(default_factory=list)  # path, or (folder path, artifact folder)
    inputs: dict[str, str | Path] = field(default_factory=dict)  # lineage: what it read
    outputs: dict[str, str | Path] = field(default_factory=dict)  # lineage: what it wrote
    step: int = 0  # the step the final metrics belong to


def numbers_of(report: dict, prefix: str = "", skip: tuple[str, ...] = ("options",)) -> dict[str, float]:
    """The numbers of a report as metrics, nested dicts flattened with '.' (None, bools and `skip` keys left out)."""
    values: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, bool) or value is None or key in skip:
            continue
        if isinstance(value, (int, float)):
            values[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            values.update(numbers_of(value, f"{prefix}{key}.", skip))
    return values


class StageRun:
    """Handle for one stage job's MLflow run; every method is a no-op when tracking is off."""

    def __init__(self, client, run_id: str | None):
        self._client = client
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        if not self.run_id:
            return
        mlflow = _mlflow()
        entries = [
            mlflow.entities.Metric(_METRIC_NAME.sub("_", key), float(value), 0, step)
            for key, value in sorted(values.items())
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        for start in range(0, len(entries), 500):
            self._client.log_batch(self.run_id, metrics=entries[start : start + 500])

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not self.run_id:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), folder)
        elif path.exists():
            self._client.log_artifact(self.run_id, str(path), folder)

    def lineage(self, inputs: dict[str, str | Path], outputs: dict[str, str | Path]) -> dict:
        """Record path and sha256 of each input and output; returns the same as a dict."""
        record = {
            direction: {name: {"path": str(path), "sha256": sha256_tree(path)} for name, path in paths.items() if Path(path).exists()}
            for direction, paths in (("input", inputs), ("output", outputs))
        }
        if self.run_id:
            mlflow = _mlflow()
            tags = [
                mlflow.entities.RunTag(f"{direction}.{name}.{field}", value)
                for direction, entries in record.items()
                for name, entry in entries.items()
                for field, value in entry.items()
            ]
            self._client.log_batch(self.run_id, tags=tags)
            self._client.log_dict(self.run_id, record, "lineage.json")
        return record


    def record(self, result: StageResult) -> None:
        """Log a stage's result: extra params, final metrics, artifacts and lineage."""
        if not self.run_id:
            return
        mlflow = _mlflow()
        params = [mlflow.entities.Param(k, v) for k, v in sorted(flatten(result.params).items())]
        for start in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[start : start + 100])
        self.metrics(result.metrics, step=result.step)
        for artifact in result.artifacts:
            path, folder = artifact if isinstance(artifact, tuple) else (artifact, None)
            self.artifact(path, folder)
        self.lineage(result.inputs, result.outputs)


@contextlib.contextmanager
def stage_run(settings: TrackingSettings, stage: str, name: str, params: dict):
    """Open a child run of the pipeline run for one stage job; FAILED if the body raises."""
    if not settings.uri:
        yield StageRun(None, None)
        return
    mlflow = _mlflow()
    client = mlflow.MlflowClient(settings.uri)
    tags = {"visionqc.stage": stage, "visionqc.kind": "stage"}
    parent = _pipeline_run_id(settings)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(_experiment_id(mlflow, settings), run_name=name, tags=tags)
    handle = StageRun(client, run.info.run_id)
    entries = [mlflow.entities.Param(k, v) for k, v in sorted(flatten(params).items())]
    for start in range(0, len(entries), 100):
        client.log_batch(run.info.run_id, params=entries[start : start + 100])
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    print(f"MLflow run {run.info.run_id} ({name}); view with: {ui_command(settings)}", flush=True)
