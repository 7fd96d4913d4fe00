"""GKD through train_model: swift's GKD trainer fed from the token cache, the logit and visual KD terms, resume."""

import json
import shutil

import pytest

from visionqc import distill
from visionqc.train import gkd_options

from conftest import RECIPE, Interrupted, moved_weights, train_into

GKD = {**RECIPE, "rlhf_type": "gkd", "max_steps": 4, "logging_steps": 1, "eval_on_start": False, "eval_steps": 4, "save_steps": 4}
VISUAL = {"vit": 1.0, "aligner": 1.0, "deepstack": 1.0}
# the KD terms at step 1, before any update, with teacher == student: float noise only
AT_START = 1e-6


def by_step(logged: list, key: str) -> dict[int, float]:
    return {step: metrics[key] for step, metrics in logged if key in metrics}


@pytest.fixture(scope="module")
def pushed_away(tiny_model, caches, tmp_path_factory):
    """4 full fine-tuning steps at a high learning rate, distilled from the base itself: the metrics logged."""
    logged = []
    recipe = {**GKD, "tuner_type": "full", "freeze_vit": False, "freeze_aligner": False, "learning_rate": 2e-2,
              "visual_kd": VISUAL}
    train_into(tiny_model, caches, tmp_path_factory.mktemp("gkd"), recipe, on_log=lambda m, s: logged.append((s, m)))
    return logged


def test_kd_terms_are_zero_while_the_student_is_its_teacher(pushed_away):
    for key in ("llm_kd_loss", "vision_kd_vit", "vision_kd_aligner", "vision_kd_deepstack", "vision_kd_loss"):
        assert abs(by_step(pushed_away, key)[1]) < AT_START, key
    # with teacher == student the total is the cross-entropy alone
    assert by_step(pushed_away, "loss")[1] == pytest.approx(by_step(pushed_away, "sft_loss")[1], rel=1e-5)


