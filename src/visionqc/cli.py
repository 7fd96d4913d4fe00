"""`visionqc <stage> ...`: parse arguments, call one stage function, track it in MLflow."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from visionqc.faults import fail_once
from visionqc.io import disk_full_message


def _offline_environment() -> None:
    """Offline hubs, and tool caches inside the work dir instead of under ~."""
    cache = Path(os.environ.get("VISIONQC_CACHE", ".cache")).absolute()
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "USE_HF": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HOME": str(cache / "huggingface"),
        "MODELSCOPE_CACHE": str(cache / "modelscope"),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
        "TIKTOKEN_CACHE_DIR": str(cache / "tiktoken"),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_KEEP_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Let glibc keep big freed blocks in the heap instead of unmapping them at once.

    torch frees and reallocates the same tens-of-MB tensors (LM-head gradients, optimizer steps) every step; by
    default glibc returns each to the kernel and page-faults it back next step. On the demo's CPU training that was a
    third of all CPU time (README, "Performance"). VISIONQC_KEEP_FREED_MEMORY=0 restores glibc's defaults.
    """
    if os.environ.get("VISIONQC_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, _HEAP_KEEP_BYTES))


def _tracking(args, rank: int = 0):
    """The stage's MLflow settings; ranks other than 0 of a torchrun job do not track."""
    from visionqc.tracking import TrackingSettings

    home = Path(os.environ.get("VISIONQC_TRACKING_HOME", "results/mlflow"))
    return TrackingSettings((args.tracking_uri or None) if rank == 0 else None, args.experiment, home)


def _add_tracking(parser: argparse.ArgumentParser) -> None:
    # The workflow sets these variables (common.smk), so tracking settings never enter a rule's params.
    uri = os.environ.get("VISIONQC_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI", ""))
    experiment = os.environ.get("VISIONQC_EXPERIMENT", os.environ.get("MLFLOW_EXPERIMENT_NAME", "visionqc"))
    parser.add_argument("--tracking-uri", default=uri, help="MLflow URI (default $VISIONQC_TRACKING_URI); empty disables tracking")
    parser.add_argument("--experiment", default=experiment, help="default $VISIONQC_EXPERIMENT, else visionqc")
    parser.add_argument("--run-name", default=None, help="MLflow run name (default: stage:name)")


def _tracked(args, stage: str, params: dict, call, rank: int = 0) -> None:
    """Open the stage's MLflow run, call the stage (given the run, for per-step metrics), log and print its result."""
    from visionqc.tracking import stage_run

    with stage_run(_tracking(args, rank), stage, args.run_name or f"{stage}:{args.name}", params) as run:
        result = call(run)
        if result is None:  # a torchrun rank other than 0: rank 0 reports
            return
        run.record(result)
    print(json.dumps(result.report, ensure_ascii=False, indent=1, default=str))


def _options(args) -> dict:
    """The stage's config block, passed by its rule as JSON."""
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--options is not valid JSON ({exc}): {args.options[:200]}") from exc
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object, got {args.options[:200]}")
    return options


def cmd_demo_data(args) -> None:
    from visionqc.demo.scenes import DemoExports, generate

    exports = DemoExports(args.platform, args.labelme, args.coco, args.coco_images, args.labelme_coco, args.groups, args.verdicts,
                          args.label_errors, args.formats)
    generate(exports, **_options(args))
    print(f"demo exports written: {exports}")


def cmd_demo_signals(args) -> None:
    from visionqc.demo.signals import write_signals

    write_signals(args.manifest, args.traces, **_options(args))
    print(f"demo traces written to {args.traces}, listed in {args.manifest}")


def cmd_convert(args) -> None:
    from visionqc.convert import convert
    from visionqc.convert.common import ConvertOutputs

    outputs = ConvertOutputs(args.train, args.val, args.report, args.media, args.overlays or None, args.examples or None)
    options = _options(args)
    _tracked(args, "convert", {"format": args.format, **options}, lambda run: convert(args.format, args.source, outputs, options))


def cmd_validate(args) -> None:
    from visionqc.validate import validate

    options = _options(args)
    _tracked(args, "validate", options, lambda run: validate(args.source, args.clean, args.rejects, args.report, options))


