"""A real tiny ms-swift training run from the cache, its resume, and the verified merge."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from visionqc.merge import MergeCheckFailed
from visionqc.train import train

from conftest import RECIPE, Interrupted, merge_into, train_into


@pytest.mark.slow
def test_training_through_swift_lowers_the_loss(trained):
    out, summary, logged = trained
    assert summary["steps"] == 12 and json.loads((out / "recipe.json").read_text())["resumed_from"] is None
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["last_eval_loss"] < 0.9 * summary["first_eval_loss"]
    assert [s for s, m in logged if "eval_loss" in m] == [0, 12]
    assert any("token_acc" in m and "learning_rate" in m for _, m in logged)
    assert (out / "model" / "adapter_model.safetensors").exists() and (out / "loss.png").exists()
    assert json.loads((out / "summary.json").read_text()) == summary
    recipe = json.loads((out / "recipe.json").read_text())["arguments"]
    assert recipe["tuner_type"] == "lora" and recipe["torch_dtype"] == "float32"
    assert recipe["template"] == recipe["model_type"] == "qwen3_vl"  # from the cache's manifest, not the recipe
    targets = json.loads((out / "model" / "adapter_config.json").read_text())["target_modules"]
    names = re.search(r"\((\w+(?:\|\w+)+)\)", targets).group(1).split("|")
    assert names == sorted(names) and "q_proj" in names  # the same bytes in every process


@pytest.mark.slow
def test_every_source_of_the_fusion_gets_its_own_curves_in_mlflow(tiny_model, caches, tmp_path, monkeypatch):
    """The fused train split mixes three datasets; each gets train/<source>_loss and _token_acc per logging step,
    and the val split (targets) eval/<source>_loss, read back from the MLflow store."""
    import mlflow

    from visionqc.arrow_cache import CacheRef
    from visionqc.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    recipe = {**RECIPE, "max_steps": 6, "save_steps": 6, "eval_steps": 6, "logging_steps": 2, "eval_on_start": False}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["train", "--base", str(tiny_model), "--train-cache", str(caches["train"]), "--val-cache", str(caches["val"]),
                 "--recipe", "recipe.yaml", "--model", str(out / "model"), "--summary", str(out / "summary.json"),
                 "--loss-plot", str(out / "loss.png"), "--recipe-out", str(out / "recipe.json"),
                 "--history", str(out / "history.json"), "--checkpoints", str(out / "ckpt"), "--name", "sources",
                 "--tracking-uri", uri, "--experiment", "t"]) == 0
    sources = sorted(set(CacheRef.read(caches["train"]).table().column("source").to_pylist()))
    val_sources = sorted(set(CacheRef.read(caches["val"]).table().column("source").to_pylist()))
    assert len(sources) == 3
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    for source in sources:
        for metric in ("loss", "token_acc"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, f"train/{source}_{metric}")]
            assert steps and set(steps) <= {1, 2, 4, 6}, (source, metric, steps)  # swift logs the first step too
    for source in val_sources:
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"eval/{source}_loss")] == [6]
    accuracy = client.get_metric_history(run.info.run_id, f"train/{sources[0]}_token_acc")
    assert all(0 <= m.value <= 1 for m in accuracy)
    history = json.loads((out / "history.json").read_text())["log_history"]
    assert any(f"loss_{sources[0]}" in entry for entry in history)  # swift's own names stay in the log history


def test_sorting_target_modules_keeps_what_they_match(tmp_path):
    from visionqc.checkpoints import sort_target_modules

    pattern = r"^(model\.language_model(?=\.).*\.(v_proj|q_proj|down_proj|k_proj))$"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": pattern, "r": 8}))
    sort_target_modules(tmp_path / "adapter_config.json")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {"target_modules": r"^(model\.language_model(?=\.).*\.(down_proj|k_proj|q_proj|v_proj))$", "r": 8}
    modules = [f"model.language_model.layers.{i}.{kind}" for i in range(2) for kind in ("q_proj", "up_proj", "down_proj", "v_proj")]
    modules += ["model.visual.blocks.0.q_proj"]
    assert [m for m in modules if re.fullmatch(pattern, m)] == [m for m in modules if re.fullmatch(config["target_modules"], m)]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["v_proj", "k_proj"]}))
    sort_target_modules(tmp_path / "adapter_config.json")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["k_proj", "v_proj"]


def test_a_recipe_that_contradicts_the_cache_is_refused(tiny_model, caches, tmp_path):
    with pytest.raises(ValueError, match="the recipe sets template: qwen2_vl, but the cache was encoded with qwen3_vl"):
        train_into(tiny_model, caches, tmp_path, {**RECIPE, "template": "qwen2_vl"})


@pytest.mark.slow
def test_demo_style_full_finetune_trains_the_vision_tower(tiny_model, caches, tmp_path):
    """The demo recipe's shape: full fine-tuning with vision tower and aligner unfrozen, left padding,
    and length-grouped batches (swift asks the dataset for its lengths)."""
    from safetensors.torch import load_file

    recipe = {"tuner_type": "full", "freeze_vit": False, "freeze_aligner": False, "padding_side": "left",
              "group_by_length": True, "learning_rate": 1e-3, "max_steps": 3, "per_device_train_batch_size": 2,
              "max_length": 1024, "gradient_checkpointing": False, "eval_on_start": False, "eval_steps": 3,
              "save_steps": 3, "logging_steps": 1}
    summary = train_into(tiny_model, caches, tmp_path, recipe).report
    assert summary["steps"] == 3
    before, after = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    moved = {name for name in before if not before[name].equal(after[name])}
    assert any(name.startswith("model.visual.blocks.") for name in moved), "vision tower did not train"
    assert any(name.startswith("model.visual.merger.") for name in moved), "aligner did not train"
    assert any(name.startswith("model.language_model.layers.") for name in moved)


# A learning rate that warms up from 0 to a spike (0, 0.25, 0.5): the loss falls, then the last step overshoots
SPIKE_RECIPE = {**RECIPE, "max_steps": 3, "save_steps": 1, "eval_steps": 1, "logging_steps": 1, "eval_on_start": False,
                "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 4, "learning_rate": 1.0}


@pytest.mark.slow
def test_select_best_deploys_the_checkpoint_before_a_learning_rate_spike(tiny_model, caches, tmp_path):
    best = train_into(tiny_model, caches, tmp_path / "run", SPIKE_RECIPE, select="best").report
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())["log_history"]
    evals = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}
    assert sorted(evals) == [1, 2, 3] and evals[3] > min(evals.values()), evals  # the spike made the last one worse
    assert best["select"] == "best" and best["selected_step"] == min(evals, key=evals.get) < 3, (best, evals)
    assert best["selected_value"] == evals[best["selected_step"]] and best["checkpoint"].endswith(f"checkpoint-{best['selected_step']}")
    # the same run with select: last exports step 3 without training again
    last = train(str(tiny_model), caches["train"], caches["val"], SPIKE_RECIPE, model_out=tmp_path / "last" / "model",
                 summary_out=tmp_path / "last" / "summary.json", loss_plot=tmp_path / "last" / "loss.png",
                 recipe_out=tmp_path / "last" / "recipe.json", history_out=tmp_path / "last" / "history.json",
                 checkpoints=tmp_path / "run" / "checkpoints", select="last").report
    assert last["checkpoint"].endswith("checkpoint-3") and "selected_step" not in last
    (run_dir,) = (tmp_path / "run" / "checkpoints").iterdir()
    weights = "adapter_model.safetensors"
    deployed = (tmp_path / "run" / "model" / weights).read_bytes()
    assert deployed == (run_dir / f"checkpoint-{best['selected_step']}" / weights).read_bytes()
    assert deployed != (tmp_path / "last" / "model" / weights).read_bytes() == (run_dir / "checkpoint-3" / weights).read_bytes()


def logged_losses(out: Path) -> list[tuple[int, float]]:
    history = json.loads((out / "log_history.json").read_text())["log_history"]
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


RESUME_RECIPE = {**RECIPE, "max_steps": 6, "save_steps": 2, "logging_steps": 1, "eval_on_start": True, "eval_steps": 6}


def trained_in_own_folder(tiny_model, caches, folder: Path, recipe: dict) -> Path:
    """A resume test's reference: `visionqc train` in its own folder, outputs under out/ (relative paths)."""
    subprocess.run(train_command(tiny_model, caches, folder, recipe), cwd=folder, check=True, capture_output=True)
    return folder / "out"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, caches, tmp_path_factory) -> Path:
    return trained_in_own_folder(tiny_model, caches, tmp_path_factory.mktemp("uninterrupted"), RESUME_RECIPE)


