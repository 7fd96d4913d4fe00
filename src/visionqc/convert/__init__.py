"""Stage convert: annotation exports → contract JSONL (train/val), converted images, QA report, overlays."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from visionqc import contract
from visionqc.convert import coco, labelme, platform
from visionqc.convert.common import (
    ConvertOptions,
    convert_image,
    split_keys,
    write_splits,
)
from visionqc.convert.signals import convert_signals
from visionqc.io import atomic_directory, write_json, write_jsonl
from visionqc.plots import draw_overlay

READERS = {"platform": platform.read, "labelme": labelme.read, "coco": coco.read}


def convert(fmt: str, source: str | Path, out_dir: str | Path, options: dict | None = None) -> dict:
    """Convert one export into `out_dir` (train.jsonl, val.jsonl, report.json, images/, overlays/).

    The folder is built under a temporary name and renamed into place, so a killed run leaves
    nothing that looks complete. Returns the QA report.
    """
    if fmt == "jsonl":
        return convert_jsonl(source, out_dir, options or {})
    if fmt == "signals":
        return convert_signals(source, out_dir, options or {})
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(READERS)}, jsonl or signals")
    options = dict(options or {})
    common = ConvertOptions.from_dict(options)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: export not found; check datasets.<name>.path in the config")
    stats = Counter(clipped_coordinates=0, exif_rotated=0, resized=0)
    issues, records = [], []
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as work:
        images_in = 0
        for item in tqdm(READERS[fmt](source, options.get(fmt, {})), desc=f"convert {source.name}", unit="img", mininterval=2):
            images_in += 1
            record, found = convert_image(item, work / "images", common, stats)
            issues.extend(found)
            if record is not None:
                records.append((item.key, record))
        splits = write_splits(work, records, common.val_fraction, common.seed)
        for index, (_, record) in enumerate(records[: common.overlays]):
            draw_overlay(record, work, work / "overlays" / f"{index:03d}.png")
        (work / "overlays").mkdir(exist_ok=True)
        report = _report(fmt, source, images_in, splits, issues, stats)
        write_json(work / "report.json", report)
    return report


def _report(fmt, source, images_in, splits, issues, stats) -> dict:
    objects = [obj for rows in splits.values() for record in rows for obj in record["objects"]]
    return {
        "format": fmt,
        "source": str(source),
        "images_in": images_in,
        "records_out": sum(len(rows) for rows in splits.values()),
        "records": {name: len(rows) for name, rows in splits.items()},
        "objects": dict(Counter(contract.geometry_key(obj) for obj in objects)),
        "categories": dict(sorted(Counter(contract.desc_category(obj["desc"]) for obj in objects).items())),
        "issues_by_reason": dict(sorted(Counter(issue.reason for issue in issues).items())),
        "issues": [issue.as_dict() for issue in issues],
        **dict(stats),
    }


def convert_jsonl(source: str | Path, out_dir: str | Path, options: dict) -> dict:
    """Records already in the contract (dense or chat-only): split them, rebasing image paths.

    Lines are not checked here; validate does that, with line numbers, on the split files.
    """
    common = ConvertOptions.from_dict(options)
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: JSONL not found; check datasets.<name>.path in the config")
    lines = [line for line in source.read_text("utf-8").splitlines() if line.strip()]
    keys = [f"{index}:{line}" for index, line in enumerate(lines)]
    val_keys = split_keys(keys, common.val_fraction, common.seed)
    with atomic_directory(out_dir) as work:
        splits = {"train": [], "val": []}
        for number, (key, line) in enumerate(zip(keys, lines, strict=True), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}: record {number}: not valid JSON ({exc}); fix or remove it") from exc
            if isinstance(record, dict):
                contract.rebase_media(record, source.parent, Path(out_dir))
            splits["val" if key in val_keys else "train"].append(record)
        for name, rows in splits.items():
            write_jsonl(work / f"{name}.jsonl", rows)
        (work / "images").mkdir()
        (work / "overlays").mkdir()
        report = {"format": "jsonl", "source": str(source), "images_in": 0, "records_in": len(lines),
                  "records_out": len(lines), "records": {k: len(v) for k, v in splits.items()},
                  "objects": {}, "categories": {}, "issues_by_reason": {}, "issues": []}
        write_json(work / "report.json", report)
    return report
