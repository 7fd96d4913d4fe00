"""Real `snakemake` runs of the workflow in a temporary copy of the repository."""

import json
import re
from pathlib import Path

import mlflow
import pytest
import yaml

from visionqc.io import process_umask
from visionqc.messages import ticket_key

from conftest import jobs_in, read_jsonl, small_workflow, snakemake

UMASK = process_umask()


@pytest.mark.slow
def test_dry_run_shows_the_dag_and_touches_nothing(tmp_path):
    workdir = small_workflow(tmp_path)
    result = snakemake(workdir, "-n")
    assert jobs_in(result.stdout) == {
        "generate_demo_data": 1, "generate_demo_signals": 1, "convert_dataset": 4, "convert_signals": 1,
        "validate_records": 10, "fuse_datasets": 2, "augment_records": 1,
        "build_demo_model": 1, "cache_tokens": 2, "train_model": 2, "merge_adapter": 2,
        "summarize_images": 1, "judge_groups": 1, "report_verdicts": 1, "evaluate_dense": 1, "find_label_suspects": 1, "build_demo_ts_models": 1,
        "cache_ts": 2, "train_ts": 1,
        "eval_ts": 1, "all": 1,
    }
    assert not (workdir / "results").exists()


@pytest.mark.slow
def test_whole_dag_runs_and_is_tracked(finished_workflow):
    workdir = finished_workflow
    for dataset in ("demo_platform", "demo_labelme", "demo_coco", "demo_verdicts", "demo_signals"):
        for split in ("train", "val"):
            report = json.loads((workdir / f"results/validate/{dataset}/{split}.report.json").read_text())
            assert report["records_out"] > 0 and report["rejected"] == 0
        assert (workdir / f"logs/convert/{dataset}.log").exists()
    fused = (workdir / "results/fuse/demo/train.jsonl").read_text().splitlines()
    assert {json.loads(line)["metadata"]["_fusion_source"] for line in fused} == {
        "demo_platform", "demo_labelme", "demo_coco", "demo_verdicts"}

    uri = f"sqlite:///{workdir}/results/mlflow/mlflow.db"
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("visionqc").experiment_id])
    names = {run.info.run_name for run in runs}
    assert {"convert:demo_platform", "validate:demo_coco.val", "fuse:demo.train", "augment:demo.epoch_0", "cache:demo.epoch_0", "train:demo",
            "train:demo_lora", "merge:demo", "merge:demo_lora", "stage_a:BBU安装检查", "stage_b:BBU安装检查", "pipeline",
            "convert:demo_signals", "cache_ts:demo_signals.train", "train_ts:demo_signals", "eval_ts:demo_signals",
            "eval_dense:demo", "qa_labels:demo_platform"} <= names
    (pipeline,) = [run for run in runs if run.info.run_name == "pipeline"]
    assert pipeline.info.status == "FINISHED"
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id]
    # convert 5, validate 10, fuse 2, augment, cache 2, train 2, merge 2, Stage-A, Stage-B, the verdict report, eval_dense,
    # qa_labels, cache_ts 2, train_ts, eval_ts
    assert len(children) == 5 + 10 + 2 + 1 + 2 + 2 + 2 + 1 + 1 + 1 + 1 + 1 + 2 + 1 + 1 and all(run.info.status == "FINISHED" for run in children)
    (train_run,) = [run for run in children if run.info.run_name == "train:demo"]
    history = client.get_metric_history(train_run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 8, 16, 24, 32]
    assert {"eval_loss", "token_acc", "learning_rate"} <= set(train_run.data.metrics)
    assert "loss.png" in {a.path for a in client.list_artifacts(train_run.info.run_id)}
    for run in ("demo", "demo_lora"):  # a full fine-tune (copied) and a LoRA adapter (merged), each checked on logits
        verification = json.loads((workdir / f"results/merge/{run}/verification.json").read_text())
        assert verification["passed"] and verification["max_abs_logit_diff"] <= 1e-4
    assert verification["adapter_effect_max_abs_logit"] > 1e-3  # the LoRA adapter changed the logits it merged
    summaries = [json.loads(line) for line in (workdir / "results/stage_a/BBU安装检查.jsonl").read_text().splitlines()]
    truth = [json.loads(line) for line in (workdir / "resources/demo/groups/truth.jsonl").read_text().splitlines()]
    assert [(s["group_id"], s["label"]) for s in summaries] == sorted(((t["group_id"], t["label"]) for t in truth),
                                                                       key=lambda key: (key[0], key[1] or ""))
    metrics = json.loads((workdir / "results/stage_b/BBU安装检查.metrics.json").read_text())
    reviewed = sum(t["label"] is not None for t in truth)
    assert metrics["groups_judged"] == len(truth) > metrics["groups_scored"] == reviewed
    verdicts = {row["ticket_key"]: row["verdict"] for row in read_jsonl(workdir / "results/stage_b/BBU安装检查.jsonl")}
    agree = [("pass" if verdicts[ticket_key(s)] == "通过" else "fail") == s["label"] for s in summaries if s["label"]]
    assert len(agree) == reviewed and metrics["label_match"] == pytest.approx(sum(agree) / reviewed)
    (stage_b_run,) = [run for run in children if run.info.run_name == "stage_b:BBU安装检查"]
    assert "label_match" in stage_b_run.data.metrics and "unparseable" in stage_b_run.data.metrics
    assert "BBU安装检查.confusion.png" in {a.path for a in client.list_artifacts(stage_b_run.info.run_id)}
    # the verdict report: a row per group, failed first, logged as an MLflow artifact with its thumbnails
    table = (workdir / "results/report/BBU安装检查.csv").read_text("utf-8-sig").splitlines()
    assert len(table) == 1 + len(truth) and (workdir / "results/report/BBU安装检查.html").stat().st_size > 1000
    (report_run,) = [run for run in children if run.info.run_name == "verdict_report:BBU安装检查"]
    assert {"BBU安装检查.html", "BBU安装检查.csv", "BBU安装检查.thumbs"} <= {a.path for a in client.list_artifacts(report_run.info.run_id)}
    assert "invalid_summary_groups" in stage_b_run.data.metrics
    (stage_a_run,) = [run for run in children if run.info.run_name == "stage_a:BBU安装检查"]
    report = json.loads((workdir / "results/stage_a/BBU安装检查.report.json").read_text())
    assert stage_a_run.data.metrics["valid_rate"] == report["valid_rate"]
    assert sum(report["invalid_by_problem"].values()) == report["invalid_images"]
    (dense_run,) = [run for run in children if run.info.run_name == "eval_dense:demo"]
    dense = json.loads((workdir / "results/eval_dense/demo/metrics.json").read_text())
    held_out = [json.loads(line) for line in (workdir / "results/fuse/demo/val.jsonl").read_text().splitlines()]
    assert dense["records"] == sum("images" in record and "messages" not in record for record in held_out)
    assert dense["overall"]["truth"] == sum(len(record.get("objects", [])) for record in held_out)
    assert dense_run.data.metrics["unparseable"] == dense["unparseable"]
    overlays = {a.path for a in client.list_artifacts(dense_run.info.run_id, "overlays")}
    assert overlays and overlays == {f"overlays/{p.name}" for p in (workdir / "results/eval_dense/demo/overlays").glob("*.png")}
    (qa_run,) = [run for run in children if run.info.run_name == "qa_labels:demo_platform"]
    qa = json.loads((workdir / "results/qa/demo_platform/report.json").read_text())
    clean = sum(len((workdir / f"results/validate/demo_platform/{split}.clean.jsonl").read_text().splitlines())
                for split in ("train", "val"))
    assert qa["records"] == clean and qa["suspects"] + qa["agree"] + qa["own_invalid"] == clean
    assert qa_run.data.metrics["records"] == clean and "suspects_table.json" in {a.path for a in client.list_artifacts(qa_run.info.run_id)}
    pointer = json.loads((workdir / "results/cache/demo.epoch_0.json").read_text())
    assert (workdir / pointer["path"] / "manifest.json").exists()

    # nothing left to do; forcing one stage reruns it and what depends on it only
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout
    forced = jobs_in(snakemake(workdir, "-n", "--forcerun", "validate_records").stdout)
    assert forced == {"validate_records": 10, "fuse_datasets": 2, "augment_records": 1, "cache_tokens": 2, "train_model": 2, "merge_adapter": 2,
                      "summarize_images": 1, "judge_groups": 1, "report_verdicts": 1, "evaluate_dense": 1, "find_label_suspects": 1, "cache_ts": 2,
                      "train_ts": 1, "eval_ts": 1, "all": 1}
    # asking for one file builds only what it needs
    (workdir / "results/validate/demo_labelme/val.clean.jsonl").unlink()
    one = jobs_in(snakemake(workdir, "-n", "results/validate/demo_labelme/val.clean.jsonl").stdout)
    assert one == {"validate_records": 1}
    built = snakemake(workdir, "results/validate/demo_labelme/val.clean.jsonl")
    assert jobs_in(built.stdout + built.stderr) == {"validate_records": 1}
    assert (workdir / "results/validate/demo_labelme/val.clean.jsonl").exists()


