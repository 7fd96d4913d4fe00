"""The record contract: JSON Schema, geometry checks, canonical polygons, desc and summary forms.

Every stage imports this module; nothing else defines what a record is.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import fastjsonschema
import orjson
from shapely.geometry import LinearRing, MultiPoint

GEOMETRY_KEYS = ("bbox_2d", "poly", "line")
IRRELEVANT_SUMMARY = "无关图片"
CATEGORY_KEY = "类别"
COUNT_KEY = "统计"
POLY_MIN_POINTS = 4
LINE_MIN_POINTS = 2
TS_PART = "time_series_url"
TS_PLACEHOLDER = "<TS_CONTEXT>"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a record: where (a field path), a short reason code, and a message."""

    field: str
    reason: str
    message: str

    def as_dict(self) -> dict:
        return {"field": self.field, "reason": self.reason, "message": self.message}


@cache
def record_schema() -> dict:
    """The machine-readable contract (JSON Schema draft-07)."""
    text = resources.files("visionqc").joinpath("schemas/record.schema.json").read_text("utf-8")
    return json.loads(text)


@cache
def _compiled_schema():
    return fastjsonschema.compile(record_schema())


_SCHEMA_RULE_REASONS = {
    "required": "missing_key",
    "type": "wrong_type",
    "minItems": "wrong_length",
    "maxItems": "wrong_length",
    "minLength": "empty_value",
    "minimum": "out_of_range",
    "exclusiveMinimum": "out_of_range",
    "enum": "bad_value",
}


def _schema_problem(record: dict, exc: fastjsonschema.JsonSchemaValueException) -> Problem:
    field = exc.name.removeprefix("data").lstrip(".") or "<record>"
    if exc.rule == "oneOf" and isinstance(exc.value, dict):
        present = [key for key in GEOMETRY_KEYS if key in exc.value]
        detail = ", ".join(present) if present else "none"
        return Problem(field, "geometry_count", f"needs exactly one of bbox_2d/poly/line, found {detail}")
    if exc.rule == "required" and isinstance(exc.value, dict):
        missing = [key for key in exc.definition.get("required", []) if key not in exc.value]
        if missing:
            where = f"{field}." if field != "<record>" else ""
            return Problem(f"{where}{missing[0]}", "missing_key", f"required key {', '.join(missing)} is missing")
    if exc.rule == "pattern" and field.endswith("desc"):
        return Problem(field, "empty_desc", "desc is empty or whitespace; give 类别=<label>")
    reason = _SCHEMA_RULE_REASONS.get(exc.rule, "schema")
    message = exc.message.replace("data.", "", 1).replace("data ", "record ", 1)
    return Problem(field, reason, message)


def _finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def _check_points(field: str, flat: list, kind: str, minimum: int, declared) -> list[Problem]:
    problems = []
    if len(flat) % 2:
        problems.append(Problem(field, f"{kind}_odd_length", f"{kind} has {len(flat)} numbers; it needs x,y pairs"))
    elif len(flat) // 2 < minimum:
        problems.append(Problem(field, f"{kind}_too_few_points", f"{kind} has {len(flat) // 2} points; at least {minimum} required"))
    if declared is not None and not len(flat) % 2 and declared != len(flat) // 2:
        problems.append(
            Problem(f"{field[: -len(kind)]}{kind}_points", f"{kind}_points_mismatch", f"{kind}_points={declared} but {kind} has {len(flat) // 2} points")
        )
    return problems


def check_object(obj: dict, index: int) -> list[Problem]:
    """Geometry rules the schema cannot express. Call after the schema passed."""
    prefix = f"objects[{index}]"
    for key in GEOMETRY_KEYS:
        if key in obj:
            field, flat = f"{prefix}.{key}", obj[key]
            break
    if not _finite(flat):
        return [Problem(field, "non_finite", f"{key} holds NaN or infinity")]
    if key == "bbox_2d":
        x1, y1, x2, y2 = flat
        if x1 >= x2 or y1 >= y2:
            return [Problem(field, "bbox_order", f"bbox_2d {flat} needs x1<x2 and y1<y2")]
        return []
    if key == "poly":
        return _check_points(field, flat, "poly", POLY_MIN_POINTS, obj.get("poly_points"))
    return _check_points(field, flat, "line", LINE_MIN_POINTS, obj.get("line_points"))


