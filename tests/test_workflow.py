"""Real `snakemake` runs of the workflow in a temporary copy of the repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO

SMALL_DEMO = {"seed": 3, "platform": 12, "labelme": 6, "coco": 8, "groups": 3}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wf")
    shutil.copy(REPO / "Snakefile", work)
    for folder in ("rules", "workflow", "config", "envs"):
        shutil.copytree(REPO / folder, work / folder)
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    config["demo"] = SMALL_DEMO
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return work


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=workdir, env=env, capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def jobs_in(output: str) -> dict[str, int]:
    """The job-stats table of a dry run: rule → count."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("job ")) + 2
    counts = {}
    for line in lines[start:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.mark.slow
def test_dry_run_shows_the_dag_and_touches_nothing(workdir):
    result = snakemake(workdir, "-n")
    assert jobs_in(result.stdout) == {"generate_demo_data": 1, "convert_dataset": 3, "validate_records": 6, "fuse_datasets": 2, "all": 1}
    assert not (workdir / "results").exists()


@pytest.mark.slow
def test_three_stages_run_and_are_tracked(workdir):
    snakemake(workdir)
    for dataset in ("demo_platform", "demo_labelme", "demo_coco"):
        for split in ("train", "val"):
            report = json.loads((workdir / f"results/validate/{dataset}/{split}.report.json").read_text())
            assert report["records_out"] > 0 and report["rejected"] == 0
        assert (workdir / f"logs/convert/{dataset}.log").exists()
    fused = (workdir / "results/fuse/demo/train.jsonl").read_text().splitlines()
    assert {json.loads(line)["metadata"]["_fusion_source"] for line in fused} == {"demo_platform", "demo_labelme", "demo_coco"}

    uri = f"sqlite:///{workdir}/results/mlflow/mlflow.db"
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("visionqc").experiment_id])
    names = {run.info.run_name for run in runs}
    assert {"convert:demo_platform", "validate:demo_coco.val", "fuse:demo.train", "pipeline"} <= names
    (pipeline,) = [run for run in runs if run.info.run_name == "pipeline"]
    assert pipeline.info.status == "FINISHED"
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id]
    assert len(children) == 3 + 6 + 2 and all(run.info.status == "FINISHED" for run in children)

    # nothing left to do; forcing one stage reruns it and what depends on it only
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout
    forced = jobs_in(snakemake(workdir, "-n", "--forcerun", "validate_records").stdout)
    assert forced == {"validate_records": 6, "fuse_datasets": 2, "all": 1}
    # asking for one file builds only what it needs
    (workdir / "results/validate/demo_labelme/val.clean.jsonl").unlink()
    one = jobs_in(snakemake(workdir, "-n", "results/validate/demo_labelme/val.clean.jsonl").stdout)
    assert one == {"validate_records": 1}


@pytest.mark.slow
def test_bad_config_fails_with_the_schema_message(workdir):
    result = snakemake(workdir, "-n", "--config", "validate={'mode': 'sometimes'}", check=False)
    assert result.returncode != 0
    assert "sometimes" in result.stderr + result.stdout and "is not one of" in result.stderr + result.stdout
