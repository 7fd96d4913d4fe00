"""Pre-flight checks: each one refuses a crafted bad input before the first training step."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from visionqc import preflight
from visionqc.arrow_cache import CacheRef, write_shards
from visionqc.vision import CACHE_SCHEMA, PixelBudget

from conftest import RECIPE, train_into


def altered_cache(pointer: Path, dest: Path, change) -> Path:
    """A copy of a cache whose rows went through `change(rows)`, and a pointer to it."""
    ref = CacheRef.read(pointer)
    rows = ref.table().to_pylist()
    change(rows)
    folder = dest / "cache"
    folder.mkdir(parents=True)
    manifest = ref.manifest
    shards = write_shards(folder, rows, CACHE_SCHEMA, 8192)
    manifest.update(shards=list(shards), shard_sha256=shards)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    altered = dest / "altered.json"
    altered.write_text(json.dumps({"key": "altered", "path": str(folder), "records": ref.records, "reused": False}))
    return altered


def first_image_row(rows: list[dict]) -> dict:
    return next(row for row in rows if row["images"])


def test_a_sample_missing_an_image_token_is_refused_with_its_line(caches, tiny_model, tmp_path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    pad = tokenizer.token_to_id("<|image_pad|>")
    start = tokenizer.token_to_id("<|vision_start|>")
    lines = []

    def drop_one_token(rows):
        row = first_image_row(rows)
        row["input_ids"].remove(pad)
        row["labels"].pop()
        row["length"] -= 1
        lines.append(row["line"])

    pointer = altered_cache(caches["train"], tmp_path, drop_one_token)
    tables = {"train": CacheRef.read(pointer).table()}
    (problem,) = preflight.vision_tokens(tables, start, pad, merge=2)
    assert "1 samples whose image tokens" in problem and f"line {lines[0]}:" in problem and "rebuild the cache" in problem
    assert preflight.vision_tokens({"train": CacheRef.read(caches["train"]).table()}, start, pad, merge=2) == []
    with pytest.raises(ValueError, match=f"the run cannot start:\n- .*line {lines[0]}: 1 images, 1 vision blocks"):
        train_into(tiny_model, {"train": pointer, "val": caches["val"]}, tmp_path / "run", RECIPE)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").rglob("checkpoint-*"))


def test_an_image_changed_since_caching_is_refused(caches, tiny_model, tmp_path):
    def point_at_a_bigger_copy(rows):
        row = first_image_row(rows)
        bigger = tmp_path / "bigger.png"
        with Image.open(row["images"][0]) as image:
            image.resize((image.width * 3, image.height * 2)).save(bigger)
        row["images"] = [str(bigger)]

    pointer = altered_cache(caches["train"], tmp_path, point_at_a_bigger_copy)
    grids = PixelBudget(64, 4).grids(tiny_model)
    (problem,) = preflight.grids_now({"train": CacheRef.read(pointer).table()}, grids)
    assert "1 images changed since caching" in problem and "bigger.png was cached as grid" in problem
    assert "--forcerun cache_tokens" in problem
    assert preflight.grids_now({"train": CacheRef.read(caches["train"]).table()}, grids) == []  # the cache as built passes
    with pytest.raises(ValueError, match=r"the run cannot start:\n- .*: 1 images changed since caching .*bigger\.png"):
        train_into(tiny_model, {"train": pointer, "val": caches["val"]}, tmp_path / "run", {**RECIPE, "max_steps": 1})
    assert not any((tmp_path / "run").rglob("checkpoint-*"))


def test_an_image_truncated_after_validate_stops_training_naming_it_and_its_record(caches, tiny_model, tmp_path):
    """The header still reads (so the grid check passes); the pixels do not: the error names the file and the line."""
    lines = []

    def point_at_a_truncated_copy(rows):
        for row in rows:
            if row["images"]:
                cut = tmp_path / f"cut-{row['line']}.png"
                with Image.open(row["images"][0]) as image:
                    image.save(cut)
                cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
                row["images"] = [str(cut)] + row["images"][1:]
                lines.append(row["line"])

    pointer = altered_cache(caches["train"], tmp_path, point_at_a_truncated_copy)
    records = CacheRef.read(pointer).records
    with pytest.raises(ValueError, match=rf"cut-(\d+)\.png: .*truncated.*; it is record {re.escape(records)}:\1, which validate passed"):
        train_into(tiny_model, {"train": pointer, "val": caches["val"]}, tmp_path / "run", {**RECIPE, "max_steps": 1})


def test_lora_patterns_that_match_no_module_are_refused(tiny_model, caches, tmp_path):
    names = ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.v_proj",
             "model.visual.merger.linear_fc1", "lm_head"]
    assert preflight.trainable_modules({"tuner_type": "lora", "target_modules": ["q_proj", "all-linear"]}, names) == []
    (problem,) = preflight.trainable_modules({"tuner_type": "lora", "target_modules": ["q_proj", "v_prj"]}, names)
    assert "'v_prj' matches no module" in problem
    (problem,) = preflight.trainable_modules({"tuner_type": "lora", "modules_to_save": ["visual.mergr"]}, names)
    assert "modules_to_save entry 'visual.mergr'" in problem
    assert preflight.trainable_modules({"tuner_type": "full", "target_modules": ["nothing"]}, names) == []
    trained = ["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight",
               "base_model.model.lm_head.modules_to_save.default.weight", "base_model.model.model.visual.merger.linear_fc1.weight"]
    (problem,) = preflight.trainable_modules({"tuner_type": "lora"}, names, trained)
    assert "1 weights train fully but the LoRA adapter will not save them (base_model.model.model.visual.merger.linear_fc1)" in problem
    with pytest.raises(ValueError, match="'v_prj' matches no module"):
        train_into(tiny_model, caches, tmp_path, {**RECIPE, "target_modules": ["q_proj", "v_prj"]})
    # a module meant to train fully under LoRA: swift 4.6 ignores trainable_parameters there, modules_to_save works
    with pytest.raises(ValueError, match=r"trainable_parameters .* ignores under LoRA.*modules_to_save"):
        train_into(tiny_model, caches, tmp_path / "unsaved", {**RECIPE, "trainable_parameters": ["model.visual.merger"]})


def test_a_base_without_processor_files_is_refused(tiny_model, caches, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    for name in preflight.PROCESSOR_FILES:
        (base / name).unlink(missing_ok=True)
    (problem,) = preflight.base_files(base)
    assert "no image processor file" in problem and "copy it from the original checkpoint" in problem
    with pytest.raises(ValueError, match="no image processor file"):
        train_into(base, caches, tmp_path / "run", RECIPE)


def test_a_max_length_below_the_longest_sample_is_refused(tiny_model, caches, tmp_path):
    longest = max(CacheRef.read(caches["train"]).table().column("length").to_pylist())
    with pytest.raises(ValueError, match=rf"max_length {longest - 1} is below the longest sample .*\({longest} tokens; \d+ samples"):
        train_into(tiny_model, caches, tmp_path, {**RECIPE, "max_length": longest - 1})


@pytest.mark.slow
def test_save_delay_steps_skips_the_early_checkpoints(tiny_model, caches, tmp_path):
    recipe = {**RECIPE, "max_steps": 6, "save_steps": 2, "save_total_limit": 5, "save_delay_steps": 4, "eval_on_start": False,
              "eval_steps": 6}
    summary = train_into(tiny_model, caches, tmp_path, recipe).report
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").rglob("checkpoint-*"))
    assert saved == [4, 6] and summary["checkpoint"].endswith("checkpoint-6")
    assert "save_delay_steps" not in json.loads((tmp_path / "recipe.json").read_text())["arguments"]
