"""Pictures people would rather look at than read: annotation overlays, token lengths, loss curves.

Our users' labels, missions and verdicts are Chinese, so every picture draws text with Noto Sans
CJK SC (from the `mplfonts` wheel: pip installs it like every other dependency, no system font
needed). matplotlib is set up once, in `_pyplot`: DejaVu Sans first, Noto Sans CJK SC for the
glyphs DejaVu lacks. The PIL overlays use the same font file.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from visionqc import contract
from visionqc.io import atomic_write

COLORS = {"bbox_2d": (255, 40, 40), "poly": (40, 120, 255), "line": (20, 200, 60)}
CJK_FONT = "NotoSansCJKsc-Regular.otf"


@cache
def cjk_font_path() -> str:
    """The CJK font shipped in the mplfonts wheel (found without importing that package)."""
    spec = importlib.util.find_spec("mplfonts")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the mplfonts package (CJK font for plots) is missing; run `make venv` or "
                           "pip install -r requirements.txt")
    path = Path(next(iter(spec.submodule_search_locations))) / "fonts" / CJK_FONT
    if not path.is_file():
        raise RuntimeError(f"{path}: CJK font not found in the mplfonts package; reinstall it (pip install --force-reinstall mplfonts)")
    return str(path)


@cache
def label_font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(cjk_font_path(), size)


def _draw_objects(draw: ImageDraw.ImageDraw, objects: list[dict], scale: float, width: int, font, color=None) -> None:
    for obj in objects:
        key = contract.geometry_key(obj)
        points = [(obj[key][i] * scale, obj[key][i + 1] * scale) for i in range(0, len(obj[key]), 2)]
        shade = color or COLORS[key]
        if key == "bbox_2d":
            draw.rectangle(points, outline=shade, width=width)
        elif key == "poly":
            draw.polygon(points, outline=shade, width=width)
        else:
            draw.line(points, fill=shade, width=width)
        width_px, height_px = draw.im.size
        x = min(points[0][0] + 2, width_px - 2 * font.size)
        y = min(points[0][1] + 1, height_px - font.size - 3)
        draw.text((x, y), contract.desc_category(obj["desc"]), fill=shade, font=font)


def _canvas(image_path: Path, max_side: int, min_side: int = 0) -> tuple[Image.Image, float]:
    """The image as RGB, scaled down to `max_side` or up to `min_side` (the scale factor with it)."""
    with Image.open(image_path) as image:
        canvas = image.convert("RGB")
    longest = max(canvas.size)
    scale = max_side / longest if longest > max_side else (min_side / longest if longest < min_side else 1.0)
    if scale != 1.0:
        canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)))
    return canvas, scale


def _save_png(canvas: Image.Image, target: Path) -> None:
    with atomic_write(target, "wb") as handle:
        canvas.save(handle, format="PNG")


def draw_overlay(record: dict, image_path: Path, target: Path, max_side: int = 768) -> None:
    """Draw a record's objects on its first image (at `image_path`) and save a PNG."""
    canvas, scale = _canvas(image_path, max_side)
    width = max(1, round(2 * max(canvas.size) / 512))
    _draw_objects(ImageDraw.Draw(canvas), record.get("objects", []), scale, width, label_font(max(10, round(max(canvas.size) / 40))))
    _save_png(canvas, target)


TRUTH_COLOR, PREDICTED_COLOR = (20, 170, 60), (220, 30, 200)


def draw_comparison(image_path: str | Path, truth: list[dict], predicted: list[dict], target: Path, note: str | None = None,
                    side: int = 384) -> None:
    """Truth (green) and prediction (magenta) side by side on the same image, with a caption; `note` marks a broken answer."""
    canvas, scale = _canvas(Path(image_path), side, side)
    font = label_font(max(11, round(side / 28)))
    width = max(2, round(side / 160))
    panels = []
    for objects, color, title in ((truth, TRUTH_COLOR, f"truth 真值: {len(truth)}"),
                                  (predicted, PREDICTED_COLOR, f"predicted 预测: {len(predicted)}" + (f" ({note})" if note else ""))):
        panel = canvas.copy()
        _draw_objects(ImageDraw.Draw(panel), objects, scale, width, font, color)
        framed = Image.new("RGB", (panel.width, panel.height + font.size + 10), "white")
        framed.paste(panel, (0, font.size + 10))
        ImageDraw.Draw(framed).text((4, 4), title, fill=color, font=font)
        panels.append(framed)
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8, panels[0].height), "white")
    sheet.paste(panels[0], (0, 0))
    sheet.paste(panels[1], (panels[0].width + 8, 0))
    _save_png(sheet, target)


