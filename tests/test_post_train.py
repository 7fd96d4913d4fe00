"""GRPO post-training through ms-swift with our rewards: prompt rows, a real tiny run, its checks, and its Snakemake rule."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from visionqc.arrow_cache import CacheRef
from visionqc.launch import SWIFT_DEFAULTS, swift_device_arguments
from visionqc.messages import parse_verdict
from visionqc.post_train import metric_names, post_train_grpo, prompt_rows
from visionqc.rewards import REWARDS

from conftest import moved_weights, read_jsonl

ALL_REWARDS = ["summary_format", "summary_parse", "summary_categories", "summary_counts", "summary_content_f1",
               "verdict_format", "verdict_label"]
RECIPE = {"rlhf_type": "grpo", "reward_funcs": ALL_REWARDS, "num_generations": 2, "per_device_train_batch_size": 4,
          "generation_batch_size": 4, "max_completion_length": 8, "temperature": 1.0, "beta": 0.04, "tuner_type": "full",
          "learning_rate": 1e-4, "weight_decay": 0.0, "max_steps": 2, "logging_steps": 1, "save_steps": 2, "max_length": 1024,
          "gradient_checkpointing": False}


def grpo_into(model, fused_records, caches, out: Path, recipe: dict, on_log=None):
    return post_train_grpo(str(model), fused_records["train"], caches["train"], recipe, model_out=out / "model",
                           summary_out=out / "summary.json", history_out=out / "log_history.json",
                           completions_out=out / "completions.jsonl", rewards_plot=out / "rewards.png",
                           checkpoints=out / "checkpoints", device="auto", on_log=on_log)


def test_every_fused_record_becomes_a_prompt_or_is_counted(fused_records, caches):
    options = CacheRef.read(caches["train"]).options
    records = read_jsonl(fused_records["train"])
    rows, fate = prompt_rows(fused_records["train"], options, {"summary", "verdict"})
    assert sum(fate.values()) == len(records) and len(rows) == fate["prompt: summary"] + fate.get("prompt: verdict", 0)
    assert fate["prompt: summary"] > 0 and fate["skipped: no summary or verdict answer"] > 0  # dense records have no reward
    for row in rows:
        assert row["messages"][-1]["role"] == "user"  # the answer became the solution
        if row["task"] == "verdict":
            assert parse_verdict(row["solution"])[2]
        else:
            assert any(item.get("type") == "image" and Path(item["image"]).is_absolute() for item in row["messages"][-1]["content"])
    summaries_only, fate = prompt_rows(fused_records["train"], options, {"summary"})
    assert all(row["task"] == "summary" for row in summaries_only) and sum(fate.values()) == len(records)


def test_swift_reward_names_become_ours():
    named = metric_names({"rewards/verdict_label/mean": 0.5, "rewards/verdict_label/std": 0.1, "reward": 0.4, "kl": 0.01,
                          "completions/mean_length": 7.0, "note": "text"})
    assert named == {"reward/verdict_label": 0.5, "reward": 0.4, "kl": 0.01, "completions/mean_length": 7.0}


@pytest.fixture(scope="module")
def grpo_run(tiny_model, fused_records, caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    logged = []
    result = grpo_into(tiny_model, fused_records, caches, out, RECIPE, on_log=lambda m, s: logged.append((s, m)))
    return out, result, logged


def test_a_grpo_run_writes_every_output_and_logs_its_rewards(grpo_run):
    out, result, logged = grpo_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["prompts"] > 0 and result.report == summary
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()
    assert (out / "rewards.png").stat().st_size > 0
    steps = {step for step, metrics in logged if "reward" in metrics}
    assert steps == {1, 2}
    keys = {k for _, metrics in logged for k in metrics}
    assert {"reward", "reward_std", "kl"} <= keys and any(k.startswith("reward/summary_") for k in keys)
    # sampled completions with their rewards, per logging step (ms-swift's log_completions)
    completions = read_jsonl(out / "completions.jsonl")
    assert {row["step"] for row in completions} == {1, 2}
    for row in completions:  # one row per completion, scored by its task's rewards only
        task = "verdict" if parse_verdict(row["solution"])[2] else "summary"
        assert set(row["rewards"]) == {name for name in ALL_REWARDS if name.startswith(task)}
        assert all(0 <= value <= 1 for value in row["rewards"].values()) and row["prompt"] and isinstance(row["completion"], str)
    assert result.artifacts and result.inputs["base"] and result.outputs["model"] == out / "model"


def test_completions_that_score_alike_teach_nothing(grpo_run, tiny_model):
    """The random tiny model's completions all score 0, so every advantage is 0 and (weight decay 0) no weight moves:
    the control for test_demo_learns, where the demo model's completions score apart and the policy moves."""
    out, _, logged = grpo_run
    assert {metrics["reward_std"] for _, metrics in logged if "reward_std" in metrics} == {0.0}
    assert moved_weights(tiny_model, out / "model") == set()


