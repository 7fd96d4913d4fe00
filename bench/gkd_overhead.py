"""CPU step time of GKD against plain SFT, on the demo's token cache and recipe.

    .venv/bin/python bench/gkd_overhead.py [--workdir .] [--steps 30]

Run it after `make demo`. It trains the demo's full fine-tune recipe (batch 8) for --steps steps four
times from the same base, cache and seed: plain SFT; GKD with the logit JSD (the teacher is the base,
a second frozen copy); GKD with the JSD and visual KD at all three places; GKD whose JSD reads only
the teacher's top 64 logits per position (ms-swift's gkd_logits_topk). It prints ms-swift's own
train_runtime per step and the ratio to SFT. Each trainer draws its batches with its own sampler, so
the batches have the same size and source but not the same order.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def demo_train_cache(workdir: Path) -> Path:
    """The demo's train cache pointer: augmented epoch 0, or the fused split when augmentation is off."""
    for name in ("demo.epoch_0.json", "demo.train.json"):
        if (workdir / "results/cache" / name).exists():
            return workdir / "results/cache" / name
    sys.exit(f"no demo token cache under {workdir}/results/cache: run `make demo` there first")


def seconds_per_step(workdir: Path, recipe: dict, out: Path, steps: int) -> float:
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, VISIONQC_TRACKING_URI="", OMP_NUM_THREADS="2")
    done = subprocess.run(
        [sys.executable, "-m", "visionqc.cli", "train", "--base", str(workdir / "resources/models/demo"),
         "--train-cache", str(demo_train_cache(workdir)), "--recipe", str(out / "recipe.yaml"), "--device", "cpu",
         "--model", str(out / "model"), "--summary", str(out / "summary.json"), "--recipe-out", str(out / "resolved.json"),
         "--history", str(out / "history.json"), "--loss-plot", str(out / "loss.png"), "--checkpoints", str(out / "ckpt"),
         "--name", "bench", "--tracking-uri", ""],
        capture_output=True, text=True, cwd=workdir, env=env, check=False)
    if done.returncode:
        sys.exit(f"visionqc train failed:\n{done.stderr[-3000:]}")
    history = json.loads((out / "history.json").read_text())["log_history"]
    return next(h["train_runtime"] for h in history if "train_runtime" in h) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO), help="a directory where `make demo` has run")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    workdir = Path(args.workdir).absolute()
    demo_train_cache(workdir)
    recipe = yaml.safe_load((REPO / "config/recipes/demo_full.yaml").read_text())
    recipe.update(max_steps=args.steps, eval_on_start=False, eval_strategy="no", save_steps=10**6, logging_steps=10)
    variants = {
        "sft": recipe,
        "gkd (logit JSD)": {**recipe, "rlhf_type": "gkd", "sft_alpha": 1.0, "beta": 0.1, "lmbda": 0.0},
        "gkd (JSD + visual KD)": {**recipe, "rlhf_type": "gkd", "sft_alpha": 1.0, "beta": 0.1, "lmbda": 0.0,
                                  "visual_kd": {"vit": 0.1, "aligner": 0.1, "deepstack": 0.05}},
        "gkd (top-64 teacher)": {**recipe, "rlhf_type": "gkd", "sft_alpha": 1.0, "beta": 0.1, "lmbda": 0.0, "gkd_logits_topk": 64},
    }
    with tempfile.TemporaryDirectory() as tmp:
        times = {name: seconds_per_step(workdir, variant, Path(tmp) / str(i), args.steps)
                 for i, (name, variant) in enumerate(variants.items())}
    print(f"{args.steps} steps each, batch {recipe['per_device_train_batch_size']}, full fine-tune, CPU")
    for name, seconds in times.items():
        print(f"{name:24s} {seconds:.3f} s/step  {seconds / times['sft']:.2f}x sft")


if __name__ == "__main__":
    main()
