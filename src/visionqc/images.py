"""Image helpers shared by stages: header reads, EXIF orientation, the pixel-budget resize rule."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import imagesize
from PIL import Image

ORIENTATION_TAG = 0x0112
# Orientations whose upright image swaps width and height.
TRANSPOSING = {5, 6, 7, 8}


def orientation(image: Image.Image) -> int:
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if value in range(1, 9) else 1


def upright_size(size: tuple[int, int], orient: int) -> tuple[int, int]:
    width, height = size
    return (height, width) if orient in TRANSPOSING else (width, height)


def orientation_mapper(orient: int, size: tuple[int, int]) -> Callable[[float, float], tuple[float, float]]:
    """Map a point in the stored (raw) frame of size `size` to the upright frame PIL's exif_transpose gives."""
    width, height = size
    return {
        1: lambda x, y: (x, y),
        2: lambda x, y: (width - x, y),
        3: lambda x, y: (width - x, height - y),
        4: lambda x, y: (x, height - y),
        5: lambda x, y: (y, x),
        6: lambda x, y: (height - y, x),
        7: lambda x, y: (height - y, width - x),
        8: lambda x, y: (y, width - x),
    }[orient]


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 0, max_pixels: int | None = None) -> tuple[int, int]:
    """The qwen_vl_utils resize rule: sides rounded to `factor`, area kept within [min_pixels, max_pixels].

    Returns (height, width). Written here so that header-only callers need not import torch.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if max_pixels is not None and h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as stored, as `PIL.Image.open(path).size` gives it, from the header bytes alone.

    `imagesize` reads the few bytes that hold the size (PNG IHDR, JPEG SOF, GIF, TIFF, WebP) without PIL's
    plugin machinery; a file it cannot size goes to PIL, which sizes it or says why not.
    """
    try:
        width, height = imagesize.get(path, exif_rotation=False)  # stored size, as PIL and qwen_vl_utils see it
    except (OSError, ValueError):
        width = height = -1
    if width > 0 and height > 0:
        return width, height
    with Image.open(path) as image:
        return image.size


def fully_decodes(path: str | Path) -> None:
    """Raise if the image is truncated or corrupt. JPEGs decode at reduced scale, which still reads every byte."""
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
