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
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SMALL_DEMO, copy_workflow, small_workflow

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


def fit_profile_to_node(profile: Path, **resources) -> None:
    """What a site does with the profile: size memory and threads to its nodes (here 2 CPUs, 24 GB); `resources` set
    rules' resources on top (rule → {resource: value})."""
    settings = yaml.safe_load(profile.read_text())
    for resources_of_rule in settings["set-resources"].values():
        resources_of_rule["mem_mb"] = 2000
    for rule, changes in resources.items():
        settings["set-resources"][rule] = {"mem_mb": 2000, **changes}
    settings["set-threads"] = {rule: 1 for rule in settings["set-threads"]}
    profile.write_text(yaml.safe_dump(settings))


def slurm_environment(**extra) -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", VISIONQC_SLURM_PARTITION="cpu",
                VISIONQC_SLURM_GPU_PARTITION="gpu", VISIONQC_SLURM_ACCOUNT="", **extra)


# this cluster keeps no accounting database, so job states come from squeue
SNAKEMAKE_ON_SLURM = ["snakemake", "--profile", "slurm", "--slurm-status-command", "squeue",
                      "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "3"]


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
    env = slurm_environment(VISIONQC_TEST_FAIL_ONCE=f"convert:{work}/convert-failed-once")
    command = [*SNAKEMAKE_ON_SLURM, "results/train/demo/summary.json", f"results/stage_a/{MISSION}.jsonl"]
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


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, f"waited {seconds:.0f} s for {what}"
        time.sleep(2)
    return found


@pytest.mark.slow
def test_a_job_past_its_time_limit_gets_more_time_and_a_requeued_job_resumes(cluster, tmp_path):
    """The time-series branch on the real slurmctld. convert_signals sleeps past its 1-minute limit on its first
    attempt: Slurm ends it TIMEOUT and the profile's retry asks for twice the time. train_ts pauses after its step-3
    checkpoint and the test requeues it (`scontrol requeue`, as preemption does): the same Slurm job starts again and
    resumes from step 3."""
    work = small_workflow(tmp_path)
    fit_profile_to_node(work / "workflow/profiles/slurm/config.yaml", convert_signals={"runtime": "1 * attempt"})
    env = slurm_environment(VISIONQC_TEST_PAUSE_AT="convert:start,train_ts:step-3", VISIONQC_TEST_PAUSE_ONCE=str(work / "paused"))
    command = [*SNAKEMAKE_ON_SLURM, "results/train_ts/demo_signals/summary.json"]
    with subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
        try:
            log = work / "logs/train_ts/demo_signals.log"
            wait_for(lambda: log.exists() and "paused at train_ts:step-3" in log.read_text(), 600, "train_ts to pause")
            listing = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True, check=True).stdout
            (job_id,) = [line.split("|")[0] for line in listing.splitlines() if line.endswith("|rule_train_ts_wildcards_demo_signals")]
            subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)
            # Slurm holds a requeued job back for two minutes (its BeginTime); a site's admin, and the test, may say now
            wait_for(lambda: job_state(job_id) == "PENDING", 120, "the requeued job to wait")
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True, text=True)
            output, _ = run.communicate(timeout=600)
        finally:
            run.kill()
    assert run.returncode == 0, output
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    jobs = submitted_jobs(run_id)

    first, second = sorted(jobs["convert_signals"], key=lambda job: int(job["id"]))
    assert (first["state"], first["TimeLimit"]) == ("TIMEOUT", "00:01:00"), first
    assert (second["state"], second["TimeLimit"]) == ("COMPLETED", "00:02:00"), second

    (train,) = jobs["train_ts"]  # requeued, not resubmitted: one Slurm job, started twice
    assert (train["id"], train["state"], train["Restarts"]) == (job_id, "COMPLETED", "1"), train
    summary = json.loads((work / "results/train_ts/demo_signals/summary.json").read_text())
    assert summary["steps_run_now"] == summary["steps"] - 3, summary