@pytest.mark.slow
def test_a_changed_config_key_reruns_exactly_the_stages_it_feeds(finished_workflow):
    """Snakemake's params change detection: after the full run, each key reruns its stage and what follows."""
    workdir = finished_workflow
    downstream = {"cache_tokens": 2, "train_model": 2, "merge_adapter": 2, "summarize_images": 1, "judge_groups": 1, "report_verdicts": 1,
                  "evaluate_dense": 1, "find_label_suspects": 1, "all": 1}
    changes = [
        ({"stage_b": {"max_new_tokens": 20}}, {"judge_groups": 1, "report_verdicts": 1, "all": 1}),
        ({"stage_a": {"batch_size": 4}}, {"summarize_images": 1, "judge_groups": 1, "report_verdicts": 1, "all": 1}),
        # shards are jobs, not answers: the merging job and what follows rerun, with three shard jobs before it
        ({"stage_a": {"shards": 3}}, {"summarize_shard": 3, "summarize_images": 1, "judge_groups": 1, "report_verdicts": 1,
                                      "all": 1}),
        ({"merge": {"samples": 2}}, {"merge_adapter": 2, "summarize_images": 1, "judge_groups": 1, "report_verdicts": 1, "evaluate_dense": 1,
                                     "find_label_suspects": 1, "all": 1}),
        ({"eval_dense": {"line_tolerance": 6}}, {"evaluate_dense": 1, "all": 1}),
        ({"qa_labels": {"gallery": 3}}, {"find_label_suspects": 1, "all": 1}),
        ({"fusion": {"seed": 5}}, {"fuse_datasets": 2, "augment_records": 1, **downstream}),
        ({"datasets": {"demo_labelme": {"convert": {"val_fraction": 0.5}}}},
         {"convert_dataset": 1, "validate_records": 2, "fuse_datasets": 2, "augment_records": 1, **downstream}),
        # augmentation feeds the train cache only; a second epoch adds its own jobs and leaves epoch 0 alone
        ({"augment": {"bypass_prob": 0.5}}, {"augment_records": 1, **downstream, "cache_tokens": 1}),
        ({"augment": {"epochs": 2}}, {"augment_records": 1, **downstream, "cache_tokens": 1}),
    ]
    for change, expected in changes:
        overlay = workdir / "changed.yaml"  # --configfile overlays config/config.yaml key by key
        overlay.write_text(yaml.safe_dump(change))
        assert jobs_in(snakemake(workdir, "-n", "--configfile", str(overlay)).stdout) == expected, change
    # tracking settings are no rule's params: changing them reruns nothing
    overlay.write_text(yaml.safe_dump({"tracking": {"enabled": False, "uri": "sqlite:///elsewhere.db", "experiment": "x"}}))
    assert "Nothing to be done" in snakemake(workdir, "-n", "--configfile", str(overlay)).stdout


