"""Shared fixtures: tiny images, demo exports and JSONL helpers, all built by the tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference-data"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def make_image(path: Path, size=(64, 48), color=(120, 130, 140), exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    if path.suffix.lower() in (".jpg", ".jpeg"):
        kwargs["quality"] = 95
    image.save(path, **kwargs)
    return path


def write_lines(path: Path, lines: list) -> Path:
    """Write raw lines: bytes as they are, str encoded, dicts as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for line in lines:
            if isinstance(line, (dict, list)):
                line = json.dumps(line, ensure_ascii=False)
            if isinstance(line, str):
                line = line.encode("utf-8")
            handle.write(line + b"\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def demo_exports(tmp_path_factory) -> Path:
    from visionqc.demo.scenes import generate

    out = tmp_path_factory.mktemp("demo") / "demo"
    generate(out, seed=5, platform=16, labelme=8, coco=10, groups=6)
    return out