def test_each_saved_completion_scores_what_the_reward_functions_give(grpo_run):
    rows = read_jsonl(grpo_run[0] / "completions.jsonl")
    assert rows and {name for row in rows for name in row["rewards"]} <= set(ALL_REWARDS)
    for row in rows:
        for name, value in row["rewards"].items():
            assert REWARDS[name][0](row["completion"], row["solution"]) == pytest.approx(value), (name, row)


@pytest.mark.slow
def test_our_rewards_run_through_swift_rlhf_external_plugins(tiny_model, fused_records, caches, tmp_path):
    """The command line that docs/stages.md gives: `swift rlhf --external_plugins src/visionqc/swift_plugin.py`."""
    import visionqc

    options = CacheRef.read(caches["train"]).options
    rows, _ = prompt_rows(fused_records["train"], options, {"verdict"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), "utf-8")
    arguments = {**SWIFT_DEFAULTS, **swift_device_arguments("cpu", {}), "rlhf_type": "grpo",
                 "external_plugins": Path(visionqc.__file__).parent / "swift_plugin.py",
                 "reward_funcs": ["verdict_format", "verdict_label"], "model": tiny_model, "model_type": options["model_type"],
                 "template": options["template"], "dataset": prompts, "output_dir": tmp_path / "out", "tuner_type": "full",
                 "max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2, "generation_batch_size": 2,
                 "max_completion_length": 8, "log_completions": True, "logging_steps": 1, "save_steps": 1}
    argv = [str(Path(sys.executable).parent / "swift"), "rlhf"]
    for key, value in arguments.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text("utf-8").splitlines()]
    assert sum(len(columns["completion"]) for columns in logged) >= 2
    for columns in logged:  # our rewards scored swift's completions
        for name in ("verdict_format", "verdict_label"):
            function = REWARDS[name][0]
            assert columns[name] == [function(c, s) for c, s in zip(columns["completion"], columns["solution"], strict=True)]


def test_a_rerun_after_the_last_checkpoint_exports_it_without_training(grpo_run, tiny_model, fused_records, caches,
                                                                          tmp_path, capsys):
    out, result, _ = grpo_run
    shutil.copytree(out, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "model")
    capsys.readouterr()
    again = grpo_into(tiny_model, fused_records, caches, tmp_path / "run", RECIPE)
    assert "nothing to train" in capsys.readouterr().out
    assert (tmp_path / "run/model/model.safetensors").read_bytes() == (out / "model/model.safetensors").read_bytes()
    assert again.report["steps"] == result.report["steps"] == 2
    assert (tmp_path / "run/completions.jsonl").read_bytes() == (out / "completions.jsonl").read_bytes()


def test_a_grpo_model_loads_like_any_other(grpo_run):
    from transformers import Qwen3VLForConditionalGeneration

    out, _, _ = grpo_run
    Qwen3VLForConditionalGeneration.from_pretrained(out / "model")


