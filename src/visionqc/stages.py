"""The stage table: every `visionqc <command>` a rule runs, declared once.

An entry names the stage's command, its rule(s), the config block its options class reads, its
inputs, outputs and settings (each a CLI flag named like the rule's input, output or param), the
resources a job of it needs on a cluster, and the glue that calls the stage function. From the table
come the CLI (`visionqc.cli`), the options JSON the rules pass (`rules/common.smk`), both profiles'
threads and resources (`workflow/scripts/profiles.py`), `visionqc where` and the seam tests.

Adding a stage: write `visionqc/<stage>.py` (a function that writes every output), `rules/<stage>.smk`
(paths, one shell line whose flags are the table's names) and one `Stage(...)` below.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one job of the stage needs on a cluster node; `runtime` (minutes) grows with each retry."""

    gpu: bool = False
    threads: int = 1
    mem_mb: int = 4000
    runtime: int = 30


CPU = Resources()


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # MLflow stage name
    command: str  # `visionqc <command>`
    rules: tuple[str, ...]  # the Snakemake rules that run it
    about: str  # the command's help
    call: Callable  # glue: (parsed arguments, options, MLflow run) -> StageResult
    inputs: dict = dataclasses.field(default_factory=dict)  # flag name -> help, or (help, argparse keywords)
    outputs: dict = dataclasses.field(default_factory=dict)
    settings: dict = dataclasses.field(default_factory=dict)  # flags that are neither inputs nor outputs
    section: str | None = None  # config block passed as --options ("a.b" for a nested block); None: no --options
    options: str | None = None  # "module:Class" that reads the block
    wiring: tuple[str, ...] = ()  # keys of the block that only wire the DAG (not passed)
    extra: tuple[str, ...] = ()  # keys of other blocks passed with it ("model.template")
    recipe: bool = False  # options come from --recipe (ms-swift YAML) instead of --options
    logged: tuple[str, ...] = ()  # flags logged as MLflow params besides the options
    resources: Resources = CPU
    tracked: bool = True  # an MLflow run per job
    local: bool = False  # seconds of work: runs on the submit host under Slurm
    distributed: bool = False  # torchrun may launch it with one process per GPU
    results: str | None = None  # its folder under results/ (visionqc where)

    def flags(self) -> dict[str, dict]:
        """Every flag: name -> argparse keywords (help, required or default, …)."""
        out = {}
        for name, spec in {**self.inputs, **self.outputs, **self.settings}.items():
            text, keywords = (spec, {}) if isinstance(spec, str) else spec
            keywords = {"help": text, **keywords}
            if "default" not in keywords:
                keywords["required"] = True
            out[name] = keywords
        return out

    def read_options(self, arguments) -> dict:
        if self.recipe:
            import yaml

            return yaml.safe_load(Path(arguments.recipe).read_text())
        if self.section is None:
            return {}
        try:
            options = json.loads(arguments.options)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--options is not valid JSON ({exc}): {arguments.options[:200]}") from exc
        if not isinstance(options, dict):
            raise ValueError(f"--options must be a JSON object, got {arguments.options[:200]}")
        return options

    def block(self, config: dict) -> dict:
        """The options a rule passes: the config block without its wiring keys, plus the keys it borrows."""
        block = config
        for part in self.section.split("."):
            block = block[part]
        options = {key: value for key, value in block.items() if key not in self.wiring}
        for dotted in self.extra:
            section, _, key = dotted.rpartition(".")
            options[key] = config[section][key] if section else config[key]
        return options


DEVICE = ("auto: the GPU when one is visible", {"default": "auto", "choices": ["auto", "cpu", "cuda"]})
TRAINED_ON = "pointer of the cache the model trained on (prompt text, pixel budget)"


def _import(dotted: str):
    module, _, attribute = dotted.partition(":")
    return getattr(__import__(module, fromlist=[attribute]), attribute)


def _needs_xtuner() -> None:
    from visionqc.timeseries import require_xtuner

    require_xtuner()


# The glue: one short function per stage, from parsed flags to the stage function's call.


