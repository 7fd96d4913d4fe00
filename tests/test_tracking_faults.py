"""Tracking never blocks the work: a dead or unwritable store, killed jobs, parallel first writers, and a real
`mlflow server` over http (with its own backend store) that receives the spooled runs and parallel DAG jobs."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import small_workflow, snakemake, write_lines

BIN = Path(sys.executable).parent
RECORD = {"images": ["x.jpg"], "width": 4, "height": 4, "objects": []}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def visionqc(cwd: Path, *args: str, uri: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, VISIONQC_TRACKING_URI=uri, VISIONQC_EXPERIMENT="t", PATH=f"{BIN}:{os.environ['PATH']}")
    result = subprocess.run([str(BIN / "visionqc"), *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"visionqc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def validate_call(cwd: Path, name: str, uri: str) -> subprocess.CompletedProcess:
    write_lines(cwd / f"{name}.jsonl", [RECORD])
    return visionqc(cwd, "validate", "--source", f"{name}.jsonl", "--clean", f"{name}.clean.jsonl", "--rejects",
                    f"{name}.rejects.jsonl", "--report", f"{name}.report.json", "--name", name, uri=uri)


def runs_of(uri: str, experiment: str = "t") -> dict:
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return {run.info.run_name: run for run in client.search_runs([found.experiment_id])} if found else {}


def spooled(cwd: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cwd / "results/mlflow/spool").glob("*/run.json"))]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port with its backend store and artifacts in `folder`; returns once it answers."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(folder / "server.log", "a") as log:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/backend.db", "--artifacts-destination",
             str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                os.killpg(server.pid, signal.SIGKILL)
                raise AssertionError(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}") from None
            time.sleep(0.5)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with its own sqlite backend and artifact folder."""
    port = free_port()
    server = start_server(tmp_path_factory.mktemp("mlflow_server"), port)
    yield f"http://127.0.0.1:{port}"
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@contextlib.contextmanager
def silent_server():
    """A server that accepts connections and never answers (a frozen or overloaded tracking server); yields its URI."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


TWO_PART_STAGE = """
import sys
from pathlib import Path
from visionqc.tracking import TrackingSettings, stage_run
with stage_run(TrackingSettings({uri!r}, "t"), "demo", "two_parts", {{"seed": 3}}) as run:
    run.metrics({{"before": 1.0}}, step=1)
    print("open", flush=True)
    sys.stdin.readline()
    run.metrics({{f"after_{{i}}": float(i) for i in range(40)}}, step=2)
    Path("report.json").write_text("{{}}")
    run.artifact("report.json")
