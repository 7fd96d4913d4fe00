"""Stage-A generation: batched (left-padded) vs batch-1 images/s on the same model.

    .venv/bin/python bench/stage_a_batching.py [--model DIR] [--images 64] [--batch 16]

Without --model it builds the tiny demo model. EOS is switched off so every request generates
exactly --new-tokens tokens in both modes: the ratio measures batching, not answer lengths.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from visionqc.demo.model import build_demo_model  # noqa: E402
from visionqc.demo.scenes import scene  # noqa: E402
from visionqc.inference import Generator  # noqa: E402
from visionqc.vision import PixelBudget  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tmp / "model"
        if not args.model:
            build_demo_model(model)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.images):
            image, _ = scene(rng)
            paths.append(str(tmp / f"{i:04d}.jpg"))
            image.save(paths[-1], quality=92)
        generator = Generator(model, args.device, PixelBudget(max_tokens=1024, min_tokens=4), max_new_tokens=args.new_tokens)
        generator.model.generation_config.eos_token_id = None
        generator.model.generation_config.min_new_tokens = args.new_tokens
        requests = [{"images": [p], "prompt": "统计图中各类别的数量，输出一行JSON。"} for p in paths]
        generator.generate(requests[:2])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(requests), args.batch):
            generator.generate(requests[i : i + args.batch])
        batched = time.perf_counter() - start
        start = time.perf_counter()
        for request in requests:
            generator.generate([request])
        single = time.perf_counter() - start
    print(f"images: {args.images}, new tokens each: {args.new_tokens}, device: {args.device}")
    print(f"batch {args.batch:3d}: {args.images / batched:7.2f} images/s")
    print(f"batch   1: {args.images / single:7.2f} images/s")
    print(f"ratio: {single / batched:.1f}x")


if __name__ == "__main__":
    main()
