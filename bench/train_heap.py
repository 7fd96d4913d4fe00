"""CPU training step time: glibc's default heap vs the CLI's setting that keeps big freed blocks.

    .venv/bin/python bench/train_heap.py [--workdir .] [--steps 60]

Run it after `make demo`: it trains the demo's full fine-tune recipe for --steps steps on the demo's
token cache, once with VISIONQC_KEEP_FREED_MEMORY=0 (what any torch program gets) and once with the
default, and prints the seconds per step, the kernel (sys) CPU time and whether both models are
byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def train_cache(workdir: Path) -> Path:
    """The demo's train cache pointer: augmented epoch 0, else the fused split (augment.epochs: 0)."""
    epoch = workdir / "results/cache/demo.epoch_0.json"
    return epoch if epoch.exists() else workdir / "results/cache/demo.train.json"


def train(workdir: Path, recipe: Path, out: Path, keep: str) -> tuple[float, float, bytes]:
    """(train seconds, sys CPU seconds, model bytes) of one `visionqc train` process."""
    env = dict(os.environ, VISIONQC_KEEP_FREED_MEMORY=keep, VISIONQC_TRACKING_URI="", OMP_NUM_THREADS="2")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-m", "visionqc.cli", "train", "--base", str(workdir / "resources/models/demo"),
         "--train-cache", str(train_cache(workdir)),
         "--val-cache", str(workdir / "results/cache/demo.val.json"),
         "--recipe", str(recipe), "--device", "cpu", "--model", str(out / "model"), "--summary", str(out / "summary.json"),
         "--recipe-out", str(out / "recipe.json"), "--history", str(out / "history.json"),
         "--loss-plot", str(out / "loss.png"), "--checkpoints", str(out / "ckpt"), "--name", "bench", "--tracking-uri", ""],
        capture_output=True, text=True, cwd=workdir, env=env, check=False)
    if done.returncode:
        sys.exit(f"visionqc train failed:\n{done.stderr[-2000:]}")
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    runtime = float(re.findall(r"'train_runtime': '([\d.]+)'", done.stdout + done.stderr)[-1])
    return runtime, used.ru_stime - before.ru_stime, (out / "model/model.safetensors").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO), help="a directory where `make demo` has run")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    workdir = Path(args.workdir).absolute()
    if not train_cache(workdir).exists():
        sys.exit(f"no demo token cache under {workdir}/results/cache: run `make demo` there first")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = yaml.safe_load((REPO / "config/recipes/demo_full.yaml").read_text())
        recipe.update(max_steps=args.steps, eval_on_start=False, eval_steps=10**6, save_steps=10**6, logging_steps=10)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        default_s, default_sys, default_model = train(workdir, tmp / "recipe.yaml", tmp / "default", "0")
        kept_s, kept_sys, kept_model = train(workdir, tmp / "recipe.yaml", tmp / "kept", "1")
    print(json.dumps({"steps": args.steps, "recipe": "config/recipes/demo_full.yaml"}))
    print(f"glibc default:     {default_s / args.steps:.3f} s/step, {default_sys:6.1f} s sys CPU")
    print(f"keep freed blocks: {kept_s / args.steps:.3f} s/step, {kept_sys:6.1f} s sys CPU")
    print(f"ratio: {default_s / kept_s:.2f}x; models byte-identical: {default_model == kept_model}")


if __name__ == "__main__":
    main()