def check_bounds(record: dict, tolerance: float = 0.0) -> list[Problem]:
    """Coordinates must lie within [-tolerance, size + tolerance]."""
    width, height = record["width"], record["height"]
    problems = []
    for index, obj in enumerate(record.get("objects", [])):
        key = next(k for k in GEOMETRY_KEYS if k in obj)
        xs, ys = obj[key][0::2], obj[key][1::2]
        if min(xs) < -tolerance or max(xs) > width + tolerance or min(ys) < -tolerance or max(ys) > height + tolerance:
            problems.append(
                Problem(
                    f"objects[{index}].{key}",
                    "out_of_bounds",
                    f"{key} spans x {min(xs)}..{max(xs)}, y {min(ys)}..{max(ys)} outside the {width}x{height} image "
                    f"(tolerance {tolerance}px)",
                )
            )
    return problems


def clip_to_bounds(record: dict) -> int:
    """Clip every coordinate into the image in place; returns how many numbers changed."""
    width, height = record["width"], record["height"]
    changed = 0
    for obj in record.get("objects", []):
        key = next(k for k in GEOMETRY_KEYS if k in obj)
        flat = obj[key]
        for i, value in enumerate(flat):
            limit = width if i % 2 == 0 else height
            clipped = min(max(value, 0), limit)
            if clipped != value:
                flat[i] = clipped
                changed += 1
    return changed


LEGACY_SUMMARY = re.compile(r"[^\s×，,:：{}\[\]\"]+×\d+(?:，[^\s×，,:：{}\[\]\"]+×\d+)*")
COUNT_VALUE_KEY = "数量"

# Why a summary misses the contract: code → what is wrong. Stage-A counts these; validate quotes them.
SUMMARY_PROBLEMS = {
    "empty": "the summary is empty",
    "multi_line": "the summary spans several lines; it must be one line",
    "legacy_form": "the summary is in the legacy 类别×N，… form, not JSON",
    "not_json": "the summary is not JSON",
    "not_object": "the summary is JSON but not an object",
    "no_counts": f"the object has no {COUNT_KEY} list",
    "bad_entry": f"a {COUNT_KEY} entry is not exactly {{{CATEGORY_KEY}: <non-empty text>, {COUNT_VALUE_KEY}: <integer>}}",
    "bad_count": f"a {COUNT_VALUE_KEY} is not a non-negative integer",
    "duplicate_category": f"a {CATEGORY_KEY} appears twice in {COUNT_KEY}",
}


@dataclass(frozen=True)
class SummaryCheck:
    """A summary read against the contract: `problem` is None when it holds, else a SUMMARY_PROBLEMS code."""

    problem: str | None
    counts: dict | None = None  # {类别: 数量}; {} for 无关图片; None when invalid
    detail: str = ""

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def irrelevant(self) -> bool:
        return self.counts == {} and self.detail == IRRELEVANT_SUMMARY


def _summary_problem(code: str, detail: str = "") -> SummaryCheck:
    return SummaryCheck(code, None, detail or SUMMARY_PROBLEMS[code])


