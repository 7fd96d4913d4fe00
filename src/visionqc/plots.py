"""Pictures people would rather look at than read: annotation overlays, token lengths, loss curves."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from visionqc import contract
from visionqc.io import atomic_write

COLORS = {"bbox_2d": (255, 40, 40), "poly": (40, 120, 255), "line": (20, 200, 60)}


def draw_overlay(record: dict, image_path: Path, target: Path, max_side: int = 768) -> None:
    """Draw a record's objects on its first image (at `image_path`) and save a PNG."""
    with Image.open(image_path) as image:
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
    with atomic_write(target, "wb") as handle:
        canvas.save(handle, format="PNG")


def _save(fig, target: Path) -> None:
    """Write a figure as PNG under a temporary name, then rename it into place."""
    fig.tight_layout()
    with atomic_write(target, "wb") as handle:
        fig.savefig(handle, format="png")
    _pyplot().close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lengths(lengths: list[int], max_length: int, target: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#3b7dd8")
    ax.axvline(max_length, color="#d33", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(f"Token lengths ({len(lengths)} samples)")
    ax.legend()
    _save(fig, target)


def plot_losses(history: list[dict], target: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key, color in (("loss", "#3b7dd8"), ("eval_loss", "#d3503b")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, color=color, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("Training loss")
    ax.legend()
    _save(fig, target)


def plot_confusion(confusion: dict[str, int], target: Path, title: str = "Stage-B verdicts", classes: tuple[str, ...] = ("pass", "fail"),
                   truth: str = "label", predicted: str = "verdict") -> None:
    """A confusion matrix from counts keyed "<truth>-><predicted>": rows are the truth, columns the prediction."""
    plt = _pyplot()
    cells = [[confusion.get(f"{t}->{p}", 0) for p in classes] for t in classes]
    size = 2.2 + 0.9 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    ax.imshow(cells, cmap="Blues")
    top = max(max(row) for row in cells) or 1
    for i, row in enumerate(cells):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=14, color="white" if value > top / 2 else "black")
    ticks = list(range(len(classes)))
    ax.set_xticks(ticks, [f"{predicted} {c}" for c in classes], rotation=30 if len(classes) > 2 else 0, ha="right" if len(classes) > 2 else "center")
    ax.set_yticks(ticks, [f"{truth} {c}" for c in classes])
    ax.set_title(title)
    _save(fig, target)


def plot_traces(examples: dict[str, list], target: Path) -> None:
    """A few example traces per label, one row per label (channel 0, time in seconds); says so when there are none."""
    plt = _pyplot()
    labels = list(examples)
    if not labels:
        fig = plt.figure(figsize=(7, 1.2), dpi=110)
        fig.text(0.5, 0.5, "No readable traces to show (see the convert report)", ha="center", va="center")
        _save(fig, target)
        return
    fig, axes = plt.subplots(len(labels), 1, figsize=(7, 1.6 * len(labels) + 0.6), dpi=110, squeeze=False)
    for ax, label in zip(axes[:, 0], labels, strict=True):
        for samples, rate in examples[label]:
            ax.plot([i / rate for i in range(samples.shape[0])], samples[:, 0], linewidth=0.8)
        ax.set_ylabel(label)
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle("Example traces per label")
    _save(fig, target)
