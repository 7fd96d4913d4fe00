"""What an export looks like: the format its files suggest, for the message of a convert that found nothing.

A wrong `format:` must not pass as an empty dataset: convert stops and says what the folder holds instead.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from defusedxml import ElementTree

LOOKS_FOR = {
    "platform": "one GeoJSON-style JSON per image, with markResult",
    "labelme": "one LabelMe JSON per image, with shapes",
    "coco": "a COCO instances JSON (images, annotations, categories)",
    "cvat": "a CVAT for images 1.1 annotations.xml",
    "label_studio": "a Label Studio JSON export (a list of tasks)",
    "yolo": "images with .txt label files (labels/ or beside them) and data.yaml, classes.txt or obj.names",
    "voc": "one Pascal VOC XML per image (<annotation>)",
    "jsonl": "a JSONL file of records in the contract",
}
SAMPLED = 20  # files read per kind when guessing


def _json_format(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            doc = json.loads(handle.read(8 << 20))
    except (OSError, ValueError):
        return None
    if isinstance(doc, list) and doc and isinstance(doc[0], dict) and ("annotations" in doc[0] or "data" in doc[0]):
        return "label_studio"
    if not isinstance(doc, dict):
        return None
    if "markResult" in doc:
        return "platform"
    if "shapes" in doc:
        return "labelme"
    if {"images", "annotations"} <= set(doc):
        return "coco"
    return None


def _xml_format(path: Path) -> str | None:
    try:
        for _, element in ElementTree.iterparse(path, events=("start",)):
            return {"annotations": "cvat", "annotation": "voc"}.get(element.tag)
    except Exception:  # not XML, or refused: no guess
        return None
    return None


def guess_formats(source: Path) -> list[str]:
    """The formats the export's files look like, most likely first."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    found: list[str] = []
    for suffix, reader in ((".json", _json_format), (".xml", _xml_format)):
        for path in [p for p in files if p.suffix.lower() == suffix][:SAMPLED]:
            guess = reader(path)
            if guess and guess not in found:
                found.append(guess)
    names = {p.name for p in files}
    if names & {"data.yaml", "classes.txt", "obj.names"} or any(p.suffix == ".txt" and "labels" in p.parts for p in files):
        found.append("yolo")
    return found


def describe(source: Path) -> str:
    """A few words on what the export holds: its top entries, with file counts for folders."""
    if not source.exists():
        return "nothing: it does not exist"
    if source.is_file():
        return f"one file of {source.stat().st_size} bytes"
    parts = []
    for entry in sorted(source.iterdir())[:8]:
        if entry.is_dir():
            parts.append(f"{entry.name}/ ({sum(1 for p in entry.rglob('*') if p.is_file())} files)")
        else:
            parts.append(entry.name)
    more = len(list(source.iterdir())) - len(parts)
    return (", ".join(parts) + (f" and {more} more" if more > 0 else "")) or "nothing: it is empty"


def nothing_converted(fmt: str, source: Path, issues: list) -> str:
    """The one-line message of an export that gave no record: the format, what it looked for, what is there, and the
    first of what was reported (each image's reports are in the log)."""
    guesses = [guess for guess in guess_formats(source) if guess != fmt] if source.exists() else []
    hint = f": format {guesses[0]}?" if guesses else "."
    reasons = Counter(issue.reason for issue in issues if not issue.note)
    first = next((issue for issue in issues if not issue.note), None)
    where = (source / first.file if source.is_dir() else source) if first else source
    reported = (f" (reported: {', '.join(f'{reason} {n}' for reason, n in sorted(reasons.items()))}; first: {where} "
                f"{first.ref}: {first.detail})") if first else ""
    return (f"{source}: format {fmt} converted no record{reported}; it reads {LOOKS_FOR.get(fmt, fmt)}, and {source} holds "
            f"{describe(source)}{hint} Check the dataset's format and path in the config")
