"""The embedded default, unchanged, through `snakemake`: the tiny model must learn the demo task.

This is `make demo` in a temporary copy of the repository (about 12 minutes on 2 CPU cores); `make demo-dense`,
the dense run, takes longer than CI allows and is marked `hours`.
Held-out groups: the photo groups are drawn from their own seeded stream and never enter training.
"""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import copy_workflow, moved_weights, snakemake

STAGE_A_TARGET = 0.80  # per-image summary exact match
STAGE_B_FLOOR = 0.85  # group label match: 0.89 measured (target 0.90); a floor that tolerates other CPUs
TIME_SERIES_TARGET = 0.90  # held-out trace accuracy by answer ranking (chance 0.25)
QA_RECALL_TARGET = 0.90  # injected label errors among the top k = 2x their number (1.00 measured)
DENSE_F1_FLOOR = 0.05  # demo_dense, all shapes: 0.10 measured (bbox 0.15, poly 0.09, line 0.08); the goal is 0.5
DENSE_BBOX_F1_FLOOR = 0.07


@pytest.mark.slow
def test_default_demo_learns_summaries_and_verdicts(tmp_path):
    snakemake(copy_workflow(tmp_path))

    stage_a = json.loads((tmp_path / "results/stage_a/BBU安装检查.report.json").read_text())
    stage_b = json.loads((tmp_path / "results/stage_b/BBU安装检查.metrics.json").read_text())
    assert stage_a["images_with_truth"] == stage_a["images"] > 300
    assert stage_a["exact_match"] >= STAGE_A_TARGET, stage_a  # 0.99 measured with the injected label errors
    # the default stage_a.min_valid_rate; 114 reviewed groups (338 photos) and 20 new ones (59 photos)
    assert stage_a["valid_rate"] >= 0.9 and stage_a["images"] == 338 + 59 and stage_a["new_groups"] == 20, stage_a
    assert stage_b["unparseable"] == 0, stage_b
    assert stage_b["label_match"] >= STAGE_B_FLOOR, stage_b
    assert stage_b["groups_judged"] == 134 and stage_b["groups_scored"] == 114, stage_b
    # the verdict report lists every group
    table = (tmp_path / "results/report/BBU安装检查.csv").read_text("utf-8-sig").splitlines()
    assert len(table) == 1 + 134
    # the second named run: a LoRA adapter, merged and checked on logits
    lora = json.loads((tmp_path / "results/merge/demo_lora/verification.json").read_text())
    assert lora["passed"] and lora["adapter_effect_max_abs_logit"] > 1e-3, lora
    # eval_dense on the deployed run: every held-out image record asked, every truth object counted (the default
    # demo is never taught dense answers, so its F1 is reported, not asserted; demo_dense's is, below)
    dense = json.loads((tmp_path / "results/eval_dense/demo/metrics.json").read_text())
    assert dense["records"] == 106 and dense["overall"]["truth"] > 300, {k: dense[k] for k in ("records", "overall")}
    # label QA on the first 1,000 platform records: the injected label errors among them rank at the top
    qa = json.loads((tmp_path / "results/qa/demo_platform/report.json").read_text())
    assert qa["records"] == 1000 and qa["injected_errors"]["injected"] >= 5, qa
    assert qa["injected_errors"]["recall_at_k"] >= QA_RECALL_TARGET, qa
    # the time-series branch: encoder + XTuner LLM, trained by the CPU loop, scored on 80 held-out traces
    series = json.loads((tmp_path / "results/eval_ts/demo_signals/metrics.json").read_text())
    assert series["records"] == 80 and series["chance"] == 0.25, series
    assert series["accuracy"] >= TIME_SERIES_TARGET, series
    trained = json.loads((tmp_path / "results/train_ts/demo_signals/summary.json").read_text())
    assert trained["backend"] == "loop" and trained["final_loss"] < trained["first_loss"] / 10, trained

    # GRPO moves the policy when completions score apart: two steps of the verdict recipe from the deployed model
    # (test_post_train has the control: completions that all score alike move nothing); its own process, as in the
    # pipeline: ms-swift sizes images once per process, and this one already sized other tests' images
    recipe = {**yaml.safe_load((tmp_path / "config/recipes/grpo_verdicts.yaml").read_text()), "max_steps": 2, "logging_steps": 1,
              "save_steps": 2, "num_generations": 8, "generation_batch_size": 8, "per_device_train_batch_size": 8,
              "max_completion_length": 32, "weight_decay": 0.0}
    out = tmp_path / "grpo"
    out.mkdir()
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    argv = [sys.executable, "-m", "visionqc.cli", "post-train", "--base", "results/merge/demo/model",
            "--records", "results/fuse/demo/train.jsonl", "--cache", "results/cache/demo.epoch_0.json",
            "--recipe", out / "recipe.yaml", "--device", "cpu", "--model", out / "model", "--summary", out / "summary.json",
            "--history", out / "history.json", "--completions", out / "completions.jsonl",
            "--rewards-plot", out / "rewards.png", "--checkpoints", out / "checkpoints", "--name", "grpo_check"]
    done = subprocess.run(list(map(str, argv)), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = json.loads((out / "history.json").read_text())["log_history"]
    assert max(metrics.get("reward_std", 0) for metrics in logged) > 0, logged  # the group's completions scored apart
    moved = moved_weights(tmp_path / "results/merge/demo/model", out / "model")
    assert moved and not [name for name in moved if ".visual." in name], sorted(moved)[:5]  # verdict prompts carry no image


@pytest.mark.hours
def test_demo_dense_learns_dense_answers(tmp_path):
    """`make demo-dense` in a temporary copy (26 minutes on 2 cores, so not in CI): the platform scenes asked
    densely, 850 steps, then eval_dense on the 106 held-out scenes."""
    snakemake(copy_workflow(tmp_path), "results/eval_dense/demo_dense/metrics.json", "--configfile=config/demo_dense.yaml")
    dense = json.loads((tmp_path / "results/eval_dense/demo_dense/metrics.json").read_text())
    assert dense["records"] == 106 and dense["unparseable"] <= 25, {k: dense[k] for k in ("records", "unparseable")}
    assert dense["overall"]["f1"] >= DENSE_F1_FLOOR, dense["overall"]
    assert dense["per_kind"]["bbox_2d"]["f1"] >= DENSE_BBOX_F1_FLOOR, dense["per_kind"]
    assert all(dense["per_kind"][kind]["matched"] > 0 for kind in ("bbox_2d", "poly", "line")), dense["per_kind"]
