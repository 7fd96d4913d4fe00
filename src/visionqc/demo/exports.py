"""All demo exports at once: the scenes (demo/scenes.py) and the exchange formats (demo/formats.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionqc.demo.formats import write_formats
from visionqc.demo.scenes import (
    labelme_as_coco,
    write_coco,
    write_groups,
    write_labelme,
    write_platform,
    write_verdicts,
)
from visionqc.io import atomic_directory, write_jsonl


@dataclass(frozen=True)
class DemoExports:
    """Where each demo export goes (the outputs of rule generate_demo_data)."""

    platform: Path
    labelme: Path
    coco: Path  # instances JSON
    coco_images: Path
    labelme_coco: Path  # labelme2coco's instances file for the LabelMe scenes drawn in parts
    groups: Path  # photo groups and truth.jsonl
    verdicts: Path  # chat-only Stage-B records (JSONL)
    label_errors: Path  # the corruptions injected into the platform export (JSONL; only label QA's evaluation reads it)
    formats: Path  # the same scenes as <format>/ for platform (the reference), cvat, label_studio, yolo and voc

    @classmethod
    def under(cls, root: str | Path) -> DemoExports:
        """The layout of resources/demo/ (tests use it too)."""
        root = Path(root)
        return cls(root / "platform", root / "labelme", root / "coco" / "instances.json", root / "coco" / "images",
                   root / "labelme_coco.json", root / "groups", root / "verdicts" / "records.jsonl", root / "label_errors.jsonl",
                   root / "formats")


def generate(exports: DemoExports, seed: int = 17, platform: int = 160, labelme: int = 60, coco: int = 80, groups: int = 24,
             new_groups: int = 0, verdicts: int = 240, guidance: str = "", label_errors: float = 0.0, formats: int = 24) -> None:
    """Write every demo export; each folder is built under a temporary name, then renamed.

    `guidance` is the Stage-B guidance text (a file path or the text itself) the verdict records quote;
    `label_errors` the share of platform scenes (with objects) given one wrong annotation, listed in
    `exports.label_errors`; `formats` the number of scenes written in every exchange format (demo/formats.py).
    """
    if guidance and Path(guidance).is_file():
        guidance = Path(guidance).read_text("utf-8")
    with atomic_directory(exports.platform) as work:
        injected = write_platform(work, np.random.default_rng([seed, 0]), platform, label_errors, np.random.default_rng([seed, 5]))
    write_jsonl(exports.label_errors, injected)
    with atomic_directory(exports.labelme) as work:
        multipart = write_labelme(work, np.random.default_rng([seed, 1]), labelme)
        labelme_as_coco(work, exports.labelme_coco, multipart)
    with atomic_directory(exports.coco_images) as work:
        write_coco(exports.coco, work, np.random.default_rng([seed, 2]), coco)
    with atomic_directory(exports.groups) as work:
        write_groups(work, np.random.default_rng([seed, 3]), groups, new=new_groups, new_rng=np.random.default_rng([seed, 7]))
    write_verdicts(exports.verdicts, np.random.default_rng([seed, 4]), verdicts, guidance)
    write_formats(exports.formats, np.random.default_rng([seed, 6]), formats)
