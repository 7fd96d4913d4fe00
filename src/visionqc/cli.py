"""`visionqc <stage> ...`: parse arguments, call one stage function, track it in MLflow."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from visionqc.io import atomic_write, write_json


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


def _tracking(args, rank: int = 0):
    """The stage's MLflow settings; ranks other than 0 of a torchrun job do not track."""
    from visionqc.tracking import TrackingSettings

    return TrackingSettings((args.tracking_uri or None) if rank == 0 else None, args.experiment)


def _add_tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""), help="MLflow URI; empty disables tracking")
    parser.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME", "visionqc"))
    parser.add_argument("--run-name", default=None, help="MLflow run name (default: stage:name)")


def _metrics_from(report: dict, prefix: str = "") -> dict[str, float]:
    """Numbers of a report, nested dicts flattened with '.' (reasons become rejected.<reason>)."""
    values = {}
    for key, value in report.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            values[f"{prefix}{key}"] = value
        elif isinstance(value, dict) and key != "options":
            values.update(_metrics_from(value, f"{prefix}{key}."))
    return values


def cmd_demo_data(args) -> None:
    from visionqc.demo.scenes import generate

    options = json.loads(args.options)
    generate(args.out_dir, **options)
    print(f"demo exports written under {args.out_dir}")


def cmd_demo_signals(args) -> None:
    from visionqc.demo.signals import write_signals

    options = json.loads(args.options)
    write_signals(args.out_dir, seed=options.get("seed", 17), count=options.get("count", 400))
    print(f"demo traces and manifest written under {args.out_dir}")


def cmd_convert(args) -> None:
    from visionqc.convert import convert
    from visionqc.tracking import stage_run

    options = json.loads(args.options)
    out = Path(args.out_dir)
    with stage_run(_tracking(args), "convert", args.run_name or f"convert:{args.name}", {"format": args.format, **options}) as run:
        report = convert(args.format, args.source, out, options)
        run.metrics({"records_in": report.get("images_in", report.get("records_in", 0)), "records_out": report["records_out"],
                     **{f"rejected.{k}": v for k, v in report["issues_by_reason"].items()},
                     **{f"objects.{k}": v for k, v in report.get("objects", {}).items()},
                     **{f"labels.{k}": v for k, v in report.get("labels", {}).items()}})
        run.artifact(out / "report.json")
        run.artifact(out / "overlays", "overlays")
        run.lineage({"export": args.source}, {"train": out / "train.jsonl", "val": out / "val.jsonl"})
    print(json.dumps({k: v for k, v in report.items() if k != "issues"}, ensure_ascii=False, indent=1))


def cmd_validate(args) -> None:
    from visionqc.tracking import stage_run
    from visionqc.validate import validate

    options = json.loads(args.options)
    with stage_run(_tracking(args), "validate", args.run_name or f"validate:{args.name}", options) as run:
        report = validate(args.source, args.clean, args.rejects, args.report, options)
        run.metrics(_metrics_from({k: v for k, v in report.items() if k != "rejected_by_reason"})
                    | {f"rejected.{k}": v for k, v in report["rejected_by_reason"].items()})
        run.artifact(args.report)
        run.artifact(args.rejects)
        run.lineage({"records": args.source}, {"clean": args.clean, "rejects": args.rejects})
    print(json.dumps(report, ensure_ascii=False, indent=1))


def cmd_fuse(args) -> None:
    from visionqc.fuse import fuse
    from visionqc.tracking import stage_run

    spec = json.loads(args.spec)
    inputs = dict(item.split("=", 1) for item in args.input)
    with stage_run(_tracking(args), "fuse", args.run_name or f"fuse:{args.name}", spec | {"eval_split": args.eval_split}) as run:
        report = fuse(spec, inputs, args.out, args.report, eval_split=args.eval_split)
        metrics = {"records_out": report["records_out"], "records_in": sum(row["available"] for row in report["datasets"])}
        for row in report["datasets"]:
            metrics |= {f"taken.{row['dataset']}": row["taken"], f"shortfall.{row['dataset']}": row["shortfall"]}
        run.metrics(metrics)
        run.artifact(args.report)
        run.lineage(inputs, {"fused": args.out})
    print(json.dumps(report, ensure_ascii=False, indent=1))


def cmd_build_demo_model(args) -> None:
    from visionqc.demo.model import build_demo_model

    options = json.loads(args.options)
    seed = options.pop("seed", 0)
    facts = build_demo_model(args.out_dir, seed=seed, sizes=options)
    print(json.dumps(facts, indent=1))


