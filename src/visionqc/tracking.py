"""MLflow tracking for every stage. The only module that imports mlflow.

A Snakemake invocation opens one pipeline run (see `start_pipeline`, called from the workflow's
onstart handler). Each stage job opens a child run under it that holds the stage's resolved
options as params, its counts as metrics, its reports and plots as artifacts, and the sha256 of
every input and output as tags (`input.<name>.sha256`, `output.<name>.sha256`).

Tracking never blocks the work. Every call to the store has a short timeout; the first failure
prints one warning and turns the job's tracking offline, and when the job ends its whole run
(params, metrics with their steps and times, artifacts, lineage, status) is written to the spool
folder, `results/mlflow/spool/<payload>/`. `visionqc tracking-sync` replays spooled runs, once each.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from visionqc.io import atomic_directory, read_json_file, sha256_tree, write_json

# MLflow's own rule for metric names (word characters in any script, so 正常 stays 正常); anything else becomes "_".
_METRIC_NAME = re.compile(r"[^\w\-. /:]")
MAX_PARAM_CHARS = 6000
# Seconds, not minutes, against a server that is down (MLflow's defaults wait about 4 minutes).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
RUN_FILE = "run.json"


@dataclass(frozen=True)
class TrackingSettings:
    """Where runs go. `uri` None disables tracking; `home` holds the pipeline-run file and the spool."""

    uri: str | None
    experiment: str = "visionqc"
    home: Path = Path("results/mlflow")

    @property
    def store_dir(self) -> Path | None:
        """Folder of a sqlite store."""
        if self.uri and self.uri.startswith("sqlite:///"):
            return Path(self.uri.removeprefix("sqlite:///")).parent
        return None

    @property
    def artifact_location(self) -> str | None:
        """Artifacts beside a sqlite store (MLflow's default would be ./mlruns under the working directory)."""
        return (self.store_dir / "artifacts").resolve().as_uri() if self.store_dir else None

    @property
    def spool(self) -> Path:
        return self.home / "spool"

    @property
    def pipeline_file(self) -> Path:
        return self.home / "pipeline_run.json"


def export_tracking_settings(tracking: dict) -> str:
    """The workflow's config `tracking:` block → the URI its stage jobs log to (empty: off), exported as
    $VISIONQC_TRACKING_URI and $VISIONQC_EXPERIMENT for them. A $VISIONQC_TRACKING_URI already set
    overrides tracking.uri (how the Slurm profile names a server)."""
    uri = (os.environ.get("VISIONQC_TRACKING_URI") or tracking["uri"]) if tracking["enabled"] else ""
    os.environ["VISIONQC_TRACKING_URI"] = uri
    os.environ["VISIONQC_EXPERIMENT"] = tracking["experiment"]
    return uri


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
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


def ui_command(settings: TrackingSettings) -> str:
    """How to look at the runs: the server's own page, or `mlflow ui` over a local store."""
    if settings.uri and settings.uri.startswith(("http://", "https://")):
        return f"open {settings.uri} in a browser"
    return f"mlflow ui --backend-store-uri {settings.uri}"


def open_store(settings: TrackingSettings):
    """(client, experiment id). A new sqlite store is created under a file lock: parallel first writers
    would otherwise race in its schema migration and leave it unreadable."""
    mlflow = _mlflow()
    lock = contextlib.nullcontext()
    if settings.store_dir:
        settings.store_dir.mkdir(parents=True, exist_ok=True)
        lock = _file_lock(settings.store_dir / ".store.lock")
    with lock:
        client = mlflow.MlflowClient(settings.uri)
        experiment = client.get_experiment_by_name(settings.experiment)
        if experiment is not None:
            return client, experiment.experiment_id
        try:
            return client, client.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
        except Exception:  # another process (or a server's other client) created it first
            return client, client.get_experiment_by_name(settings.experiment).experiment_id


@contextlib.contextmanager
def _file_lock(path: Path, waiting: str = ""):
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # artifact file → {column: values}, for the MLflow UI


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _workdir() -> str:
    return str(Path.cwd().resolve())


class StageRun:
    """One job's MLflow run. It logs live while the store answers and keeps the whole run as data
    (`self.payload`), which it spools when the store stopped answering. A no-op when tracking is off."""

    def __init__(self, settings: TrackingSettings, kind: str, name: str, tags: dict[str, str], params: dict,
                 offline: bool = False):
        self.settings = settings
        self.run_id: str | None = None
        self.offline = offline or not settings.uri
        self.payload = {
            "id": uuid.uuid4().hex, "kind": kind, "name": name, "experiment": settings.experiment,
            "tags": {**tags, "visionqc.kind": kind, "visionqc.workdir": _workdir(), "visionqc.host": socket.gethostname(),
                     "visionqc.pid": str(os.getpid())},
            "params": flatten(params), "metrics": [], "artifacts": [], "lineage": None, "tables": {},
            "status": "RUNNING", "start_ms": _now_ms(), "end_ms": None, "run_id": None,
        }
        self._client = None
        self._live(self._create)

    @property
    def tracked(self) -> bool:
        return bool(self.settings.uri)

    def _create(self) -> None:
        client, experiment_id = open_store(self.settings)
        tags = {**self.payload["tags"], "visionqc.payload": self.payload["id"]}
        run = client.create_run(experiment_id, start_time=self.payload["start_ms"], tags=tags, run_name=self.payload["name"])
        self._client, self.run_id = client, run.info.run_id
        self.payload["run_id"] = self.run_id
        _log_params(client, self.run_id, self.payload["params"])

    def _live(self, call) -> None:
        """Call the store unless it already failed in this job; its first failure turns the job offline."""
        if self.offline:
            return
        try:
            call()
        except Exception as exc:  # any store failure: the work goes on, the run goes to the spool
            self.offline = True
            print(f"warning: MLflow store {self.settings.uri} (config tracking.uri) did not answer: "
                  f"{type(exc).__name__}: {str(exc)[:300]}. This run goes to {self.settings.spool}/ at the end of the job; "
                  f"replay it with: visionqc tracking-sync --tracking-uri {self.settings.uri}", file=sys.stderr, flush=True)

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        if not self.tracked:
            return
        stamp = _now_ms()
        entries = [[_METRIC_NAME.sub("_", key), float(value), stamp, step] for key, value in sorted(values.items())
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        self.payload["metrics"] += entries
        self._live(lambda: _log_metrics(self._client, self.run_id, entries))

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not self.tracked or not Path(path).exists():
            return
        self.payload["artifacts"].append([str(path), folder])
        self._live(lambda: _log_artifact(self._client, self.run_id, Path(path), folder))

    def lineage(self, inputs: dict[str, str | Path], outputs: dict[str, str | Path]) -> dict:
        """Record path and sha256 of each input and output; returns the same as a dict."""
        record = {
            direction: {name: {"path": str(path), "sha256": sha256_tree(path)} for name, path in paths.items() if Path(path).exists()}
            for direction, paths in (("input", inputs), ("output", outputs))
        }
        if self.tracked:
            self.payload["lineage"] = record
            self._live(lambda: _log_lineage(self._client, self.run_id, record))
        return record

    def record(self, result: StageResult) -> None:
        """Log a stage's result: extra params, final metrics, artifacts and lineage."""
        if not self.tracked:
            return
        params = flatten(result.params)
        self.payload["params"].update(params)
        self._live(lambda: _log_params(self._client, self.run_id, params))
        self.metrics(result.metrics, step=result.step)
        for artifact in result.artifacts:
            path, folder = artifact if isinstance(artifact, tuple) else (artifact, None)
            self.artifact(path, folder)
        self.lineage(result.inputs, result.outputs)
        for name, columns in result.tables.items():
            table = {"columns": list(columns), "data": [list(row) for row in zip(*columns.values(), strict=True)]}
            self.payload["tables"][name] = table  # lists keep the column order through the spool's sorted JSON
            self._live(lambda name=name, table=table: _log_table(self._client, self.run_id, name, table))

    def close(self, status: str) -> None:
        """End the run live, or spool all of it."""
        if not self.tracked:
            return
        self.payload.update(status=status, end_ms=_now_ms())
        self._live(lambda: self._client.set_terminated(self.run_id, status, self.payload["end_ms"]))
        if self.offline:
            spool_run(self.settings.spool, self.payload)


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    mlflow = _mlflow()
    entries = [mlflow.entities.Param(k, v) for k, v in sorted(params.items())]
    for start in range(0, len(entries), 100):
        client.log_batch(run_id, params=entries[start : start + 100])


def _log_metrics(client, run_id: str, entries: list) -> None:
    mlflow = _mlflow()
    metrics = [mlflow.entities.Metric(key, value, stamp, step) for key, value, stamp, step in entries]
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start : start + 500])


