"""Stage validate: contract JSONL → clean JSONL + rejects JSONL (file, line, field, reason, original) + report.

Nothing is dropped without a reject line. In fail_fast mode the first problem stops the stage
with file:line and field. Clean lines pass through byte for byte, except that relative image
paths are rebased when the clean file lives in another folder than its input (only `images`
changes then).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy
import orjson
from PIL import Image
from shapely.geometry import Polygon
from shapely.validation import make_valid
from tqdm import tqdm

from visionqc import contract
from visionqc.contract import Problem
from visionqc.images import fully_decodes, orientation
from visionqc.io import atomic_write, dumps, iter_lines, write_json
from visionqc.options import options_from
from visionqc.signals import read_signal
from visionqc.taxonomy import Taxonomy
from visionqc.tracking import StageResult, numbers_of

WARNING_LINES_SHOWN = 5


class ValidationError(ValueError):
    """Raised in fail_fast mode; the message names file:line, the field and what to do."""


@dataclass
class SignalBounds:
    """Inclusive [low, high] ranges a signal must lie in (the validate.signals config block)."""

    sampling_rate: tuple[float, float] = (1.0, 100_000.0)
    channels: tuple[int, int] = (1, 16)
    seconds: tuple[float, float] = (0.1, 86_400.0)

    def check(self, section: str) -> None:
        for name in ("sampling_rate", "channels", "seconds"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{section}.{name} must be [low, high] with low <= high, got {[low, high]}")


@dataclass
class ValidateOptions:
    mode: str = "report"  # report | fail_fast
    data_root: str | None = None  # image paths must stay inside it; default: the JSONL's folder
    bounds_tolerance: float = 0.0
    bounds_policy: str = "reject"  # reject | clip
    legacy: str = "warn"  # warn | reject: older summary/desc forms
    self_crossing: str = "warn"  # warn | reject | repair (shapely make_valid): polygons that cross themselves
    decode_images: bool = True  # full decode catches truncated files; False reads headers only
    reject_duplicates: bool = True
    signals: SignalBounds = field(default_factory=SignalBounds)  # bounds for time-series records
    taxonomy: Taxonomy = field(default_factory=Taxonomy)  # the config's taxonomy block: the categories a record may name

    def check(self, section: str) -> None:
        if self.mode not in ("report", "fail_fast"):
            raise ValueError(f"{section}.mode must be report or fail_fast, got {self.mode!r}")
        if self.self_crossing not in ("warn", "reject", "repair"):
            raise ValueError(f"{section}.self_crossing must be warn, reject or repair, got {self.self_crossing!r}")
        if self.legacy not in ("warn", "reject"):
            raise ValueError(f"{section}.legacy must be warn or reject, got {self.legacy!r}")
        if self.bounds_policy not in ("reject", "clip"):
            raise ValueError(f"{section}.bounds_policy must be reject or clip, got {self.bounds_policy!r}")

    @classmethod
    def from_dict(cls, options: dict) -> ValidateOptions:
        return options_from(cls, options, "validate")


def _outside(real: str, root: str) -> bool:
    return real != root and not real.startswith(root + os.sep)


MEMO_SIZE = 1024  # image paths whose check is remembered (records that share an image are usually neighbours)


class ImageChecker:
    """Checks image files once per path: inside the data root, present, decodable, size, orientation."""

    def __init__(self, base_dir: Path, data_root: Path, decode: bool):
        self.base_dir = base_dir
        self.root = os.path.realpath(data_root)
        self.decode = decode
        self._seen: dict[str, tuple[Problem | None, tuple[int, int] | None]] = {}

    def _inspect(self, rel: str, field: str) -> tuple[Problem | None, tuple[int, int] | None]:
        real = os.path.realpath(self.base_dir / rel)
        if _outside(real, self.root):
            return Problem(field, "path_escapes_root", f"{rel} resolves outside the data root {self.root}; set validate.data_root"), None
        if not os.path.isfile(real):
            return Problem(field, "missing_image", f"{rel} does not exist (looked in {self.base_dir})"), None
        try:
            with Image.open(real) as image:
                size, orient = image.size, orientation(image)
            if self.decode:
                fully_decodes(real)
        except Exception as exc:  # PIL raises many types for broken files
            return Problem(field, "corrupt_image", f"{rel} does not decode: {exc}"), None
        if orient != 1:
            return Problem(field, "exif_rotated", f"{rel} has EXIF orientation {orient}; models read raw pixels, so run convert to bake it in"), None
        return None, size

    def check(self, rel: str, field: str, width: int, height: int) -> Problem | None:
        if rel not in self._seen:
            if len(self._seen) >= MEMO_SIZE:
                self._seen.clear()
            self._seen[rel] = self._inspect(rel, field)
        problem, size = self._seen[rel]
        if problem is not None:
            return Problem(field, problem.reason, problem.message)
        if size != (width, height):
            return Problem(field, "size_mismatch", f"{rel} is {size[0]}x{size[1]} but the record says {width}x{height}")
        return None


class SignalChecker:
    """Checks signal files once per path: inside the data root, readable, finite; then rate, channels, duration."""

    def __init__(self, base_dir: Path, data_root: Path, bounds: SignalBounds):
        self.base_dir = base_dir
        self.root = os.path.realpath(data_root)
        self.bounds = bounds
        self._seen: dict[str, tuple[Problem | None, tuple[int, int, float | None]]] = {}

    def _inspect(self, rel: str, field: str) -> tuple[Problem | None, tuple[int, int, float | None]]:
        real = os.path.realpath(self.base_dir / rel)
        if _outside(real, self.root):
            return Problem(field, "path_escapes_root", f"{rel} resolves outside the data root {self.root}; set validate.data_root"), (0, 0, None)
        if not os.path.isfile(real):
            return Problem(field, "missing_signal", f"{rel} does not exist (looked in {self.base_dir})"), (0, 0, None)
        try:
            samples, header_rate = read_signal(real)
        except Exception as exc:  # soundfile, numpy and csv parsing raise many types
            return Problem(field, "unreadable_signal", f"{rel} does not open as a signal: {exc}"), (0, 0, None)
        finite = numpy.isfinite(samples)
        if not finite.all():
            frame = int(numpy.argwhere(~finite)[0][0])
            return Problem(field, "non_finite_samples", f"{rel} holds NaN or infinity (first at frame {frame}); repair or drop the trace"), (0, 0, None)
        return None, (samples.shape[0], samples.shape[1], header_rate)

    def check(self, rel: str, field: str, signal: dict) -> Problem | None:
        if rel not in self._seen:
            self._seen[rel] = self._inspect(rel, f"{field}.url")
        problem, (frames, channels, header_rate) = self._seen[rel]
        if problem is not None:
            return Problem(f"{field}.url", problem.reason, problem.message)
        rate, bounds = signal["sampling_rate"], self.bounds
        if header_rate is not None and abs(header_rate - rate) > 1e-6 * rate:
            return Problem(f"{field}.sampling_rate", "sampling_rate_mismatch", f"the record says {rate} Hz but {rel} was recorded at {header_rate:g} Hz")
        if not bounds.sampling_rate[0] <= rate <= bounds.sampling_rate[1]:
            return Problem(f"{field}.sampling_rate", "sampling_rate_out_of_range", f"{rate} Hz lies outside validate.signals.sampling_rate {list(bounds.sampling_rate)}")
        declared = signal.get("channels")
        if declared is not None and declared != channels:
            return Problem(f"{field}.channels", "channels_mismatch", f"the record says {declared} channel(s) but {rel} has {channels}")
        if not bounds.channels[0] <= channels <= bounds.channels[1]:
            return Problem(f"{field}.url", "channels_out_of_range", f"{rel} has {channels} channel(s), outside validate.signals.channels {list(bounds.channels)}")
        seconds = frames / rate
        if seconds < bounds.seconds[0]:
            return Problem(f"{field}.url", "signal_too_short", f"{rel} lasts {seconds:.3g} s, under validate.signals.seconds minimum {bounds.seconds[0]}")
        if seconds > bounds.seconds[1]:
            return Problem(f"{field}.url", "signal_too_long", f"{rel} lasts {seconds:.3g} s, over validate.signals.seconds maximum {bounds.seconds[1]}")
        return None


def _non_finite_path(value, path: str = "") -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path or "<record>"
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else k, v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_path, sub in items:
        found = _non_finite_path(sub, sub_path)
        if found:
            return found
    return None


def parse_line(raw: bytes) -> tuple[dict | None, Problem | None]:
    """Bytes of one line → (record, None) or (None, problem)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, Problem("<line>", "non_utf8", f"byte {exc.start} is not UTF-8 ({raw[exc.start:exc.start + 4]!r}); re-export as UTF-8")
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError as exc:
        try:  # the standard parser accepts NaN/Infinity, so it tells those apart from broken JSON
            where = _non_finite_path(json.loads(text))
        except ValueError:
            return None, Problem("<line>", "malformed_json", f"not valid JSON: {exc}")
        if where:
            return None, Problem(where, "non_finite", f"{where} is NaN or infinity; JSON numbers must be finite")
        return None, Problem("<line>", "malformed_json", f"not valid JSON: {exc}")


