"""Stage train: ms-swift SFT fed from the Arrow cache (no re-tokenisation).

ms-swift drives everything (its trainer, template, collator, tuners); we only replace its dataset:
`CachedSft._prepare_dataset` returns datasets whose items are the cached input_ids/labels plus
pixel_values made by the image processor at the cached grid, exactly what `template.encode`
would have produced.

Outputs (each path given by the rule): the model folder (the adapter or full weights of the last
step, with the processor), summary.json, recipe.json (the resolved swift arguments),
log_history.json and loss.png. Work folder: `<checkpoints>/<fingerprint>/checkpoint-N`, kept for
resuming; the fingerprint changes with the recipe and the cache, so a changed run never resumes an
old one. The template, model type and pixel budget come from the train cache's manifest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa

from visionqc.arrow_cache import CacheRef
from visionqc.checkpoints import hf_checkpoint_problem, newest_complete
from visionqc.faults import pause_point
from visionqc.io import atomic_directory, write_json
from visionqc.launch import launched_rank, resolve_device
from visionqc.plots import plot_losses
from visionqc.tracking import StageResult
from visionqc.vision import PixelBudget, images_at_grid

# Our defaults under every recipe; a recipe may override any of them (model_type and template come from the cache).
BASE_ARGUMENTS = {
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


def resumable_checkpoint(run_dir: Path, optimizer: bool = True, log=print) -> Path | None:
    """The newest complete `checkpoint-N` of a run folder. Incomplete ones (a kill during a save) are logged
    and removed (by rank 0 alone under torchrun): transformers would otherwise write into them again, and its
    rotation counts them."""
    problem = functools.partial(hf_checkpoint_problem, optimizer=optimizer)
    return newest_complete(_checkpoints(run_dir), problem, log=log, remove_skipped=launched_rank()[0] == 0)


def resolve_arguments(recipe: dict, model_dir: str, device: str, cache_options: dict) -> dict:
    """Recipe + our defaults + the cache's model type and template → keyword arguments of swift's SftArguments."""
    from_cache = {"model_type": cache_options["model_type"], "template": cache_options["template"]}
    for name, value in from_cache.items():
        if recipe.get(name, value) != value:
            raise ValueError(f"the recipe sets {name}: {recipe[name]}, but the cache was encoded with {value} "
                             f"(config model.{name}); remove it from the recipe")
    arguments = {**BASE_ARGUMENTS, **from_cache, **recipe, "model": model_dir}
    if resolve_device(device) == "cpu":
        arguments.setdefault("torch_dtype", "float32")
        arguments["use_cpu"] = True
    else:
        arguments.setdefault("torch_dtype", "bfloat16")
    return arguments


ALTERNATION = re.compile(r"\((\w+(?:\|\w+)+)\)")


def sort_target_modules(adapter_config: Path) -> None:
    """Sort the module names in an adapter's `target_modules` in place.

    swift builds the LoRA target regex from a set, so `(k_proj|q_proj|…)` comes out in another order
    in every process; sorted, the same run gives the same bytes. The modules matched do not change.
    """
    config = json.loads(adapter_config.read_text("utf-8"))
    targets = config.get("target_modules")
    if isinstance(targets, str):
        config["target_modules"] = ALTERNATION.sub(lambda m: "(" + "|".join(sorted(m.group(1).split("|"))) + ")", targets)
    elif isinstance(targets, list):
        config["target_modules"] = sorted(targets)
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True), "utf-8")


def fingerprint(arguments: dict, train_key: str, val_key: str | None) -> str:
    text = json.dumps({"arguments": arguments, "train": train_key, "val": val_key}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def agreed_options(train: CacheRef, val: CacheRef | None) -> dict:
    """The train cache's options; a val cache encoded differently (template, pixel budget, prompts) is an error."""
    if val is not None:
        for name in ("model_type", "template", "image_max_tokens", "image_min_tokens", "prompts"):
            if train.options.get(name) != val.options.get(name):
                raise ValueError(f"{train.pointer} and {val.pointer} were cached with different {name}; rerun both cache jobs")
    return train.options