def _log_artifact(client, run_id: str, path: Path, folder: str | None) -> None:
    if path.is_dir():
        client.log_artifacts(run_id, str(path), folder)
    elif path.exists():
        client.log_artifact(run_id, str(path), folder)


def _log_table(client, run_id: str, name: str, table: dict) -> None:
    """A table artifact the MLflow UI shows as a table (MlflowClient.log_table); `table`: {"columns", "data" (rows)}."""
    columns = {column: [row[i] for row in table["data"]] for i, column in enumerate(table["columns"])}
    client.log_table(run_id, data=columns, artifact_file=name)


def _log_lineage(client, run_id: str, record: dict) -> None:
    mlflow = _mlflow()
    tags = [mlflow.entities.RunTag(f"{direction}.{name}.{key}", value)
            for direction, entries in record.items() for name, entry in entries.items() for key, value in entry.items()]
    client.log_batch(run_id, tags=tags)
    client.log_dict(run_id, record, "lineage.json")


def spool_run(spool: Path, payload: dict) -> Path:
    """Write a run and copies of its artifacts to `spool/<payload id>/`, complete or not at all."""
    target = spool / payload["id"]
    with atomic_directory(target) as work:
        kept = []
        for index, (path, folder) in enumerate(payload["artifacts"]):
            copy = work / "artifacts" / str(index) / Path(path).name
            copy.parent.mkdir(parents=True)
            if Path(path).is_dir():
                shutil.copytree(path, copy)
            elif Path(path).exists():
                shutil.copy2(path, copy)
            kept.append([str(copy.relative_to(work)), folder])
        write_json(work / RUN_FILE, {**payload, "artifacts": kept})
    print(f"MLflow run spooled to {target}/", file=sys.stderr, flush=True)
    return target


