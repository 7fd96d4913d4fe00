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


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, f"waited {seconds:.0f} s for {what}"
        time.sleep(2)
    return found


@pytest.mark.slow
def test_one_run_through_sbatch_retries_failures_and_time_limits_and_resumes_a_requeued_job(cluster, tmp_path):
    """One `snakemake --profile slurm` run of a small workflow on the real slurmctld, both branches at once:
    - images, convert to Stage-A in three shard jobs: every rule a Slurm job on the profile's partition, with its
      GPUs and time limit; the first attempt of train_model fails (a test-only switch) and the profile's retry
      resubmits it with twice the time;
    - time series: cache_ts sleeps past its 1-minute limit on its first attempt, Slurm ends it TIMEOUT and the retry
      asks for 2 minutes; train_ts pauses after its step-3 checkpoint and the test requeues it (`scontrol requeue`,
      as preemption does): the same Slurm job starts again and resumes from step 3."""
    work = copy_workflow(tmp_path)
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    config["demo"] = SMALL_DEMO
    config["model"]["image_max_tokens"] = 64
    config["datasets"] = {name: config["datasets"][name] for name in ("demo_platform", "demo_signals")}
    config["fusion"]["targets"] = config["fusion"]["targets"][:1]
    config["fusion"]["sources"] = []
    recipe = {**yaml.safe_load((work / "config/recipes/demo_full.yaml").read_text()),
              "max_steps": 2, "per_device_train_batch_size": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1}
    (work / "config/recipes/tiny.yaml").write_text(yaml.safe_dump(recipe))
    config["train"]["runs"] = {"demo": {"recipe": "config/recipes/tiny.yaml", "base": ""}}
    # Stage-A in three shard jobs (GPU jobs each), then the merging job; two steps teach no valid summary
    config["stage_a"].update(shards=3, chunk_size=4, max_new_tokens=8, min_valid_rate=0.0)
    config["timeseries"]["train"].update(steps=6, batch_size=4, eval_every=0, save_every=3)
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    fit_profile_to_node(work / "workflow/profiles/slurm/config.yaml", cache_ts={"runtime": "1 * attempt"})

    env = slurm_environment(VISIONQC_TEST_FAIL_ONCE=f"train:{work}/train-failed-once",
                            VISIONQC_TEST_PAUSE_AT="cache-ts:start,train_ts:step-3", VISIONQC_TEST_PAUSE_ONCE=str(work / "paused"))
    command = [*SNAKEMAKE_ON_SLURM, "--verbose", "results/train/demo/summary.json", f"results/stage_a/{MISSION}.jsonl",
               "results/train_ts/demo_signals/summary.json"]
    with open(work / "snakemake.out", "w") as out, subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT) as run:
        try:
            log = work / "logs/train_ts/demo_signals.log"
            wait_for(lambda: log.exists() and "paused at train_ts:step-3" in log.read_text(), 900, "train_ts to pause")
            listing = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True, check=True).stdout
            (job_id,) = [line.split("|")[0] for line in listing.splitlines() if line.endswith("|rule_train_ts_wildcards_demo_signals")]
            subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)
            # Slurm holds a requeued job back for two minutes (its BeginTime); a site's admin, and the test, may say now
            wait_for(lambda: job_state(job_id) == "PENDING", 120, "the requeued job to wait")
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True, text=True)
            run.wait(timeout=900)
        except BaseException:
            print((work / "snakemake.out").read_text()[-20000:])  # the executor's status queries (--verbose)
            raise
        finally:
            run.kill()
    output = (work / "snakemake.out").read_text()
    assert run.returncode == 0, output
    assert (work / "results/train/demo/model").is_dir()

    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    jobs = submitted_jobs(run_id)
    assert {rule: len(entries) for rule, entries in jobs.items()} == {
        "convert_dataset": 1, "convert_signals": 1, "validate_records": 4, "fuse_datasets": 2, "augment_records": 1,
        "cache_tokens": 2, "train_model": 2, "merge_adapter": 1, "summarize_shard": 3, "summarize_images": 1,
        "cache_ts": 3, "train_ts": 1}
    # localrules (demo data, demo models) ran on the submit host: not in the table above

    first, second = sorted(jobs.pop("train_model"), key=lambda job: int(job["id"]))
    assert (first["state"], first["TimeLimit"]) == ("FAILED", "08:00:00"), first  # the profile's 480 * attempt minutes
    assert (second["state"], second["TimeLimit"]) == ("COMPLETED", "16:00:00"), second
    assert (work / "train-failed-once").exists()
    assert second["Partition"] == "gpu" and second["TresPerJob"] == "gres:gpu:1"
    log = work / ".snakemake/slurm_logs/rule_train_model/demo" / f"{second['id']}.log"
    assert log.exists(), "the executor plugin's per-job Slurm log is missing"
    for job in [*jobs["convert_dataset"], *jobs["fuse_datasets"]]:
        assert job["Partition"] == "cpu" and "TresPerJob" not in job and job["TimeLimit"] == "00:30:00"

    # one cache_ts job (the first to start) ran past its minute; its retry got two
    limits = sorted((job["state"], job["TimeLimit"]) for job in jobs.pop("cache_ts"))
    assert limits == [("COMPLETED", "00:01:00"), ("COMPLETED", "00:02:00"), ("TIMEOUT", "00:01:00")], limits
    (train_ts,) = jobs.pop("train_ts")  # requeued, not resubmitted: one Slurm job, started twice
    assert (train_ts["id"], train_ts["state"], train_ts["Restarts"]) == (job_id, "COMPLETED", "1"), train_ts
    summary = json.loads((work / "results/train_ts/demo_signals/summary.json").read_text())
    assert summary["steps_run_now"] == summary["steps"] - 3, summary
    assert all(job["state"] == "COMPLETED" for entries in jobs.values() for job in entries)

    # each shard a Slurm job of its own on the GPU partition, each generating its share of the chunks
    shards = jobs["summarize_shard"]
    assert len({job["id"] for job in shards}) == 3
    assert all(job["Partition"] == "gpu" and job["TresPerJob"] == "gres:gpu:1" for job in [*shards, *jobs["summarize_images"]])
    reports = [json.loads((work / f"results/stage_a/{MISSION}.shards/{rank}.report.json").read_text()) for rank in range(3)]
    merged = json.loads((work / f"results/stage_a/{MISSION}.report.json").read_text())
    assert [report["world"] for report in reports] == [3, 3, 3] and sum(r["chunks_run"] for r in reports) == merged["chunks"] > 2
    assert merged["chunks_run"] == 0 and merged["merged"]
