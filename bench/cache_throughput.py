"""Cache throughput: `visionqc cache` vs `swift export --to_cached_dataset true`, same JSONL, same model.

    .venv/bin/python bench/cache_throughput.py [--records 5000]

Both run as fresh processes, start-up included (that is what a pipeline stage costs). swift's
cached dataset stores messages, image paths and lengths only, and re-encodes every sample during
training; ours stores the real input_ids, labels and image grids. Prints records/s and the ratio.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from visionqc.demo.model import build_demo_model  # noqa: E402
from visionqc.demo.scenes import scene, summary_of  # noqa: E402
from visionqc.messages import build_messages  # noqa: E402

PROMPTS = {"summary": "统计图中各类别的数量。"}


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--images", type=int, default=1000, help="distinct 128x128 PNGs the records use")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_demo_model(tmp / "model")
        rng = np.random.default_rng(0)
        (tmp / "images").mkdir()
        summaries = []
        for i in range(args.images):
            image, items = scene(rng)
            image.save(tmp / "images" / f"{i:05d}.png")
            summaries.append(summary_of(items))
        records = [{"images": [f"images/{n % args.images:05d}.png"], "width": 128, "height": 128, "objects": [],
                    "summary": summaries[n % args.images], "metadata": {"_fusion_mode": "summary", "_fusion_prompt": "summary", "n": n}}
                   for n in range(args.records)]
        (tmp / "records.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
        # swift reads the same samples as messages rows
        rows = [build_messages(r, tmp, PROMPTS) for r in records]
        (tmp / "swift.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", USE_HF="1",
                   IMAGE_MAX_TOKEN_NUM="1024", IMAGE_MIN_TOKEN_NUM="4", MLFLOW_DISABLE_TELEMETRY="true",
                   HF_HOME=str(tmp / "hf"), MODELSCOPE_CACHE=str(tmp / "ms"))
        ours = timed([str(bin_dir / "visionqc"), "cache", "--records", str(tmp / "records.jsonl"), "--model", str(tmp / "model"),
                      "--cache-root", str(tmp / "cache"), "--pointer", str(tmp / "pointer.json"), "--name", "bench",
                      "--options", json.dumps({"prompts": PROMPTS, "image_max_tokens": 1024, "image_min_tokens": 4})], env)
        theirs = timed([str(bin_dir / "swift"), "export", "--model", str(tmp / "model"), "--model_type", "qwen3_vl",
                        "--template", "qwen3_vl", "--dataset", str(tmp / "swift.jsonl"), "--split_dataset_ratio", "0",
                        "--to_cached_dataset", "true", "--output_dir", str(tmp / "swift_cache"), "--dataset_num_proc", "1",
                        "--max_length", "1024"], env)
    def rate(seconds):
        return args.records / seconds

    print(f"records: {args.records} ({args.images} distinct 128x128 PNGs), processes timed from start to exit")
    print(f"visionqc cache (input_ids, labels, grids):     {ours:7.1f} s  {rate(ours):8.1f} records/s")
    print(f"swift export --to_cached_dataset (lengths):    {theirs:7.1f} s  {rate(theirs):8.1f} records/s")
    print(f"ratio: {theirs / ours:.1f}x")


if __name__ == "__main__":
    main()