def test_kd_terms_grow_as_the_student_is_pushed_away(pushed_away):
    for key in ("llm_kd_loss", "vision_kd_vit", "vision_kd_aligner", "vision_kd_deepstack"):
        later = max(value for step, value in by_step(pushed_away, key).items() if step > 1)
        assert later > 1e-3 and later > 1000 * abs(by_step(pushed_away, key)[1]), key
    # every term reaches MLflow under its own name, for eval too
    evaluated = {k for _, metrics in pushed_away for k in metrics if k.startswith("eval_")}
    assert {"eval_sft_loss", "eval_llm_kd_loss", "eval_vision_kd_loss", "eval_token_acc"} <= evaluated


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A teacher that is not the student: the tiny model built from another seed (every weight differs)."""
    from visionqc.demo.model import build_demo_model

    out = tmp_path_factory.mktemp("teacher") / "tiny"
    build_demo_model(out, seed=1)
    return out


# full fine-tuning where nothing but the recipe's terms moves a weight: no weight decay, no on-policy batches
FULL_AND_STILL = {**GKD, "tuner_type": "full", "freeze_vit": False, "freeze_aligner": False, "learning_rate": 1e-3,
                  "weight_decay": 0.0, "lmbda": 0.0, "max_steps": 2, "eval_steps": 2, "save_steps": 2}


def test_visual_kd_alone_moves_only_the_vision_blocks(tiny_model, other_teacher, caches, tmp_path):
    """CE and logit KD weighted 0: the vit term (the merger's input) moves the vision blocks and nothing after them;
    with visual KD off as well, no weight moves."""
    only_vit = {**FULL_AND_STILL, "sft_alpha": 0.0, "llm_kd_weight": 0.0, "visual_kd": {"vit": 1.0}}
    train_into(tiny_model, caches, tmp_path / "vit", only_vit, teacher=str(other_teacher))
    moved = moved_weights(tiny_model, tmp_path / "vit" / "model")
    assert any(".visual.blocks." in name for name in moved)
    assert all(".visual.blocks." in name or ".visual.patch_embed." in name or ".visual.pos_embed." in name
               for name in moved), sorted(moved)[:5]
    off = {**only_vit, "visual_kd": {"vit": 0.0}}
    train_into(tiny_model, caches, tmp_path / "off", off, teacher=str(other_teacher))
    assert moved_weights(tiny_model, tmp_path / "off" / "model") == set()


def test_the_logged_total_is_the_weighted_sum_of_the_logged_terms(tiny_model, other_teacher, caches, tmp_path):
    logged = []
    recipe = {**GKD, "lmbda": 0.0, "sft_alpha": 0.5, "llm_kd_weight": 0.7, "max_steps": 3, "eval_steps": 3, "save_steps": 3,
              "visual_kd": {"vit": 1.0, "aligner": 0.5, "deepstack": 0.25}}
    train_into(tiny_model, caches, tmp_path, recipe, teacher=str(other_teacher), on_log=lambda m, s: logged.append((s, m)))
    train_steps = [(step, metrics) for step, metrics in logged if "loss" in metrics]  # one batch each; an eval's means are not
    for step, metrics in train_steps:
        places = [metrics[f"vision_kd_{place}"] for place in distill.VISUAL_PLACES if f"vision_kd_{place}" in metrics]
        assert metrics.get("vision_kd_loss", 0) == pytest.approx(sum(places), abs=2e-4)
        weighted = 0.5 * metrics["sft_loss"] + metrics["llm_kd_loss"] + metrics.get("vision_kd_loss", 0)
        assert metrics["loss"] == pytest.approx(weighted, abs=2e-4, rel=1e-4), (step, metrics)
        assert metrics["llm_kd_loss"] > 1e-3 and metrics.get("vision_kd_loss", 0) > 1e-3, (step, metrics)
    assert len(train_steps) == 3


def test_each_visual_hook_captures_its_module(tiny_model):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model).eval()
    processor = AutoProcessor.from_pretrained(tiny_model)
    image = Image.new("RGB", (64, 96), (200, 30, 30))
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>数一数<|im_end|>\n"
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    vision = model.config.vision_config
    patches = int(inputs["image_grid_thw"].prod())
    merged = patches // vision.spatial_merge_size ** 2
    with torch.no_grad(), distill.captured_features(model, distill.VISUAL_PLACES) as features:
        model(**inputs)
    (vit,), (aligner,) = features["vit"], features["aligner"]
    assert vit.shape == (patches, vision.hidden_size)
    assert aligner.shape == (merged, vision.out_hidden_size)
    assert len(features["deepstack"]) == len(vision.deepstack_visual_indexes)
    assert all(f.shape == (merged, vision.out_hidden_size) for f in features["deepstack"])
    # the vit capture is what the merger reads, the aligner capture what it returns
    tower = distill.vision_tower(model)
    assert torch.equal(tower.merger(vit), aligner)
    # hooks are gone afterwards, and a text-only batch captures nothing (its term is skipped)
    with torch.no_grad(), distill.captured_features(model, distill.VISUAL_PLACES) as features:
        model(**processor(text=["<|im_start|>user\n你好<|im_end|>\n"], return_tensors="pt"))
    assert features == {"vit": [], "aligner": [], "deepstack": []}
    assert distill.feature_distance([], [], "mse") is None
    assert not tower.merger._forward_hooks and not tower.merger._forward_pre_hooks


def test_distances_are_zero_on_equal_features_only():
    import torch

    a = torch.randn(5, 8)
    for distance in ("mse", "cosine"):
        assert float(distill.feature_distance([a], [a.clone()], distance)) == pytest.approx(0, abs=1e-6)
        assert float(distill.feature_distance([a], [a + 1], distance)) > 0
    assert float(distill.feature_distance([a], [2 * a], "cosine")) == pytest.approx(0, abs=1e-6)  # cosine ignores scale


def test_without_the_logit_term_its_metric_is_not_logged(tiny_model, caches, tmp_path):
    logged = []
    train_into(tiny_model, caches, tmp_path, {**GKD, "max_steps": 2, "llm_kd_weight": 0.0, "eval_steps": 2, "save_steps": 2},
               on_log=lambda m, s: logged.append((s, m)))
    keys = {k for _, metrics in logged for k in metrics}
    assert "sft_loss" in keys and "token_acc" in keys
    assert not {k for k in keys if "llm_kd" in k or "vision_kd" in k}


def test_on_policy_batches_are_the_students_own_answers(tiny_model, caches, tmp_path):
    """lmbda 1: every train batch is rolled out from the cached prompts; the run trains and evaluates on the dataset."""
    logged = []
    summary = train_into(tiny_model, caches, tmp_path, {**GKD, "max_steps": 2, "eval_steps": 2, "save_steps": 2, "lmbda": 1.0,
                                                         "max_completion_length": 6, "temperature": 0.9},
                         on_log=lambda m, s: logged.append((s, m))).report
    assert summary["steps"] == 2
    assert all(metrics["llm_kd_loss"] < AT_START for step, metrics in logged if step == 1 and "llm_kd_loss" in metrics)
    assert by_step(logged, "eval_sft_loss")[2] > 1  # eval scores the dataset's answers, which the random model can't write


def test_a_rollout_continues_from_the_cached_prompt(tiny_model):
    import torch
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer.encode("<|im_start|>user\n数一数<|im_end|>\n<|im_start|>assistant\n")
    answer = tokenizer.encode("BBU×2<|im_end|>")
    item = {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer, "length": len(prompt) + len(answer)}
    torch.manual_seed(0)
    (rolled,) = distill.complete_on_policy(model, [item], eos_ids=[151645], max_new_tokens=5, temperature=0)
    assert rolled["input_ids"][: len(prompt)] == prompt
    completion = rolled["input_ids"][len(prompt):]
    assert 1 <= len(completion) <= 5 and rolled["labels"] == [-100] * len(prompt) + completion
    assert rolled["length"] == len(rolled["input_ids"])
    assert distill.answer_start([-100, -100, 5, 6, -100, 7, 8]) == 5  # the last answer span of a multi-turn record


@pytest.mark.parametrize("recipe, message", [
    ({"rlhf_type": "gkd", "seq_kd": True}, "seq_kd: true"),
    ({"rlhf_type": "grpo"}, "rlhf_type: grpo cannot train from the token cache"),
    ({"llm_kd_weight": 0.5}, "without rlhf_type: gkd"),
    ({"rlhf_type": "gkd", "visual_kd": {"vit": 0.1, "distance": "l1"}}, "distance must be mse or cosine"),
    ({"rlhf_type": "gkd", "visual_kd": {"vti": 0.1}}, "did you mean recipe.visual_kd.vit"),
])
def test_gkd_recipes_are_refused_before_loading(recipe, message):
    with pytest.raises(ValueError, match=message):
        gkd_options(dict(recipe))


@pytest.mark.slow
def test_a_gkd_run_resumes_like_any_other(tiny_model, caches, tmp_path):
    recipe = {**GKD, "max_steps": 6, "save_steps": 2, "eval_steps": 6}
    train_into(tiny_model, caches, tmp_path / "whole", recipe)

    def stop(metrics, step):
        if step >= 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_into(tiny_model, caches, tmp_path / "cut", recipe, on_log=stop)
    (run_dir,) = (tmp_path / "cut" / "checkpoints").iterdir()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    steps = []
    train_into(tiny_model, caches, tmp_path / "cut", recipe, on_log=lambda m, s: steps.append(s))
    assert json.loads((tmp_path / "cut" / "recipe.json").read_text())["resumed_from"] == str(run_dir / "checkpoint-2")
    assert sorted(set(steps)) == [3, 4, 5, 6]
    whole, cut = (json_history(tmp_path / name) for name in ("whole", "cut"))
    assert cut == pytest.approx(whole, rel=1e-5)
    shutil.rmtree(tmp_path / "whole")


def json_history(out) -> list[tuple]:
    import json

    history = json.loads((out / "log_history.json").read_text())["log_history"]
    return [value for h in history if "llm_kd_loss" in h and "loss" in h for value in (h["step"], h["loss"], h["llm_kd_loss"])]


@pytest.mark.slow
def test_gkd_is_a_train_model_job_whose_teacher_is_another_run(finished_workflow):
    """A GKD run added to the finished small workflow: only its train and merge jobs run, the teacher is the LoRA
    run's merged model, every term reaches MLflow, and the merged model loads like any other."""
    from transformers import Qwen3VLForConditionalGeneration

    from conftest import added_run, short_recipe

    work = finished_workflow
    recipe = short_recipe(work, "gkd", max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=1, eval_steps=4,
                          save_steps=4, logging_steps=2, learning_rate=1e-3, max_length=1024, warmup_ratio=0.0)
    overlay = {"train": {"runs": {"demo_gkd": {"recipe": recipe, "base": "", "teacher": "demo_lora"}}}}
    with added_run(work, "demo_gkd", overlay, {"train_model": 1, "merge_adapter": 1}) as client:
        Qwen3VLForConditionalGeneration.from_pretrained(work / "results/merge/demo_gkd/model")
        (run,) = client.search_runs([client.get_experiment_by_name("visionqc").experiment_id], "attributes.run_name = 'train:demo_gkd'")
        assert run.data.params["teacher"] == "results/merge/demo_lora/model"
        assert {"sft_loss", "llm_kd_loss", "vision_kd_loss", "token_acc", "eval_sft_loss", "eval_llm_kd_loss"} <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "llm_kd_loss")] == [1, 2, 4]  # swift logs step 1 too
        assert run.data.metrics["llm_kd_loss"] > 0  # the teacher is another model: the terms are not zero