def parse_summary(text) -> SummaryCheck:
    """The one reader of the summary contract (validate, Stage-A, Stage-B and the rewards use it).

    Valid: the literal 无关图片, or a one-line JSON object whose 统计 is a list of
    {类别: non-empty text, 数量: integer >= 0} with each 类别 once. Other top-level keys are allowed;
    entries hold exactly those two keys. Surrounding whitespace is ignored.
    """
    if not isinstance(text, str) or not text.strip():
        return _summary_problem("empty")
    text = text.strip()
    if text == IRRELEVANT_SUMMARY:
        return SummaryCheck(None, {}, IRRELEVANT_SUMMARY)
    if "\n" in text or "\r" in text:
        return _summary_problem("multi_line")
    if LEGACY_SUMMARY.fullmatch(text):
        return _summary_problem("legacy_form")
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return _summary_problem("not_json", f"the summary is not JSON ({exc})")
    if not isinstance(payload, dict):
        return _summary_problem("not_object", f"the summary is JSON {type(payload).__name__}, not an object")
    entries = payload.get(COUNT_KEY)
    if not isinstance(entries, list):
        return _summary_problem("no_counts")
    counts: dict[str, int] = {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {CATEGORY_KEY, COUNT_VALUE_KEY}:
            return _summary_problem("bad_entry", f"{COUNT_KEY}[{position}] is {json.dumps(entry, ensure_ascii=False)[:60]}, "
                                                 f"not {{{CATEGORY_KEY}, {COUNT_VALUE_KEY}}}")
        category, count = entry[CATEGORY_KEY], entry[COUNT_VALUE_KEY]
        if not isinstance(category, str) or not category.strip():
            return _summary_problem("bad_entry", f"{COUNT_KEY}[{position}].{CATEGORY_KEY} is not a non-empty text")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            return _summary_problem("bad_count", f"{COUNT_KEY}[{position}].{COUNT_VALUE_KEY} is {count!r}, "
                                                 "not a non-negative integer")
        if category in counts:
            return _summary_problem("duplicate_category", f"{CATEGORY_KEY} {category!r} appears twice in {COUNT_KEY}")
        counts[category] = count
    return SummaryCheck(None, counts)


def desc_form(desc: str) -> str:
    """'keyed' for 类别=…,k=v; 'legacy' for the older slash form 设备/示例."""
    return "keyed" if desc.startswith(f"{CATEGORY_KEY}=") else "legacy"


def self_crossing_polygons(record: dict) -> list[int]:
    """Indices of the objects whose poly crosses itself (its ring is not simple)."""
    found = []
    for index, obj in enumerate(record.get("objects", [])):
        flat = obj.get("poly")
        if flat and len(flat) >= 2 * POLY_MIN_POINTS and not LinearRing(list(zip(flat[0::2], flat[1::2]))).is_simple:
            found.append(index)
    return found


def check_record(record, *, legacy: str = "warn", self_crossing: str = "warn") -> tuple[list[Problem], list[Problem]]:
    """Check one parsed record. Returns (errors, warnings).

    `legacy` decides what the older summary/desc forms are: "warn" (accepted and counted) or "reject";
    `self_crossing` the same for polygons that cross themselves ("repair" is validate's, and warns here).
    A summary in no documented form is always an error.
    Image files and bounds are checked by the validate stage, which knows where the data lives.
    """
    if not isinstance(record, dict):
        return [Problem("<record>", "wrong_type", f"a record must be a JSON object, got {type(record).__name__}")], []
    try:
        _compiled_schema()(record)
    except fastjsonschema.JsonSchemaValueException as exc:
        return [_schema_problem(record, exc)], []
    if "messages" in record:
        return check_time_series(record), []
    errors: list[Problem] = []
    for index, obj in enumerate(record["objects"]):
        errors.extend(check_object(obj, index))
    found: list[Problem] = []
    summary = record.get("summary")
    check = parse_summary(summary) if summary is not None else SummaryCheck(None, {})
    if not check.valid and check.problem != "legacy_form":
        errors.append(Problem("summary", "bad_summary", f"summary {summary[:60]!r}: {check.detail}; it must be 无关图片, a one-line "
                                                        f"JSON object with a {COUNT_KEY} list, or the legacy 类别×N，… form (设备×1，标签×1)"))
    elif check.problem == "legacy_form":
        found.append(Problem("summary", "legacy_summary", "summary is in the legacy 类别×N，… form, not a JSON object string"))
    for index, obj in enumerate(record["objects"]):
        if desc_form(obj["desc"]) == "legacy":
            found.append(Problem(f"objects[{index}].desc", "legacy_desc", f"desc {obj['desc']!r} is not 类别=<label>,key=value"))
    crossing = [Problem(f"objects[{index}].poly", "self_crossing_poly", "the polygon crosses itself; redraw it, or set "
                        "validate.self_crossing: repair") for index in ([] if errors else self_crossing_polygons(record))]
    if legacy == "reject":
        errors, found = errors + found, []
    if self_crossing == "reject":
        return errors + crossing, found
    return errors, found + crossing


# --- desc and summary ---------------------------------------------------------------------------


def _clean(text) -> str:
    if isinstance(text, list):
        text = "|".join(str(item) for item in text)
    return str(text).strip().replace(",", "，").replace("=", "＝")


def format_desc(category: str, attributes: dict | None = None) -> str:
    """类别=<category>,key=value,... with 类别 first; commas and '=' inside values become full-width."""
    parts = [f"{CATEGORY_KEY}={_clean(category)}"]
    for key, value in (attributes or {}).items():
        if value is None or value == "" or key == CATEGORY_KEY:
            continue
        parts.append(f"{_clean(key)}={_clean(value)}")
    return ",".join(parts)


def desc_category(desc: str) -> str:
    """The category of a desc, in either form."""
    if desc_form(desc) == "keyed":
        return desc.split(",", 1)[0].split("=", 1)[1]
    return desc.split("/", 1)[0].strip()


def desc_attributes(desc: str) -> list[str]:
    """The attribute keys of a keyed desc (类别=…,key=value,…); a legacy desc has none."""
    if desc_form(desc) != "keyed":
        return []
    return [part.split("=", 1)[0] for part in desc.split(",")[1:] if "=" in part]


def build_summary(objects: list[dict], *, empty_as_irrelevant: bool = True) -> str:
    """Per-category counts as a single-line JSON string, categories in sorted order."""
    if not objects and empty_as_irrelevant:
        return IRRELEVANT_SUMMARY
    counts = Counter(desc_category(obj["desc"]) for obj in objects)
    payload = {COUNT_KEY: [{CATEGORY_KEY: name, COUNT_VALUE_KEY: counts[name]} for name in sorted(counts)]}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


# --- geometry -----------------------------------------------------------------------------------


def geometry_key(obj: dict) -> str:
    return next(k for k in GEOMETRY_KEYS if k in obj)


def canonical_polygon(flat: list[float]) -> list[float]:
    """Canonical vertex order for a polygon given as a flat list.

    Drops a duplicate closing vertex, orders the ring clockwise as seen on screen (y grows down),
    and starts at the top-most, then left-most vertex. A ring that crosses itself (vertices listed
    out of order) whose points are all corners of their convex hull is first re-ordered by angle
    around the centroid, which recovers the convex shape. Any other ring keeps its own vertex order,
    so non-convex outlines keep their shape.
    """
    points = [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]
    if len(points) > 1 and points[0] == points[-1]:
        points.pop()
    deduped = [p for i, p in enumerate(points) if i == 0 or p != points[i - 1]]
    if len(deduped) < 3:
        return [c for p in deduped for c in p]
    ring = LinearRing(deduped)
    if not ring.is_simple and _convex_position(deduped):
        cx = sum(x for x, _ in deduped) / len(deduped)
        cy = sum(y for _, y in deduped) / len(deduped)
        deduped.sort(key=lambda p: math.atan2(p[1] - cy, p[0] - cx))
        ring = LinearRing(deduped)
    # With y pointing down, a ring that is counter-clockwise in maths axes is clockwise on screen.
    if not ring.is_ccw:
        deduped.reverse()
    start = min(range(len(deduped)), key=lambda i: (deduped[i][1], deduped[i][0]))
    ordered = deduped[start:] + deduped[:start]
    return [c for p in ordered for c in p]


def _convex_position(points: list[tuple[float, float]]) -> bool:
    hull = MultiPoint(points).convex_hull
    return hull.geom_type == "Polygon" and len(hull.exterior.coords) - 1 == len(set(points))


def bbox_of(points: list[tuple[float, float]]) -> list[float]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return [min(xs), min(ys), max(xs), max(ys)]


def _rebase(path, from_dir: str, to_dir: str):
    """A relative path, seen from `to_dir`; anything else (absolute, not a string) as it is, for validate to judge."""
    if not isinstance(path, str) or not path:
        return path
    return path if os.path.isabs(path) else os.path.relpath(os.path.join(from_dir, path), to_dir).replace(os.sep, "/")


def rebase_media(record: dict, from_dir: str | Path, to_dir: str | Path) -> dict:
    """Rewrite relative image and signal paths so they resolve the same from `to_dir` (absolute paths stay)."""
    from_dir, to_dir = os.path.abspath(from_dir), os.path.abspath(to_dir)
    if from_dir == to_dir:
        return record
    if isinstance(record.get("images"), list):
        record["images"] = [_rebase(path, from_dir, to_dir) for path in record["images"]]
    for _, signal in time_series_parts(record):
        if "url" in signal:
            signal["url"] = _rebase(signal["url"], from_dir, to_dir)
    return record


# --- time series --------------------------------------------------------------------------------


def time_series_parts(record: dict) -> list[tuple[str, dict]]:
    """(field path, the time_series_url object) of every signal in a chat record, in order."""
    found = []
    for m, message in enumerate(record.get("messages", [])):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for c, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == TS_PART and isinstance(part.get(TS_PART), dict):
                found.append((f"messages[{m}].content[{c}].{TS_PART}", part[TS_PART]))
    return found


def _message_text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def check_time_series(record: dict) -> list[Problem]:
    """A signal-bearing turn has one <TS_CONTEXT> per signal, and an assistant answer follows it.

    Chat records without signals pass unchanged. Call after the schema passed.
    """
    messages = record["messages"]
    last_signal_turn = -1
    for m, message in enumerate(messages):
        content = message["content"]
        signals = sum(1 for part in content if part.get("type") == TS_PART) if isinstance(content, list) else 0
        placeholders = _message_text(message).count(TS_PLACEHOLDER)
        if signals != placeholders and (signals or placeholders):
            return [Problem(f"messages[{m}].content", "placeholder_mismatch",
                            f"{signals} time_series_url part(s) but {placeholders} {TS_PLACEHOLDER} placeholder(s); "
                            f"put one {TS_PLACEHOLDER} in the text for each signal")]
        if signals:
            last_signal_turn = m
    if last_signal_turn >= 0 and not any(message["role"] == "assistant" for message in messages[last_signal_turn + 1:]):
        return [Problem("messages", "missing_answer", "no assistant answer follows the signal; add the expected answer")]
    return []