@contextlib.contextmanager
def stage_run(settings: TrackingSettings, stage: str, name: str, params: dict):
    """Open a child run of the pipeline run for one stage job; FAILED if the body raises, KILLED on a signal.

    When the store did not answer at the pipeline's start, the job spools without trying it again.
    """
    pipeline = _pipeline_record(settings)
    tags = {"visionqc.stage": stage}
    if pipeline:
        tags["visionqc.parent_payload"] = pipeline["payload"]
        if pipeline.get("run_id"):
            tags["mlflow.parentRunId"] = pipeline["run_id"]
        if pipeline.get("offline"):
            print(f"MLflow store {settings.uri} did not answer at the pipeline's start: this run is spooled", flush=True)
    run = StageRun(settings, "stage", name, tags, params, offline=bool(pipeline and pipeline.get("offline")))
    try:
        yield run
    except (KeyboardInterrupt, SystemExit):
        run.close("KILLED")
        raise
    except BaseException:
        run.close("FAILED")
        raise
    run.close("FINISHED")
    if run.tracked and not run.offline:
        print(f"MLflow run {run.run_id} ({name}); view with: {ui_command(settings)}", flush=True)


def _pipeline_record(settings: TrackingSettings) -> dict | None:
    """This invocation's pipeline run (its id, its payload id, whether the store answered), if it uses the same store."""
    pipeline = read_json_file(settings.pipeline_file) if settings.uri else None
    return pipeline if pipeline and pipeline.get("uri") == settings.uri else None


