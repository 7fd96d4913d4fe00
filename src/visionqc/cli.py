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

from visionqc.faults import fail_once, pause_point
from visionqc.io import disk_full_message
from visionqc.where import print_where


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
    third of all CPU time (docs/status.md, "Benchmarks"). VISIONQC_KEEP_FREED_MEMORY=0 restores glibc's defaults.
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


def run_stage(stage, args) -> None:
    """Read the stage's options, open its MLflow run (given to the stage for per-step metrics), call it, log its result."""
    from visionqc.launch import launched_rank
    from visionqc.stages import EXTRA_PARAMS
    from visionqc.tracking import stage_run

    options = stage.read_options(args)
    if not stage.tracked:
        stage.call(args, options, None)
        return
    logged = {name: getattr(args, name) for name in stage.logged if getattr(args, name) not in ("", None)}
    params = {**logged, **options, **(EXTRA_PARAMS[stage.name](options) if stage.name in EXTRA_PARAMS else {})}
    rank = launched_rank()[0] if stage.distributed else 0  # ranks other than 0 of a torchrun job do not track
    name = args.name or getattr(args, "mission", None)  # Stage-A's jobs are named by their mission
    with stage_run(_tracking(args, rank), stage.name, args.run_name or f"{stage.name}:{name}", params) as run:
        result = stage.call(args, options, run)
        if result is None:  # a torchrun rank other than 0: rank 0 reports
            return
        run.record(result)
    print(json.dumps(result.report, ensure_ascii=False, indent=1, default=str))


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


def _configured_store(config: Path) -> str:
    """tracking.uri of a config file (the schema's default when it names none); empty when tracking is off."""
    import yaml

    if not config.is_file():
        return ""
    tracking = (yaml.safe_load(config.read_text("utf-8")) or {}).get("tracking") or {}
    if not tracking.get("enabled", True):
        return ""
    return tracking.get("uri", "sqlite:///results/mlflow/mlflow.db")


def cmd_tracking_sync(args) -> None:
    from visionqc.tracking import sync_spool

    if not args.tracking_uri:  # the store the project's config names, as the workflow's jobs used it
        args.tracking_uri = _configured_store(Path(args.config))
    settings = _tracking(args)
    if not settings.uri:
        raise ValueError(f"no tracking URI: {args.config} turns tracking off or is not there; pass --tracking-uri "
                         "or set VISIONQC_TRACKING_URI")
    try:
        counts = sync_spool(settings)
    except Exception as exc:  # the store still does not answer: the spool stays for the next try
        raise RuntimeError(f"MLflow store {settings.uri} did not answer ({type(exc).__name__}: {str(exc)[:200]}); "
                           f"the spool in {settings.spool}/ is kept; run tracking-sync again once the store is up") from exc
    print(f"{counts['replayed']} spooled run(s) logged to {settings.uri}, {counts['already_there']} already there; "
          f"{settings.spool}/ is empty")


def cmd_init(args) -> None:
    from visionqc.project import init_project, print_summary

    print_summary(init_project(args.folder, args.dataset, photos=args.photos, model=args.model, run=args.run))


def build_parser() -> argparse.ArgumentParser:
    from visionqc.stages import STAGES

    parser = argparse.ArgumentParser(prog="visionqc", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or set VISIONQC_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:  # a flag per input, output and setting, named like the rule's
        p = sub.add_parser(stage.command, help=stage.about)
        for name, keywords in stage.flags().items():
            p.add_argument("--" + name.replace("_", "-"), **keywords)
        if stage.section is not None:
            p.add_argument("--options", default="{}", help=f"JSON of the config block {stage.section}")
        if stage.tracked:
            p.add_argument("--name", help="what this job works on (dataset, split, run); names the MLflow run")
            _add_tracking(p)
        p.set_defaults(func=lambda args, stage=stage: run_stage(stage, args))

    p = sub.add_parser("pipeline", help="open or close the pipeline's parent MLflow run")
    p.add_argument("action", choices=["start", "success", "error"])
    p.add_argument("--config", default=None, help="JSON file of the resolved config (logged as params)")
    _add_tracking(p)
    p.set_defaults(func=cmd_pipeline)
    p = sub.add_parser("tracking-sync", help="log the runs spooled while the MLflow store was unreachable")
    _add_tracking(p)
    p.add_argument("--config", default="config/config.yaml", help="the config whose tracking.uri names the store, "
                   "when neither --tracking-uri nor $VISIONQC_TRACKING_URI does")
    p.set_defaults(func=cmd_tracking_sync)
    p = sub.add_parser("init", help="make a project folder of your own: config (no demo), taxonomy, profiles")
    p.add_argument("folder", help="the project folder to make (its files must not exist yet)")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=FORMAT:PATH",
                   help="an export to convert (repeatable); init scans it and writes its categories into the taxonomy")
    p.add_argument("--photos", default="", help="folder of photo groups for Stage-A/B: <mission>/<group>/*.jpg (new) or <mission>/{审核通过,审核不通过}/<group>/*.jpg")
    p.add_argument("--model", default="", help="the base checkpoint folder (default: a tiny random model, to try the pipeline)")
    p.add_argument("--run", default="main", help="the name of the training run (and of the fused dataset)")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("where", help="print where results and the MLflow store are")
    p.add_argument("--results", default="results")
    p.set_defaults(func=lambda args: print_where(Path(args.results)))
    return parser


# Errors raised on purpose: their message says what went wrong and what to do (tests/test_seams.py keeps every raise
# in src/visionqc among them). Anything else is a bug and keeps its traceback.
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
        pause_point(f"{args.command}:start")
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
