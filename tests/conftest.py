"""Shared fixtures: tiny images, demo exports and JSONL helpers, all built by the tests."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from visionqc.cli import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference-data"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def point_slurm_clients_at_no_controller() -> None:
    """Snakemake's Slurm plugin runs `scontrol show config` whenever snakemake starts. With Slurm installed and no
    controller up (this machine between Slurm tests), scontrol retries for MessageTimeout, 9-10 s on every snakemake
    call the tests make. Slurm's clients read SLURM_CONF: here a config whose controller is unreachable at once (1 s
    timeout), so the plugin's probe fails in milliseconds, as it does where Slurm is not installed. The Slurm test's
    cluster fixture restores the real config."""
    if "SLURM_CONF" in os.environ:
        return
    conf = Path(os.environ.get("TMPDIR", "/tmp")) / f"visionqc-tests-{os.getuid()}-no-controller.conf"
    conf.write_text("ClusterName=none\nSlurmctldHost=localhost\nMessageTimeout=1\n")
    os.environ["SLURM_CONF"] = str(conf)


point_slurm_clients_at_no_controller()
keep_freed_memory()  # tests train and generate in-process too: the CLI's heap setting (docs/status.md, "Benchmarks")


def make_image(path: Path, size=(64, 48), color=(120, 130, 140), exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    if path.suffix.lower() in (".jpg", ".jpeg"):
        kwargs["quality"] = 95
    image.save(path, **kwargs)
    return path


def write_lines(path: Path, lines: list) -> Path:
    """Write raw lines: bytes as they are, str encoded, dicts as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for line in lines:
            if isinstance(line, (dict, list)):
                line = json.dumps(line, ensure_ascii=False)
            if isinstance(line, str):
                line = line.encode("utf-8")
            handle.write(line + b"\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines() if line.strip()]


def convert_into(fmt: str, source: Path, out: Path, options: dict | None = None) -> dict:
    """Convert into the workflow's layout under `out`; returns the full report (issues included)."""
    from visionqc.convert import convert
    from visionqc.convert.common import ConvertOutputs

    out = Path(out)
    signals = fmt == "signals"
    outputs = ConvertOutputs(out / "train.jsonl", out / "val.jsonl", out / "report.json", out / ("signals" if signals else "images"),
                             None if signals else out / "overlays", out / "overlays" / "traces.png" if signals else None)
    convert(fmt, source, outputs, options)
    return json.loads((out / "report.json").read_text())


def write_demo_signals(folder: Path, seed: int, count: int) -> None:
    """Demo traces in the workflow's layout: folder/manifest.csv and folder/traces/."""
    from visionqc.demo.signals import write_signals

    write_signals(Path(folder) / "manifest.csv", Path(folder) / "traces", seed=seed, count=count)


def cache_pointers(cache_root: Path, records: dict[str, Path], model: Path, options: dict) -> dict[str, Path]:
    """Vision caches of each split's records; returns the pointer files."""
    from visionqc.cache import build_cache

    pointers = {}
    for split, path in records.items():
        pointers[split] = Path(cache_root) / f"{split}.json"
        build_cache(path, model, cache_root, pointers[split], None, options)
    return pointers


@pytest.fixture(scope="session")
def demo_exports(tmp_path_factory) -> Path:
    from visionqc.demo.exports import DemoExports, generate

    out = tmp_path_factory.mktemp("demo") / "demo"
    generate(DemoExports.under(out), seed=5, platform=16, labelme=8, coco=10, groups=6, new_groups=3, verdicts=24, guidance="规则：每台BBU都要有标签。")
    return out


PROMPTS = {"dense": "找出图中的设备、标签和线缆，按图片输出JSON。", "summary": "统计图中各类别的数量。"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from visionqc.demo.model import build_demo_model

    out = tmp_path_factory.mktemp("model") / "tiny"
    build_demo_model(out, seed=0)
    return out


@pytest.fixture(scope="session")
def fused_records(demo_exports, tmp_path_factory) -> dict[str, Path]:
    """Fused train/val JSONL from the demo exports: dense, summary, chat-only and multi-image records."""
    from visionqc.fuse import fuse

    root = tmp_path_factory.mktemp("fused")
    convert_into("platform", demo_exports / "platform", root / "convert" / "platform", {"val_fraction": 0.25})
    convert_into("labelme", demo_exports / "labelme", root / "convert" / "labelme", {"val_fraction": 0.25})
    extra = root / "convert" / "extra"
    group = json.loads((demo_exports / "groups" / "truth.jsonl").read_text("utf-8").splitlines()[0])
    images = [str(demo_exports / "groups" / p) for p in group["images"]]
    multi = {"images": images, "width": 128, "height": 128, "summary": group["per_image"]["image_1"],
             "objects": [{"bbox_2d": [4, 5, 28, 27], "desc": "类别=BBU", "image_index": 1}]}
    chat = {"messages": [{"role": "user", "content": "图片摘要：\n" + group["per_image"]["image_1"] + "\n这组照片是否通过？"},
                         {"role": "assistant", "content": "通过\n理由: 每台BBU都有标签"}]}
    write_lines(extra / "train.jsonl", [multi, chat])
    write_lines(extra / "val.jsonl", [multi])
    # partial records (LabelMe points) kept: the tests that read these records count on every demo record being here
    spec = {"seed": 1, "partial_records": "keep", "targets": [
        {"dataset": "platform", "ratio": 1.0, "mode": "dense", "prompt": "dense"},
        {"dataset": "labelme", "ratio": 1.0, "mode": "summary", "prompt": "summary"},
        {"dataset": "extra", "ratio": 1.0, "mode": "dense", "prompt": "dense"}]}
    fused = {}
    for split in ("train", "val"):
        inputs = {name: root / "convert" / name / f"{split}.jsonl" for name in ("platform", "labelme", "extra")}
        fused[split] = root / "fuse" / f"{split}.jsonl"
        fuse(spec, inputs, fused[split], root / "fuse" / f"{split}.report.json", eval_split=split == "val")
    return fused


CACHE = {"prompts": PROMPTS, "image_max_tokens": 64, "image_min_tokens": 4}
RECIPE = {"tuner_type": "lora", "lora_rank": 16, "lora_alpha": 32, "target_modules": ["all-linear"], "learning_rate": 5e-3,
          "max_steps": 12, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4, "max_length": 1024,
          "gradient_checkpointing": False, "eval_on_start": True, "eval_steps": 12, "save_steps": 6, "logging_steps": 2,
          "warmup_ratio": 0.0}


class Interrupted(Exception):
    pass


@pytest.fixture(scope="session")
def caches(tiny_model, fused_records, tmp_path_factory) -> dict[str, Path]:
    """Cache pointers of the fused train/val records."""
    return cache_pointers(tmp_path_factory.mktemp("caches"), fused_records, tiny_model, CACHE)


def train_into(model, caches: dict, out: Path, recipe: dict, on_log=None, **options):
    """Train with the workflow's layout under `out` (model/, summary.json, …, checkpoints/); returns the StageResult."""
    from visionqc.train import train

    out = Path(out)
    return train(str(model), caches["train"], caches.get("val"), recipe, model_out=out / "model", summary_out=out / "summary.json",
                 loss_plot=out / "loss.png", recipe_out=out / "recipe.json", history_out=out / "log_history.json",
                 checkpoints=out / "checkpoints", device="auto", on_log=on_log, **options)


def moved_weights(before, after) -> set[str]:
    """Names of the weights that differ between two model folders."""
    import torch
    from safetensors.torch import load_file

    old, new = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert old.keys() == new.keys()
    return {name for name in old if not torch.equal(old[name], new[name])}


def merge_into(base, trained_model, val_cache, out: Path, **options):
    """Merge into out/model and out/verification.json; returns the verification report."""
    from visionqc.merge import merge

    out = Path(out)
    return merge(str(base), str(trained_model), val_cache, model_out=out / "model", verification_out=out / "verification.json",
                 options=options).report


@pytest.fixture(scope="session")
def trained(tiny_model, caches, tmp_path_factory):
    """A real 12-step LoRA run through ms-swift: (out_dir, summary, logged metrics)."""
    out = tmp_path_factory.mktemp("train") / "run"
    logged = []
    summary = train_into(tiny_model, caches, out, RECIPE, on_log=lambda m, s: logged.append((s, m))).report
    return out, summary, logged


@pytest.fixture(scope="session")
def merged_model(tiny_model, trained, caches, tmp_path_factory):
    """The trained demo adapter merged into the tiny model: (folder, verification report)."""
    out, _, _ = trained
    folder = tmp_path_factory.mktemp("merged")
    return folder / "model", merge_into(tiny_model, out / "model", caches["val"], folder, samples=3)


# A copy of the workflow with a small demo and two short training runs (for snakemake, Slurm and MLflow UI tests).
SMALL_DEMO = {"seed": 3, "platform": 12, "labelme": 6, "coco": 8, "groups": 3, "new_groups": 2, "verdicts": 20,
              "guidance": "config/guidance/BBU安装检查.txt", "signals": 40, "formats": 4}


def held_by(stage) -> float:
    """The Python memory the stage holds while it runs: the median of tracemalloc's current size, every 5 ms.

    A stage that keeps its records grows all along and its median with it; tracemalloc's peak would
    instead catch momentary copies that come and go. CPython's table of interned names (pathlib interns
    every file name) is grown first: when it resizes, its new copy (megabytes) is traced and the old one,
    allocated before tracing, is not, so the size jumps at times that depend on earlier names.
    """
    import statistics
    import threading
    import tracemalloc

    _grow_interned_names()
    samples, done = [], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            samples.append(tracemalloc.get_traced_memory()[0])

    tracemalloc.start()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        stage()
    finally:
        done.set()
        sampler.join()
        tracemalloc.stop()
    return statistics.median(samples)


@functools.cache
def _grow_interned_names() -> list[str]:
    """Names kept interned for the session: room in CPython's table for every name the measured stages make."""
    return [sys.intern(f"conftest interned name {n}") for n in range(300_000)]


def copy_workflow(dest: Path) -> Path:
    """The files a snakemake run needs (Snakefile, rules, workflow, config, envs, the slurm link), copied to `dest`."""
    shutil.copy(REPO / "Snakefile", dest)
    shutil.copy(REPO / "slurm", dest, follow_symlinks=False)
    for folder in ("rules", "workflow", "config", "envs"):
        shutil.copytree(REPO / folder, dest / folder)
    return dest


def short_recipe(work: Path, name: str, **changes) -> str:
    """A copy of config/recipes/<name>.yaml with `changes`, written as <name>_short.yaml; returns its path."""
    recipe = {**yaml.safe_load((work / "config" / "recipes" / f"{name}.yaml").read_text()), **changes}
    path = f"config/recipes/{name}_short.yaml"
    (work / path).write_text(yaml.safe_dump(recipe))
    return path


def small_workflow(dest: Path) -> Path:
    work = copy_workflow(dest)
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    config["demo"] = SMALL_DEMO
    # the exchange formats run through snakemake in the full demo (test_demo_learns); here they would only add jobs
    config["datasets"] = {name: spec for name, spec in config["datasets"].items() if not spec["path"].startswith("resources/demo/formats/")}
    config["model"]["image_max_tokens"] = 64
    config["fusion"]["sources"][0]["ratio"] = 0.2  # the small demo still draws a few COCO records
    # the demo recipes, cut short; the full run gets enough steps that every summary is non-empty (Stage-A checks that)
    config["train"]["runs"] = {
        "demo": {"recipe": short_recipe(work, "demo_full", learning_rate=2e-3, max_steps=32, per_device_train_batch_size=4,
                                        eval_steps=32, save_steps=32, logging_steps=8), "base": ""},
        "demo_lora": {"recipe": short_recipe(work, "demo_lora", max_steps=4, per_device_train_batch_size=4, eval_steps=4,
                                             save_steps=4, logging_steps=2), "base": ""},
    }
    # several chunks, for the resume tests; the 32-step model answers outside the summary contract, so Stage-A
    # passes its answers on (min_valid_rate 0) and Stage-B judges them anyway (its generation is tested too)
    config["stage_a"].update(max_new_tokens=24, chunk_size=4, min_valid_rate=0.0)
    config["stage_b"].update(max_new_tokens=16, invalid_summaries="judge")
    config["timeseries"]["train"].update(steps=6, batch_size=4, eval_every=0, save_every=3)
    # augmentation in the DAG with geometry ops too (the demo default keeps to flips and colour)
    config["augment"].update(epochs=1, ops=[*config["augment"]["ops"], {"op": "rotate", "prob": 0.5, "degrees": 10},
                                            {"op": "crop", "prob": 0.3, "min_scale": 0.8, "coverage": 0.5}])
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return work


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], check=False, cwd=workdir, env=env,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def jobs_in(output: str) -> dict[str, int]:
    """The job-stats table of a (dry) run: rule → count."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("job ")) + 2
    counts = {}
    for line in lines[start:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@contextlib.contextmanager
def added_run(work: Path, run: str, overlay: dict, jobs: dict[str, int]):
    """Add `run` to a finished workflow through a --configfile overlay and build its merged model, whose logit check
    must pass; the dry run must plan exactly `jobs`. Yields an MlflowClient of the run's own store (the other tests
    read the finished workflow's single pipeline run); the overlay, the run's folders and that store go afterwards."""
    import mlflow

    name, store = f"{run}.overlay.yaml", work / "results" / "mlflow" / f"{run}.db"
    (work / name).write_text(yaml.safe_dump({**overlay, "tracking": {"uri": f"sqlite:///results/mlflow/{run}.db"}}))
    target = f"results/merge/{run}/verification.json"
    try:
        assert jobs_in(snakemake(work, "-n", target, "--configfile", name).stdout) == jobs
        snakemake(work, target, "--configfile", name)
        assert json.loads((work / target).read_text())["passed"]
        yield mlflow.MlflowClient(f"sqlite:///{store}")
    finally:
        (work / name).unlink(missing_ok=True)
        for stage in ("train", "post_train", "merge"):
            shutil.rmtree(work / "results" / stage / run, ignore_errors=True)
        store.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def finished_workflow(tmp_path_factory) -> Path:
    """The small workflow after one full `snakemake` run."""
    work = small_workflow(tmp_path_factory.mktemp("wf"))
    snakemake(work)
    return work
