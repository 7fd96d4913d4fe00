"""Stage merge: fold a LoRA adapter into its base model, and prove the merged model is the same function.

The proof: the saved merged folder is loaded back fresh and its logits on several cached samples
are compared with base+adapter (PEFT, unmerged). The maximum absolute difference is reported and
the stage fails above the tolerance. A full fine-tune (no adapter) is copied and checked the same way.
Verification runs in float32 so the tolerance means the same thing on every device.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from visionqc.arrow_cache import CacheRef
from visionqc.io import atomic_directory, write_json
from visionqc.options import options_from
from visionqc.tracking import StageResult
from visionqc.vision import images_at_grid

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                   "preprocessor_config.json", "video_preprocessor_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")


class MergeCheckFailed(RuntimeError):
    pass


@dataclass
class MergeOptions:
    samples: int = 4  # cached samples whose logits are compared
    tolerance: float = 1e-4  # largest allowed absolute logit difference

    @classmethod
    def from_dict(cls, options: dict) -> MergeOptions:
        return options_from(cls, options, "merge")


def sample_inputs(cache: CacheRef, processor, count: int) -> list[dict]:
    """Model inputs for the first `count` cached samples (pixels made at the cached grid)."""
    import torch

    table = cache.table()
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    patch = processor.image_processor.patch_size
    inputs = []
    for row in table.slice(0, count).to_pylist():
        ids = torch.tensor([row["input_ids"]])
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if row["images"]:
            images = images_at_grid(row["images"], row["image_grid_thw"], patch)
            item.update(processor.image_processor(images=images, return_tensors="pt", do_resize=False))
            item["mm_token_type_ids"] = (ids == image_token).long()
        inputs.append(item)
    return inputs


def _logits(model, inputs: list[dict]) -> list:
    import torch

    with torch.no_grad():
        return [model(**item).logits.float() for item in inputs]


def merge(base_dir: str | Path, trained_dir: str | Path, val_cache: str | Path, *, model_out: str | Path,
          verification_out: str | Path, options: dict | None = None) -> StageResult:
    """Write the merged model to `model_out` (with the processor) and its proof to `verification_out`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    opts = MergeOptions.from_dict(dict(options or {}))
    samples, tolerance = opts.samples, opts.tolerance
    cache = CacheRef.read(val_cache)
    trained = Path(trained_dir)
    is_adapter = (trained / "adapter_config.json").exists()
    processor = AutoProcessor.from_pretrained(base_dir)
    inputs = sample_inputs(cache, processor, samples)
    load = dict(dtype=torch.float32)
    if is_adapter:
        reference = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir, **load), str(trained)).eval()
    else:
        reference = AutoModelForImageTextToText.from_pretrained(str(trained), **load).eval()
    expected = _logits(reference, inputs)
    base_moved = None
    if is_adapter:
        with reference.disable_adapter():
            base_moved = max((a - b).abs().max().item() for a, b in zip(_logits(reference, inputs), expected, strict=True))
        merged = reference.merge_and_unload()
    else:
        merged = reference
    with atomic_directory(model_out) as work:
        merged.save_pretrained(work, safe_serialization=True)
        for name in PROCESSOR_FILES:
            source = Path(base_dir) / name
            if source.exists() and not (work / name).exists():
                shutil.copy2(source, work / name)
        reloaded = AutoModelForImageTextToText.from_pretrained(str(work), **load).eval()
        diff = max((a - b).abs().max().item() for a, b in zip(_logits(reloaded, inputs), expected, strict=True))
        report = {
            "adapter": is_adapter, "samples": len(inputs), "max_abs_logit_diff": diff, "tolerance": tolerance,
            "adapter_effect_max_abs_logit": base_moved, "passed": diff <= tolerance,
        }
        if diff > tolerance:
            raise MergeCheckFailed(
                f"merged logits differ from base+adapter by {diff:.3g} > {tolerance:g}; the merged model was not written"
            )
    write_json(verification_out, report)
    return StageResult(
        report=report,
        metrics={"max_abs_logit_diff": report["max_abs_logit_diff"], "samples": report["samples"],
                 "adapter_effect_max_abs_logit": report["adapter_effect_max_abs_logit"] or 0.0},
        artifacts=[verification_out], inputs={"base": base_dir, "trained": trained_dir}, outputs={"merged": model_out},
    )