"""


def test_a_server_killed_mid_stage_gets_the_whole_run_at_the_next_sync(tmp_path):
    """The run begun live stays RUNNING with one metric when the server dies; the job spools all of it. After the
    server is back, sync logs the whole run FINISHED (not 'already there') and marks the partial one superseded."""
    port, store = free_port(), tmp_path / "server"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    job = subprocess.Popen([sys.executable, "-c", TWO_PART_STAGE.format(uri=uri)], cwd=tmp_path, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert job.stdout.readline().strip() == "open"
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)
    began = time.monotonic()
    _, errors = job.communicate("go\n", timeout=120)
    assert job.returncode == 0 and time.monotonic() - began < 30, errors
    assert "did not answer" in errors and len(spooled(tmp_path)) == 1

    server = start_server(store, port)
    try:
        (partial,) = runs_of(uri).values()
        assert partial.info.status == "RUNNING" and set(partial.data.metrics) == {"before"}
        synced = visionqc(tmp_path, "tracking-sync", uri=uri)
        assert "1 spooled run(s) logged" in synced.stdout, synced.stdout + synced.stderr
        runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("t").experiment_id])
        (whole,) = [run for run in runs if "visionqc.superseded_by" not in run.data.tags]
        (cut,) = [run for run in runs if "visionqc.superseded_by" in run.data.tags]
        assert whole.info.status == "FINISHED" and len(whole.data.metrics) == 41
        assert [a.path for a in mlflow.MlflowClient(uri).list_artifacts(whole.info.run_id)] == ["report.json"]
        assert cut.info.run_id == partial.info.run_id and cut.info.status == "FAILED"
        assert cut.data.tags["visionqc.superseded_by"] == whole.info.run_id
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_two_syncs_at_once_log_each_run_once_and_the_second_waits(tmp_path):
    dead, store = f"http://127.0.0.1:{free_port()}", f"sqlite:///{tmp_path}/store.db"
    for name in ("a", "b", "c"):
        validate_call(tmp_path, name, dead)
    env = dict(os.environ, VISIONQC_TRACKING_URI=store, VISIONQC_EXPERIMENT="t", PATH=f"{BIN}:{os.environ['PATH']}")
    syncs = [subprocess.Popen([str(BIN / "visionqc"), "tracking-sync"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [sync.communicate(timeout=300) for sync in syncs]
    assert [sync.returncode for sync in syncs] == [0, 0], outputs
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["validate:a", "validate:b", "validate:c"]  # each once
    logged = sorted(out for out, _ in outputs)
    assert "0 spooled run(s) logged" in logged[0] and "3 spooled run(s) logged" in logged[1], outputs
    assert any("waiting for it" in err for _, err in outputs), outputs


def test_a_server_that_never_answers_stalls_a_stage_seconds_not_minutes(tmp_path):
    with silent_server() as uri:
        began = time.monotonic()
        validate_call(tmp_path, "lm", uri)
        stalled = time.monotonic() - began
    assert stalled < 40, stalled  # one timed-out call (5 s, one retry), then the job goes offline
    (record,) = spooled(tmp_path)
    assert record["status"] == "FINISHED"


def test_a_dead_server_costs_seconds_and_sync_logs_each_spooled_run_once(tmp_path, mlflow_server):
    dead = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "config.json").write_text(json.dumps({"fusion": {"seed": 3}}))
    began = time.monotonic()
    visionqc(tmp_path, "pipeline", "start", "--config", "config.json", uri=dead)
    job = validate_call(tmp_path, "lm", dead)
    visionqc(tmp_path, "pipeline", "success", uri=dead)
    assert time.monotonic() - began < 30  # MLflow's own retries would take about 4 minutes per call
    assert "did not answer at the pipeline's start: this run is spooled" in job.stdout  # the job did not try again
    report = json.loads((tmp_path / "lm.report.json").read_text())
    assert report["records_in"] == 1  # the work itself is done
    records = {r["kind"]: r for r in spooled(tmp_path)}
    assert set(records) == {"pipeline", "stage"} and records["pipeline"]["status"] == "FINISHED"
    assert records["stage"]["tags"]["visionqc.parent_payload"] == records["pipeline"]["id"]

    before = tmp_path / "spool_copy"
    shutil.copytree(tmp_path / "results/mlflow/spool", before)
    synced = visionqc(tmp_path, "tracking-sync", uri=mlflow_server)
    assert "2 spooled run(s) logged" in synced.stdout
    assert not list((tmp_path / "results/mlflow/spool").iterdir())
    runs = runs_of(mlflow_server)
    assert set(runs) == {"pipeline", "validate:lm"}
    stage = runs["validate:lm"]
    assert stage.info.status == "FINISHED" and stage.data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id
    assert runs["pipeline"].data.params["fusion.seed"] == "3"
    assert stage.data.metrics["records_in"] == 1
    assert stage.data.tags["output.clean.sha256"] == records["stage"]["lineage"]["output"]["clean"]["sha256"]
    client = mlflow.MlflowClient(mlflow_server)
    assert {"lm.report.json", "lineage.json"} <= {a.path for a in client.list_artifacts(stage.info.run_id)}

    # a sync cut off before it emptied the spool logs nothing twice
    shutil.rmtree(tmp_path / "results/mlflow/spool")
    shutil.copytree(before, tmp_path / "results/mlflow/spool")
    again = visionqc(tmp_path, "tracking-sync", uri=mlflow_server)
    assert "0 spooled run(s) logged" in again.stdout and "2 already there" in again.stdout
    assert len(runs_of(mlflow_server)) == 2


def test_an_unwritable_store_spools_instead_of_failing(tmp_path):
    (tmp_path / "not_a_folder").write_text("a file where the store's folder should be")
    uri = f"sqlite:///{tmp_path}/not_a_folder/mlflow.db"
    job = validate_call(tmp_path, "lm", uri)
    assert (tmp_path / "lm.clean.jsonl").exists()
    assert job.stderr.count("warning: MLflow store") == 1 and "visionqc tracking-sync" in job.stderr
    (record,) = spooled(tmp_path)
    assert record["status"] == "FINISHED" and record["name"] == "validate:lm"
    failed = visionqc(tmp_path, "tracking-sync", uri=uri, check=False)
    assert failed.returncode == 1 and "spool in results/mlflow/spool/ is kept" in failed.stderr
    assert spooled(tmp_path) == [record]


SLOW_STAGE = """
import signal, time
from visionqc.cli import _exit_on_sigterm
from visionqc.tracking import TrackingSettings, stage_run
signal.signal(signal.SIGTERM, _exit_on_sigterm)
with stage_run(TrackingSettings({uri!r}, "t"), "demo", "slow:{name}", {{}}):
    print("open", flush=True)
    time.sleep(120)
