"""Validation throughput on demo-like records, against json.loads + jsonschema per record.

    .venv/bin/python bench/validate_throughput.py [--records 10000]

Our stage does more than the baseline: geometry rules, bounds, image checks (each distinct image
opened and fully decoded once), duplicate detection, and it writes clean/rejects/report files.
The baseline only parses and checks the schema, once with `jsonschema.validate` per record (what
a plain script does) and once with a validator built up front (the fastest plain jsonschema).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import numpy as np

from visionqc import contract
from visionqc.demo.scenes import scene, summary_of
from visionqc.validate import validate


def build(folder: Path, count: int, distinct_images: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    for i in range(distinct_images):
        image, _ = scene(rng)
        image.save(folder / "images" / f"{i:04d}.jpg", quality=90)
    lines = []
    for n in range(count):
        _, items = scene(rng)
        objects = []
        for item in items:
            flat = [c for p in item.points for c in p]
            key = {"bbox": "bbox_2d", "poly": "poly", "line": "line"}[item.kind]
            obj = {key: flat, "desc": contract.format_desc(item.category, item.attributes)}
            if key != "bbox_2d":
                obj[f"{key}_points"] = len(flat) // 2
            objects.append(obj)
        record = {"images": [f"images/{n % distinct_images:04d}.jpg"], "width": 128, "height": 128, "objects": objects,
                  "summary": summary_of(items), "metadata": {"n": n}}
        lines.append(json.dumps(record, ensure_ascii=False))
    path = folder / "records.jsonl"
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=500, help="distinct images the records point at")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = build(tmp / "data", args.records, args.images)
        lines = path.read_text("utf-8").splitlines()
        schema = contract.record_schema()

        def ours():
            report = validate(path, tmp / "clean.jsonl", tmp / "rejects.jsonl", tmp / "report.json").report
            assert report["records_out"] == args.records, report

        def plain_per_call():
            for line in lines:
                jsonschema.validate(json.loads(line), schema)

        validator = jsonschema.Draft7Validator(schema)

        def plain_prebuilt():
            for line in lines:
                validator.validate(json.loads(line))

        ours_s = best_of(args.repeats, ours)
        per_call_s = best_of(1, plain_per_call)
        prebuilt_s = best_of(args.repeats, plain_prebuilt)
    def rate(seconds):
        return args.records / seconds

    print(f"records: {args.records}, distinct images: {args.images}, python {sys.version.split()[0]}")
    print(f"visionqc validate (schema+geometry+images+files): {rate(ours_s):10.0f} records/s")
    print(f"json.loads + jsonschema.validate per record:       {rate(per_call_s):10.0f} records/s  -> ratio {per_call_s / ours_s:.1f}x")
    print(f"json.loads + prebuilt Draft7Validator:             {rate(prebuilt_s):10.0f} records/s  -> ratio {prebuilt_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
