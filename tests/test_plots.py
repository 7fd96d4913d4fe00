"""Every picture draws our users' Chinese labels as text, not as empty boxes."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from visionqc import plots

from conftest import make_image

LABELS = ("审核通过", "审核不通过", "标签", "线缆", "常")


@pytest.mark.filterwarnings("error")  # matplotlib warns "Glyph … missing from font(s)" for each glyph it cannot draw
def test_matplotlib_plots_render_chinese_labels_without_missing_glyphs(tmp_path):
    confusion = {f"{a}->{b}": i + j for i, a in enumerate(LABELS) for j, b in enumerate(LABELS)}
    plots.plot_confusion(confusion, tmp_path / "confusion.png", title="标签混淆矩阵", classes=LABELS)
    plots.plot_confusion({"pass->pass": 3, "fail->fail": 2}, tmp_path / "verdicts.png", truth={"pass": "审核通过", "fail": "审核不通过"},
                         predicted={"pass": "通过", "fail": "不通过"})
    rng = np.random.default_rng(0)
    plots.plot_traces({"正常": [(rng.normal(size=(100, 1)), 50.0)], "掉电": [(rng.normal(size=(80, 1)), 40.0)]}, tmp_path / "traces.png")
    plots.plot_losses([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "eval_loss": 1.5}], tmp_path / "loss.png")
    plots.plot_lengths(Counter([5, 9, 9, 12]), 16, tmp_path / "lengths.png")
    for name in ("confusion", "verdicts", "traces", "loss", "lengths"):
        with Image.open(tmp_path / f"{name}.png") as picture:
            assert picture.size[0] > 200


def test_a_plot_with_an_uncovered_glyph_would_fail_this_suite(tmp_path):
    """The check above can fail: DejaVu Sans alone lacks these glyphs and matplotlib says so."""
    plt = plots._pyplot()
    with plt.rc_context({"font.family": ["DejaVu Sans"]}), pytest.warns(UserWarning, match="Glyph .* missing from font"):
        fig, ax = plt.subplots()
        ax.set_title("线缆")
        fig.savefig(tmp_path / "tofu.png")
    plt.close(fig)


def test_overlays_draw_distinct_chinese_glyphs(tmp_path):
    font = plots.label_font(24)
    masks = [np.asarray(font.getmask(text)) for text in ("标签", "线缆", "常")]
    assert all(mask.max() > 0 for mask in masks)
    assert not np.array_equal(masks[0], masks[1])  # a font without these glyphs draws the same empty boxes for both
    make_image(tmp_path / "a.jpg", size=(200, 120), color=(240, 240, 240))
    record = {"objects": [{"bbox_2d": [10, 10, 120, 80], "desc": "类别=线缆"}]}
    plots.draw_overlay(record, tmp_path / "a.jpg", tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as picture:
        drawn = np.asarray(picture.convert("RGB")).astype(int)
    label_area = drawn[12:40, 14:60]
    assert (np.abs(label_area - [240, 240, 240]).sum(axis=2) > 100).sum() > 20  # the label text is on the picture