def draw_suspect(image_path: str | Path, objects: list[dict], annotated: str, predicted: str, target: Path, caption: str = "",
                 side: int = 384) -> None:
    """A label-QA suspect: the image with its annotated objects, and the annotated and the model's answer under it."""
    canvas, scale = _canvas(Path(image_path), side, side)
    font = label_font(max(11, round(side / 30)))
    _draw_objects(ImageDraw.Draw(canvas), objects, scale, max(2, round(side / 160)), font)
    lines = [(caption, (0, 0, 0)), (f"标注 annotated: {annotated}", TRUTH_COLOR), (f"模型 model: {predicted}", PREDICTED_COLOR)]
    text_width = canvas.width
    wrapped = [(chunk, color) for text, color in lines if text for chunk in _wrap(text, font, text_width - 16)]
    height = max(canvas.height, (font.size + 4) * len(wrapped) + 16)
    sheet = Image.new("RGB", (canvas.width + text_width, height), "white")
    sheet.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for row, (text, color) in enumerate(wrapped):
        draw.text((canvas.width + 8, 8 + row * (font.size + 4)), text, fill=color, font=font)
    _save_png(sheet, target)


def draw_augment_pairs(pairs: list[tuple[Path, list[dict], Path, list[dict]]], target: Path, side: int = 256) -> None:
    """Rows of (before, after) augmentation panels, each image with its own objects drawn; a note when there are none."""
    font = label_font(max(11, round(side / 22)))
    rows = []
    for before_path, before, after_path, after in pairs:
        panels = []
        for path, objects, title in ((before_path, before, f"before 原图: {len(before)}"), (after_path, after, f"after 增强: {len(after)}")):
            canvas, scale = _canvas(Path(path), side, side)
            _draw_objects(ImageDraw.Draw(canvas), objects, scale, max(1, round(side / 160)), font)
            framed = Image.new("RGB", (side, side + font.size + 8), "white")
            framed.paste(canvas, (0, font.size + 8))
            ImageDraw.Draw(framed).text((4, 2), title, fill=(0, 0, 0), font=font)
            panels.append(framed)
        rows.append(panels)
    if not rows:
        sheet = Image.new("RGB", (2 * side, font.size + 16), "white")
        ImageDraw.Draw(sheet).text((4, 4), "no augmented record with objects", fill=(0, 0, 0), font=font)
        _save_png(sheet, target)
        return
    height = rows[0][0].height
    sheet = Image.new("RGB", (2 * side + 8, len(rows) * (height + 8)), "white")
    for row, (left, right) in enumerate(rows):
        sheet.paste(left, (0, row * (height + 8)))
        sheet.paste(right, (side + 8, row * (height + 8)))
    _save_png(sheet, target)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Cut `text` into lines no wider than `width` pixels (character by character: CJK has no spaces)."""
    lines, current = [], ""
    for char in text:
        if current and font.getlength(current + char) > width:
            lines.append(current)
            current = ""
        current += char
    return lines + [current] if current else lines


def _save(fig, target: Path) -> None:
    """Write a figure as PNG under a temporary name, then rename it into place."""
    fig.tight_layout()
    with atomic_write(target, "wb") as handle:
        fig.savefig(handle, format="png")
    _pyplot().close(fig)


@contextmanager
def plotting_process() -> Iterator[ProcessPoolExecutor]:
    """A second process that imports matplotlib (about a second) while the caller works; submit plots to it.

    Spawned, so it shares no threads or state with the caller; it ends with the block.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_import_pyplot)
        yield pool


def _import_pyplot() -> None:
    _pyplot()


