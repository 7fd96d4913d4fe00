"""Cache throughput: `visionqc cache` vs `swift export --to_cached_dataset true`, same JSONL, same model.

    .venv/bin/python bench/cache_throughput.py [--records 5000]

Both run as fresh processes, start-up included (that is what a pipeline stage costs). swift's
cached dataset stores messages, image paths and lengths only, and re-encodes every sample during
training; ours stores the real input_ids, labels and image grids. Prints records/s and the ratio,
and the start-up floor: a process that imports the cache stage and loads the tokenizer, then exits
(what any cache process pays before its first record), with the ratio it would reach at zero cost per record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def write_inputs(folder: Path, records: int, images: int) -> None:
    """The tiny model, `images` distinct scenes and `records` records over them, as ours and as swift's rows."""
    build_demo_model(folder / "model")
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    summaries = []
    for i in range(images):
        image, items = scene(rng)
        image.save(folder / "images" / f"{i:05d}.png")
        summaries.append(summary_of(items))
    rows = [{"images": [f"images/{n % images:05d}.png"], "width": 128, "height": 128, "objects": [],
             "summary": summaries[n % images], "metadata": {"_fusion_mode": "summary", "_fusion_prompt": "summary", "n": n}}
            for n in range(records)]
    (folder / "records.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    # swift reads the same samples as messages rows
    swift_rows = [build_messages(r, folder, PROMPTS) for r in rows]
    (folder / "swift.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in swift_rows), "utf-8")


def ours_command(folder: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "visionqc"), "cache", "--records", str(folder / "records.jsonl"),
            "--model", str(folder / "model"), "--cache-root", str(folder / "cache"), "--pointer", str(folder / "pointer.json"),
            "--lengths-plot", str(folder / "lengths.png"), "--name", "bench",
            "--options", json.dumps({"prompts": PROMPTS, "image_max_tokens": 1024, "image_min_tokens": 4})]


FLOOR = "import sys; import visionqc.cache, tokenizers; tokenizers.Tokenizer.from_file(sys.argv[1])"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--images", type=int, default=1000, help="distinct 128x128 PNGs the records use")
    parser.add_argument("--keep", type=Path, help="build the inputs in this new folder and keep them (to profile)")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or Path(tmp)
        write_inputs(tmp, args.records, args.images)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", USE_HF="1",
                   IMAGE_MAX_TOKEN_NUM="1024", IMAGE_MIN_TOKEN_NUM="4", MLFLOW_DISABLE_TELEMETRY="true",
                   HF_HOME=str(tmp / "hf"), MODELSCOPE_CACHE=str(tmp / "ms"))
        swift = [str(bin_dir / "swift"), "export", "--model", str(tmp / "model"), "--model_type", "qwen3_vl",
                 "--template", "qwen3_vl", "--dataset", str(tmp / "swift.jsonl"), "--split_dataset_ratio", "0",
                 "--to_cached_dataset", "true", "--output_dir", str(tmp / "swift_cache"), "--dataset_num_proc", "1",
                 "--max_length", "1024"]
        ours, theirs, floor = float("inf"), float("inf"), float("inf")
        for _ in range(2):  # best of two, each from nothing: no cache folder, no datasets/modelscope cache
            for made in ("cache", "swift_cache", "hf", "ms"):
                shutil.rmtree(tmp / made, ignore_errors=True)
            ours = min(ours, timed(ours_command(tmp), env))
            theirs = min(theirs, timed(swift, env))
            floor = min(floor, timed([sys.executable, "-c", FLOOR, str(tmp / "model/tokenizer.json")], env))

    def rate(seconds):
        return args.records / seconds

    print(f"records: {args.records} ({args.images} distinct 128x128 PNGs), processes timed from start to exit, best of 2")
    print(f"visionqc cache (input_ids, labels, grids):     {ours:7.1f} s  {rate(ours):8.1f} records/s")
    print(f"swift export --to_cached_dataset (lengths):    {theirs:7.1f} s  {rate(theirs):8.1f} records/s")
    print(f"ratio: {theirs / ours:.1f}x")
    print(f"start-up floor (imports, tokenizer load):       {floor:7.1f} s  at most {theirs / floor:.1f}x with records free")


if __name__ == "__main__":
    main()