def start_pipeline(settings: TrackingSettings, name: str, config: dict) -> str | None:
    """Mark runs a killed job left RUNNING, open the pipeline run and record its id for the stage jobs.

    Snakemake's lock lets one invocation at a time work in a folder, so a run of this folder that is
    still RUNNING when the next invocation starts belongs to a job that was killed.
    """
    if not settings.uri:
        return None
    run = StageRun(settings, "pipeline", name, {}, config)
    run._live(lambda: mark_stale_runs(settings, keep=run.run_id))
    if run.offline:
        spool_run(settings.spool, run.payload)
    write_json(settings.pipeline_file, {"run_id": run.run_id, "payload": run.payload["id"], "uri": settings.uri, "name": name,
                                        "offline": run.offline})
    return run.run_id


def mark_stale_runs(settings: TrackingSettings, keep: str | None = None) -> list[str]:
    """KILLED for every run of this folder still RUNNING but `keep` (the pipeline run being opened); returns their ids."""
    client, experiment_id = open_store(settings)
    query = f"attributes.status = 'RUNNING' and tags.`visionqc.workdir` = '{_workdir()}'"
    stale = []
    for found in client.search_runs([experiment_id], query, max_results=5000):
        if found.info.run_id == keep:
            continue
        client.set_tag(found.info.run_id, "visionqc.stale", "still RUNNING when the next pipeline started")
        client.set_terminated(found.info.run_id, "KILLED")
        stale.append(found.info.run_id)
    if stale:
        print(f"marked {len(stale)} run(s) left RUNNING by killed jobs as KILLED", file=sys.stderr)
    return stale


def end_pipeline(settings: TrackingSettings, status: str = "FINISHED") -> None:
    """End the pipeline run live, or in the spool. A pipeline that spooled tries to sync its spool now."""
    pipeline = _pipeline_record(settings)
    if not pipeline:
        return
    spooled = settings.spool / pipeline["payload"] / RUN_FILE
    if spooled.exists():
        write_json(spooled, {**json.loads(spooled.read_text("utf-8")), "status": status, "end_ms": _now_ms()})
    else:
        ending = {"id": uuid.uuid4().hex, "kind": "ending", "run_id": pipeline["run_id"], "status": status, "end_ms": _now_ms(),
                  "experiment": settings.experiment, "artifacts": []}
        try:
            open_store(settings)[0].set_terminated(pipeline["run_id"], status, ending["end_ms"])
        except Exception as exc:  # the store went away during the pipeline
            print(f"warning: MLflow store {settings.uri} did not answer ({type(exc).__name__}); "
                  "the pipeline run's end is spooled", file=sys.stderr)
            spool_run(settings.spool, ending)
    if any(settings.spool.glob(f"*/{RUN_FILE}")):
        try:
            counts = sync_spool(settings)
            print(f"MLflow store {settings.uri} answers again: {counts['replayed']} spooled run(s) logged")
        except Exception as exc:  # still down: the spool waits for `visionqc tracking-sync`
            print(f"MLflow store {settings.uri} still does not answer ({type(exc).__name__}); the runs stay in "
                  f"{settings.spool}/: once it is up, run: visionqc tracking-sync --tracking-uri {settings.uri}", file=sys.stderr)


