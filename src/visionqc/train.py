"""Stage train: ms-swift SFT fed from the Arrow cache (no re-tokenisation).

ms-swift drives everything (its trainer, template, collator, tuners); we only replace its dataset:
`CachedTraining._prepare_dataset` returns datasets whose items are the cached input_ids/labels plus
pixel_values made by the image processor at the cached grid, exactly what `template.encode`
would have produced. A recipe with `rlhf_type: gkd` runs swift's GKD pipeline on the same items
(distill.py).

Outputs (each path given by the rule): the model folder (the adapter or full weights of the last
step, with the processor), summary.json, recipe.json (the resolved swift arguments),
log_history.json and loss.png. Work folder: `<checkpoints>/<fingerprint>/checkpoint-N`, kept for
resuming; the fingerprint changes with the recipe and the cache, so a changed run never resumes an
old one. The template, model type and pixel budget come from the train cache's manifest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import pyarrow as pa

from visionqc import distill, preflight
from visionqc.arrow_cache import CacheRef
from visionqc.checkpoints import (
    best_checkpoint,
    checkpoint_folders,
    export_model,
    finished_training,
    resumable_checkpoint,
    trainer_history,
)
from visionqc.faults import pause_point
from visionqc.io import follow_umask, write_json
from visionqc.launch import SWIFT_DEFAULTS, launched_rank, swift_device_arguments
from visionqc.options import options_from
from visionqc.plots import plot_losses
from visionqc.tracking import StageResult
from visionqc.vision import PixelBudget, UnreadableImage, images_at_grid

# Our defaults under every recipe; a recipe may override any of them (model_type and template come from the cache).
BASE_ARGUMENTS = {
    **SWIFT_DEFAULTS,
    "save_only_model": False,
    "eval_strategy": "steps",
    "eval_steps": 25,
    # per-source loss from swift, per source (the cache's `source` column) as its `channel`
    "enable_channel_loss": True,
}
# GKD's recommended mode, forward-only distillation on the cached answers; a recipe may override each
GKD_ARGUMENTS = {"sft_alpha": 1.0, "beta": 0.1, "lmbda": 0.0, "seq_kd": False, "enable_channel_loss": False}
UNTAGGED = "untagged"  # the channel of a cached row without a fusion source

class CachedDataset:
    """Items from a memory-mapped cache, shaped like `template.encode` output, each with its source as `channel`."""

    def __init__(self, table: pa.Table, template, records: str = "the cached records"):
        self.table = table
        self.template = template
        self.image_token = template.image_token_id
        self.records = records

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int | str) -> dict | list:
        if index == "lengths":  # swift's length-grouped batch sampler (group_by_length: true) asks for this
            return self.table.column("length").to_pylist()
        row = self.table.slice(index, 1).to_pylist()[0]
        item = {"input_ids": row["input_ids"], "labels": row["labels"], "length": row["length"],
                "channel": row["source"] or UNTAGGED}
        if row["images"]:
            processor = self.template.processor.image_processor
            try:
                images = images_at_grid(row["images"], row["image_grid_thw"], processor.patch_size)
            except UnreadableImage as exc:
                raise UnreadableImage(exc.path, f"{exc.cause}; it is record {self.records}:{row['line']}, which validate passed: "
                                                "the file changed since. Restore it, or rerun convert and validate") from exc
            media = processor(images=images, return_tensors="pt", do_resize=False)
            if media["image_grid_thw"].tolist() != row["image_grid_thw"]:
                raise ValueError(f"cache line {row['line']}: image grid changed since caching; rebuild the cache")
            item.update(media)
            mask = [token == self.image_token for token in row["input_ids"]]
            item["mm_token_type_ids"] = self.template.create_mm_token_type_ids(row["input_ids"], mask)
        return item


class EpochCaches:
    """The caches of augmented epochs as one training set: the trainer's epoch e reads epoch e mod E.

    `EpochSwitch` sets `epoch` at the start of every trainer epoch (before the dataloader is iterated,
    so dataloader workers see it); swift's sampler still shuffles each epoch with its own seed.
    """

    def __init__(self, epochs: list[CachedDataset], pointers: list[str]):
        sizes = {len(epoch) for epoch in epochs}
        if len(sizes) > 1:
            raise ValueError(f"the augmented epochs {', '.join(pointers)} hold different numbers of records "
                             f"({sorted(sizes)}); rerun augment_records and cache_tokens for them")
        self.epochs = epochs
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.epochs[0])

    def __getitem__(self, index: int | str) -> dict | list:
        return self.epochs[self.epoch % len(self.epochs)][index]


def source_metric_names(sources: list[str]) -> dict[str, str]:
    """swift's per-channel log keys → our MLflow names: `loss_<s>` → `train/<s>_loss`, `eval_token_acc_<s>` →
    `eval/<s>_token_acc`, and so on."""
    names = {}
    for source in sources:
        for metric in ("loss", "token_acc"):
            names[f"{metric}_{source}"] = f"train/{source}_{metric}"
            names[f"eval_{metric}_{source}"] = f"eval/{source}_{metric}"
    return names


def count_source_accuracy(trainer, packed: AnswerRows | None) -> None:
    """Add `token_acc_<source>` to swift's metrics, beside its per-channel loss (swift has no per-channel accuracy).

    The batch's channels are read as compute_loss starts (it pops them), then each row's answer tokens are
    scored like swift's own token_acc: the argmax at position t against the label at t + 1. A batch packed by
    `packed` is one row holding every sample's answer tokens in turn: swift would give them all to the first
    sample's channel, so its per-channel loss is taken over here, split by `packed.tokens`.
    """
    compute_loss, compute_acc = trainer.compute_loss, trainer._compute_acc
    batch = {}

    def metrics():
        return trainer.custom_metrics["train" if trainer.model.training else "eval"]

    def remember_channels(model, inputs, return_outputs=False, num_items_in_batch=None):
        batch["channels"] = channels = inputs.get("channel")
        if not (packed and packed.tokens and channels):
            return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        inputs["channel"] = None
        loss, outputs = compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        metrics().pop("loss_None", None)  # what swift counted under no channel
        for channel, tokens in zip(channels, packed.split(outputs.loss), strict=True):
            if len(tokens):
                metrics()[f"loss_{channel}"].update(tokens)
        return (loss, outputs) if return_outputs else loss

    def with_sources(outputs, labels, cu_seqlens=None):
        compute_acc(outputs, labels, cu_seqlens=cu_seqlens)
        channels, logits = batch.get("channels"), getattr(outputs, "logits", None)
        if not channels or logits is None or logits.shape[:2] != labels.shape:
            return
        predicted, gold = logits.argmax(dim=-1)[:, :-1], labels[:, 1:]
        if packed and packed.tokens and labels.shape[0] == 1:
            rows = zip(packed.split(predicted[0]), packed.split(gold[0]), strict=True)
        elif len(channels) == labels.shape[0]:
            rows = ((p[g != -100], g[g != -100]) for p, g in zip(predicted, gold, strict=True))
        else:
            return
        for channel, (guess, answer) in zip(channels, rows, strict=True):
            if len(answer):
                metrics()[f"token_acc_{channel}"].update((guess == answer).float())

    trainer.compute_loss, trainer._compute_acc = remember_channels, with_sources


class AnswerRows:
    """A training batch of several samples computes the LM head only where a label follows, packed in one row.

    ms-swift keeps the logits of every sample from the batch's earliest answer token on (exactly the answers
    only at batch size 1): a batch × longest-answer block of 151,936-wide rows, and one 250-token dense answer
    makes eight 30-token summaries pay 250 rows each. Here the hidden states whose next token is a label go
    through the head as one sequence, with their labels after a leading -100 (swift's own layout at batch
    size 1), so the head, the loss and its gradient cover the answers' tokens only: the same maths, though the
    product over fewer rows and the mean over another length may round differently in the last bits. `tokens`
    holds each sample's count, for the per-source metrics. Evaluation, and batches with a loss_scale, keep
    swift's rows.
    """

    def __init__(self, trainer):
        import torch.nn.functional as F

        self.tokens: list[int] | None = None
        rows = {}
        prepare, head = trainer.prepare_logits_to_keep, trainer.model.get_output_embeddings()
        linear = head.forward

        def pack(inputs):
            prepare(inputs)
            labels, self.tokens = inputs["labels"], None
            rows.clear()
            if (not trainer.model.training or labels.shape[0] == 1 or not isinstance(inputs["logits_to_keep"], int)
                    or inputs.get("loss_scale") is not None):
                return
            follows = labels[:, 1:] != -100
            rows["kept"] = F.pad(follows, (0, 1), value=False)
            self.tokens = follows.sum(dim=1).tolist()
            inputs["labels"] = F.pad(labels[:, 1:][follows], (1, 0), value=-100)[None]

        def head_at_rows(hidden):
            kept = rows.pop("kept", None)
            if kept is None or kept.shape != hidden.shape[:2]:
                return linear(hidden)
            return F.pad(linear(hidden[kept]), (0, 0, 0, 1))[None]  # a last row for the leading -100's place

        trainer.prepare_logits_to_keep, head.forward = pack, head_at_rows

    def split(self, packed):
        """A packed row's entries (per-token losses, predictions, labels), one slice per sample."""
        return packed[: sum(self.tokens)].split(self.tokens)


