"""Pictures people would rather look at than read: annotation overlays (more plots join later)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from visionqc import contract

COLORS = {"bbox_2d": (255, 40, 40), "poly": (40, 120, 255), "line": (20, 200, 60)}


def draw_overlay(record: dict, base_dir: Path, target: Path, max_side: int = 768) -> None:
    """Draw a record's objects on its first image and save a PNG."""
    with Image.open(base_dir / record["images"][0]) as image:
        canvas = image.convert("RGB")
    scale = min(1.0, max_side / max(canvas.size))
    if scale < 1.0:
        canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)))
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(2 * max(canvas.size) / 512))
    for obj in record.get("objects", []):
        key = contract.geometry_key(obj)
        points = [(obj[key][i] * scale, obj[key][i + 1] * scale) for i in range(0, len(obj[key]), 2)]
        color = COLORS[key]
        if key == "bbox_2d":
            draw.rectangle(points, outline=color, width=width)
        elif key == "poly":
            draw.polygon(points, outline=color, width=width)
        else:
            draw.line(points, fill=color, width=width)
        draw.text((points[0][0] + 2, points[0][1] + 1), contract.desc_category(obj["desc"]), fill=color)
    target.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(target)