@pytest.mark.slow
def test_report_holds_the_stage_plots(finished_workflow):
    workdir = finished_workflow
    snakemake(workdir, "--report", "report.html")
    html = (workdir / "report.html").read_text()
    embedded = [json.loads(name) for name in re.findall(r'"filename":\s*("(?:[^"\\]|\\.)*")', html)]
    for plot in ("BBU安装检查.confusion.png", "demo.epoch_0.lengths.png", "demo.val.lengths.png", "traces.png",
                 "confusion.png", "epoch_0.preview.png"):
        assert plot in embedded, plot
    assert embedded.count("loss.png") == 3  # one loss curve per training run: demo, demo_lora, train_ts
    overlays = [name for name in embedded if re.fullmatch(r"\d{3}\.png", name)]
    overlays_per_dataset = yaml.safe_load((workdir / "config/config.yaml").read_text())["convert"]["overlays"]
    dense_overlays = len(list((workdir / "results/eval_dense/demo/overlays").glob("*.png")))
    suspects = len(list((workdir / "results/qa/demo_platform/gallery").glob("*.png")))
    assert dense_overlays > 0
    # three image datasets (the verdict records have no images), eval_dense's truth-against-prediction pictures and
    # label QA's suspects
    assert len(overlays) == 3 * overlays_per_dataset + dense_overlays + suspects


