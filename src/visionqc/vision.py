"""Vision helpers shared by the model stages: the pixel budget, header grids, images at a grid, the token cache format."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from PIL import Image

from visionqc.images import smart_resize

CACHE_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("length", pa.int32()),
    ("images", pa.list_(pa.string())),
    ("image_grid_thw", pa.list_(pa.list_(pa.int32()))),
    ("source", pa.string()),
    ("line", pa.int32()),
])


def pixel_environment(image_max_tokens: int, image_min_tokens: int) -> dict[str, str]:
    """The variables that make swift/qwen_vl_utils size images like the cache did. Set them in every stage."""
    return {"IMAGE_MAX_TOKEN_NUM": str(image_max_tokens), "IMAGE_MIN_TOKEN_NUM": str(image_min_tokens)}


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

    def __init__(self, patch: int, merge: int, image_max_tokens: int, image_min_tokens: int):
        self.patch, self.merge = patch, merge
        factor = patch * merge
        self.min_pixels = image_min_tokens * factor**2
        self.max_pixels = image_max_tokens * factor**2
        self._grids: dict[str, list[int]] = {}

    def __call__(self, path: str) -> list[int]:
        if path not in self._grids:
            with Image.open(path) as image:
                width, height = image.size
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

    return [fetch_image({"image": p, "resized_height": h * patch, "resized_width": w * patch}, image_patch_size=patch)
            for p, (_, h, w) in zip(paths, grids, strict=True)]