def _demo_data(a, options, run):
    from visionqc.demo.exports import DemoExports, generate

    exports = DemoExports(a.platform, a.labelme, a.coco, a.coco_images, a.labelme_coco, a.groups, a.verdicts, a.label_errors,
                          a.formats)
    generate(exports, **options)
    print(f"demo exports written: {exports}")


def _demo_signals(a, options, run):
    from visionqc.demo.signals import write_signals

    write_signals(a.manifest, a.traces, **options)
    print(f"demo traces written to {a.traces}, listed in {a.manifest}")


def _demo_model(a, options, run):
    from visionqc.demo.model import build_demo_model

    options = dict(options)
    print(json.dumps(build_demo_model(a.out_dir, seed=options.pop("seed", 0), sizes=options), indent=1))


def _demo_ts_models(a, options, run):
    _needs_xtuner()
    from visionqc.demo.ts_models import build_demo_ts_models

    print(json.dumps(build_demo_ts_models(a.out_dir, **options), indent=1, ensure_ascii=False))


def _convert(a, options, run):
    from visionqc.convert import convert
    from visionqc.convert.common import ConvertOutputs

    outputs = ConvertOutputs(a.train, a.val, a.report, a.media, a.overlays or None, a.examples or None)
    return convert(a.format, a.source, outputs, options)


def _validate(a, options, run):
    from visionqc.validate import validate

    return validate(a.source, a.clean, a.rejects, a.report, options)


def _fuse(a, options, run):
    from visionqc.fuse import fuse

    inputs = dict(item.split("=", 1) for item in a.inputs)
    return fuse(options, inputs, a.records, a.report, eval_split=a.split != "train")


def _augment(a, options, run):
    from visionqc.augment import augment_epoch

    return augment_epoch(a.records, a.augmented, a.images, a.report, a.preview, options, a.epoch, workers=a.threads)


def _cache(a, options, run):
    from visionqc.cache import build_cache

    return build_cache(a.records, a.model, a.cache_root, a.pointer, a.lengths_plot, options)


def _train(a, recipe, run):
    from visionqc.train import train

    return train(a.base, a.train_cache, a.val_cache or None, recipe, model_out=a.model, summary_out=a.summary,
                 loss_plot=a.loss_plot, recipe_out=a.recipe_out, history_out=a.history, checkpoints=a.checkpoints,
                 device=a.device, teacher=a.teacher or None, select=a.select, select_metric=a.select_metric, on_log=run.metrics)


def _post_train(a, recipe, run):
    from visionqc.post_train import post_train_grpo

    return post_train_grpo(a.base, a.records, a.cache, recipe, model_out=a.model, summary_out=a.summary, history_out=a.history,
                           completions_out=a.completions, rewards_plot=a.rewards_plot, checkpoints=a.checkpoints,
                           device=a.device, on_log=run.metrics)


def _merge(a, options, run):
    from visionqc.merge import merge

    return merge(a.base, a.trained, a.val_cache, model_out=a.model, verification_out=a.verification, options=options)


def _stage_a(a, options, run):
    from visionqc.launch import launched_rank, wait_for_all_ranks
    from visionqc.stage_a import run_stage_a

    local, processes = launched_rank()  # torchrun's ranks inside this job, which is shard a.rank of a.world
    torchrun = processes > 1
    return run_stage_a(a.root, a.mission, a.model, a.cache, summaries_out=a.summaries or None, report_out=a.report,
                       chunks_dir=a.chunks, truth=a.truth or None, options=options, device=a.device,
                       rank=a.rank * processes + local, world=a.world * processes,
                       barrier=wait_for_all_ranks if torchrun else None, reporter=local == 0, log_metrics=run.metrics)


def _stage_b(a, options, run):
    from visionqc.stage_b import run_stage_b

    return run_stage_b(a.summaries, a.guidance, a.model, verdicts_out=a.verdicts, metrics_out=a.metrics,
                       confusion_out=a.confusion, options=options, device=a.device)