@pytest.mark.slow
def test_a_rerun_really_resumes_from_the_newest_complete_checkpoint(tiny_model, caches, uninterrupted, tmp_path, capsys):
    """What only a real resume gives: the rerun runs the remaining steps alone, its global step continues, and
    the loss history equals an uninterrupted run's. A checkpoint whose save was cut off is skipped."""

    def stop_after_checkpoint(metrics, step):
        if step >= 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_into(tiny_model, caches, tmp_path, RESUME_RECIPE, on_log=stop_after_checkpoint)
    assert not (tmp_path / "model").exists()
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    shutil.copytree(run_dir / "checkpoint-2", run_dir / "checkpoint-3")  # a later save that a kill cut short:
    (run_dir / "checkpoint-3" / "trainer_state.json").unlink()  # its weights are there, its trainer state is not
    capsys.readouterr()

    steps_run = []
    summary = train_into(tiny_model, caches, tmp_path, RESUME_RECIPE, on_log=lambda m, step: steps_run.append(step)).report
    assert "skipped checkpoint" in capsys.readouterr().out
    assert json.loads((tmp_path / "recipe.json").read_text())["resumed_from"] == str(run_dir / "checkpoint-2")
    assert summary["checkpoint"].endswith("checkpoint-6") and not (run_dir / "checkpoint-3").exists()
    assert sorted(set(steps_run)) == [3, 4, 5, 6]  # only the remaining steps ran, counted on from the checkpoint
    assert logged_losses(tmp_path) == logged_losses(uninterrupted)
    # a changed recipe never resumes the old run's checkpoints
    train_into(tiny_model, caches, tmp_path, {**RESUME_RECIPE, "max_steps": 2})
    assert json.loads((tmp_path / "recipe.json").read_text())["resumed_from"] is None


def train_command(tiny_model, caches, folder: Path, recipe: dict) -> list[str]:
    """`visionqc train` writing into folder/out, with the recipe as folder/recipe.yaml."""
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return [str(Path(sys.executable).parent / "visionqc"), "train", "--base", str(tiny_model), "--train-cache",
            str(caches["train"]), "--val-cache", str(caches["val"]), "--recipe", "recipe.yaml", "--device", "auto",
            "--model", "out/model", "--summary", "out/summary.json", "--recipe-out", "out/recipe.json",
            "--history", "out/log_history.json", "--loss-plot", "out/loss.png", "--checkpoints", "out/checkpoints",
            "--name", "t", "--tracking-uri", ""]


def run_until(command: list[str], folder: Path, point: str) -> tuple[subprocess.Popen, str | None]:
    """Start the command with the pause point armed; return once it paused there (or ended)."""
    job = subprocess.Popen(command, cwd=folder, env=dict(os.environ, VISIONQC_TEST_PAUSE_AT=point),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(600, os.killpg, (job.pid, signal.SIGKILL))
    watchdog.start()
    paused = next((line for line in job.stdout if line.startswith(f"paused at {point}")), None)
    watchdog.cancel()
    return job, paused


TIMINGS = ("runtime", "per_second")


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if not k.endswith(TIMINGS)} for entry in history]


FULL_RECIPE = {**RESUME_RECIPE, "tuner_type": "full", "learning_rate": 1e-4, "max_steps": 4, "eval_steps": 4}


@pytest.fixture(scope="module")
def uninterrupted_full(tiny_model, caches, tmp_path_factory) -> Path:
    return trained_in_own_folder(tiny_model, caches, tmp_path_factory.mktemp("uninterrupted_full"), FULL_RECIPE)


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["lora", "full"])
@pytest.mark.parametrize("fault", ["kill -9 after the last checkpoint", "model/ deleted"])
def test_a_rerun_after_the_last_checkpoint_gives_the_uninterrupted_model(fault, tuner, tiny_model, caches, uninterrupted,
                                                                           uninterrupted_full, tmp_path):
    """The last checkpoint holds the last step: the rerun exports it without training (no step max_steps + 1),
    and the model, log history and summary equal the uninterrupted run's."""
    recipe, whole = (FULL_RECIPE, uninterrupted_full) if tuner == "full" else (RESUME_RECIPE, uninterrupted)
    command = train_command(tiny_model, caches, tmp_path, recipe)
    if fault.startswith("kill"):
        job, paused = run_until(command, tmp_path, "train:trained")
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
        assert paused and not (tmp_path / "out" / "model").exists()
    else:
        shutil.copytree(whole, tmp_path / "out")
        shutil.rmtree(tmp_path / "out" / "model")
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "nothing to train" in rerun.stdout
    out = tmp_path / "out"
    weights = "adapter_model.safetensors" if tuner == "lora" else "model.safetensors"
    assert (out / "model" / weights).read_bytes() == (whole / "model" / weights).read_bytes()
    history = [json.loads((folder / "log_history.json").read_text())["log_history"] for folder in (out, whole)]
    assert without_timings(history[0]) == without_timings(history[1])
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (out, whole)]
    assert summaries[0]["steps"] == recipe["max_steps"]
    assert {**summaries[0], "checkpoint": ""} == {**summaries[1], "checkpoint": ""}
    assert summaries[0]["checkpoint"].endswith(f"checkpoint-{recipe['max_steps']}")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill -9 of the process group", "SIGTERM to the process"])
def test_a_fault_inside_a_checkpoint_save_costs_only_that_checkpoint(fault, tiny_model, caches, uninterrupted, tmp_path):
    """`visionqc train` is killed (-9, whole process group) or preempted (SIGTERM) while it saves checkpoint-4;
    the rerun skips that checkpoint, resumes from checkpoint-2 and ends with the uninterrupted run's adapter,
    byte for byte."""
    from visionqc.checkpoints import hf_checkpoint_problem

    command = train_command(tiny_model, caches, tmp_path, RESUME_RECIPE)
    job, paused = run_until(command, tmp_path, "train:checkpoint-4")
    if fault.startswith("SIGTERM"):
        job.terminate()
        assert job.wait(timeout=120) == 128 + signal.SIGTERM  # unwound through our handler, not killed outright
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    assert paused, "the job ended without reaching the save of checkpoint-4"
    (run_dir,) = (tmp_path / "out" / "checkpoints").iterdir()
    assert (run_dir / "checkpoint-4" / "adapter_model.safetensors").exists()  # the weights were written, the rest not
    assert hf_checkpoint_problem(run_dir / "checkpoint-4").startswith("trainer_state.json is missing")
    assert not (tmp_path / "out" / "model").exists()

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"skipped checkpoint {Path('out/checkpoints') / run_dir.name / 'checkpoint-4'}" in rerun.stdout
    assert f"resuming from {Path('out/checkpoints') / run_dir.name / 'checkpoint-2'}" in rerun.stdout
    assert logged_losses(tmp_path / "out") == logged_losses(uninterrupted)
    final = (tmp_path / "out" / "model" / "adapter_model.safetensors").read_bytes()
    assert final == (uninterrupted / "model" / "adapter_model.safetensors").read_bytes()
    # no second step-0 eval in the history, and the model folder names no resume
    histories = [json.loads((out / "log_history.json").read_text())["log_history"] for out in (tmp_path / "out", uninterrupted)]
    assert without_timings(histories[0]) == without_timings(histories[1])
    for name in ("args.json", "adapter_config.json"):
        assert (tmp_path / "out/model" / name).read_bytes() == (uninterrupted / "model" / name).read_bytes(), name


def test_checkpoint_checks_name_what_is_missing_or_cut_short(tmp_path):
    import torch
    from safetensors.torch import save_file

    from visionqc.checkpoints import hf_checkpoint_problem, newest_complete

    def checkpoint(step: int) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"w": torch.ones(64)}, folder / "model.safetensors")
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.save({"step": step}, folder / name)
        return folder

    good, cut, missing = checkpoint(1), checkpoint(2), checkpoint(3)
    assert hf_checkpoint_problem(good) is None
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-40])
    assert "model.safetensors does not open" in hf_checkpoint_problem(cut)
    (missing / "optimizer.pt").write_bytes((missing / "optimizer.pt").read_bytes()[:-30])
    assert "optimizer.pt is cut short" in hf_checkpoint_problem(missing)
    assert hf_checkpoint_problem(missing, optimizer=False) is None
    logged = []
    assert newest_complete([good, cut, missing], hf_checkpoint_problem, log=logged.append) == good
    assert [line.split(":")[0] for line in logged] == [f"skipped checkpoint {missing}", f"skipped checkpoint {cut}"]
    assert cut.exists()  # left in place unless removal is asked for


@pytest.mark.slow
def test_merge_matches_base_plus_adapter(tiny_model, trained, caches, merged_model, tmp_path):
    from transformers import AutoModelForImageTextToText

    out, _, _ = trained
    folder, report = merged_model
    assert report["passed"] and report["max_abs_logit_diff"] <= 1e-4
    assert report["adapter_effect_max_abs_logit"] > 1e-2  # the adapter really changes the model
    assert json.loads((folder.parent / "verification.json").read_text()) == report
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"

    with pytest.raises(MergeCheckFailed, match="differ from base"):
        merge_into(tiny_model, out / "model", caches["val"], tmp_path / "strict", samples=3, tolerance=1e-12)
    assert not (tmp_path / "strict" / "model").exists()

    # the merged folder serves through swift infer
    request = tmp_path / "ask.jsonl"
    request.write_text(json.dumps({"messages": [{"role": "user", "content": "数一数"}]}, ensure_ascii=False) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", USE_HF="1")
    swift = Path(sys.executable).parent / "swift"
    result = subprocess.run(
        [str(swift), "infer", "--model", str(folder), "--model_type", "qwen3_vl", "--infer_backend",
         "transformers", "--val_dataset", str(request), "--max_new_tokens", "4", "--result_path", str(tmp_path / "out.jsonl"),
         "--torch_dtype", "float32"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(answers) == 1 and "response" in answers[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB file system (tmpfs; needs the right to mount, as root in CI)."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_training_names_the_folder_and_says_so(tiny_model, caches, small_disk):
    """A full fine-tune's checkpoint (40 MB) does not fit: the error says 'no space left' and where, not torch's
    'unexpected pos'."""
    command = train_command(tiny_model, caches, small_disk, {**FULL_RECIPE, "max_steps": 2, "save_steps": 2})
    failed = subprocess.run(command, cwd=small_disk, capture_output=True, text=True)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("visionqc train: error:")]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert errors and errors[0].startswith("visionqc train: error: no space left on the device it writes to: out/"), errors
    assert "MiB free" in errors[0]
