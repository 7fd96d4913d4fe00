"""A real tiny ms-swift training run from the cache, its resume, and the verified merge."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RECIPE, Interrupted, merge_into, train_into

from visionqc.merge import MergeCheckFailed


@pytest.mark.slow
def test_training_through_swift_lowers_the_loss(trained):
    out, summary, logged = trained
    assert summary["steps"] == 12 and summary["resumed_from"] is None
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


def test_sorting_target_modules_keeps_what_they_match(tmp_path):
    from visionqc.train import sort_target_modules

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


@pytest.mark.slow
def test_interrupted_training_resumes_from_the_last_checkpoint(tiny_model, caches, tmp_path):
    recipe = {**RECIPE, "max_steps": 6, "save_steps": 3, "logging_steps": 1, "eval_on_start": False, "eval_steps": 6}

    def stop_after_checkpoint(metrics, step):
        if step >= 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_into(tiny_model, caches, tmp_path, recipe, on_log=stop_after_checkpoint)
    assert not (tmp_path / "model").exists()
    summary = train_into(tiny_model, caches, tmp_path, recipe).report
    assert summary["resumed_from"].endswith("checkpoint-3")
    assert summary["checkpoint"].endswith("checkpoint-6") and summary["steps"] == 6
    # a changed recipe never resumes the old run's checkpoints
    changed = train_into(tiny_model, caches, tmp_path, {**recipe, "max_steps": 2}).report
    assert changed["resumed_from"] is None


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