def taxonomy_problems(record: dict, taxonomy: Taxonomy) -> list[Problem]:
    """The categories and attribute keys of a record's objects and summary that the taxonomy does not name."""
    problems = []
    for index, obj in enumerate(record["objects"]):
        category = contract.desc_category(obj["desc"])
        why = taxonomy.unknown_category(category) or taxonomy.unknown_attributes(category, contract.desc_attributes(obj["desc"]))
        if why:
            problems.append(Problem(f"objects[{index}].desc", "unknown_category", why))
    summary = record.get("summary")
    counted = contract.parse_summary(summary).counts if summary is not None else {}
    for category in counted or {}:
        if why := taxonomy.unknown_category(category):
            problems.append(Problem("summary", "unknown_category", why))
    return problems


def check_line(record: dict, lineno: int, opts: ValidateOptions, images: ImageChecker, signals: SignalChecker,
               seen: dict[bytes, int]) -> tuple[list[Problem], list[Problem], int, int]:
    """A parsed record's errors and warnings, whether it was clipped, and how many polygons were repaired (in place)."""
    errors, warnings = contract.check_record(record, legacy=opts.legacy, self_crossing=opts.self_crossing)
    clipped = repaired = 0
    if not errors and opts.self_crossing == "repair" and any(w.reason == "self_crossing_poly" for w in warnings):
        errors, repaired = repair_polygons(record)
        warnings = [w for w in warnings if w.reason != "self_crossing_poly"]
    if not errors and "messages" not in record and opts.taxonomy.checks:
        errors = taxonomy_problems(record, opts.taxonomy)
    if not errors and "messages" not in record:
        errors, clipped = _check_dense(record, images, opts)
    elif not errors:
        errors = [p for where, signal in contract.time_series_parts(record) if (p := signals.check(signal["url"], where, signal))]
    if not errors and opts.reject_duplicates:
        # 16 bytes a record, not the record (a chance collision among 10^9 records is about 10^-21)
        fingerprint = hashlib.blake2b(orjson.dumps(record, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
        if fingerprint in seen:
            errors = [Problem("<record>", "duplicate_record", f"same content as line {seen[fingerprint]}")]
        else:
            seen[fingerprint] = lineno
    return errors, warnings, clipped, repaired


def validate(source: str | Path, clean_path: str | Path, rejects_path: str | Path, report_path: str | Path,
             options: dict | None = None) -> StageResult:
    """Validate one JSONL file into clean, rejects and report; returns the report and what tracking logs."""
    opts = ValidateOptions.from_dict(dict(options or {}))
    source, clean_path = Path(source), Path(clean_path)
    base_dir = source.parent
    data_root = Path(opts.data_root) if opts.data_root else base_dir
    images = ImageChecker(base_dir, data_root, opts.decode_images)
    signals = SignalChecker(base_dir, data_root, opts.signals)
    counts = Counter(records_in=0, records_out=0, blank_lines=0, clipped_records=0, repaired_polygons=0)
    rejected, warned = Counter(), Counter()
    warning_lines: dict[str, list[int]] = {}
    seen: dict[bytes, int] = {}
    rebase = os.path.abspath(base_dir) != os.path.abspath(clean_path.parent)

    with atomic_write(clean_path, "wb") as clean, atomic_write(rejects_path, "wb") as rejects:

        def reject(lineno: int, raw: bytes, problems: list[Problem]) -> None:
            first = problems[0]
            if opts.mode == "fail_fast":
                raise ValidationError(f"{source}:{lineno}: {first.field}: {first.message} [{first.reason}]")
            rejected[first.reason] += 1
            entry = {"file": str(source), "line": lineno, "field": first.field, "reason": first.reason, "message": first.message}
            entry["problems"] = [p.as_dict() for p in problems]
            entry["original"] = raw.decode("utf-8", errors="replace")
            if first.reason == "non_utf8":
                entry["original_base64"] = base64.b64encode(raw).decode("ascii")
            rejects.write(orjson.dumps(entry) + b"\n")

        for lineno, raw in tqdm(iter_lines(source), desc=f"validate {source.name}", unit="line", mininterval=2):
            if not raw.strip():
                counts["blank_lines"] += 1
                continue
            counts["records_in"] += 1
            record, problem = parse_line(raw)
            if problem:
                reject(lineno, raw, [problem])
                continue
            errors, warnings, clipped, repaired = check_line(record, lineno, opts, images, signals, seen)
            if errors:
                reject(lineno, raw, errors)
                continue
            warned.update(w.reason for w in warnings)
            for reason in dict.fromkeys(w.reason for w in warnings):
                lines = warning_lines.setdefault(reason, [])
                if len(lines) < WARNING_LINES_SHOWN:
                    lines.append(lineno)
            counts["clipped_records"] += bool(clipped)
            counts["repaired_polygons"] += repaired
            if rebase or clipped or repaired:
                contract.rebase_media(record, base_dir, clean_path.parent)
                clean.write(dumps(record).encode("utf-8") + b"\n")
            else:
                clean.write(raw + b"\n")
            counts["records_out"] += 1

        if counts["records_in"] == 0:
            reject(0, b"", [Problem("<file>", "empty_file", f"{source} holds no records; check the stage that wrote it")])

    report = {
        "file": str(source),
        **dict(counts),
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "warnings_by_reason": dict(sorted(warned.items())),
        "warning_lines": dict(sorted(warning_lines.items())),  # the first few lines of each warning kind
        "options": asdict(opts),
    }
    write_json(report_path, report)
    return StageResult(
        report=report,
        metrics=numbers_of(report, skip=("options", "rejected_by_reason", "warning_lines")) | {f"rejected.{k}": v for k, v in rejected.items()},
        artifacts=[report_path, rejects_path], inputs={"records": source}, outputs={"clean": clean_path, "rejects": rejects_path},
    )


def repair_polygons(record: dict) -> tuple[list[Problem], int]:
    """Replace each self-crossing poly with its shapely `make_valid` repair, in place; returns (problems, repaired).

    A repair that splits the polygon into several pieces (a bow tie) has no single outline: that is a problem.
    """
    repaired = 0
    for index in contract.self_crossing_polygons(record):
        obj = record["objects"][index]
        pieces = make_valid(Polygon(list(zip(obj["poly"][0::2], obj["poly"][1::2]))))
        polygons = [g for g in getattr(pieces, "geoms", [pieces]) if g.geom_type == "Polygon" and g.area > 0]
        if len(polygons) != 1:
            return [Problem(f"objects[{index}].poly", "self_crossing_poly",
                            f"make_valid splits the polygon into {len(polygons)} pieces; redraw it")], 0
        flat = contract.canonical_polygon([c for point in polygons[0].exterior.coords for c in point])
        obj["poly"], obj["poly_points"] = flat, len(flat) // 2
        repaired += 1
    return [], repaired


def _check_dense(record: dict, images: ImageChecker, opts: ValidateOptions) -> tuple[list[Problem], int]:
    """Image and bounds checks; returns (problems, coordinates clipped)."""
    problems = []
    for index, rel in enumerate(record["images"]):
        problem = images.check(rel, f"images[{index}]", record["width"], record["height"])
        if problem:
            problems.append(problem)
    if problems:
        return problems, 0
    out_of_bounds = contract.check_bounds(record, opts.bounds_tolerance)
    if out_of_bounds and opts.bounds_policy == "reject":
        return out_of_bounds, 0
    return [], contract.clip_to_bounds(record) if out_of_bounds else 0
