"""Vision helpers shared by the model stages: the pixel budget, header grids, images at a grid, the token cache format."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from visionqc.images import image_size, smart_resize

CACHE_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("length", pa.int32()),
    ("images", pa.list_(pa.string())),
    ("image_grid_thw", pa.list_(pa.list_(pa.int32()))),
    ("source", pa.string()),
    ("line", pa.int32()),
])


@dataclass(frozen=True)
class PixelBudget:
    """Merged vision tokens per image, at most and at least (config model.image_max_tokens / image_min_tokens).

    The cache records it in its manifest; every later stage takes it from there (`from_cache_options`).
    """

    max_tokens: int
    min_tokens: int

    @classmethod
    def from_cache_options(cls, options: dict) -> PixelBudget:
        return cls(int(options["image_max_tokens"]), int(options["image_min_tokens"]))

    def export_to_swift(self) -> None:
        """Set the variables by which ms-swift and qwen_vl_utils size images (the only place they are set).

        ms-swift copies them into qwen_vl_utils once per process, at its first Qwen-VL encode, and
        ignores later changes; a second, different budget in the same process is refused here
        instead of being silently ignored (each stage runs in its own process).
        """
        vision_process = sys.modules.get("qwen_vl_utils.vision_process")
        if vision_process is not None and getattr(vision_process, "_patch", False):
            fixed = (getattr(vision_process, "IMAGE_MAX_TOKEN_NUM", None), getattr(vision_process, "IMAGE_MIN_TOKEN_NUM", None))
            if fixed != (self.max_tokens, self.min_tokens):
                raise RuntimeError(f"ms-swift already sized images in this process at {fixed[0]}/{fixed[1]} tokens, "
                                   f"so the budget {self.max_tokens}/{self.min_tokens} would be ignored; run it in a new process")
        os.environ.update(IMAGE_MAX_TOKEN_NUM=str(self.max_tokens), IMAGE_MIN_TOKEN_NUM=str(self.min_tokens))

    def grids(self, model_dir: str | Path) -> HeaderGrids:
        return HeaderGrids(*patch_and_merge(model_dir), self)


def patch_and_merge(model_dir: str | Path) -> tuple[int, int]:
    """Patch and merge size from the processor files (no transformers import, so no torch)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(model_dir) / name
        if path.exists():
            config = json.loads(path.read_text())
            config = config.get("image_processor", config)
            if "patch_size" in config:
                return int(config["patch_size"]), int(config.get("merge_size", 2))
    raise ValueError(f"{model_dir}: no patch_size in preprocessor_config.json or processor_config.json")


class HeaderGrids:
    """[t, h, w] in patches per image path, from the header and the qwen_vl_utils resize rule (memoised)."""

    MEMO_SIZE = 65536

    def __init__(self, patch: int, merge: int, budget: PixelBudget):
        self.patch, self.merge = patch, merge
        factor = patch * merge
        self.min_pixels = budget.min_tokens * factor**2
        self.max_pixels = budget.max_tokens * factor**2
        self._grids: dict[str, list[int]] = {}

    def __call__(self, path: str) -> list[int]:
        if path not in self._grids:
            if len(self._grids) >= self.MEMO_SIZE:  # a record's images are asked for a few times in a row
                self._grids.clear()
            width, height = image_size(path)
            factor = self.patch * self.merge
            resized_h, resized_w = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
            self._grids[path] = [1, resized_h // self.patch, resized_w // self.patch]
        return self._grids[path]

    def tokens(self, path: str) -> int:
        t, h, w = self(path)
        return t * h * w // self.merge**2


def images_at_grid(paths: list[str], grids: list[list[int]], patch: int) -> list:
    """Load images resized to their grids exactly as qwen_vl_utils does for training and inference."""
    from qwen_vl_utils import fetch_image

    images = []
    for path, (_, h, w) in zip(paths, grids, strict=True):
        try:
            images.append(fetch_image({"image": path, "resized_height": h * patch, "resized_width": w * patch}, image_patch_size=patch))
        except (OSError, ValueError) as exc:  # PIL: truncated, corrupt or missing
            raise UnreadableImage(path, exc) from exc
    return images


class UnreadableImage(ValueError):
    """An image that no longer decodes (truncated, replaced, removed) since it was validated and cached."""

    def __init__(self, path: str, cause: Exception):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause
