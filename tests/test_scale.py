"""Flat memory: each data stage streams, so the memory it holds does not grow with the records it handles.

bench/scale.py measures the stages at 10k and 100k records as processes (docs/status.md, "Scale"); here
each stage function runs at two sizes under tracemalloc, and the memory it holds per added record must
stay well below what holding the records costs (1-5 KB each as Python objects, more as fingerprints or
augmented pairs). What may grow is documented per stage: convert keeps each file's name, to list the
export in order, each output name it claimed (to rename a second image of that name) and an 8-byte
rank per record for the seeded split; validate a 16-byte digest per record for duplicates;
fuse an 8-byte offset per pick; augment and cache nothing (test_cache.py checks the cache).
"""

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from conftest import held_by

BYTES_PER_RECORD = 512  # held now (500 → 2,000 records): convert 177, the others under 100; before streaming: 1,156 to 5,303
SMALL, LARGE = 500, 2000


def write_labelme_export(folder: Path, records: int) -> None:
    folder.mkdir(parents=True)
    for n in range(records):
        image = Image.new("RGB", (64, 64), (n % 251, (n // 251) % 251, 90))
        ImageDraw.Draw(image).rectangle((4 + n % 20, 6, 40 + n % 20, 50), fill=(250, 200, 30))
        image.save(folder / f"{n:06d}.png")
        shape = {"label": ("设备", "标签")[n % 2], "points": [[4 + n % 20, 6], [40 + n % 20, 50]], "shape_type": "rectangle"}
        (folder / f"{n:06d}.json").write_text(json.dumps({"imagePath": f"{n:06d}.png", "imageWidth": 64, "imageHeight": 64,
                                                          "shapes": [shape]}, ensure_ascii=False))


def stage_calls(work: Path) -> dict:
    """Each data stage on `work`/export, in pipeline order, as a call."""
    from visionqc.augment import augment_epoch
    from visionqc.convert import convert
    from visionqc.convert.common import ConvertOutputs
    from visionqc.fuse import fuse
    from visionqc.validate import validate

    fusion = {"seed": 3, "targets": [{"dataset": "team", "ratio": 1.5, "mode": "summary", "prompt": "summary"}]}
    augment = {"seed": 3, "ops": [{"op": "hflip", "prob": 0.5}, {"op": "rotate", "prob": 0.5, "degrees": 10}]}
    c, v, f, a = work / "convert", work / "validate", work / "fuse", work / "augment"
    outputs = ConvertOutputs(c / "train.jsonl", c / "val.jsonl", c / "report.json", c / "images", c / "overlays", None)
    return {
        "convert": lambda: convert("labelme", work / "export", outputs, {"val_fraction": 0.1}),
        "validate": lambda: validate(c / "train.jsonl", v / "clean.jsonl", v / "rejects.jsonl", v / "report.json", {}),
        "fuse": lambda: fuse(fusion, {"team": v / "clean.jsonl"}, f / "train.jsonl", f / "report.json"),
        "augment": lambda: augment_epoch(f / "train.jsonl", a / "epoch_0.jsonl", a / "images", a / "report.json",
                                         a / "preview.png", augment, epoch=0, workers=2),
    }


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> dict[str, dict[int, float]]:
    """The memory each stage held at SMALL and LARGE records, after a warm-up run at SMALL (first calls fill caches)."""
    found: dict[str, dict[int, float]] = {}
    for records in (SMALL, SMALL, LARGE):
        work = tmp_path_factory.mktemp(f"scale{records}")
        write_labelme_export(work / "export", records)
        for name, stage in stage_calls(work).items():
            found.setdefault(name, {})[records] = held_by(stage)
    return found


@pytest.mark.parametrize("stage", ["convert", "validate", "fuse", "augment"])
def test_a_data_stage_holds_no_record_it_has_written(held, stage):
    growth = (held[stage][LARGE] - held[stage][SMALL]) / (LARGE - SMALL)
    assert growth < BYTES_PER_RECORD, f"{stage}: held {growth:.0f} bytes more per record ({held[stage]})"