@pytest.mark.parametrize("change, message", [
    ({"num_generations": 3, "generation_batch_size": 4}, r"GRPO recipe cannot run: .*must be evenly divisible by num_generations \(3\)"),
    ({"generation_batch_size": 6}, r"GRPO recipe cannot run: generation_batch_size \(6\) must be divisible by"),
    ({"num_generations": 1}, r"GRPO recipe cannot run: num_generations must be greater than 1"),
    ({"reward_funcs": ["verdict_lable"]}, r"reward_funcs \['verdict_lable'\] are not ours"),
    # one verdict prompt, two per rollout: ms-swift would train no step (and the stage found no checkpoint)
    ({"reward_funcs": ["verdict_format"], "num_generations": 4, "generation_batch_size": 8, "per_device_train_batch_size": 8},
     r"1 prompt\(s\) .*but one rollout takes 2 \(generation_batch_size 8 / num_generations 4\)"),
])
def test_a_wrong_recipe_stops_before_the_model_loads(tiny_model, fused_records, caches, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        grpo_into(tiny_model, fused_records, caches, tmp_path, {**RECIPE, **change})
    assert not (tmp_path / "model").exists() and not list((tmp_path / "checkpoints").glob("*/checkpoint-*"))


def test_a_reward_without_prompts_of_its_task_is_refused(tiny_model, fused_records, caches, tmp_path):
    records = tmp_path / "summaries.jsonl"  # the fused records without the verdict chat
    records.write_text("".join(line + "\n" for line in fused_records["train"].read_text().splitlines() if '"messages"' not in line))
    shutil.copytree(fused_records["train"].parent.parent / "convert", tmp_path.parent / "convert", dirs_exist_ok=True)
    with pytest.raises(ValueError, match=r"rewards verdict answers, but .* holds no such prompt"):
        post_train_grpo(str(tiny_model), records, caches["train"], {**RECIPE, "reward_funcs": ["verdict_label"]},
                        model_out=tmp_path / "m", summary_out=tmp_path / "s.json", history_out=tmp_path / "h.json",
                        completions_out=tmp_path / "c.jsonl", rewards_plot=tmp_path / "r.png", checkpoints=tmp_path / "ck")


@pytest.mark.slow
@pytest.mark.parametrize(("recipe_name", "task", "other"), [("grpo_verdicts", "verdict", "summary"), ("grpo_summary", "summary", "verdict")])
def test_grpo_is_a_snakemake_rule_merged_and_tracked_like_any_run(finished_workflow, recipe_name, task, other):
    """Each shipped GRPO recipe as a run added to the finished small workflow: post_train and merge run, nothing else;
    its prompts are its task's; MLflow has its rewards."""
    import yaml
    from transformers import Qwen3VLForConditionalGeneration

    from conftest import added_run

    work = finished_workflow
    recipe = yaml.safe_load((work / f"config/recipes/{recipe_name}.yaml").read_text())
    recipe.update(max_steps=2, logging_steps=1, save_steps=2, num_generations=2, per_device_train_batch_size=4,
                  generation_batch_size=4, max_completion_length=12)
    run_name = f"demo_{recipe_name}"
    (work / f"config/recipes/{recipe_name}_short.yaml").write_text(yaml.safe_dump(recipe))
    overlay = {"post_train": {"runs": {run_name: {"base": "demo", "recipe": f"config/recipes/{recipe_name}_short.yaml"}}}}
    with added_run(work, run_name, overlay, {"post_train_grpo": 1, "merge_adapter": 1}) as client:
        Qwen3VLForConditionalGeneration.from_pretrained(work / f"results/merge/{run_name}/model")
        summary = json.loads((work / f"results/post_train/{run_name}/summary.json").read_text())
        assert summary["records"][f"prompt: {task}"] > 0 and f"prompt: {other}" not in summary["records"]
        (run,) = client.search_runs([client.get_experiment_by_name("visionqc").experiment_id],
                                    f"attributes.run_name = 'post_train:{run_name}'")
        assert {"reward", "reward_std", "kl"} <= set(run.data.metrics)
        assert {f"reward/{name}" for name in recipe["reward_funcs"]} <= set(run.data.metrics), sorted(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "reward")] == [1, 2]
        assert {"completions.jsonl", "rewards.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