@cache
def _pyplot():
    """pyplot on the Agg backend, with Noto Sans CJK SC behind DejaVu Sans for Chinese text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    font_manager.fontManager.addfont(cjk_font_path())
    cjk = font_manager.FontProperties(fname=cjk_font_path()).get_name()
    plt.rcParams["font.family"] = ["DejaVu Sans", cjk]
    return plt


def plot_lengths(lengths: Counter, max_length: int, target: Path) -> None:
    """Histogram of token lengths ({length: samples}) against the max_length line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.hist(list(lengths), weights=list(lengths.values()), bins=min(50, max(5, len(lengths))), color="#3b7dd8")
    ax.axvline(max_length, color="#d33", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(f"Token lengths ({sum(lengths.values())} samples)")
    ax.legend()
    _save(fig, target)


def plot_losses(history: list[dict], target: Path, sources: list[str] = ()) -> None:
    """Train and eval loss; with several sources, each source's train loss too (swift's `loss_<source>`); a GKD run's
    terms (sft_loss, llm_kd_loss, vision_kd_loss) as dotted lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    for key, color in (("loss", "#3b7dd8"), ("eval_loss", "#d3503b")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, color=color, label=key)
    for key, color in (("sft_loss", "#3b7dd8"), ("llm_kd_loss", "#7a4bc2"), ("vision_kd_loss", "#2e9c6a")):
        points = [(h["step"], h[key]) for h in history if h.get(key, 0) > 0]  # log axis: a zero term has no point
        if points:
            ax.plot(*zip(*points, strict=True), linewidth=1, linestyle=":", color=color, label=key)
    palette = plt.get_cmap("Dark2")
    for index, source in enumerate(sources if len(sources) > 1 else ()):
        points = [(h["step"], h[f"loss_{source}"]) for h in history if f"loss_{source}" in h]
        if points:
            ax.plot(*zip(*points, strict=True), linewidth=1, linestyle="--", marker=".", markersize=4, color=palette(index % 8),
                    label=f"{source} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("Training loss")
    ax.legend(fontsize=7)
    _save(fig, target)


def plot_rewards(history: list[dict], target: Path) -> None:
    """A GRPO run: each reward's mean per logging step, the total with its spread (reward ± reward_std), and the KL."""
    plt = _pyplot()
    fig, (ax, kl_ax) = plt.subplots(2, 1, figsize=(6.5, 5.2), dpi=110, sharex=True, height_ratios=[3, 1])
    logged = [h for h in history if "reward" in h]
    names = sorted({k.split("/")[1] for h in logged for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    palette = plt.get_cmap("tab10")
    for index, name in enumerate(names):
        points = [(h["step"], h[f"rewards/{name}/mean"]) for h in logged if f"rewards/{name}/mean" in h]
        ax.plot(*zip(*points, strict=True), linewidth=1, marker=".", color=palette(index % 10), label=name)
    if logged:
        steps = [h["step"] for h in logged]
        total = [h["reward"] for h in logged]
        spread = [h.get("reward_std", 0.0) for h in logged]
        ax.plot(steps, total, color="black", linewidth=2, label="reward (weighted sum)")
        ax.fill_between(steps, [t - s for t, s in zip(total, spread)], [t + s for t, s in zip(total, spread)],
                        color="black", alpha=0.1, label="± reward_std")
        kl_ax.plot(steps, [h.get("kl", 0.0) for h in logged], color="#d3503b")
    ax.set_ylabel("reward")
    ax.set_title("GRPO rewards")
    ax.legend(fontsize=7)
    kl_ax.set_ylabel("KL to ref")
    kl_ax.set_xlabel("step")
    _save(fig, target)


def plot_confusion(confusion: dict[str, int], target: Path, title: str = "Stage-B verdicts", classes: tuple[str, ...] = ("pass", "fail"),
                   truth: dict[str, str] | None = None, predicted: dict[str, str] | None = None) -> None:
    """A confusion matrix from counts keyed "<truth>-><predicted>": rows are the truth, columns the prediction.

    `truth` and `predicted` map a class to the text shown for it (the user's own words); a class
    without one is shown as it is.
    """
    plt = _pyplot()
    cells = [[confusion.get(f"{t}->{p}", 0) for p in classes] for t in classes]
    size = 2.4 + 0.9 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    ax.imshow(cells, cmap="Blues")
    top = max(max(row) for row in cells) or 1
    for i, row in enumerate(cells):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=14, color="white" if value > top / 2 else "black")
    ticks = list(range(len(classes)))
    wide = len(classes) > 2
    ax.set_xticks(ticks, [(predicted or {}).get(c, c) for c in classes], rotation=30 if wide else 0, ha="right" if wide else "center")
    ax.set_yticks(ticks, [(truth or {}).get(c, c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
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