def train(model_dir: str, train_cache: str | Path, val_cache: str | Path | None, recipe: dict, *, model_out: str | Path,
          summary_out: str | Path, loss_plot: str | Path, recipe_out: str | Path, history_out: str | Path,
          checkpoints: str | Path, device: str = "auto", on_log=None) -> StageResult | None:
    """Train one run from cache pointers; writes every output path given. Returns what tracking needs (None off rank 0).

    Under torchrun every rank trains (swift's DDP); rank 0 alone writes the outputs.
    """
    import torch
    from swift.arguments import SftArguments
    from swift.pipelines.train.sft import SwiftSft
    from transformers import TrainerCallback

    train_ref = CacheRef.read(train_cache)
    val_ref = CacheRef.read(val_cache) if val_cache else None
    cache_options = agreed_options(train_ref, val_ref)
    PixelBudget.from_cache_options(cache_options).export_to_swift()
    arguments = resolve_arguments(recipe, model_dir, device, cache_options)
    run_dir = Path(checkpoints) / fingerprint(arguments, train_ref.key, val_ref.key if val_ref else None)
    run_dir.mkdir(parents=True, exist_ok=True)
    found = resumable_checkpoint(run_dir, optimizer=not arguments.get("save_only_model"))
    resume = str(found) if found else None
    if resume:
        print(f"resuming from {resume}", flush=True)
    if not val_ref:
        arguments["eval_strategy"] = "no"
    # swift wants dataset names even though _prepare_dataset below never loads them
    placeholders = {"dataset": ["cache"], "val_dataset": ["cache"] if val_ref else []}
    sft_args = SftArguments(**arguments, **placeholders, output_dir=str(run_dir), resume_from_checkpoint=resume)

    class LogForwarder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log and logs:
                on_log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, state.global_step)

    class CachedSft(SwiftSft):
        def _prepare_dataset(self):
            train_set = CachedDataset(train_ref.table(), self.template)
            val_set = CachedDataset(val_ref.table(), self.template) if val_ref else None
            return [train_set, val_set]

        def train(self, trainer):
            trainer.add_callback(LogForwarder())
            _pause_point_inside_saves(trainer)
            return super().train(trainer)

    torch.manual_seed(int(arguments["seed"]))
    result = CachedSft(sft_args).main()
    history = result["log_history"]
    last = _checkpoints(run_dir)[-1]
    if launched_rank()[0] != 0:
        return None
    with atomic_directory(model_out) as work:
        for name in MODEL_FILES:
            if (last / name).exists():
                shutil.copy2(last / name, work / name)
        if (work / "adapter_config.json").exists():
            sort_target_modules(work / "adapter_config.json")
    write_json(recipe_out, {"arguments": arguments, "resumed_from": resume, "checkpoint": str(last)})
    write_json(history_out, {"log_history": history})
    plot_losses(history, loss_plot)
    summary = summarize(history, resume, last)
    write_json(summary_out, summary)
    return StageResult(
        report=summary, metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=summary["steps"],
        params={"template": arguments["template"], "model_type": arguments["model_type"]},
        artifacts=[loss_plot, recipe_out, history_out],
        inputs={"train_cache": train_ref.folder, "val_cache": val_ref.folder if val_ref else "", "base": model_dir},
        outputs={"model": model_out},
    )


def _pause_point_inside_saves(trainer) -> None:
    """Offer the test-only pause point `train:checkpoint-N` inside each save: weights written, the rest not yet."""
    save_rest = trainer._save_optimizer_and_scheduler

    def paused(output_dir):
        pause_point(f"train:checkpoint-{trainer.state.global_step}")
        return save_rest(output_dir)

    trainer._save_optimizer_and_scheduler = paused


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