"""


def start_slow_stage(cwd: Path, uri: str, name: str) -> subprocess.Popen:
    job = subprocess.Popen([sys.executable, "-c", SLOW_STAGE.format(uri=uri, name=name)], cwd=cwd, stdout=subprocess.PIPE,
                           text=True, start_new_session=True)
    assert job.stdout.readline().strip() == "open"
    return job


def test_sigterm_ends_the_run_killed_and_kill_9_is_marked_at_the_next_start(tmp_path):
    uri = f"sqlite:///{tmp_path}/results/mlflow/mlflow.db"
    terminated = start_slow_stage(tmp_path, uri, "term")
    os.killpg(terminated.pid, signal.SIGTERM)
    assert terminated.wait(timeout=60) == 128 + signal.SIGTERM
    killed = start_slow_stage(tmp_path, uri, "nine")
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    runs = runs_of(uri)
    assert runs["slow:term"].info.status == "KILLED"
    assert runs["slow:nine"].info.status == "RUNNING"  # nothing runs in a process killed by -9

    visionqc(tmp_path, "pipeline", "start", uri=uri)
    runs = runs_of(uri)
    assert runs["slow:nine"].info.status == "KILLED" and "visionqc.stale" in runs["slow:nine"].data.tags
    assert runs["pipeline"].info.status == "RUNNING"  # the run being opened is not stale


def test_parallel_first_writers_create_one_readable_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/results/mlflow/mlflow.db"
    names = [f"job{i}" for i in range(12)]
    for name in names:
        write_lines(tmp_path / f"{name}.jsonl", [RECORD])
    env = dict(os.environ, VISIONQC_TRACKING_URI=uri, VISIONQC_EXPERIMENT="t")
    jobs = [subprocess.Popen([str(BIN / "visionqc"), "validate", "--source", f"{n}.jsonl", "--clean", f"{n}.c.jsonl",
                              "--rejects", f"{n}.r.jsonl", "--report", f"{n}.p.json", "--name", n], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in names]
    errors = [job.communicate()[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0] * 12
    assert not any("warning: MLflow store" in e for e in errors), [e for e in errors if "warning" in e][:1]
    runs = runs_of(uri)
    assert sorted(runs) == sorted(f"validate:{n}" for n in names)
    assert {run.info.status for run in runs.values()} == {"FINISHED"}


DATA_TARGETS = [f"results/validate/{name}/{split}.clean.jsonl" for name in ("demo_labelme", "demo_coco") for split in ("train", "val")]


@pytest.mark.slow
def test_data_stages_against_a_dead_server_then_a_live_one(tmp_path, mlflow_server, monkeypatch):
    """Cluster mode: the same DAG with tracking off, against a dead server (spooled, then synced), and over http
    to a live server with parallel jobs. Every job's run arrives."""
    workdir = small_workflow(tmp_path)
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    config["tracking"]["experiment"] = "dag"
    (workdir / "config/config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    (workdir / "off.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}}))

    began = time.monotonic()
    snakemake(workdir, *DATA_TARGETS, "--configfile", "off.yaml")
    seconds_off = time.monotonic() - began
    tracked_jobs = len([p for p in (workdir / "logs").rglob("*.log") if "demo" not in p.parts])  # demo generators are not

    monkeypatch.setenv("VISIONQC_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    began = time.monotonic()
    snakemake(workdir, *DATA_TARGETS, "--forceall")
    seconds_dead = time.monotonic() - began
    print(f"data stages: {seconds_off:.0f} s with tracking off, {seconds_dead:.0f} s against a dead server")
    assert seconds_dead < 1.25 * seconds_off + 10, (seconds_off, seconds_dead)
    records = spooled(workdir)
    assert len(records) == tracked_jobs + 1 and {r["status"] for r in records} == {"FINISHED"}

    monkeypatch.setenv("VISIONQC_TRACKING_URI", mlflow_server)
    # each spooled run goes to the experiment it was written for ("dag"), whatever the sync's default
    subprocess.run([str(BIN / "visionqc"), "tracking-sync"], cwd=workdir, check=True, capture_output=True)
    synced = runs_of(mlflow_server, "dag")
    assert len(synced) == tracked_jobs + 1 and {r.info.status for r in synced.values()} == {"FINISHED"}

    with silent_server() as frozen:  # accepts connections, never answers (a server stopped with SIGSTOP)
        monkeypatch.setenv("VISIONQC_TRACKING_URI", frozen)
        began = time.monotonic()
        snakemake(workdir, *DATA_TARGETS, "--forceall")
        seconds_frozen = time.monotonic() - began
    print(f"data stages: {seconds_frozen:.0f} s against a server that never answers")
    # the pipeline's first call times out (5 s, one retry); its jobs then spool without calling
    assert seconds_frozen < 1.25 * seconds_off + 45, (seconds_off, seconds_frozen)
    assert len(spooled(workdir)) == tracked_jobs + 1
    monkeypatch.setenv("VISIONQC_TRACKING_URI", mlflow_server)

    snakemake(workdir, *DATA_TARGETS, "--forceall", "--cores", "4")
    assert not spooled(workdir)  # the live pipeline's end synced what the frozen server's pipeline spooled
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("dag").experiment_id
    live = [r for r in client.search_runs([experiment]) if "visionqc.synced" not in r.data.tags]
    (pipeline,) = [r for r in live if r.data.tags["visionqc.kind"] == "pipeline"]
    stages = [r for r in live if r.data.tags["visionqc.kind"] == "stage"]
    assert len(stages) == tracked_jobs
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {pipeline.info.run_id}
    assert {r.info.status for r in live} == {"FINISHED"}


def test_tracking_sync_defaults_to_the_store_the_config_names(tmp_path):
    """In a project folder, `visionqc tracking-sync` as the README prints it: the store is the config's tracking.uri."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("tracking: {uri: 'sqlite:///results/mlflow/project.db'}\n")
    env = {key: value for key, value in os.environ.items() if key not in ("VISIONQC_TRACKING_URI", "MLFLOW_TRACKING_URI")}
    synced = subprocess.run([str(BIN / "visionqc"), "tracking-sync"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert synced.returncode == 0 and "logged to sqlite:///results/mlflow/project.db" in synced.stdout, synced.stderr
    (tmp_path / "config" / "config.yaml").write_text("tracking: {enabled: false}\n")
    off = subprocess.run([str(BIN / "visionqc"), "tracking-sync"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert off.returncode == 1 and "turns tracking off" in off.stderr
