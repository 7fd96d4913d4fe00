"""Stage convert: annotation exports → contract JSONL (train/val), converted images, QA report, overlays."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from visionqc import contract
from visionqc.convert import coco, cvat, label_studio, labelme, platform, voc, yolo
from visionqc.convert.common import (
    ConvertOptions,
    ConvertOutputs,
    ImagePlacement,
    Issue,
    SplitSpool,
    convert_image,
    split_keys,
)
from visionqc.convert.signals import convert_signals
from visionqc.convert.sniff import nothing_converted
from visionqc.io import write_json, write_jsonl
from visionqc.plots import draw_overlay
from visionqc.taxonomy import closest
from visionqc.tracking import StageResult

READERS = {"platform": platform.read, "labelme": labelme.read, "coco": coco.read, "cvat": cvat.read,
           "label_studio": label_studio.read, "yolo": yolo.read, "voc": voc.read}
FORMATS = (*READERS, "jsonl", "signals")


def convert(fmt: str, source: str | Path, outputs: ConvertOutputs, options: dict | None = None) -> StageResult:
    """Convert one export into the given outputs (train/val JSONL, report, images/ or signals/, overlays/).

    Media and overlays are built in a scratch folder and moved into place, the JSONL files and the
    report are written atomically, the report last: a killed run leaves no complete-looking set.
    """
    opts = ConvertOptions.from_dict(dict(options or {}))
    source = Path(source)
    try:
        if fmt == "jsonl":
            report = convert_jsonl(source, outputs, opts)
        elif fmt == "signals":
            report = convert_signals(source, outputs, opts)
        elif fmt in READERS:
            report = convert_images(fmt, source, outputs, opts)
        else:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-export it as UTF-8") from exc
    return StageResult(
        report={k: v for k, v in report.items() if k not in ("issues", "notes")},
        metrics={"records_in": report.get("images_in", report.get("records_in", 0)), "records_out": report["records_out"],
                 **{f"shapes.{k}": v for k, v in report.get("shapes", {}).items()},
                 **{f"rejected.{k}": v for k, v in report["issues_by_reason"].items()},
                 **{f"notes.{k}": v for k, v in report.get("notes_by_reason", {}).items()},
                 **{f"objects.{k}": v for k, v in report.get("objects", {}).items()},
                 **{f"labels.{k}": v for k, v in report.get("labels", {}).items()}},
        artifacts=[outputs.report, (outputs.overlays or outputs.examples, "overlays")],
        inputs={"export": source}, outputs={"train": outputs.train, "val": outputs.val},
    )


def convert_images(fmt: str, source: Path, outputs: ConvertOutputs, opts: ConvertOptions) -> dict:
    if not source.exists():
        raise FileNotFoundError(f"{source}: export not found; check datasets.<name>.path in the config")
    stats = Counter(clipped_coordinates=0, exif_rotated=0, resized=0, multipart_instances=0)
    shapes = ShapeLedger(source)
    issues: list[Issue] = []
    geometries, categories = Counter(), Counter()  # of the converted objects, for the report
    classes: Counter = Counter()  # the export's class names, before label_map
    reader_options = getattr(opts, fmt, None)
    placement = ImagePlacement.for_export(source, getattr(reader_options, "images", ""))
    with outputs.staged() as scratch:
        records = SplitSpool(scratch, opts.seed)
        images_in = 0
        for item in tqdm(READERS[fmt](source, reader_options), desc=f"convert {source.name}", unit="img", mininterval=2):
            images_in += item.has_image
            classes.update(shape.category for shape in item.shapes)
            name, record, found, converted = convert_image(item, scratch / "media", outputs.media_prefix, opts, stats, placement)
            issues.extend(found)
            shapes.add(item.annotation_file, item.entries, converted, sum(issue.entries for issue in found))
            if record is not None:
                if len(records) < opts.overlays:
                    draw_overlay(record, scratch / "media" / name, scratch / "overlays" / f"{len(records):03d}.png")
                records.add(name, record)
                geometries.update(contract.geometry_key(obj) for obj in record["objects"])
                categories.update(contract.desc_category(obj["desc"]) for obj in record["objects"])
        shapes.close()
        refuse_unknown_categories(source, issues, classes, opts)
        if not len(records):
            for issue in issues:  # the report is not written: the log keeps every reason
                print(f"visionqc convert: {issue.file} {issue.ref}: {issue.reason}: {issue.detail}", file=sys.stderr)
            raise ValueError(nothing_converted(fmt, source, issues))
        issues.extend(unmatched_label_map(source, classes, opts))
        splits = records.write_splits(outputs, opts.val_fraction)
    report = _report(fmt, source, images_in, splits, geometries, categories, issues, stats, shapes)
    write_json(outputs.report, report)
    return report


class ShapeLedger:
    """Every input shape is converted or reported: per annotation file, in == converted + reported.

    Readers yield a file's images together, so each file is checked when the next begins, and only the
    totals are kept (memory does not grow with the files).
    """

    def __init__(self, source: Path):
        self.source = source
        self.totals: Counter = Counter()
        self.files = 0
        self._file: str | None = None
        self._count: Counter = Counter()

    def add(self, file: str, entries: int, converted: int, reported: int) -> None:
        if file != self._file:
            self.close()
            self._file, self.files = file, self.files + 1
        self._count.update({"in": entries, "converted": converted, "reported": reported})

    def close(self) -> None:
        """Check the file being counted, and add it to the totals."""
        count = self._count
        if count["in"] != count["converted"] + count["reported"]:
            raise RuntimeError(f"{self.source / self._file if self.source.is_dir() else self.source}: {count['in']} input "
                               f"shapes but {count['converted']} converted + {count['reported']} reported; the converter "
                               f"lost shapes (a bug in visionqc: please report it with this file)")
        self.totals.update(count)
        self._count = Counter()


def refuse_unknown_categories(source: Path, issues: list[Issue], classes: Counter, opts: ConvertOptions) -> None:
    """taxonomy.unknown: refuse stops convert, naming every export class that is no category and not mapped."""
    if opts.taxonomy.unknown != "refuse" or not any(issue.reason == "unknown_category" for issue in issues):
        return
    mapped = {name: opts.label_map.get(name, name) for name in classes}
    listed = ", ".join(f"{name} ({classes[name]} shapes)" for name in sorted(classes)
                       if mapped[name] is not None and not opts.taxonomy.knows(mapped[name]))
    raise ValueError(f"{source}: classes not in taxonomy.categories: {listed}; add them to the taxonomy, map them onto a "
                     f"category with convert.label_map (null reports them), or set taxonomy.unknown: report")


def unmatched_label_map(source: Path, classes: Counter, opts: ConvertOptions) -> list[Issue]:
    """A label_map key that names no class of this export (a typo, or the wrong dataset): a note naming the closest."""
    notes = []
    for key in sorted(set(opts.label_map) - set(classes)):
        near = closest(key, classes)
        detail = (f"convert.label_map key {key!r} matches no class of this export"
                  f"{f'; did you mean {near!r}?' if near else ''} (its classes: {', '.join(sorted(classes)) or 'none'})")
        print(f"visionqc convert: warning: {source}: {detail}", file=sys.stderr)
        notes.append(Issue(str(source), "convert.label_map", "label_map_unmatched", detail, entries=0, note=True))
    return notes


def _report(fmt, source, images_in, splits, geometries, categories, issues, stats, shapes) -> dict:
    dropped = [issue for issue in issues if not issue.note]
    notes = [issue for issue in issues if issue.note]
    return {
        "format": fmt,
        "source": str(source),
        "images_in": images_in,
        "files_in": shapes.files,
        "records_out": sum(splits.values()),
        "records": splits,
        "shapes": {name: shapes.totals[name] for name in ("in", "converted", "reported")},
        "objects": dict(geometries),
        "categories": dict(sorted(categories.items())),
        "issues_by_reason": dict(sorted(Counter(issue.reason for issue in dropped).items())),
        "issues": [issue.as_dict() for issue in dropped],
        "notes_by_reason": dict(sorted(Counter(issue.reason for issue in notes).items())),
        "notes": [issue.as_dict() for issue in notes],
        **dict(stats),
    }


def convert_jsonl(source: Path, outputs: ConvertOutputs, opts: ConvertOptions) -> dict:
    """Records already in the contract (dense or chat-only): split them, rebasing image paths.

    Lines are not checked here; validate does that, with line numbers, on the split files.
    """
    if not source.is_file():
        raise FileNotFoundError(f"{source}: JSONL not found; check datasets.<name>.path in the config")
    lines = [line for line in source.read_text("utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(nothing_converted("jsonl", source, []))
    keys = [f"{index}:{line}" for index, line in enumerate(lines)]
    val_keys = split_keys(keys, opts.val_fraction, opts.seed)
    with outputs.staged():
        splits = {"train": [], "val": []}
        for number, (key, line) in enumerate(zip(keys, lines, strict=True), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}: record {number}: not valid JSON ({exc}); fix or remove it") from exc
            if isinstance(record, dict):
                contract.rebase_media(record, source.parent, outputs.records_dir)
            splits["val" if key in val_keys else "train"].append(record)
        write_jsonl(outputs.train, splits["train"])
        write_jsonl(outputs.val, splits["val"])
    report = {"format": "jsonl", "source": str(source), "images_in": 0, "records_in": len(lines),
              "records_out": len(lines), "records": {k: len(v) for k, v in splits.items()},
              "objects": {}, "categories": {}, "issues_by_reason": {}, "issues": []}
    write_json(outputs.report, report)
    return report