@pytest.mark.slow
def test_bad_config_fails_with_the_schema_message(tmp_path):
    workdir = small_workflow(tmp_path)
    result = snakemake(workdir, "-n", "--config", "validate={'mode': 'sometimes'}", check=False)
    assert result.returncode != 0
    assert "sometimes" in result.stderr + result.stdout and "is not one of" in result.stderr + result.stdout


@pytest.mark.slow
def test_a_real_checkpoint_path_replaces_the_demo_model(tmp_path, tiny_model):
    workdir = small_workflow(tmp_path)
    result = snakemake(workdir, "-n", "-p", "--forceall", "--config", f"model={{'path': '{tiny_model}'}}")
    jobs = jobs_in(result.stdout)
    assert "build_demo_model" not in jobs and jobs["train_model"] == 2
    assert f"--base {tiny_model}" in result.stdout


@pytest.mark.slow
def test_time_series_branch_runs_alone_and_is_tracked(finished_workflow, tmp_path):
    """Asking for the held-out metrics in a fresh folder plans exactly the time-series branch, nothing of the vision DAG;
    the finished workflow's branch is measured and tracked."""
    target = "results/eval_ts/demo_signals/metrics.json"
    expected = {"generate_demo_signals": 1, "convert_signals": 1, "validate_records": 2, "build_demo_ts_models": 1,
                "cache_ts": 2, "train_ts": 1, "eval_ts": 1}
    assert jobs_in(snakemake(small_workflow(tmp_path), "-n", target).stdout) == expected
    workdir = finished_workflow
    metrics = json.loads((workdir / target).read_text())
    assert metrics["records"] == 8 and sum(metrics["confusion"].values()) == 8
    predictions = read_jsonl(workdir / "results/eval_ts/demo_signals/predictions.jsonl")
    assert metrics["accuracy"] == pytest.approx(sum(p["predicted"] == p["answer"] for p in predictions) / 8, abs=1e-4)
    summary = json.loads((workdir / "results/train_ts/demo_signals/summary.json").read_text())
    assert summary["backend"] == "loop" and summary["steps"] == 6 and summary["final_loss"] < summary["first_loss"]
    log = (workdir / "logs/train_ts/demo_signals.log").read_text()
    assert "backend loop" in log and "XTuner's Trainer needs CUDA" in log
    assert (workdir / "results/train_ts/demo_signals/trainer_config.py").read_text().count("TrainerConfig(") == 1

    client = mlflow.MlflowClient(f"sqlite:///{workdir}/results/mlflow/mlflow.db")
    runs = {run.info.run_name: run for run in client.search_runs([client.get_experiment_by_name("visionqc").experiment_id])}
    train = runs["train_ts:demo_signals"]
    assert train.data.params["backend"] == "loop" and "CPU loop" in train.data.params["backend_note"]
    assert len(client.get_metric_history(train.info.run_id, "loss")) == 6
    assert {"loss.png", "trainer_config.py", "lineage.json"} <= {a.path for a in client.list_artifacts(train.info.run_id)}
    evaluation = runs["eval_ts:demo_signals"]
    assert evaluation.data.metrics["accuracy"] == metrics["accuracy"]
    assert {"confusion.png", "traces.png", "lineage.json"} <= {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    convert_run = runs["convert:demo_signals"]
    assert "overlays" in {a.path for a in client.list_artifacts(convert_run.info.run_id)}
    lineage = client.download_artifacts(runs["cache_ts:demo_signals.val"].info.run_id, "lineage.json", str(tmp_path))
    assert json.loads(Path(lineage).read_text())["input"]["records"]["sha256"]
    # a rerun resumes nothing and redoes nothing
    assert "Nothing to be done" in snakemake(workdir, "-n", target).stdout


# Keys whose values are clocks or rates: the only fields a rerun may change.
TIME_KEY = re.compile(r"(^|_)(seconds|runtime)(_|$)|per_second$")


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if not TIME_KEY.search(k)}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def parsed(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


# The one output allowed to differ between two project folders, and why (README, "Same config, same bytes").
FOLDER_DEPENDENT = {"results/train_ts/demo_signals/trainer_config.py": "XTuner's config names the project's files by "
                    "absolute path, so that torchrun can start it from any folder"}


@pytest.mark.slow
def test_a_second_run_from_scratch_gives_the_same_bytes(finished_workflow, tmp_path):
    """The whole small workflow from scratch in another folder: every file it writes equals the first run's, byte for
    byte, but FOLDER_DEPENDENT. Files that record times may differ only in those fields (`seconds*`, `*_runtime`,
    `*_per_second`). Every file has the mode a plain write gives under the umask."""
    second = small_workflow(tmp_path)
    snakemake(second)

    same, timed, by_folder = [], [], []
    written = [p for folder in ("results", "resources") for p in sorted((second / folder).rglob("*")) if p.is_file()]
    for path in written:
        relative = path.relative_to(second)
        if relative.parts[:2] == ("results", "mlflow") or "checkpoints" in relative.parts:
            continue  # the tracking store and the resumable work folders are not outputs
        assert path.stat().st_mode & 0o777 in (0o666 & ~UMASK, 0o777 & ~UMASK), f"{relative}: mode {path.stat().st_mode:o}"
        first = (finished_workflow / relative).read_bytes()
        here = path.read_bytes()
        if here == first:
            same.append(relative)
            continue
        if str(relative) in FOLDER_DEPENDENT:
            assert here.replace(str(second).encode(), str(finished_workflow).encode()) == first
            by_folder.append(str(relative))
            continue
        assert path.suffix in (".json", ".jsonl"), f"{relative} differs between two runs of the same config"
        assert without_times(parsed(here.decode())) == without_times(parsed(first.decode())), f"{relative}: not only times"
        timed.append(str(relative))
    print(f"{len(same)} files byte-identical, {len(timed)} identical but for their times: {timed}")
    assert by_folder == sorted(FOLDER_DEPENDENT)
    assert len(same) > 100 and any(p.suffix == ".wav" for p in same) and any(p.name == "adapter_config.json" for p in same)
    names = {p.as_posix() for p in same}
    for stage in ("results/train/demo/model/model.safetensors", "results/train/demo_lora/model/adapter_model.safetensors",
                  "results/merge/demo/model/model.safetensors", "results/stage_a/", "results/stage_b/", "results/eval_dense/",
                  "results/qa/"):
        assert any(name.startswith(stage) for name in names), f"nothing of {stage} compared equal"
