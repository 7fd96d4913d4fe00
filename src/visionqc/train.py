"""Stage train: ms-swift SFT fed from the Arrow cache (no re-tokenisation).

ms-swift drives everything (its trainer, template, collator, tuners); we only replace its dataset:
`CachedSft._prepare_dataset` returns datasets whose items are the cached input_ids/labels plus
pixel_values made by the image processor at the cached grid, exactly what `template.encode`
would have produced.

Layout of `<out_dir>` (results/train/<run>/): `model/` (the adapter or full weights of the last
step, with the processor), `checkpoints/<fingerprint>/checkpoint-N` (kept for resuming; the
fingerprint changes with the recipe and the cache, so a changed run never resumes an old one),
`recipe.json` (the resolved swift arguments), `log_history.json` and `loss.png`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa

from visionqc.arrow_cache import open_cache
from visionqc.io import atomic_directory, write_json
from visionqc.launch import launched_rank, resolve_device
from visionqc.plots import plot_losses
from visionqc.vision import images_at_grid, pixel_environment

# Our defaults under every recipe; a recipe may override any of them.
BASE_ARGUMENTS = {
    "model_type": "qwen3_vl",
    "template": "qwen3_vl",
    "attn_impl": "sdpa",
    "dataloader_num_workers": 0,
    "dataset_num_proc": 1,
    "report_to": ["none"],
    "check_model": False,
    "add_version": False,
    "save_only_model": False,
    "logging_steps": 5,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "eval_strategy": "steps",
    "eval_steps": 25,
    "split_dataset_ratio": 0.0,
    "gradient_accumulation_steps": 1,
    "seed": 42,
    "data_seed": 42,
}
MODEL_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json",
               "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
               "special_tokens_map.json", "additional_config.json", "args.json")


class CachedDataset:
    """Items from a memory-mapped cache, shaped like `template.encode` output."""

    def __init__(self, table: pa.Table, template):
        self.table = table
        self.template = template
        self.image_token = template.image_token_id

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int | str) -> dict | list:
        if index == "lengths":  # swift's length-grouped batch sampler (group_by_length: true) asks for this
            return self.table.column("length").to_pylist()
        row = self.table.slice(index, 1).to_pylist()[0]
        item = {"input_ids": row["input_ids"], "labels": row["labels"], "length": row["length"]}
        if row["images"]:
            processor = self.template.processor.image_processor
            images = images_at_grid(row["images"], row["image_grid_thw"], processor.patch_size)
            media = processor(images=images, return_tensors="pt", do_resize=False)
            if media["image_grid_thw"].tolist() != row["image_grid_thw"]:
                raise ValueError(f"cache line {row['line']}: image grid changed since caching; rebuild the cache")
            item.update(media)
            mask = [token == self.image_token for token in row["input_ids"]]
            item["mm_token_type_ids"] = self.template.create_mm_token_type_ids(row["input_ids"], mask)
        return item


def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_arguments(recipe: dict, model_dir: str, device: str) -> dict:
    """Recipe + our defaults → keyword arguments of swift's SftArguments (without paths that vary per run)."""
    arguments = {**BASE_ARGUMENTS, **recipe, "model": model_dir}
    if resolve_device(device) == "cpu":
        arguments.setdefault("torch_dtype", "float32")
        arguments["use_cpu"] = True
    else:
        arguments.setdefault("torch_dtype", "bfloat16")
    return arguments


def fingerprint(arguments: dict, train_key: str, val_key: str | None) -> str:
    text = json.dumps({"arguments": arguments, "train": train_key, "val": val_key}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train(model_dir: str, train_cache: str, val_cache: str | None, out_dir: str, recipe: dict, cache_options: dict,
          device: str = "auto", on_log=None) -> dict:
    """Train one run; returns a summary (steps, first/last losses, paths).

    Under torchrun every rank trains (swift's DDP); rank 0 alone writes model/ and the reports.
    """
    import torch
    from swift.arguments import SftArguments
    from swift.pipelines.train.sft import SwiftSft
    from transformers import TrainerCallback

    os.environ.update(pixel_environment(cache_options.get("image_max_tokens", 1024), cache_options.get("image_min_tokens", 4)))
    out = Path(out_dir)
    train_key = json.loads((Path(train_cache) / "manifest.json").read_text())["key"]
    val_key = json.loads((Path(val_cache) / "manifest.json").read_text())["key"] if val_cache else None
    arguments = resolve_arguments(recipe, model_dir, device)
    run_dir = out / "checkpoints" / fingerprint(arguments, train_key, val_key)
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = _checkpoints(run_dir)
    resume = str(existing[-1]) if existing else None
    if not val_cache:
        arguments["eval_strategy"] = "no"
    # swift wants dataset names even though _prepare_dataset below never loads them
    placeholders = {"dataset": ["cache"], "val_dataset": ["cache"] if val_cache else []}
    sft_args = SftArguments(**arguments, **placeholders, output_dir=str(run_dir), resume_from_checkpoint=resume)

    class LogForwarder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log and logs:
                on_log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, state.global_step)

    class CachedSft(SwiftSft):
        def _prepare_dataset(self):
            train_set = CachedDataset(open_cache(train_cache), self.template)
            val_set = CachedDataset(open_cache(val_cache), self.template) if val_cache else None
            return [train_set, val_set]

        def train(self, trainer):
            trainer.add_callback(LogForwarder())
            return super().train(trainer)

    torch.manual_seed(int(arguments["seed"]))
    result = CachedSft(sft_args).main()
    history = result["log_history"]
    last = _checkpoints(run_dir)[-1]
    if launched_rank()[0] != 0:
        return summarize(history, resume, last)
    with atomic_directory(out / "model") as work:
        for name in MODEL_FILES:
            if (last / name).exists():
                shutil.copy2(last / name, work / name)
    write_json(out / "recipe.json", {"arguments": arguments, "resumed_from": resume, "checkpoint": str(last)})
    write_json(out / "log_history.json", {"log_history": history})
    plot_losses(history, out / "loss.png")
    return summarize(history, resume, last)


def summarize(history: list[dict], resume: str | None, last: Path) -> dict:
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    summary = {"resumed_from": resume, "checkpoint": str(last), "steps": max([s for s, _ in losses + evals], default=0)}
    if losses:
        summary.update(first_loss=losses[0][1], last_loss=losses[-1][1])
    if evals:
        summary.update(first_eval_loss=evals[0][1], last_eval_loss=evals[-1][1],
                       eval_loss_drop=1 - evals[-1][1] / evals[0][1])
    return summary