def cmd_cache(args) -> None:
    from visionqc.cache import build_cache
    from visionqc.tracking import stage_run

    options = json.loads(args.options)
    with stage_run(_tracking(args), "cache", args.run_name or f"cache:{args.name}", options) as run:
        manifest = build_cache(args.records, args.model, args.cache_root, args.pointer, options)
        run.metrics({"records_in": manifest["lengths"]["samples"], "records_out": manifest["lengths"]["samples"],
                     "reused": int(manifest["reused"]), "label_tokens": manifest["label_tokens"],
                     **{f"length.{k}": v for k, v in manifest["lengths"].items()}})
        folder = Path(json.loads(Path(args.pointer).read_text())["path"])
        if args.lengths_plot:
            with atomic_write(args.lengths_plot, "wb") as handle:
                handle.write((folder / "lengths.png").read_bytes())
        run.artifact(folder / "lengths.png")
        run.artifact(folder / "manifest.json")
        run.lineage({"records": args.records, "model": args.model}, {"cache": folder})
    print(json.dumps(manifest, ensure_ascii=False, indent=1))


def cmd_train(args) -> None:
    import yaml

    from visionqc.launch import launched_rank
    from visionqc.tracking import stage_run
    from visionqc.train import train

    rank = launched_rank()[0]
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    cache_options = json.loads(args.cache_options)
    caches = [json.loads(Path(p).read_text())["path"] if p else None for p in (args.train_cache, args.val_cache)]
    params = {"recipe_file": args.recipe, "base": args.base, "device": args.device, **recipe}
    with stage_run(_tracking(args, rank), "train", args.run_name or f"train:{args.name}", params) as run:
        summary = train(args.base, caches[0], caches[1], args.out_dir, recipe, cache_options, args.device, on_log=run.metrics)
        if rank != 0:
            return
        out = Path(args.out_dir)
        run.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=summary["steps"])
        for name in ("loss.png", "recipe.json", "log_history.json"):
            run.artifact(out / name)
        run.lineage({"train_cache": caches[0], "val_cache": caches[1] or "", "base": args.base}, {"model": out / "model"})
        write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=1))


def cmd_build_demo_ts_models(args) -> None:
    from visionqc.timeseries import require_xtuner

    require_xtuner()
    from visionqc.demo.ts_models import build_demo_ts_models

    facts = build_demo_ts_models(args.out_dir, **json.loads(args.options))
    print(json.dumps(facts, indent=1, ensure_ascii=False))


def cmd_cache_ts(args) -> None:
    from visionqc.timeseries import require_xtuner

    require_xtuner()
    from visionqc.timeseries.cache import build_ts_cache
    from visionqc.tracking import stage_run

    options = json.loads(args.options)
    base = Path(args.base)
    with stage_run(_tracking(args), "cache_ts", args.run_name or f"cache_ts:{args.name}", options) as run:
        manifest = build_ts_cache(args.records, base / "llm", base / "encoder", args.cache_root, args.pointer, options)
        run.metrics({"records_in": manifest["lengths"]["samples"], "records_out": manifest["lengths"]["samples"],
                     "reused": int(manifest["reused"]), "signals": manifest["signals"], "context_tokens": manifest["context_tokens"],
                     "label_tokens": manifest["label_tokens"], **{f"length.{k}": v for k, v in manifest["lengths"].items()}})
        folder = Path(json.loads(Path(args.pointer).read_text())["path"])
        run.artifact(folder / "lengths.png")
        run.artifact(folder / "manifest.json")
        run.lineage({"records": args.records, "base": args.base}, {"cache": folder})
    print(json.dumps(manifest, ensure_ascii=False, indent=1))


