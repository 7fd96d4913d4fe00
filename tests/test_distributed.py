"""Several processes per job: torchrun's ranks for training (swift DDP) and Stage-A (chunk shards), on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import RECIPE, copy_workflow

BIN = Path(sys.executable).parent


def visionqc(*args: str, processes: int = 1, cwd: Path) -> subprocess.CompletedProcess:
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(processes), "-m", "visionqc.cli"]
    command = (launcher if processes > 1 else [sys.executable, "-m", "visionqc.cli"]) + list(args)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_stage_a_ranks_and_shard_jobs_equal_one_process(merged_model, demo_exports, caches, tmp_path):
    """torchrun's ranks inside a job, and stage_a.shards: 3 jobs (as summarize_shard runs them) and the merging job,
    give the bytes of one process."""
    # the 12-step model's 8-token answers are not valid summaries; this test is about sharding, so none are refused
    options = json.dumps({"chunk_size": 3, "batch_size": 2, "max_new_tokens": 8, "mode": "per_image", "min_valid_rate": 0})

    def stage_a(out: Path, *args: str, processes: int = 1) -> dict:
        visionqc("stage-a", "--root", str(demo_exports / "groups"), "--mission", "BBU安装检查", "--model", str(merged_model[0]),
                 "--cache", str(caches["train"]), "--device", "cpu", "--report", str(out / f"report{''.join(args)}.json"),
                 "--chunks", str(out / "chunks"), "--options", options, *args, processes=processes, cwd=tmp_path)
        return json.loads((out / f"report{''.join(args)}.json").read_text())

    one, ranks, shards = tmp_path / "p1", tmp_path / "p2", tmp_path / "s3"
    stage_a(one, "--summaries", str(one / "summaries.jsonl"))
    report = stage_a(ranks, "--summaries", str(ranks / "summaries.jsonl"), processes=2)
    assert report["world"] == 2 and report["merged"] and report["chunks_done"] == report["chunks"] > 2
    assert report["chunks_run"] == (report["chunks"] + 1) // 2  # rank 0's share: chunks 0, 2, 4, …
    assert (ranks / "summaries.jsonl").read_bytes() == (one / "summaries.jsonl").read_bytes()
    # three shard jobs, each its chunks i % 3 == shard and no summaries; then the merging job generates nothing
    runs = [stage_a(shards, "--rank", str(shard), "--world", "3")["chunks_run"] for shard in range(3)]
    assert sum(runs) == report["chunks"] and all(runs) and not (shards / "summaries.jsonl").exists()
    merged = stage_a(shards, "--summaries", str(shards / "summaries.jsonl"))
    assert merged["chunks_run"] == 0 and merged["merged"]
    assert (shards / "summaries.jsonl").read_bytes() == (one / "summaries.jsonl").read_bytes()


@pytest.mark.slow
def test_training_under_torchrun_runs_two_ddp_ranks(tiny_model, caches, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "max_steps": 2, "eval_on_start": False, "eval_steps": 2, "save_steps": 2}))
    run = tmp_path / "run"
    outputs = {"--model": run / "model", "--summary": run / "summary.json", "--loss-plot": run / "loss.png",
               "--recipe-out": run / "recipe.json", "--history": run / "log_history.json", "--checkpoints": run / "checkpoints"}
    result = visionqc("train", "--base", str(tiny_model), "--train-cache", str(caches["train"]), "--val-cache", str(caches["val"]),
                      "--recipe", str(recipe), "--name", "ddp", "--device", "cpu", *[str(a) for kv in outputs.items() for a in kv],
                      processes=2, cwd=tmp_path)
    assert "world_size: 2" in result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_rules_launch_torchrun_when_a_job_holds_several_gpus(tmp_path):
    work = copy_workflow(tmp_path)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "2", "--set-resources",
                             "train_model:gpu=4", "summarize_images:gpu=2"], check=False, cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torchrun --standalone --nproc_per_node 4 -m visionqc.cli train" in result.stdout
    assert "torchrun --standalone --nproc_per_node 2 -m visionqc.cli stage-a" in result.stdout
    assert "Shell command: visionqc merge" in result.stdout  # one process where no GPU count is set