def resolve_arguments(recipe: dict, model_dir: str, device: str, cache_options: dict) -> dict:
    """Recipe + our defaults + the cache's model type and template → keyword arguments of swift's SftArguments."""
    from_cache = {"model_type": cache_options["model_type"], "template": cache_options["template"]}
    for name, value in from_cache.items():
        if recipe.get(name, value) != value:
            raise ValueError(f"the recipe sets {name}: {recipe[name]}, but the cache was encoded with {value} "
                             f"(config model.{name}); remove it from the recipe")
    return {**BASE_ARGUMENTS, **from_cache, **recipe, "model": model_dir, **swift_device_arguments(device, recipe)}


def fingerprint(arguments: dict, train_keys: list[str], val_key: str | None) -> str:
    train = train_keys[0] if len(train_keys) == 1 else train_keys
    text = json.dumps({"arguments": arguments, "train": train, "val": val_key}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def agreed_options(train: list[CacheRef], val: CacheRef | None) -> dict:
    """The train caches' options; a cache encoded differently (template, pixel budget, prompts) is an error."""
    for other in train[1:] + ([val] if val is not None else []):
        for name in ("model_type", "template", "image_max_tokens", "image_min_tokens", "prompts"):
            if train[0].options.get(name) != other.options.get(name):
                raise ValueError(f"{train[0].pointer} and {other.pointer} were cached with different {name}; rerun both cache jobs")
    return train[0].options


def train(model_dir: str, train_cache: str | Path | list, val_cache: str | Path | None, recipe: dict, *, model_out: str | Path,
          summary_out: str | Path, loss_plot: str | Path, recipe_out: str | Path, history_out: str | Path,
          checkpoints: str | Path, device: str = "auto", teacher: str | None = None, select: str = "last",
          select_metric: str = "eval_loss", on_log=None) -> StageResult | None:
    """Train one run from cache pointers; writes every output path given. Returns what tracking needs (None off rank 0).

    `train_cache` is one pointer, or one per augmented epoch in epoch order (`EpochCaches`).
    A recipe with `rlhf_type: gkd` distils from `teacher` (a model folder; the base when None), see distill.py.
    Under torchrun every rank trains (swift's DDP); rank 0 alone writes the outputs. A rerun resumes from the
    newest complete checkpoint; one that holds the last step is exported without training.
    `select` says which checkpoint becomes `model_out`: the last, or the best by `select_metric` (`best_checkpoint`).
    """
    train_refs = [CacheRef.read(p) for p in ([train_cache] if isinstance(train_cache, (str, Path)) else train_cache)]
    val_ref = CacheRef.read(val_cache) if val_cache else None
    cache_options = agreed_options(train_refs, val_ref)
    budget = PixelBudget.from_cache_options(cache_options)
    budget.export_to_swift()
    recipe = copy.deepcopy(recipe)  # swift may change list arguments in place
    save_delay = int(recipe.pop("save_delay_steps", 0) or 0)  # ours (config_check.RECIPE_EXTENSIONS), not swift's
    at_labels = bool(recipe.pop("logits_at_labels", True))
    gkd = gkd_options(recipe)
    arguments = resolve_arguments(recipe, model_dir, device, cache_options)
    if gkd:
        arguments = {**arguments, **{k: v for k, v in GKD_ARGUMENTS.items() if k not in recipe},
                     "teacher_model": teacher or model_dir, "teacher_model_type": arguments["model_type"]}
    check_before_loading(model_dir, arguments, [*train_refs, *([val_ref] if val_ref else [])], budget)
    if len(train_refs) > 1 and arguments.get("dataloader_persistent_workers") and arguments.get("dataloader_num_workers"):
        raise ValueError("dataloader_persistent_workers keeps the first augmented epoch in its workers; "
                         "remove it from the recipe (augmented epochs switch at every trainer epoch)")
    run_dir = Path(checkpoints) / fingerprint(arguments, [ref.key for ref in train_refs], val_ref.key if val_ref else None)
    run_dir.mkdir(parents=True, exist_ok=True)
    found = resumable_checkpoint(run_dir, optimizer=not arguments.get("save_only_model"))
    resume = str(found) if found else None
    if not val_ref:
        arguments["eval_strategy"] = "no"
    if found and finished_training(found):
        print(f"{found} is the run's last step: exporting it, nothing to train", flush=True)
        history, last = trainer_history(found), found
        renamed = source_metric_names(source_names(train_refs))
        for entry in history if on_log else []:  # the run's curves, for its tracking record
            on_log({renamed.get(k, k): v for k, v in entry.items() if isinstance(v, (int, float))}, entry["step"])
    else:
        if resume:
            print(f"resuming from {resume}", flush=True)
        history = run_swift(arguments, gkd, train_refs, val_ref, run_dir, resume, save_delay, at_labels, on_log)
        follow_umask(run_dir)
        last = checkpoint_folders(run_dir)[-1]
        pause_point("train:trained")
    if launched_rank()[0] != 0:
        return None
    chosen = {}
    if select == "best":
        folder, step, value = best_checkpoint(run_dir, history, select_metric, optimizer=not arguments.get("save_only_model"))
        chosen = {"selected_step": step, "selected_metric": select_metric, "selected_value": value}
        print(f"select: best deploys {folder.name} ({select_metric} {value:.6g}); the last is {last.name}", flush=True)
        last = folder
    export_model(last, model_out)
    write_json(recipe_out, {"arguments": arguments, "resumed_from": resume, "checkpoint": str(last)})
    write_json(history_out, {"log_history": history})
    sources = source_names(train_refs)
    plot_losses(history, loss_plot, sources)
    summary = {**summarize(history, last), "select": select, **chosen}
    write_json(summary_out, summary)
    return StageResult(
        report=summary, metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=summary["steps"],
        params={"template": arguments["template"], "model_type": arguments["model_type"], "sources": ",".join(sources),
                "resumed_from": resume or ""},
        artifacts=[loss_plot, recipe_out, history_out],
        inputs={**{f"train_cache{'' if i == 0 else f'_epoch_{i}'}": ref.folder for i, ref in enumerate(train_refs)},
                "val_cache": val_ref.folder if val_ref else "", "base": model_dir, **({"teacher": teacher} if gkd and teacher else {})},
        outputs={"model": model_out},
    )


def source_names(train_refs: list[CacheRef]) -> list[str]:
    return sorted({source or UNTAGGED for ref in train_refs for source in ref.table().column("source").unique().to_pylist()})


def run_swift(arguments: dict, gkd, train_refs: list[CacheRef], val_ref: CacheRef | None, run_dir: Path, resume: str | None,
              save_delay: int, at_labels: bool, on_log) -> list[dict]:
    """Train through ms-swift from the caches; returns the step log history (the end-of-training totals left out:
    they are timings, and a run resumed after its last step could not reproduce them)."""
    import torch
    from swift.arguments import RLHFArguments, SftArguments
    from swift.pipelines.train.rlhf import SwiftRLHF
    from swift.pipelines.train.sft import SwiftSft
    from transformers import TrainerCallback

    # swift wants dataset names even though _prepare_dataset below never loads them
    placeholders = {"dataset": ["cache"], "val_dataset": ["cache"] if val_ref else []}
    arguments_class, pipeline = (RLHFArguments, SwiftRLHF) if gkd else (SftArguments, SwiftSft)
    swift_args = arguments_class(**arguments, **placeholders, output_dir=str(run_dir), resume_from_checkpoint=resume)

    renamed = source_metric_names(source_names(train_refs))

    class LogForwarder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log and logs:
                on_log({renamed.get(k, k): v for k, v in logs.items() if isinstance(v, (int, float))}, state.global_step)

    class EpochSwitch(TrainerCallback):
        def __init__(self, dataset: EpochCaches):
            self.dataset = dataset

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.dataset.epoch = math.floor(state.epoch + 1e-9)  # a resumed run restarts inside its epoch

    class SaveDelay(TrainerCallback):
        """No checkpoint before step save_delay_steps (a recipe key of ours); the last step still saves."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < min(save_delay, state.max_steps):
                control.should_save = False

    class CachedTraining(pipeline):
        def _prepare_dataset(self):
            epochs = [CachedDataset(ref.table(), self.template, ref.records) for ref in train_refs]
            self.train_set = epochs[0] if len(epochs) == 1 else EpochCaches(epochs, [str(r.pointer) for r in train_refs])
            val_set = CachedDataset(val_ref.table(), self.template, val_ref.records) if val_ref else None
            return [self.train_set, val_set]

        def train(self, trainer):
            model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
            trained = [name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad]
            problems = preflight.trainable_modules(arguments, [name for name, _ in model.named_modules()], trained)
            if problems:
                raise ValueError("the run cannot start:\n- " + "\n- ".join(problems))
            trainer.add_callback(LogForwarder())
            if save_delay:
                trainer.add_callback(SaveDelay())
            # packing needs our per-source accounting (the per-channel loss); GKD keeps swift's rows
            packed = AnswerRows(trainer) if at_labels and not gkd and arguments.get("enable_channel_loss") else None
            if arguments.get("enable_channel_loss"):
                count_source_accuracy(trainer, packed)
            if gkd:
                distill.use_cached_batches(trainer, int(arguments.get("max_completion_length", 512)))
                distill.use_gkd_loss(trainer, gkd, float(arguments["sft_alpha"]))
            if isinstance(self.train_set, EpochCaches):
                trainer.add_callback(EpochSwitch(self.train_set))
            _pause_point_inside_saves(trainer)
            if resume:  # its step-0 eval is in the checkpoint's history already (args.json keeps the recipe's value)
                trainer.args.eval_on_start = False
            return super().train(trainer)

    torch.manual_seed(int(arguments["seed"]))
    result = CachedTraining(swift_args).main()
    return [entry for entry in result["log_history"] if "train_runtime" not in entry]


def gkd_options(recipe: dict) -> distill.GkdOptions | None:
    """Pop our GKD keys from a recipe (changed in place); None unless it sets rlhf_type: gkd."""
    kind = recipe.get("rlhf_type")
    ours = {key: recipe.pop(key) for key in ("llm_kd_weight", "visual_kd") if key in recipe}
    if kind is None:
        if ours:
            raise ValueError(f"the recipe sets {', '.join(sorted(ours))} without rlhf_type: gkd; add it, or remove them")
        return None
    if kind != "gkd":
        raise ValueError(f"rlhf_type: {kind} cannot train from the token cache; train_model runs rlhf_type: gkd "
                         "(GRPO runs in the post_train_grpo rule)")
    if recipe.get("seq_kd"):
        raise ValueError("seq_kd: true (the teacher writes the answers) is not implemented by ms-swift 4.6; "
                         "use lmbda > 0 for on-policy distillation instead")
    return options_from(distill.GkdOptions, ours, "recipe")


def check_before_loading(model_dir: str, arguments: dict, refs: list[CacheRef], budget: PixelBudget) -> None:
    """The pre-flight checks that need no model (preflight.py); all problems at once, each saying what to do."""
    from tokenizers import Tokenizer

    tables = {str(ref.pointer): ref.table() for ref in refs}
    problems = preflight.base_files(model_dir) + preflight.lengths(arguments.get("max_length"), tables)
    if not problems:
        tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        grids = budget.grids(model_dir)
        problems += preflight.vision_tokens(tables, tokenizer.token_to_id("<|vision_start|>"),
                                            tokenizer.token_to_id("<|image_pad|>"), grids.merge)
        problems += preflight.grids_now(tables, grids)
    if problems:
        raise ValueError("the run cannot start:\n- " + "\n- ".join(problems))


def _pause_point_inside_saves(trainer) -> None:
    """Offer the test-only pause point `train:checkpoint-N` inside each save: weights written, the rest not yet."""
    save_rest = trainer._save_optimizer_and_scheduler

    def paused(output_dir):
        pause_point(f"train:checkpoint-{trainer.state.global_step}")
        return save_rest(output_dir)

    trainer._save_optimizer_and_scheduler = paused


def summarize(history: list[dict], last: Path) -> dict:
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    summary = {"checkpoint": str(last), "steps": max([s for s, _ in losses + evals], default=0)}
    if losses:
        summary.update(first_loss=losses[0][1], last_loss=losses[-1][1])
    if evals:
        summary.update(first_eval_loss=evals[0][1], last_eval_loss=evals[-1][1],
                       eval_loss_drop=1 - evals[-1][1] / evals[0][1] if evals[0][1] else None)  # 0 when every term weighs 0
    return summary