def cmd_train_ts(args) -> None:
    from visionqc.timeseries import require_xtuner

    require_xtuner()
    from visionqc.timeseries.train import TimeSeriesTrainOptions, choose_backend, train_ts
    from visionqc.tracking import stage_run

    options = json.loads(args.options)
    shape = {k: options.pop(k) for k in ("target_rate", "channels", "max_length")}
    backend = choose_backend(TimeSeriesTrainOptions.from_dict(options).backend)
    params = {"base": args.base, **shape, **options, "backend": backend,
              "backend_note": "XTuner Trainer (torchrun)" if backend == "xtuner" else "CPU loop of our own: XTuner model, collator and loss"}
    out = Path(args.out_dir)
    with stage_run(_tracking(args), "train_ts", args.run_name or f"train_ts:{args.name}", params) as run:
        summary = train_ts(args.base, args.train_cache, args.val_cache or None, args.train_records, out, options, **shape,
                           on_step=lambda entry: run.metrics({k: v for k, v in entry.items() if k != "step"}, step=entry["step"]))
        if summary["backend"] == "xtuner":
            for entry in summary.get("history", []):
                run.metrics({"loss": entry["loss"]}, step=entry["step"])
        run.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=summary.get("steps") or 0)
        for name in ("loss.png", "summary.json", "trainer_config.py", "history.jsonl"):
            if (out / name).exists():
                run.artifact(out / name)
        run.lineage({"train_cache": args.train_cache, "val_cache": args.val_cache or "", "base": args.base}, {"model": out / "model"})
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))


def cmd_eval_ts(args) -> None:
    from visionqc.timeseries import require_xtuner

    require_xtuner()
    from visionqc.plots import plot_confusion
    from visionqc.timeseries.evaluate import evaluate_ts
    from visionqc.tracking import stage_run

    out = Path(args.out_dir)
    params = {"model": args.model, "device": args.device, "records_per_forward": args.records_per_forward}
    with stage_run(_tracking(args), "eval_ts", args.run_name or f"eval_ts:{args.name}", params) as run:
        metrics = evaluate_ts(args.model, args.val_cache, args.train_cache, out, device=args.device,
                              records_per_forward=args.records_per_forward)
        plot_confusion(metrics["confusion"], out / "confusion.png", title="Held-out traces", classes=tuple(metrics["classes"]),
                       truth="label", predicted="predicted")
        run.metrics({"accuracy": metrics["accuracy"], "chance": metrics["chance"], "records": metrics["records"],
                     **{f"accuracy.{k}": v for k, v in metrics["accuracy_by_class"].items()}})
        for name in ("metrics.json", "predictions.jsonl", "confusion.png"):
            run.artifact(out / name)
        if args.examples and Path(args.examples).exists():
            run.artifact(args.examples)
        run.lineage({"model": args.model, "val_cache": args.val_cache}, {"metrics": out / "metrics.json"})
    print(json.dumps(metrics, indent=1, ensure_ascii=False))


def cmd_merge(args) -> None:
    from visionqc.merge import merge
    from visionqc.tracking import stage_run
    from visionqc.vision import pixel_environment

    cache_options = json.loads(args.cache_options)
    os.environ.update(pixel_environment(cache_options.get("image_max_tokens", 1024), cache_options.get("image_min_tokens", 4)))
    cache = json.loads(Path(args.val_cache).read_text())["path"]
    params = {"base": args.base, "trained": args.trained, "samples": args.samples, "tolerance": args.tolerance}
    with stage_run(_tracking(args), "merge", args.run_name or f"merge:{args.name}", params) as run:
        report = merge(args.base, args.trained, args.out_dir, cache, args.samples, args.tolerance)
        run.metrics({"max_abs_logit_diff": report["max_abs_logit_diff"], "samples": report["samples"],
                     "adapter_effect_max_abs_logit": report["adapter_effect_max_abs_logit"] or 0.0})
        run.artifact(Path(args.out_dir).parent / "verification.json")
        run.lineage({"base": args.base, "trained": args.trained}, {"merged": args.out_dir})
    print(json.dumps(report, indent=1))


def cmd_stage_a(args) -> None:
    from visionqc.io import read_jsonl
    from visionqc.launch import launched_rank, wait_for_all_ranks
    from visionqc.stage_a import exact_match, run_stage_a
    from visionqc.tracking import stage_run

    rank, world = launched_rank()
    torchrun = world > 1
    if not torchrun:
        rank, world = args.rank, args.world
    options = json.loads(args.options)
    params = {"mission": args.mission, "model": args.model, "rank": rank, "world": world, **options}
    with stage_run(_tracking(args, rank if torchrun else 0), "stage_a", args.run_name or f"stage_a:{args.mission}", params) as run:
        report = run_stage_a(args.root, args.mission, args.model, args.out, args.chunks_dir, options, rank, world,
                             barrier=wait_for_all_ranks if torchrun else None)
        if torchrun and rank != 0:  # rank 0 merges and reports
            return
        if report["merged"] and args.truth and Path(args.truth).exists():
            report.update(exact_match([r for _, r in read_jsonl(args.out)], args.truth))
        write_json(args.report, report)
        run.metrics(_metrics_from({k: v for k, v in report.items() if v is not None}))
        run.artifact(args.report)
        if report["merged"]:
            run.lineage({"groups": Path(args.root) / args.mission, "model": args.model}, {"summaries": args.out})
    print(json.dumps(report, ensure_ascii=False, indent=1))


def cmd_stage_b(args) -> None:
    from visionqc.plots import plot_confusion
    from visionqc.stage_b import run_stage_b
    from visionqc.tracking import stage_run

    options = json.loads(args.options)
    params = {"guidance": args.guidance, "model": args.model, **options}
    with stage_run(_tracking(args), "stage_b", args.run_name or f"stage_b:{args.name}", params) as run:
        metrics = run_stage_b(args.summaries, args.guidance, args.model, args.out, options)
        write_json(args.metrics, metrics)
        plot_confusion(metrics["confusion"], Path(args.confusion))
        run.metrics(_metrics_from({k: v for k, v in metrics.items() if v is not None}))
        for path in (args.metrics, args.confusion, args.guidance):
            run.artifact(path)
        run.lineage({"summaries": args.summaries, "guidance": args.guidance, "model": args.model}, {"verdicts": args.out})
    print(json.dumps(metrics, ensure_ascii=False, indent=1))


def cmd_pipeline(args) -> None:
    from visionqc.tracking import end_pipeline, start_pipeline, ui_command

    settings = _tracking(args)
    if args.action == "start":
        config = json.loads(Path(args.config).read_text()) if args.config else {}
        run_id = start_pipeline(settings, args.run_name or "pipeline", config)
        print(f"pipeline run {run_id}")
    else:
        end_pipeline(settings, "FINISHED" if args.action == "success" else "FAILED")
        if settings.uri:
            print(f"View the runs with: {ui_command(settings)}")


