import hashlib
import json
from pathlib import Path

import mlflow

from visionqc.cli import main


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_stage_runs_are_tracked_and_read_back(demo_exports, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    track = ["--tracking-uri", uri, "--experiment", "t"]
    (tmp_path / "cfg.json").write_text(json.dumps({"fusion": {"seed": 1}}))
    assert main(["pipeline", "start", "--config", "cfg.json", *track]) == 0
    assert main(["convert", "--format", "labelme", "--source", str(demo_exports / "labelme"), "--train", "conv/train.jsonl",
                 "--val", "conv/val.jsonl", "--report", "conv/report.json", "--media", "conv/images", "--overlays", "conv/overlays",
                 "--name", "lm", "--options", json.dumps({"val_fraction": 0.25, "overlays": 2}), *track]) == 0
    assert main(["validate", "--source", "conv/train.jsonl", "--clean", "val/train.clean.jsonl", "--rejects", "val/rej.jsonl",
                 "--report", "val/report.json", "--name", "lm.train", *track]) == 0
    assert main(["pipeline", "success", *track]) == 0

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("t")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pipeline", "convert:lm", "validate:lm.train"}
    parent = runs["pipeline"]
    assert parent.info.status == "FINISHED" and parent.data.params["fusion.seed"] == "1"

    convert_run = runs["convert:lm"]
    assert convert_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert convert_run.data.params["val_fraction"] == "0.25"
    converted = json.loads((tmp_path / "conv" / "report.json").read_text())
    assert convert_run.data.metrics["records_out"] == converted["records_out"] == 8
    assert convert_run.data.metrics["rejected.unsupported_point"] == converted["issues_by_reason"]["unsupported_point"]
    assert convert_run.data.tags["output.train.sha256"] == sha256(tmp_path / "conv" / "train.jsonl")
    artifacts = {a.path for a in client.list_artifacts(convert_run.info.run_id)}
    assert {"report.json", "overlays", "lineage.json"} <= artifacts
    assert len(client.list_artifacts(convert_run.info.run_id, "overlays")) == 2
    assert list((tmp_path / "mlflow" / "artifacts").rglob("report.json")), "artifacts belong beside the store"
    assert not (tmp_path / "mlruns").exists()

    validate_run = runs["validate:lm.train"]
    assert validate_run.data.metrics["records_in"] == validate_run.data.metrics["records_out"] == converted["records"]["train"]
    assert validate_run.data.tags["input.records.sha256"] == sha256(tmp_path / "conv" / "train.jsonl")
    assert validate_run.data.tags["output.clean.sha256"] == sha256(tmp_path / "val" / "train.clean.jsonl")
    assert validate_run.info.status == "FINISHED"


def test_failed_stage_marks_its_run_failed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "bad.jsonl").write_text('{"images": ["x.jpg"], "width": 4, "height": 4, "objects": []}\n')
    code = main(["validate", "--source", "bad.jsonl", "--clean", "c.jsonl", "--rejects", "r.jsonl", "--report", "p.json",
                 "--name", "bad", "--options", '{"mode": "fail_fast"}', "--tracking-uri", uri])
    assert code == 1
    (run,) = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("visionqc").experiment_id])
    assert run.info.status == "FAILED"
    assert not (tmp_path / "c.jsonl").exists()


def test_metric_names_keep_our_users_labels(tmp_path):
    """Per-class metrics are named by the users' own (Chinese) labels; distinct labels stay distinct metrics."""
    from visionqc.tracking import StageResult, TrackingSettings, stage_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with stage_run(TrackingSettings(uri, "visionqc", tmp_path / "home"), "eval_ts", "eval_ts:x", {}) as run:
        run.record(StageResult(report={}, metrics={"accuracy.正常": 0.9, "accuracy.尖峰": 1.0, "odd name?": 2.0}))
    client = mlflow.MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("visionqc").experiment_id])
    assert found.data.metrics == {"accuracy.正常": 0.9, "accuracy.尖峰": 1.0, "odd name_": 2.0}


def test_tables_reach_the_store_live_and_through_the_spool(tmp_path):
    """A StageResult's tables become MLflow table artifacts (the UI lists them), whether logged live or replayed."""
    from visionqc.tracking import StageResult, TrackingSettings, stage_run, sync_spool

    table = {"rank": [1, 2], "source_file": ["site5.json", "site2.json"], "margin": [8.0, 4.0]}
    result = StageResult(report={}, tables={"suspects_table.json": table})
    dead = TrackingSettings(f"sqlite:///{tmp_path}/not_a_folder/mlflow.db", "visionqc", tmp_path / "home")
    (tmp_path / "not_a_folder").write_text("a file where the store's folder should be")
    with stage_run(dead, "qa_labels", "qa:spooled", {}) as run:
        run.record(result)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    live = TrackingSettings(uri, "visionqc", tmp_path / "home")
    with stage_run(live, "qa_labels", "qa:live", {}) as run:
        run.record(result)
    assert sync_spool(live)["replayed"] == 1
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("visionqc").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["qa:live", "qa:spooled"]
    for found in runs:
        assert json.loads(found.data.tags["mlflow.loggedArtifacts"]) == [{"path": "suspects_table.json", "type": "table"}]
        stored = json.loads(Path(client.download_artifacts(found.info.run_id, "suspects_table.json", str(tmp_path))).read_text())
        assert stored["columns"] == ["rank", "source_file", "margin"] and stored["data"][0] == [1, "site5.json", 8.0]