def _verdict_report(a, options, run):
    from visionqc.verdict_report import run_verdict_report

    return run_verdict_report(a.summaries, a.verdicts, a.root, mission=a.name or Path(a.page).stem, page_out=a.page, table_out=a.table,
                              thumbnails_out=a.thumbnails)


def _eval_dense(a, options, run):
    from visionqc.eval_dense import run_eval_dense

    return run_eval_dense(a.model, a.records, a.cache, metrics_out=a.metrics, predictions_out=a.predictions,
                          overlays_out=a.overlays, options=options, device=a.device)


def _qa_labels(a, options, run):
    from visionqc.qa_labels import run_qa_labels

    return run_qa_labels(a.model, {"train": a.train, "val": a.val}, a.cache, suspects_out=a.suspects, report_out=a.report,
                         gallery_out=a.gallery, truth=a.truth or None, options=options, device=a.device)


def _cache_ts(a, options, run):
    _needs_xtuner()
    from visionqc.timeseries.cache import build_ts_cache

    return build_ts_cache(a.records, a.base, a.cache_root, a.pointer, options)


def _train_ts(a, options, run):
    _needs_xtuner()
    from visionqc.timeseries.train import train_ts

    def on_step(entry):
        run.metrics({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    return train_ts(a.base, a.train_cache, a.val_cache or None, a.train_records, model_out=a.model, summary_out=a.summary,
                    trainer_config_out=a.trainer_config, loss_plot=a.loss_plot, history_out=a.history, work_dir=a.work_dir,
                    options=options, on_step=on_step)


def _eval_ts(a, options, run):
    _needs_xtuner()
    from visionqc.timeseries.evaluate import evaluate_ts

    return evaluate_ts(a.model, a.val_cache, a.train_cache, metrics_out=a.metrics, predictions_out=a.predictions,
                       confusion_out=a.confusion, examples=a.examples or None, options=options)


def _ts_backend(options: dict) -> dict:
    """train_ts logs the backend that runs, not `auto`."""
    from visionqc.timeseries.train import choose_backend

    return {"backend": choose_backend(options.get("backend", "auto"))}


STAGES = (
    Stage("demo_data", "demo-data", ("generate_demo_data",), "write the seeded demo exports", _demo_data,
          outputs={name: "folder or file of that export" for name in
                   ("platform", "labelme", "coco", "coco_images", "labelme_coco", "groups", "verdicts", "label_errors")},
          settings={"formats": "folder of the exchange-format exports (<format>/ each)"},
          section="demo", wiring=("signals",), tracked=False, local=True),
    Stage("demo_signals", "demo-signals", ("generate_demo_signals",), "write the seeded demo sensor traces and their manifest",
          _demo_signals, outputs={"manifest": "CSV of the traces and their labels", "traces": "folder of the trace files"},
          section="demo", tracked=False, local=True),
    Stage("demo_model", "build-demo-model", ("build_demo_model",), "write the seeded tiny Qwen3-VL with the real Qwen tokenizer",
          _demo_model, outputs={"out_dir": "model folder"}, section="model.demo", tracked=False, local=True),
    Stage("demo_ts_models", "build-demo-ts-models", ("build_demo_ts_models",),
          "write the seeded tiny time-series encoder + Qwen3 LLM", _demo_ts_models, outputs={"out_dir": "model folder"},
          section="timeseries.demo", extra=("timeseries.channels", "timeseries.target_rate"), tracked=False, local=True),
    Stage("convert", "convert", ("convert_dataset", "convert_signals"), "annotation export → contract JSONL (train/val) + QA report",
          _convert, inputs={"source": "export folder (platform, labelme), instances JSON (coco), records (jsonl) or manifest (signals)"},
          outputs={"train": "JSONL", "val": "JSONL", "report": "JSON of counts and what was not converted",
                   "media": "folder for the converted images (or copied signals)",
                   "overlays": ("folder for annotation-overlay PNGs (image exports, jsonl)", {"default": ""}),
                   "examples": ("PNG of example traces per label (signals)", {"default": ""})},
          settings={"format": ("the export's format", {"choices": ["platform", "labelme", "coco", "cvat", "label_studio", "yolo",
                                                                   "voc", "jsonl", "signals"]})},
          section="convert", options="visionqc.convert.common:ConvertOptions", extra=("taxonomy",), logged=("format",),
          results="convert"),
    Stage("validate", "validate", ("validate_records",), "contract JSONL → clean + rejects + report", _validate,
          inputs={"source": "contract JSONL"},
          outputs={"clean": "JSONL of the records that pass", "rejects": "JSONL of the others, with file:line and reasons",
                   "report": "JSON of counts"},
          section="validate", options="visionqc.validate:ValidateOptions", extra=("taxonomy",), results="validate"),
    Stage("fuse", "fuse", ("fuse_datasets",), "mix datasets by ratios into one tagged JSONL", _fuse,
          outputs={"records": "fused JSONL", "report": "JSON of counts per dataset"},
          settings={"inputs": ("NAME=PATH of each dataset's clean split", {"nargs": "+"}),
                    "split": ("train mixes by ratios; val takes targets only, each record once", {"choices": ["train", "val"]})},
          section="fusion", options="visionqc.fuse:FusionOptions", wiring=("name",), logged=("split",), results="fuse"),
    Stage("augment", "augment", ("augment_records",), "one epoch of geometry-aware augmentation of a fused train split",
          _augment, inputs={"records": "fused JSONL of the train split"},
          outputs={"augmented": "JSONL of the epoch", "images": "folder of the images it writes", "report": "JSON of counts",
                   "preview": "PNG of records before and after"},
          settings={"epoch": ("which epoch (seeds its variants)", {"type": int}),
                    "threads": ("images augmented in parallel", {"type": int, "default": 1})},
          section="augment", options="visionqc.augment:AugmentOptions", wiring=("epochs",), logged=("epoch",),
          resources=Resources(threads=8), results="augment"),
    Stage("cache", "cache", ("cache_tokens",), "fused JSONL → tokenized Arrow cache keyed by content", _cache,
          inputs={"records": "fused (or augmented) JSONL", "model": "model folder whose tokenizer/processor encode the records"},
          outputs={"pointer": "JSON file that names the cache folder", "lengths_plot": ("token-length histogram PNG", {"default": ""})},
          settings={"cache_root": "the content-keyed store; the cache is <cache-root>/<key>/"},
          section="cache", options="visionqc.cache:CacheOptions",
          extra=("model.model_type", "model.template", "model.image_max_tokens", "model.image_min_tokens", "prompts",
                 "taxonomy"),
          resources=Resources(threads=4, mem_mb=16000, runtime=60), results="cache"),
    Stage("train", "train", ("train_model",), "ms-swift SFT (or GKD) from the Arrow cache", _train,
          inputs={"base": "base model folder",
                  "train_cache": ("cache pointer JSON of the train split, or one per augmented epoch, in epoch order", {"nargs": "+"}),
                  "val_cache": ("cache pointer JSON of the val split", {"default": ""}),
                  "recipe": "YAML of ms-swift arguments",
                  "teacher": ("teacher model folder of a rlhf_type: gkd recipe (default: the base)", {"default": ""})},
          outputs={"model": "folder", "summary": "JSON", "loss_plot": "PNG", "recipe_out": "JSON of the resolved arguments",
                   "history": "JSON of swift's log history"},
          settings={"checkpoints": "work folder kept for resuming", "device": DEVICE,
                    "select": ("which checkpoint becomes the model: the last, or the best by --select-metric",
                               {"default": "last", "choices": ["last", "best"]}),
                    "select_metric": ("eval metric that ranks checkpoints for --select best (lower is better for a loss)",
                                      {"default": "eval_loss"})},
          recipe=True, logged=("recipe", "base", "device", "teacher", "select", "select_metric"),
          resources=Resources(gpu=True, threads=16, mem_mb=64000, runtime=480), distributed=True, results="train"),
    Stage("post_train", "post-train", ("post_train_grpo",), "GRPO from a run's merged model, rewarded by visionqc.rewards",
          _post_train, inputs={"base": "the supervised run's merged model folder",
                               "records": "fused JSONL of the train split: its summaries and verdicts become prompts",
                               "cache": "the train split's cache pointer (prompts, message options, pixel budget)",
                               "recipe": "YAML of ms-swift RLHFArguments (rlhf_type grpo, reward_funcs)"},
          outputs={"model": "folder", "summary": "JSON", "history": "JSON of swift's log history",
                   "completions": "JSONL of sampled completions and their rewards", "rewards_plot": "PNG"},
          settings={"checkpoints": "work folder kept for resuming", "device": DEVICE},
          recipe=True, logged=("recipe", "base", "device"),
          resources=Resources(gpu=True, threads=16, mem_mb=64000, runtime=480), distributed=True, results="post_train"),
    Stage("merge", "merge", ("merge_adapter",), "merge an adapter into its base and verify the logits", _merge,
          inputs={"base": "base model folder", "trained": "adapter (or full weights) folder from train",
                  "val_cache": "cache pointer JSON whose samples are compared"},
          outputs={"model": "merged model folder to write", "verification": "JSON of the logit comparison"},
          section="merge", options="visionqc.merge:MergeOptions", logged=("base", "trained"),
          resources=Resources(threads=4, mem_mb=64000, runtime=60), results="merge"),
    Stage("stage_a", "stage-a", ("summarize_images", "summarize_shard"), "per-image summaries for photo groups (chunked, resumable)", _stage_a,
          inputs={"root": "folder holding <mission>/<group_id>/ (new) and <mission>/{审核通过,审核不通过}/<group_id>/ (reviewed)",
                  "model": "merged model folder",
                  "cache": TRAINED_ON},
          outputs={"summaries": ("JSONL of per-image summaries (without it, this call only generates its shard's chunks)",
                                 {"default": ""}),
                   "report": "JSON of the summary contract's checks (of this shard's work, for a shard)"},
          settings={"mission": "the mission folder under --root", "chunks": "work folder of resumable chunk files",
                    "truth": ("JSONL with known per-image summaries (exact match)", {"default": ""}), "device": DEVICE,
                    "rank": ("this process's rank, or this job's shard (chunk i belongs to rank i %% world)",
                             {"type": int, "default": 0}),
                    "world": ("number of processes (or shard jobs) sharing the chunks", {"type": int, "default": 1})},
          section="stage_a", options="visionqc.stage_a:StageAOptions", wiring=("root", "missions", "run", "truth", "shards"),
          logged=("mission", "model", "device"), resources=Resources(gpu=True, threads=8, mem_mb=32000, runtime=120),
          distributed=True, results="stage_a"),
    Stage("stage_b", "stage-b", ("judge_groups",), "two-line group verdicts from Stage-A summaries", _stage_b,
          inputs={"summaries": "Stage-A JSONL", "guidance": "mission guidance text file", "model": "merged model folder"},
          outputs={"verdicts": "JSONL of verdicts", "metrics": "JSON of label match", "confusion": "confusion-matrix PNG"},
          settings={"device": DEVICE},
          section="stage_b", options="visionqc.stage_b:StageBOptions", wiring=("guidance",), logged=("guidance", "model", "device"),
          resources=Resources(gpu=True, threads=8, mem_mb=32000, runtime=60), results="stage_b"),
    Stage("verdict_report", "verdict-report", ("report_verdicts",),
          "a mission's verdicts as a static HTML page (thumbnails, summaries, verdicts; failed first) and a CSV",
          _verdict_report, inputs={"summaries": "Stage-A JSONL", "verdicts": "Stage-B JSONL",
                                   "root": "the photo-group folder the summaries' image paths are relative to"},
          outputs={"page": "HTML page", "table": "CSV, one row per group", "thumbnails": "folder of the page's thumbnails"},
          results="report"),
    Stage("eval_dense", "eval-dense", ("evaluate_dense",),
          "detection quality of dense answers on held-out records (COCOeval, P/R/F1)", _eval_dense,
          inputs={"model": "merged model folder", "records": "held-out contract JSONL (the fusion's val split)",
                  "cache": TRAINED_ON},
          outputs={"metrics": "JSON", "predictions": "JSONL: per record its raw answer, parsed objects and matches",
                   "overlays": "folder of truth-against-prediction PNGs"},
          settings={"device": DEVICE},
          section="eval_dense", options="visionqc.eval_dense:EvalDenseOptions", wiring=("runs",),
          logged=("model", "records", "device"), resources=Resources(gpu=True, threads=8, mem_mb=32000, runtime=60),
          results="eval_dense"),
    Stage("qa_labels", "qa-labels", ("find_label_suspects",),
          "rank the records whose annotation the model disputes (label QA)", _qa_labels,
          inputs={"model": "merged model folder", "train": "the dataset's clean train JSONL",
                  "val": "the dataset's clean val JSONL", "cache": TRAINED_ON,
                  "truth": ("JSONL of known label errors (source_file); evaluation only", {"default": ""})},
          outputs={"suspects": "JSONL of the suspects, ranked", "report": "JSON", "gallery": "folder of PNGs of the top suspects"},
          settings={"device": DEVICE},
          section="qa_labels", options="visionqc.qa_labels:QaLabelsOptions", wiring=("datasets", "truth"),
          logged=("model", "device"), resources=Resources(gpu=True, threads=8, mem_mb=32000, runtime=120), results="qa"),
    Stage("cache_ts", "cache-ts", ("cache_ts",), "time-series JSONL → tokenized Arrow cache (XTuner tokenize function)",
          _cache_ts, inputs={"records": "clean JSONL of a split", "base": "base model folder (encoder/, llm/, timeseries.json)"},
          outputs={"pointer": "JSON file that names the cache folder"},
          settings={"cache_root": "the content-keyed store; the cache is <cache-root>/<key>/"},
          section="timeseries", options="visionqc.timeseries.cache:TimeSeriesCacheOptions",
          wiring=("dataset", "base", "demo", "train", "eval"), results="cache_ts"),
    Stage("train_ts", "train-ts", ("train_ts",), "train the time-series model (XTuner trainer on GPU, else a CPU loop)",
          _train_ts, inputs={"base": "base model folder", "train_cache": "cache pointer of the train split",
                             "val_cache": ("cache pointer of the val split", {"default": ""}),
                             "train_records": "the clean JSONL the cache came from (XTuner tokenizes it itself)"},
          outputs={"model": "folder", "summary": "JSON", "trainer_config": "XTuner's trainer config (.py)", "loss_plot": "PNG",
                   "history": "JSONL of logged steps"},
          settings={"work_dir": "resumable state: checkpoints/ (CPU loop), xtuner/ (XTuner's work_dir)"},
          section="timeseries.train", options="visionqc.timeseries.train:TimeSeriesTrainOptions", logged=("base",),
          resources=Resources(gpu=True, threads=16, mem_mb=64000, runtime=240), results="train_ts"),
    Stage("eval_ts", "eval-ts", ("eval_ts",), "rank candidate answers of held-out traces by log-likelihood", _eval_ts,
          inputs={"model": "trained model folder", "val_cache": "cache pointer of the held-out split",
                  "train_cache": "cache pointer of the train split: its answers are the candidates",
                  "examples": ("a PNG of example traces to attach (convert's examples plot)", {"default": ""})},
          outputs={"metrics": "JSON", "predictions": "JSONL", "confusion": "confusion-matrix PNG"},
          section="timeseries.eval", options="visionqc.timeseries.evaluate:TimeSeriesEvalOptions", logged=("model",),
          results="eval_ts"),
)

BY_NAME = {stage.name: stage for stage in STAGES}
# extra MLflow params a stage computes from its options
EXTRA_PARAMS = {"train_ts": _ts_backend}


def options_class(stage: Stage):
    return _import(stage.options) if stage.options else None