def cmd_fuse(args) -> None:
    from visionqc.fuse import fuse

    inputs = dict(item.split("=", 1) for item in args.input)
    options = _options(args)
    _tracked(args, "fuse", options | {"eval_split": args.eval_split},
             lambda run: fuse(options, inputs, args.out, args.report, eval_split=args.eval_split))


def cmd_augment(args) -> None:
    from visionqc.augment import augment_epoch

    options = _options(args)
    _tracked(args, "augment", options | {"epoch": args.epoch}, lambda run: augment_epoch(
        args.records, args.out, args.images, args.report, args.preview, options, args.epoch, workers=args.threads))


def cmd_build_demo_model(args) -> None:
    from visionqc.demo.model import build_demo_model

    options = _options(args)
    facts = build_demo_model(args.out_dir, seed=options.pop("seed", 0), sizes=options)
    print(json.dumps(facts, indent=1))


def cmd_cache(args) -> None:
    from visionqc.cache import build_cache

    options = _options(args)
    _tracked(args, "cache", options,
             lambda run: build_cache(args.records, args.model, args.cache_root, args.pointer, args.lengths_plot, options))


def cmd_train(args) -> None:
    import yaml

    from visionqc.launch import launched_rank
    from visionqc.train import train

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    params = {"recipe_file": args.recipe, "base": args.base, "device": args.device, **recipe}
    if args.teacher:
        params["teacher"] = args.teacher
    _tracked(args, "train", params, lambda run: train(
        args.base, args.train_cache, args.val_cache or None, recipe, model_out=args.model, summary_out=args.summary,
        loss_plot=args.loss_plot, recipe_out=args.recipe_out, history_out=args.history, checkpoints=args.checkpoints,
        device=args.device, teacher=args.teacher or None, on_log=run.metrics), rank=launched_rank()[0])


def cmd_build_demo_ts_models(args) -> None:
    from visionqc.timeseries import require_xtuner

    require_xtuner()
    from visionqc.demo.ts_models import build_demo_ts_models

    facts = build_demo_ts_models(args.out_dir, **_options(args))
    print(json.dumps(facts, indent=1, ensure_ascii=False))


def cmd_cache_ts(args) -> None:
    from visionqc.timeseries import require_xtuner

    require_xtuner()
    from visionqc.timeseries.cache import build_ts_cache

    options = _options(args)
    _tracked(args, "cache_ts", options, lambda run: build_ts_cache(args.records, args.base, args.cache_root, args.pointer, options))


