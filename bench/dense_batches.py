"""What a dense-heavy batch pays for padding, and what packed answer rows and length-grouped batches save (CPU).

    .venv/bin/python bench/dense_batches.py [--steps 20] [--dense-ratio 0.5] [--batch 8]

Builds a small mixed-mode training set in a temporary folder (the seeded demo's platform export:
every record asked densely or for its summary, drawn per record; the tiny demo model and its cache),
then:
- from the cache's lengths, the padding a batch carries with the trainer's random batches and with
  length-grouped batches (transformers' sampler, which ms-swift uses for `group_by_length: true`):
  the share of padded tokens, and the share of logit rows past an answer's end (a left-padded
  batch keeps logits from its longest answer's first token for every sample);
- the demo's full fine-tune recipe trained for --steps steps from the same base, cache and seed, each
  way: ms-swift's logit rows (`logits_at_labels: false`) or the LM head only where a label follows,
  packed in one row (ours, the default), with random or length-grouped batches: seconds per step,
  from the wall time of a run of --steps steps less one of 2, and the ratio against ms-swift's rows
  with random batches.
Speed only: on the demo, length-grouped batches stop the model from learning (docs/status.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import yaml
from transformers.trainer_pt_utils import get_length_grouped_indices

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def build(work: Path, dense_ratio: float) -> tuple[Path, Path]:
    """(model folder, train cache pointer) of a mixed-mode fusion of the demo's platform export."""
    from visionqc.cache import build_cache
    from visionqc.convert import convert
    from visionqc.convert.common import ConvertOutputs
    from visionqc.demo.exports import DemoExports, generate
    from visionqc.demo.model import build_demo_model
    from visionqc.fuse import fuse

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    generate(DemoExports.under(work / "demo"), seed=7, platform=96, labelme=4, coco=4, groups=2, new_groups=1, verdicts=4,
             guidance="规则：每台BBU都要有标签。")
    c = work / "convert"
    convert("platform", work / "demo/platform", ConvertOutputs(c / "train.jsonl", c / "val.jsonl", c / "report.json", c / "images",
                                                             None, None), {"val_fraction": 0.05})
    spec = {"seed": 1, "targets": [{"dataset": "platform", "ratio": 2.0, "mode": "mixed", "dense_ratio": dense_ratio}]}
    fuse(spec, {"platform": c / "train.jsonl"}, work / "fuse/train.jsonl", work / "fuse/report.json")
    build_demo_model(work / "model", seed=0)
    options = {"prompts": config["prompts"], "image_max_tokens": config["model"]["image_max_tokens"],
               "image_min_tokens": config["model"]["image_min_tokens"]}
    build_cache(work / "fuse/train.jsonl", work / "model", work / "cache", work / "cache/train.json", None, options)
    return work / "model", work / "cache/train.json"


def spans(pointer: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's length and the span from its first label token to its end."""
    folder = Path(json.loads(pointer.read_text())["path"])
    table = pa.concat_tables(pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in sorted(folder.glob("data-*.arrow")))
    lengths = np.array(table.column("length").to_pylist())
    labels = table.column("labels").to_pylist()
    answer = np.array([len(row) - next(i for i, t in enumerate(row) if t != -100) for row in labels])
    return lengths, answer


def padding(lengths: np.ndarray, answer: np.ndarray, batches: list[np.ndarray]) -> tuple[float, float]:
    """(share of padded tokens, share of logit rows past an answer's end) over the batches."""
    tokens = sum(len(b) * lengths[b].max() for b in batches)
    rows = sum(len(b) * answer[b].max() for b in batches)
    return 1 - sum(lengths[b].sum() for b in batches) / tokens, 1 - sum(answer[b].sum() for b in batches) / rows


def batch_plans(lengths: np.ndarray, batch: int, seed: int) -> dict[str, list[np.ndarray]]:
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(lengths), generator=generator).numpy()
    grouped = np.array(get_length_grouped_indices(lengths.tolist(), batch, generator=torch.Generator().manual_seed(seed)))
    cut = len(lengths) // batch * batch
    return {name: [order[i : i + batch] for i in range(0, cut, batch)] for name, order in
            (("random", shuffled), ("length-grouped", grouped))}


def run_seconds(model: Path, pointer: Path, recipe: dict, out: Path) -> float:
    """Wall seconds of one `visionqc train` process."""
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, VISIONQC_TRACKING_URI="", OMP_NUM_THREADS="2")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "visionqc.cli", "train", "--base", str(model), "--train-cache", str(pointer), "--recipe",
         str(out / "recipe.yaml"), "--device", "cpu", "--model", str(out / "model"), "--summary", str(out / "summary.json"),
         "--recipe-out", str(out / "resolved.json"), "--history", str(out / "history.json"), "--loss-plot", str(out / "loss.png"),
         "--checkpoints", str(out / "ckpt"), "--name", "bench", "--tracking-uri", ""],
        capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        sys.exit(f"visionqc train failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def seconds_per_step(model: Path, pointer: Path, recipe: dict, out: Path, steps: int) -> float:
    """Seconds per step past the first two: a run of `steps` less a run of 2 (loading, the first steps' warm-up)."""
    short = run_seconds(model, pointer, {**recipe, "max_steps": 2, "logging_steps": 2}, out / "short")
    return (run_seconds(model, pointer, recipe, out / "long") - short) / (steps - 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    recipe = yaml.safe_load((REPO / "config/recipes/demo_full.yaml").read_text())
    recipe.update(max_steps=args.steps, per_device_train_batch_size=args.batch, eval_on_start=False, eval_strategy="no",
                  save_steps=10**6, logging_steps=args.steps, max_length=4096)
    with tempfile.TemporaryDirectory() as tmp:
        model, pointer = build(Path(tmp), args.dense_ratio)
        lengths, answer = spans(pointer)
        print(f"{len(lengths)} samples, dense ratio {args.dense_ratio}: length p50 {int(np.median(lengths))}, max {lengths.max()}; "
              f"answer p50 {int(np.median(answer))}, max {answer.max()} tokens; batch {args.batch}")
        for name, plan in batch_plans(lengths, args.batch, recipe.get("seed", 42)).items():
            tokens, rows = padding(lengths, answer, plan)
            print(f"{name:15s} padded tokens {tokens:6.1%}   logit rows past an answer {rows:6.1%}")
        times = {}
        for grouped, batches in ((False, "random"), (True, "length-grouped")):
            for at_labels, rows in ((False, "ms-swift's rows"), (True, "packed answer rows")):
                name = f"{batches}, {rows}"
                times[name] = seconds_per_step(model, pointer, {**recipe, "group_by_length": grouped, "logits_at_labels": at_labels},
                                               Path(tmp) / name.replace(", ", "_").replace(" ", "-"), args.steps)
    baseline = times["random, ms-swift's rows"]
    for name, seconds in times.items():
        print(f"{name:32s} {seconds:.3f} s/step (wall, steps 3-{args.steps})  {baseline / seconds:.2f}x")


if __name__ == "__main__":
    main()
