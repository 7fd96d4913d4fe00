"""`snakemake --profile slurm` against a real single-node Slurm (Debian's slurm-wlm on this machine).

workflow/scripts/local_slurm.sh installs (as root), configures and starts slurmctld, slurmd and
munged; the test stops them by PID when it started them. The node has no real GPU: it declares two
stand-in GPU devices, so Slurm accepts, schedules and records --gpus requests, which is what the
test reads back.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SMALL_DEMO, copy_workflow

CLUSTER = REPO / "workflow" / "scripts" / "local_slurm.sh"
MISSION = "BBU安装检查"


def slurm_is_up() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], check=False, capture_output=True, timeout=10).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("SLURM_CONF", raising=False)  # the real cluster's config (conftest points the clients elsewhere)
        was_up = slurm_is_up()
        subprocess.run(["bash", str(CLUSTER), "start"], check=True, capture_output=True, text=True, timeout=300)
        yield
        if not was_up:
            subprocess.run(["bash", str(CLUSTER), "stop"], check=True, timeout=60)


def fit_profile_to_node(profile: Path) -> None:
    """What a site does with the profile: size memory and threads to its nodes (here 2 CPUs, 24 GB)."""
    settings = yaml.safe_load(profile.read_text())
    for resources in settings["set-resources"].values():
        resources["mem_mb"] = 2000
    settings["set-threads"] = {rule: 1 for rule in settings["set-threads"]}
    profile.write_text(yaml.safe_dump(settings))


def submitted_jobs(run_id: str) -> dict[str, dict]:
    """Slurm's own record of this run's jobs (squeue keeps finished jobs for MinJobAge): rule → fields."""
    listing = subprocess.run(["squeue", "-t", "all", "-h", "-o", "%i|%j|%k|%T"], capture_output=True, text=True, check=True)
    jobs = {}
    for line in listing.stdout.splitlines():
        job_id, name, comment, state = line.split("|")
        if name != run_id:
            continue
        rule = re.match(r"rule_(\w+?)(_wildcards_.*)?$", comment).group(1)
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
        fields = dict(re.findall(r"(\w[\w/:]*)=(\S*)", shown))
        jobs.setdefault(rule, []).append({"id": job_id, "state": state, **fields})
    return jobs


@pytest.mark.slow
def test_convert_to_stage_a_shards_through_sbatch(cluster, tmp_path):
    work = copy_workflow(tmp_path)
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    config["demo"] = SMALL_DEMO
    config["model"]["image_max_tokens"] = 64
    config["datasets"] = {"demo_platform": config["datasets"]["demo_platform"]}
    config["fusion"]["targets"] = config["fusion"]["targets"][:1]
    config["fusion"]["sources"] = []
    config["timeseries"]["dataset"] = ""  # no signal dataset left: the time-series branch is off
    recipe = {**yaml.safe_load((work / "config/recipes/demo_full.yaml").read_text()),
              "max_steps": 2, "per_device_train_batch_size": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1}
    (work / "config/recipes/tiny.yaml").write_text(yaml.safe_dump(recipe))
    config["train"]["runs"] = {"demo": {"recipe": "config/recipes/tiny.yaml", "base": ""}}
    # Stage-A in three shard jobs (GPU jobs each), then the merging job; two steps teach no valid summary
    config["stage_a"].update(shards=3, chunk_size=4, max_new_tokens=8, min_valid_rate=0.0)
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    fit_profile_to_node(work / "workflow/profiles/slurm/config.yaml")

    # the first attempt of the convert job fails (a test-only switch); the profile's retries resubmit it
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               VISIONQC_SLURM_PARTITION="cpu", VISIONQC_SLURM_GPU_PARTITION="gpu", VISIONQC_SLURM_ACCOUNT="",
               VISIONQC_TEST_FAIL_ONCE=f"convert:{work}/convert-failed-once")
    # this cluster keeps no accounting database, so job states come from squeue
    command = ["snakemake", "--profile", "slurm", "--slurm-status-command", "squeue",
               "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "3",
               "results/train/demo/summary.json", f"results/stage_a/{MISSION}.jsonl"]
    result = subprocess.run(command, check=False, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert (work / "results/train/demo/model").is_dir()

    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    jobs = submitted_jobs(run_id)
    assert {rule: len(entries) for rule, entries in jobs.items()} == {
        "convert_dataset": 2, "validate_records": 2, "fuse_datasets": 2, "augment_records": 1, "cache_tokens": 2,
        "train_model": 1, "merge_adapter": 1, "summarize_shard": 3, "summarize_images": 1}
    first, second = sorted(jobs.pop("convert_dataset"), key=lambda job: int(job["id"]))
    assert (first["state"], first["TimeLimit"]) == ("FAILED", "00:30:00")  # 30 * attempt minutes
    assert (second["state"], second["TimeLimit"]) == ("COMPLETED", "01:00:00")
    assert (work / "convert-failed-once").exists()
    assert all(job["state"] == "COMPLETED" for entries in jobs.values() for job in entries)
    # localrules (demo data, demo model) ran on the submit host: not in the table above

    (train,) = jobs["train_model"]
    assert train["Partition"] == "gpu" and train["TresPerJob"] == "gres:gpu:1"
    assert train["TimeLimit"] == "08:00:00"  # the profile's 480 * attempt minutes, first attempt
    for job in [first, *jobs["fuse_datasets"]]:
        assert job["Partition"] == "cpu" and "TresPerJob" not in job and job["TimeLimit"] == "00:30:00"
    log = work / ".snakemake/slurm_logs/rule_train_model/demo" / f"{train['id']}.log"
    assert log.exists(), "the executor plugin's per-job Slurm log is missing"
    # each shard a Slurm job of its own on the GPU partition, each generating its share of the chunks
    shards = jobs["summarize_shard"]
    assert len({job["id"] for job in shards}) == 3
    assert all(job["Partition"] == "gpu" and job["TresPerJob"] == "gres:gpu:1" for job in [*shards, *jobs["summarize_images"]])
    reports = [json.loads((work / f"results/stage_a/{MISSION}.shards/{rank}.report.json").read_text()) for rank in range(3)]
    merged = json.loads((work / f"results/stage_a/{MISSION}.report.json").read_text())
    assert [report["world"] for report in reports] == [3, 3, 3] and sum(r["chunks_run"] for r in reports) == merged["chunks"] > 2
    assert merged["chunks_run"] == 0 and merged["merged"]