def cmd_where(args) -> None:
    results = Path(args.results)
    print("Results:")
    for stage in ("convert", "validate", "fuse", "cache", "train", "merge", "stage_a", "stage_b", "cache_ts", "train_ts", "eval_ts"):
        if (results / stage).exists():
            print(f"  {stage:9s} {results / stage}/")
    for metrics in sorted((results / "stage_b").glob("*.metrics.json")):
        values = json.loads(metrics.read_text())
        print(f"Verdicts:  {metrics.with_name(metrics.name.replace('.metrics.json', '.jsonl'))}  "
              f"label match {values['label_match']:.2f}, unparseable {values['unparseable']}")
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
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the seeded demo exports")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--options", default="{}", help="JSON: seed, platform, labelme, coco, groups, verdicts, guidance")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo-signals", help="write the seeded demo sensor traces and their manifest")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--options", default="{}", help="JSON: seed, count")
    p.set_defaults(func=cmd_demo_signals)

    p = sub.add_parser("build-demo-ts-models", help="write the seeded tiny time-series encoder + Qwen3 LLM (a base folder)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--options", default="{}", help="JSON: seed, encoder, llm, channels, target_rate")
    p.set_defaults(func=cmd_build_demo_ts_models)

    p = sub.add_parser("cache-ts", help="time-series JSONL → tokenized Arrow cache (XTuner tokenize function)")
    p.add_argument("--records", required=True)
    p.add_argument("--base", required=True, help="base model folder (encoder/, llm/)")
    p.add_argument("--cache-root", required=True)
    p.add_argument("--pointer", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--options", default="{}", help="JSON: target_rate, channels, max_length")
    _add_tracking(p)
    p.set_defaults(func=cmd_cache_ts)

    p = sub.add_parser("train-ts", help="train the time-series model (XTuner trainer on GPU, else a CPU loop)")
    p.add_argument("--base", required=True)
    p.add_argument("--train-cache", required=True)
    p.add_argument("--val-cache", default="")
    p.add_argument("--train-records", required=True, help="the clean JSONL the cache came from (XTuner tokenizes it itself)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--options", default="{}", help="JSON: timeseries.train plus target_rate, channels, max_length")
    _add_tracking(p)
    p.set_defaults(func=cmd_train_ts)

    p = sub.add_parser("eval-ts", help="rank candidate answers of held-out traces by log-likelihood")
    p.add_argument("--model", required=True)
    p.add_argument("--val-cache", required=True)
    p.add_argument("--train-cache", required=True, help="its answers are the candidates")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--records-per-forward", type=int, default=2)
    p.add_argument("--examples", default="", help="a PNG of example traces to attach (convert's overlays/traces.png)")
    _add_tracking(p)
    p.set_defaults(func=cmd_eval_ts)

    p = sub.add_parser("convert", help="annotation export → contract JSONL (train/val) + QA report")
    p.add_argument("--format", required=True, choices=["platform", "labelme", "coco", "jsonl", "signals"])
    p.add_argument("--source", required=True, help="export folder (platform, labelme), instances JSON (coco), records (jsonl) or manifest (signals)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--name", required=True, help="dataset name")
    p.add_argument("--options", default="{}", help="JSON of the convert options")
    _add_tracking(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("validate", help="contract JSONL → clean + rejects + report")
    p.add_argument("--source", required=True)
    p.add_argument("--clean", required=True)
    p.add_argument("--rejects", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--options", default="{}", help="JSON of the validate options")
    _add_tracking(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("fuse", help="mix datasets by ratios into one tagged JSONL")
    p.add_argument("--spec", required=True, help="JSON fusion spec: seed, targets, sources")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--out", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--eval-split", action="store_true", help="targets only, each record once")
    _add_tracking(p)
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("build-demo-model", help="write the seeded tiny Qwen3-VL with the real Qwen tokenizer")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--options", default="{}", help="JSON: seed and sizes")
    p.set_defaults(func=cmd_build_demo_model)

    p = sub.add_parser("cache", help="fused JSONL → tokenized Arrow cache keyed by content")
    p.add_argument("--records", required=True)
    p.add_argument("--model", required=True, help="model folder whose tokenizer/processor encode the records")
    p.add_argument("--cache-root", required=True)
    p.add_argument("--pointer", required=True, help="JSON file that names the cache folder")
    p.add_argument("--lengths-plot", default="", help="also copy the token-length histogram here")
    p.add_argument("--name", required=True)
    p.add_argument("--options", default="{}")
    _add_tracking(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="ms-swift SFT from the Arrow cache")
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--train-cache", required=True, help="cache pointer JSON of the train split")
    p.add_argument("--val-cache", default="", help="cache pointer JSON of the val split")
    p.add_argument("--recipe", required=True, help="YAML of ms-swift arguments")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: the GPU when one is visible")
    p.add_argument("--cache-options", default="{}", help="JSON of the cache options (pixel budget)")
    _add_tracking(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="merge an adapter into its base and verify the logits")
    p.add_argument("--base", required=True)
    p.add_argument("--trained", required=True, help="adapter (or full weights) folder from train")
    p.add_argument("--val-cache", required=True, help="cache pointer JSON whose samples are compared")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--name", required=True)
    p.add_argument("--cache-options", default="{}")
    _add_tracking(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("stage-a", help="per-image summaries for photo groups (chunked, resumable)")
    p.add_argument("--root", required=True, help="folder holding <mission>/{审核通过,审核不通过}/<group_id>/")
    p.add_argument("--mission", required=True)
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--out", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--chunks-dir", required=True)
    p.add_argument("--truth", default="", help="JSONL with known per-image summaries (exact match)")
    p.add_argument("--rank", type=int, default=0, help="this process's rank (chunk i belongs to rank i %% world)")
    p.add_argument("--world", type=int, default=1, help="number of processes sharing the chunks")
    p.add_argument("--options", default="{}")
    _add_tracking(p)
    p.set_defaults(func=cmd_stage_a)

    p = sub.add_parser("stage-b", help="two-line group verdicts from Stage-A summaries")
    p.add_argument("--summaries", required=True, help="Stage-A JSONL")
    p.add_argument("--guidance", required=True, help="mission guidance text file")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--confusion", required=True, help="confusion-matrix PNG")
    p.add_argument("--name", required=True)
    p.add_argument("--options", default="{}")
    _add_tracking(p)
    p.set_defaults(func=cmd_stage_b)

    p = sub.add_parser("pipeline", help="open or close the pipeline's parent MLflow run")
    p.add_argument("action", choices=["start", "success", "error"])
    p.add_argument("--config", default=None, help="JSON file of the resolved config (logged as params)")
    _add_tracking(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("where", help="print where results and the MLflow store are")
    p.add_argument("--results", default="results")
    p.set_defaults(func=cmd_where)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_environment()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"visionqc {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