def cmd_train_ts(args) -> None:
    from visionqc.timeseries import require_xtuner

    require_xtuner()
    from visionqc.timeseries.train import choose_backend, train_ts

    def on_step(run):
        return lambda entry: run.metrics({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    options = _options(args)
    params = {"base": args.base, **options, "backend": choose_backend(options.get("backend", "auto"))}  # the backend that runs
    _tracked(args, "train_ts", params, lambda run: train_ts(
        args.base, args.train_cache, args.val_cache or None, args.train_records, model_out=args.model,
        summary_out=args.summary, trainer_config_out=args.trainer_config, loss_plot=args.loss_plot, history_out=args.history,
        work_dir=args.work_dir, options=options, on_step=on_step(run)))


def cmd_eval_ts(args) -> None:
    from visionqc.timeseries import require_xtuner

    require_xtuner()
    from visionqc.timeseries.evaluate import evaluate_ts

    options = _options(args)
    _tracked(args, "eval_ts", {"model": args.model, **options}, lambda run: evaluate_ts(
        args.model, args.val_cache, args.train_cache, metrics_out=args.metrics, predictions_out=args.predictions,
        confusion_out=args.confusion, examples=args.examples or None, options=options))


def cmd_post_train(args) -> None:
    import yaml

    from visionqc.launch import launched_rank
    from visionqc.post_train import post_train_grpo

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    params = {"recipe_file": args.recipe, "base": args.base, "device": args.device, **recipe}
    _tracked(args, "post_train", params, lambda run: post_train_grpo(
        args.base, args.records, args.cache, recipe, model_out=args.model, summary_out=args.summary, history_out=args.history,
        completions_out=args.completions, rewards_plot=args.rewards_plot, checkpoints=args.checkpoints, device=args.device,
        on_log=run.metrics), rank=launched_rank()[0])


def cmd_merge(args) -> None:
    from visionqc.merge import merge

    options = _options(args)
    _tracked(args, "merge", {"base": args.base, "trained": args.trained, **options}, lambda run: merge(
        args.base, args.trained, args.val_cache, model_out=args.model, verification_out=args.verification, options=options))


def cmd_stage_a(args) -> None:
    from visionqc.launch import launched_rank, wait_for_all_ranks
    from visionqc.stage_a import run_stage_a

    rank, world = launched_rank()
    torchrun = world > 1
    if not torchrun:
        rank, world = args.rank, args.world
    args.name = args.name or args.mission
    options = _options(args)
    params = {"mission": args.mission, "model": args.model, "rank": rank, "world": world, "device": args.device, **options}
    _tracked(args, "stage_a", params, lambda run: run_stage_a(
        args.root, args.mission, args.model, args.cache, summaries_out=args.out, report_out=args.report,
        chunks_dir=args.chunks_dir, truth=args.truth or None, options=options, device=args.device, rank=rank, world=world,
        barrier=wait_for_all_ranks if torchrun else None, log_metrics=run.metrics), rank=rank if torchrun else 0)


def cmd_stage_b(args) -> None:
    from visionqc.stage_b import run_stage_b

    options = _options(args)
    _tracked(args, "stage_b", {"guidance": args.guidance, "model": args.model, "device": args.device, **options},
             lambda run: run_stage_b(args.summaries, args.guidance, args.model, verdicts_out=args.out, metrics_out=args.metrics,
                                     confusion_out=args.confusion, options=options, device=args.device))


def cmd_eval_dense(args) -> None:
    from visionqc.eval_dense import run_eval_dense

    options = _options(args)
    _tracked(args, "eval_dense", {"model": args.model, "records": args.records, "device": args.device, **options},
             lambda run: run_eval_dense(args.model, args.records, args.cache, metrics_out=args.metrics,
                                        predictions_out=args.predictions, overlays_out=args.overlays, options=options,
                                        device=args.device))


def cmd_qa_labels(args) -> None:
    from visionqc.qa_labels import run_qa_labels

    options = _options(args)
    splits = {"train": args.train, "val": args.val}
    _tracked(args, "qa_labels", {"model": args.model, "device": args.device, **options},
             lambda run: run_qa_labels(args.model, splits, args.cache, suspects_out=args.suspects, report_out=args.report,
                                       gallery_out=args.gallery, truth=args.truth or None, options=options, device=args.device))


def cmd_pipeline(args) -> None:
    from visionqc.tracking import end_pipeline, start_pipeline, ui_command

    settings = _tracking(args)
    if args.action == "start":
        config = json.loads(Path(args.config).read_text()) if args.config else {}
        run_id = start_pipeline(settings, args.run_name or "pipeline", config)
        if settings.uri:
            print(f"pipeline run {run_id}" if run_id else "pipeline run spooled (the MLflow store did not answer)")
    else:
        end_pipeline(settings, "FINISHED" if args.action == "success" else "FAILED")
        if settings.uri:
            print(f"View the runs with: {ui_command(settings)}")


def cmd_tracking_sync(args) -> None:
    from visionqc.tracking import sync_spool

    settings = _tracking(args)
    if not settings.uri:
        raise ValueError("no tracking URI: pass --tracking-uri or set VISIONQC_TRACKING_URI")
    try:
        counts = sync_spool(settings)
    except Exception as exc:  # the store still does not answer: the spool stays for the next try
        raise RuntimeError(f"MLflow store {settings.uri} did not answer ({type(exc).__name__}: {str(exc)[:200]}); "
                           f"the spool in {settings.spool}/ is kept; run tracking-sync again once the store is up") from exc
    print(f"{counts['replayed']} spooled run(s) logged to {settings.uri}, {counts['already_there']} already there; "
          f"{settings.spool}/ is empty")


def cmd_where(args) -> None:
    results = Path(args.results)
    print("Results:")
    for stage in ("convert", "validate", "fuse", "augment", "cache", "train", "post_train", "merge", "stage_a", "stage_b",
                  "eval_dense", "qa", "cache_ts", "train_ts", "eval_ts"):
        if (results / stage).exists():
            print(f"  {stage:10s} {results / stage}/")
    for report in sorted((results / "stage_a").glob("*.report.json")):
        values = json.loads(report.read_text())
        if "valid_rate" in values:
            exact = f", exact match {values['exact_match']:.2f}" if values.get("exact_match") is not None else ""
            print(f"Summaries: {report.with_name(report.name.replace('.report.json', '.jsonl'))}  "
                  f"valid {values['valid_rate']:.2f} ({values['images']} images){exact}")
    for metrics in sorted((results / "stage_b").glob("*.metrics.json")):
        values = json.loads(metrics.read_text())
        print(f"Verdicts:  {metrics.with_name(metrics.name.replace('.metrics.json', '.jsonl'))}  "
              f"label match {values['label_match']:.2f}, unparseable {values['unparseable']}")
    for metrics in sorted((results / "eval_dense").glob("*/metrics.json")):
        values = json.loads(metrics.read_text())
        overall, coco = values["overall"], values["coco"]
        aps = ", ".join(f"{kind} AP {coco[kind]['AP']:.2f}" for kind in ("bbox", "segm") if coco.get(kind))
        print(f"Dense:     {metrics.parent / 'predictions.jsonl'}  F1@{values['iou_threshold']} {overall['f1'] or 0:.2f}"
              f"{', ' + aps if aps else ''}, unparseable {values['unparseable']}/{values['records']}")
    for report in sorted((results / "qa").glob("*/report.json")):
        values = json.loads(report.read_text())
        known = values.get("injected_errors") or {}
        found = (f"; known errors in the top {known['k']}: {known['hits_at_k']}/{known['injected']}"
                 if known.get("injected") else "")
        print(f"Label QA:  {report.parent / 'suspects.jsonl'}  {values['suspects']} suspects in {values['records']} records{found}")
    for metrics in sorted((results / "eval_ts").glob("*/metrics.json")):
        values = json.loads(metrics.read_text())
        print(f"Traces:    {metrics.parent / 'predictions.jsonl'}  held-out accuracy {values['accuracy']:.2f} "
              f"({values['records']} traces, chance {values['chance']:.2f})")
    store = results / "mlflow" / "mlflow.db"
    if store.exists():
        print(f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{store}")
        print("           then open http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionqc", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or set VISIONQC_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, func, help: str, options: str | None = "{}", tracked: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        if options is not None:
            p.add_argument("--options", default=options, help="JSON of the stage's config block")
        if tracked:
            p.add_argument("--name", help="what this job works on (dataset, split, run); names the MLflow run")
            _add_tracking(p)
        p.set_defaults(func=func)
        return p

    p = stage("demo-data", cmd_demo_data, "write the seeded demo exports", tracked=False)
    for name in ("platform", "labelme", "coco", "coco-images", "labelme-coco", "groups", "verdicts", "label-errors"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--formats", required=True, help="folder of the exchange-format exports (<format>/ each)")

    p = stage("demo-signals", cmd_demo_signals, "write the seeded demo sensor traces and their manifest", tracked=False)
    p.add_argument("--manifest", required=True)
    p.add_argument("--traces", required=True, help="folder of the trace files")

    p = stage("build-demo-model", cmd_build_demo_model, "write the seeded tiny Qwen3-VL with the real Qwen tokenizer", tracked=False)
    p.add_argument("--out-dir", required=True)

    p = stage("build-demo-ts-models", cmd_build_demo_ts_models, "write the seeded tiny time-series encoder + Qwen3 LLM", tracked=False)
    p.add_argument("--out-dir", required=True)

    p = stage("convert", cmd_convert, "annotation export → contract JSONL (train/val) + QA report")
    p.add_argument("--format", required=True, choices=CONVERT_FORMATS)
    p.add_argument("--source", required=True, help="export folder (platform, labelme), instances JSON (coco), records (jsonl) or manifest (signals)")
    for name in ("train", "val", "report"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--media", required=True, help="folder for the converted images (or copied signals)")
    p.add_argument("--overlays", default="", help="folder for annotation-overlay PNGs (image exports, jsonl)")
    p.add_argument("--examples", default="", help="PNG of example traces per label (signals)")

    p = stage("validate", cmd_validate, "contract JSONL → clean + rejects + report")
    for name in ("source", "clean", "rejects", "report"):
        p.add_argument(f"--{name}", required=True)

    p = stage("fuse", cmd_fuse, "mix datasets by ratios into one tagged JSONL")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--out", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--eval-split", action="store_true", help="targets only, each record once")

    p = stage("augment", cmd_augment, "one epoch of geometry-aware augmentation of a fused train split")
    p.add_argument("--records", required=True, help="fused JSONL of the train split")
    p.add_argument("--epoch", type=int, required=True, help="which epoch (seeds its variants)")
    for name, what in (("out", "JSONL of the epoch"), ("images", "folder of the images it writes"),
                       ("report", "JSON of counts"), ("preview", "PNG of records before and after")):
        p.add_argument(f"--{name}", required=True, help=what)
    p.add_argument("--threads", type=int, default=1, help="images augmented in parallel")

    p = stage("cache", cmd_cache, "fused JSONL → tokenized Arrow cache keyed by content")
    p.add_argument("--records", required=True)
    p.add_argument("--model", required=True, help="model folder whose tokenizer/processor encode the records")
    p.add_argument("--cache-root", required=True, help="the content-keyed store; the cache is <cache-root>/<key>/")
    p.add_argument("--pointer", required=True, help="JSON file that names the cache folder")
    p.add_argument("--lengths-plot", default="", help="token-length histogram PNG")

    p = stage("train", cmd_train, "ms-swift SFT (or GKD) from the Arrow cache", options=None)
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--train-cache", required=True, nargs="+",
                   help="cache pointer JSON of the train split, or one per augmented epoch, in epoch order")
    p.add_argument("--val-cache", default="", help="cache pointer JSON of the val split")
    p.add_argument("--recipe", required=True, help="YAML of ms-swift arguments")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: the GPU when one is visible")
    p.add_argument("--teacher", default="", help="teacher model folder of a rlhf_type: gkd recipe (default: the base)")
    for name, what in (("model", "folder"), ("summary", "JSON"), ("loss-plot", "PNG"), ("recipe-out", "JSON of the resolved arguments"),
                       ("history", "JSON of swift's log history"), ("checkpoints", "work folder kept for resuming")):
        p.add_argument(f"--{name}", required=True, help=what)

    p = stage("post-train", cmd_post_train, "GRPO from a run's merged model, rewarded by visionqc.rewards", options=None)
    p.add_argument("--base", required=True, help="the supervised run's merged model folder")
    p.add_argument("--records", required=True, help="fused JSONL of the train split: its summaries and verdicts become prompts")
    p.add_argument("--cache", required=True, help="the train split's cache pointer (prompts, message options, pixel budget)")
    p.add_argument("--recipe", required=True, help="YAML of ms-swift RLHFArguments (rlhf_type grpo, reward_funcs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: the GPU when one is visible")
    for name, what in (("model", "folder"), ("summary", "JSON"), ("history", "JSON of swift's log history"),
                       ("completions", "JSONL of sampled completions and their rewards"), ("rewards-plot", "PNG"),
                       ("checkpoints", "work folder kept for resuming")):
        p.add_argument(f"--{name}", required=True, help=what)

    p = stage("merge", cmd_merge, "merge an adapter into its base and verify the logits")
    p.add_argument("--base", required=True)
    p.add_argument("--trained", required=True, help="adapter (or full weights) folder from train")
    p.add_argument("--val-cache", required=True, help="cache pointer JSON whose samples are compared")
    p.add_argument("--model", required=True, help="merged model folder to write")
    p.add_argument("--verification", required=True, help="JSON of the logit comparison")

    p = stage("stage-a", cmd_stage_a, "per-image summaries for photo groups (chunked, resumable)")
    p.add_argument("--root", required=True, help="folder holding <mission>/{审核通过,审核不通过}/<group_id>/")
    p.add_argument("--mission", required=True)
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--cache", required=True, help="pointer of the cache the model trained on (prompt text, pixel budget)")
    p.add_argument("--out", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--chunks-dir", required=True, help="work folder of resumable chunk files")
    p.add_argument("--truth", default="", help="JSONL with known per-image summaries (exact match)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--rank", type=int, default=0, help="this process's rank (chunk i belongs to rank i %% world)")
    p.add_argument("--world", type=int, default=1, help="number of processes sharing the chunks")

    p = stage("stage-b", cmd_stage_b, "two-line group verdicts from Stage-A summaries")
    p.add_argument("--summaries", required=True, help="Stage-A JSONL")
    p.add_argument("--guidance", required=True, help="mission guidance text file")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--confusion", required=True, help="confusion-matrix PNG")

    p = stage("eval-dense", cmd_eval_dense, "detection quality of dense answers on held-out records (COCOeval, P/R/F1)")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--records", required=True, help="held-out contract JSONL (the fusion's val split)")
    p.add_argument("--cache", required=True, help="pointer of the cache the model trained on (prompt text, pixel budget)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--metrics", required=True)
    p.add_argument("--predictions", required=True, help="JSONL: per record its raw answer, parsed objects and matches")
    p.add_argument("--overlays", required=True, help="folder of truth-against-prediction PNGs")

    p = stage("qa-labels", cmd_qa_labels, "rank the records whose annotation the model disputes (label QA)")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--train", required=True, help="the dataset's clean train JSONL")
    p.add_argument("--val", required=True, help="the dataset's clean val JSONL")
    p.add_argument("--cache", required=True, help="pointer of the cache the model trained on (prompt text, pixel budget)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--suspects", required=True, help="JSONL of the suspects, ranked")
    p.add_argument("--report", required=True)
    p.add_argument("--gallery", required=True, help="folder of PNGs of the top suspects")
    p.add_argument("--truth", default="", help="JSONL of known label errors (source_file); evaluation only")

    p = stage("cache-ts", cmd_cache_ts, "time-series JSONL → tokenized Arrow cache (XTuner tokenize function)")
    p.add_argument("--records", required=True)
    p.add_argument("--base", required=True, help="base model folder (encoder/, llm/, timeseries.json)")
    p.add_argument("--cache-root", required=True)
    p.add_argument("--pointer", required=True)

    p = stage("train-ts", cmd_train_ts, "train the time-series model (XTuner trainer on GPU, else a CPU loop)")
    p.add_argument("--base", required=True)
    p.add_argument("--train-cache", required=True)
    p.add_argument("--val-cache", default="")
    p.add_argument("--train-records", required=True, help="the clean JSONL the cache came from (XTuner tokenizes it itself)")
    for name in ("model", "summary", "trainer-config", "loss-plot", "history"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--work-dir", required=True, help="resumable state: checkpoints/ (CPU loop), xtuner/ (XTuner's work_dir)")

    p = stage("eval-ts", cmd_eval_ts, "rank candidate answers of held-out traces by log-likelihood")
    p.add_argument("--model", required=True)
    p.add_argument("--val-cache", required=True)
    p.add_argument("--train-cache", required=True, help="its answers are the candidates")
    for name in ("metrics", "predictions", "confusion"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--examples", default="", help="a PNG of example traces to attach (convert's examples plot)")

    p = stage("pipeline", cmd_pipeline, "open or close the pipeline's parent MLflow run", options=None)
    p.add_argument("action", choices=["start", "success", "error"])
    p.add_argument("--config", default=None, help="JSON file of the resolved config (logged as params)")

    p = stage("tracking-sync", cmd_tracking_sync, "log the runs spooled while the MLflow store was unreachable", options=None)

    p = stage("where", cmd_where, "print where results and the MLflow store are", options=None, tracked=False)
    p.add_argument("--results", default="results")
    return parser


# Errors raised on purpose: their message says what went wrong and what to do (tests/test_seams.py keeps every raise
# in src/visionqc among them). Anything else is a bug and keeps its traceback.
# convert.FORMATS, without importing the converters to parse arguments (tests/test_convert_formats.py compares them)
CONVERT_FORMATS = ["platform", "labelme", "coco", "cvat", "label_studio", "yolo", "voc", "jsonl", "signals"]
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, subprocess.SubprocessError)


def _exit_on_sigterm(signum, frame) -> None:
    """A SIGTERM (Slurm preemption, time limit, scancel) unwinds like Ctrl-C: runs end KILLED, temporary files go."""
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    _offline_environment()
    keep_freed_memory()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = build_parser().parse_args(argv)
    try:
        fail_once(args.command)
        args.func(args)
    except Exception as exc:  # the expected kinds, and a full disk whatever library raised it
        full = disk_full_message(exc, vars(args).values())
        if args.debug or os.environ.get("VISIONQC_DEBUG") or not (full or isinstance(exc, EXPECTED_ERRORS)):
            raise
        print(f"visionqc {args.command}: error: {full or exc}", file=sys.stderr)
        print("(run with --debug or VISIONQC_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