def sync_spool(settings: TrackingSettings) -> dict[str, int]:
    """Replay every spooled run into the store, once each: a payload whose run is already complete in the
    store (by its `visionqc.payload` tag) is skipped. Each replayed payload leaves the spool. One sync at
    a time per spool: a second caller waits for the first, and says so."""
    settings.home.mkdir(parents=True, exist_ok=True)
    with _file_lock(settings.home / "spool.lock", waiting="another tracking-sync is replaying this spool; waiting for it"):
        return _sync_locked(settings)


def _sync_locked(settings: TrackingSettings) -> dict[str, int]:
    folders = [p.parent for p in settings.spool.glob(f"*/{RUN_FILE}")]
    records = [(folder, json.loads((folder / RUN_FILE).read_text("utf-8"))) for folder in folders]
    order = {"pipeline": 0, "stage": 1, "ending": 2}
    records.sort(key=lambda item: (order[item[1]["kind"]], item[1].get("start_ms") or 0, item[1]["id"]))
    counts = {"replayed": 0, "already_there": 0}
    stores = {}  # each record goes to the experiment it was written for
    for folder, record in records:
        experiment = record.get("experiment") or settings.experiment
        if experiment not in stores:
            stores[experiment] = open_store(TrackingSettings(settings.uri, experiment, settings.home))
        counts[_replay(*stores[experiment], folder, record)] += 1
        shutil.rmtree(folder)
    return counts


def _runs_of_payload(client, experiment_id: str, payload_id: str) -> list:
    """The store's runs of one payload, live or replayed; superseded ones (partial live runs) last."""
    found = client.search_runs([experiment_id], f"tags.`visionqc.payload` = '{payload_id}'", max_results=100)
    return sorted(found, key=lambda run: "visionqc.superseded_by" in run.data.tags)


def _run_of_payload(client, experiment_id: str, payload_id: str):
    found = _runs_of_payload(client, experiment_id, payload_id)
    return found[0] if found else None


def _holds(run, record: dict) -> bool:
    """Whether a stored run holds all of a spooled payload: its end status and every metric it logged."""
    return (run.info.status == record["status"] and "visionqc.superseded_by" not in run.data.tags
            and {key for key, *_ in record["metrics"]} <= set(run.data.metrics))


def _existing_run(client, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # not in this store
        return None


def _replay(client, experiment_id: str, folder: Path, record: dict) -> str:
    if record["kind"] == "ending":
        if _existing_run(client, record["run_id"]):
            client.set_terminated(record["run_id"], record["status"], record["end_ms"])
            return "replayed"
        return "already_there"
    stored = _runs_of_payload(client, experiment_id, record["id"])
    if any(_holds(run, record) for run in stored):
        return "already_there"
    tags = {**record["tags"], "visionqc.payload": record["id"], "visionqc.synced": "tracking-sync"}
    parent_payload = tags.get("visionqc.parent_payload")
    parent = _run_of_payload(client, experiment_id, parent_payload) if parent_payload else None
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.info.run_id
    elif not _existing_run(client, tags.get("mlflow.parentRunId")):
        tags.pop("mlflow.parentRunId", None)
    run = client.create_run(experiment_id, start_time=record["start_ms"], tags=tags, run_name=record["name"])
    run_id = run.info.run_id
    _log_params(client, run_id, record["params"])
    _log_metrics(client, run_id, record["metrics"])
    for path, artifact_folder in record["artifacts"]:
        _log_artifact(client, run_id, folder / path, artifact_folder)
    if record["lineage"]:
        _log_lineage(client, run_id, record["lineage"])
    for name, table in record.get("tables", {}).items():
        _log_table(client, run_id, name, table)
    if record["status"] != "RUNNING":
        client.set_terminated(run_id, record["status"], record["end_ms"])
    for partial in stored:  # begun live before the store went away: the replay above holds all of it
        client.set_tag(partial.info.run_id, "visionqc.superseded_by", run_id)
        if partial.info.status == "RUNNING":
            client.set_terminated(partial.info.run_id, "FAILED")
    return "replayed"
