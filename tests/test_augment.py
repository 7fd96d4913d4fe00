"""augment: pixels and geometry move together, checked against shapely, masks and the contract."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from shapely.geometry import LineString, Polygon, box

from visionqc import contract
from visionqc.augment import AugmentOp, AugmentOptions, augment_epoch, augment_record
from visionqc.validate import validate

from conftest import CACHE, RECIPE, cache_pointers, read_jsonl, train_into

W, H = 160, 120
OBJECTS = [
    {"bbox_2d": [10, 12, 50, 40], "desc": "类别=BBU"},
    {"poly": contract.canonical_polygon([90, 20, 140, 30, 130, 80, 95, 70]), "poly_points": 4, "desc": "类别=标签"},
    {"line": [20, 100, 80, 60, 150, 110], "line_points": 3, "desc": "类别=线缆"},
]


def scene_record(objects=OBJECTS) -> dict:
    return {"images": ["scene.png"], "width": W, "height": H, "objects": [dict(o) for o in objects],
            "summary": contract.build_summary(objects), "metadata": {"source_file": "scene.json"}}


def mask_of(objects: list[dict], size: tuple[int, int], line_width: int = 5) -> Image.Image:
    """The objects filled white on black: boxes, polygons, and lines drawn `line_width` wide."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for obj in objects:
        key = contract.geometry_key(obj)
        points = [(obj[key][i], obj[key][i + 1]) for i in range(0, len(obj[key]), 2)]
        if key == "bbox_2d":
            draw.rectangle([points[0], (points[1][0] - 1, points[1][1] - 1)], fill=255)
        elif key == "poly":
            draw.polygon(points, fill=255)
        else:
            draw.line(points, fill=255, width=line_width)
    return mask


def ops(*entries: dict) -> list[AugmentOp]:
    return AugmentOptions.from_dict({"ops": list(entries)}).ops


def shape_of(obj: dict):
    key = contract.geometry_key(obj)
    points = np.array(obj[key], dtype=float).reshape(-1, 2)
    if key == "bbox_2d":
        return box(*obj[key])
    return LineString(points) if key == "line" else Polygon(points)


def measure(shape) -> float:
    return shape.length if shape.geom_type in ("LineString", "MultiLineString") else shape.area


AFFINE = [{"op": "hflip", "prob": 0.5}, {"op": "vflip", "prob": 0.5}, {"op": "rotate", "prob": 0.8, "degrees": 40},
          {"op": "scale", "prob": 0.8, "low": 0.7, "high": 1.3}, {"op": "translate", "prob": 0.8, "fraction": 0.3}]


class ScriptedDraws:
    """Stands in for numpy's Generator: each `random()` (does the op fire?) and `uniform()` (its parameter, as a fraction of
    the op's range) comes from the test's script, so the test knows every parameter without asking the code."""

    def __init__(self, fires: list[bool], fractions: list[float]):
        self.fires, self.fractions = iter(fires), iter(fractions)

    def random(self) -> float:
        return 0.0 if next(self.fires) else 0.999

    def uniform(self, low: float, high: float) -> float:
        return low + next(self.fractions) * (high - low)


def moved_by_the_script(shape, fires: list[bool], fractions: list[float]):
    """`shape` moved by the AFFINE ops with the scripted parameters, built with shapely.affinity, then clipped to the canvas."""
    from shapely import affinity

    centre, fractions = (W / 2, H / 2), iter(fractions)
    for op, fire in zip(AFFINE, fires, strict=True):
        if not fire:
            continue
        if op["op"] in ("hflip", "vflip"):
            shape = affinity.scale(shape, -1 if op["op"] == "hflip" else 1, -1 if op["op"] == "vflip" else 1, origin=centre)
        elif op["op"] == "rotate":
            shape = affinity.rotate(shape, -op["degrees"] + next(fractions) * 2 * op["degrees"], origin=centre)
        elif op["op"] == "scale":
            factor = op["low"] + next(fractions) * (op["high"] - op["low"])
            shape = affinity.scale(shape, factor, factor, origin=centre)
        else:
            dx, dy = ((-1 + 2 * next(fractions)) * op["fraction"] * size for size in (W, H))
            shape = affinity.translate(shape, dx, dy)
    return shape.intersection(box(0, 0, W, H))


@pytest.mark.parametrize("seed", range(12))
def test_random_transforms_move_geometry_as_shapely_moves_it_with_the_same_parameters(seed):
    script = np.random.default_rng(seed)
    fires, fractions = (script.random(len(AFFINE)) < 0.7).tolist(), script.random(6).tolist()
    record = scene_record()
    variant = augment_record(record, Image.new("RGB", (W, H)), ops(*AFFINE), ScriptedDraws(fires, fractions), min_coverage=0.0)
    expected = [moved_by_the_script(shape_of(obj), fires, fractions) for obj in OBJECTS]
    if variant.passed:  # only when nothing is left on the canvas
        assert variant.passed == "every_object_dropped" and all(measure(e) < 1 for e in expected), (seed, variant.passed)
        return
    out = variant.record
    kept = out["metadata"]["_augment"]["kept_indices"]
    assert (out["width"], out["height"]) == (W, H) and len(kept) == len(out["objects"])
    assert all(measure(expected[i]) < 1 for i in set(range(len(OBJECTS))) - set(kept)), seed  # dropped: nothing left of it
    for index, obj in zip(kept, out["objects"]):
        part = max(getattr(expected[index], "geoms", [expected[index]]), key=measure)  # the largest part is kept
        got = shape_of(obj)
        if "line" in obj:
            assert got.hausdorff_distance(part) < 0.05, (seed, obj)
        else:
            assert got.symmetric_difference(part).area < 0.01 * part.area + 0.5, (seed, obj)
    assert contract.check_record(out)[0] == [] and contract.check_bounds(out) == []


def test_a_box_turned_by_a_non_right_angle_becomes_its_four_corners():
    record = scene_record([{"bbox_2d": [60, 40, 100, 68], "desc": "类别=BBU"}])  # central: no corner leaves the image
    variant = augment_record(record, Image.new("RGB", (W, H)), ops({"op": "rotate", "degrees": 20}),
                             np.random.default_rng(3), min_coverage=0.0)
    box_out = variant.record["objects"][0]
    assert "poly" in box_out and box_out["poly_points"] == 4 and variant.counts["boxes_to_poly"] == 1
    assert Polygon(np.array(box_out["poly"]).reshape(-1, 2)).area == pytest.approx(40 * 28, rel=0.01)


def within_a_pixel(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels of `a` farther than one pixel from `b`."""
    grown = np.array(Image.fromarray(b.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 127
    return int((a & ~grown).sum())


@pytest.mark.parametrize("seed", range(8))
def test_the_augmented_mask_equals_the_transformed_mask(seed):
    """The image is the objects' own mask, areas in red and the cable, 5 px wide, in green: after augmentation, the pixels
    and the new geometry drawn again agree up to resampling. Areas: every pixel of each within one pixel of the other.
    The cable: its new centre line runs on green pixels, and every green pixel lies within the widest stroke scaling allows."""
    areas, lines = OBJECTS[:2], OBJECTS[2:]
    record = scene_record(OBJECTS)
    image = Image.merge("RGB", (mask_of(areas, (W, H)), mask_of(lines, (W, H), line_width=5), Image.new("L", (W, H))))
    chosen = ops(*AFFINE, {"op": "crop", "prob": 0.5, "min_scale": 0.8, "coverage": 0.6})
    variant = augment_record(record, image, chosen, np.random.default_rng(seed), min_coverage=0.0)
    assert not variant.passed
    out_areas = [o for o in variant.record["objects"] if "line" not in o]
    out_lines = [o for o in variant.record["objects"] if "line" in o]
    assert len(out_areas) == 2 and len(out_lines) == 1, variant.record["objects"]
    red, green, _ = (np.array(channel) > 127 for channel in variant.image.split())
    drawn = np.array(mask_of(out_areas, variant.image.size)) > 127
    assert within_a_pixel(red, drawn) <= 0.002 * red.sum() and within_a_pixel(drawn, red) <= 0.002 * drawn.sum()
    assert (red & drawn).sum() / (red | drawn).sum() > 0.9
    centre = np.array(mask_of(out_lines, variant.image.size, line_width=1)) > 127
    widest = np.array(mask_of(out_lines, variant.image.size, line_width=math.ceil(5 * AFFINE[3]["high"]) + 2)) > 127
    assert centre.sum() > 20 and within_a_pixel(centre, green) <= 0.01 * centre.sum()
    assert within_a_pixel(green, widest) <= 0.01 * green.sum()  # a few pixels of the stroke's corners


def test_hflip_twice_is_the_identity_for_pixels_and_geometry():
    record = scene_record()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    flip = ops({"op": "hflip"})
    once = augment_record(record, image, flip, np.random.default_rng(0), min_coverage=0.0)
    twice = augment_record(once.record, once.image, flip, np.random.default_rng(0), min_coverage=0.0)
    assert np.array_equal(np.array(twice.image), np.array(image))
    assert twice.record["objects"] == record["objects"]
    assert once.record["objects"] != record["objects"]
    both = augment_record(record, image, ops({"op": "hflip"}, {"op": "hflip"}), np.random.default_rng(0), min_coverage=0.0)
    assert both.counts["resamples"] == 0 and both.record["objects"] == record["objects"]


def test_a_crop_that_drops_objects_rebuilds_the_summary():
    objects = [{"bbox_2d": [2, 2, 30, 30], "desc": "类别=BBU"}, {"bbox_2d": [120, 80, 150, 110], "desc": "类别=标签"},
               {"bbox_2d": [10, 60, 40, 100], "desc": "类别=BBU"}]
    record = scene_record(objects)
    crop = ops({"op": "crop", "min_scale": 0.5})
    for seed in range(200):
        variant = augment_record(record, Image.new("RGB", (W, H)), crop, np.random.default_rng(seed), min_coverage=0.5)
        kept = variant.record.get("metadata", {}).get("_augment", {}).get("kept_indices")
        if not variant.passed and kept and len(kept) < 3:
            break
    else:
        pytest.fail("no crop dropped an object")
    out = variant.record
    assert out["summary"] == contract.build_summary([objects[i] for i in kept]) != record["summary"]
    assert contract.parse_summary(out["summary"]).valid
    assert [contract.desc_category(o["desc"]) for o in out["objects"]] == [contract.desc_category(objects[i]["desc"]) for i in kept]
    assert len(out["metadata"]["_augment"]["coverage"]) == len(kept)
    assert variant.counts["summaries_rebuilt"] == 1


def test_a_crop_losing_every_object_passes_the_record_through():
    record = scene_record([{"bbox_2d": [2, 2, 12, 12], "desc": "类别=BBU"}])
    crop = ops({"op": "crop", "min_scale": 0.3})
    outcomes = [augment_record(record, Image.new("RGB", (W, H)), crop, np.random.default_rng(s), 0.9) for s in range(40)]
    dropped = [variant for variant in outcomes if variant.passed == "every_object_dropped"]
    assert dropped and all(variant.record is record and variant.image is None for variant in dropped)


def test_degenerate_geometry_is_dropped_and_counted():
    """Shrunk to 3%, the 40x30 box is under a pixel tall and the 20-px line under a pixel long; the big polygon stays."""
    big = {"poly": [0, 0, 160, 0, 160, 120, 0, 120], "poly_points": 4, "desc": "类别=机柜"}
    record = scene_record([{"bbox_2d": [0, 0, 40, 30], "desc": "类别=BBU"}, big,
                           {"line": [100, 50, 120, 50], "line_points": 2, "desc": "类别=线缆"}])
    variant = augment_record(record, Image.new("RGB", (W, H)), ops({"op": "scale", "low": 0.03, "high": 0.03}),
                             np.random.default_rng(0), min_coverage=0.0)
    assert variant.counts["objects_dropped_degenerate"] == 2 and variant.counts["objects_out"] == 1
    assert variant.record["metadata"]["_augment"]["kept_indices"] == [1]
    assert variant.record["summary"] == contract.build_summary([big])
    assert contract.check_record(variant.record)[0] == []


@pytest.fixture(scope="module")
def epochs(fused_records, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("augment")
    options = {"seed": 3, "bypass_prob": 0.1, "min_coverage": 0.5, "preview": 3,
               "ops": [*AFFINE, {"op": "crop", "prob": 0.3, "min_scale": 0.7}, {"op": "pad_to_multiple", "multiple": 32},
                       {"op": "brightness", "prob": 0.5}, {"op": "hue", "prob": 0.5, "strength": 0.05}]}
    for epoch in (0, 1):
        augment_epoch(fused_records["train"], out / f"epoch_{epoch}.jsonl", out / f"epoch_{epoch}" / "images",
                      out / f"epoch_{epoch}.report.json", out / f"epoch_{epoch}.preview.png", options, epoch)
    return out, options


def test_every_record_is_kept_and_every_output_passes_validate(epochs, fused_records, tmp_path):
    out, _ = epochs
    source = read_jsonl(fused_records["train"])
    augmented = read_jsonl(out / "epoch_0.jsonl")
    assert len(augmented) == len(source)
    report = json.loads((out / "epoch_0.report.json").read_text())
    counts = report["counts"]
    assert counts["augmented"] + sum(v for k, v in counts.items() if k.startswith("passed.")) == len(source)
    assert counts["passed.no_image"] == 1 and counts["passed.several_images"] == 1  # the chat and the multi-image record
    images = [r["images"][0] for r in source if r.get("images")]
    root = os.path.commonpath([out, fused_records["train"], *(p for p in images if os.path.isabs(p))])
    result = validate(out / "epoch_0.jsonl", tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl", tmp_path / "report.json",
                      {"data_root": root})
    assert result.report["rejected"] == 0 and result.report["records_out"] == len(source)
    assert (out / "epoch_0.preview.png").stat().st_size > 0


def test_the_same_seed_gives_the_same_bytes_and_each_epoch_its_own_variant(epochs, fused_records, tmp_path):
    out, options = epochs
    augment_epoch(fused_records["train"], tmp_path / "epoch_0.jsonl", tmp_path / "images", tmp_path / "report.json",
                  tmp_path / "preview.png", options, 0)
    first = {p.name: p.read_bytes() for p in (out / "epoch_0" / "images").iterdir()}
    again = {p.name: p.read_bytes() for p in (tmp_path / "images").iterdir()}
    assert first == again
    assert [{k: v for k, v in r.items() if k != "images"} for r in read_jsonl(tmp_path / "epoch_0.jsonl")] == \
        [{k: v for k, v in r.items() if k != "images"} for r in read_jsonl(out / "epoch_0.jsonl")]
    second = {p.name: p.read_bytes() for p in (out / "epoch_1" / "images").iterdir()}
    assert sum(first.get(name) != data for name, data in second.items()) > len(second) // 2


def test_unknown_op_keys_are_refused_with_the_op_name():
    with pytest.raises(ValueError, match=r"augment.ops\[0\].degres; did you mean augment.ops\[0\].degrees"):
        AugmentOptions.from_dict({"ops": [{"op": "rotate", "degres": 5}]})
    with pytest.raises(ValueError, match=r"augment.ops\[0\].strength"):  # a key of another op
        AugmentOptions.from_dict({"ops": [{"op": "hflip", "strength": 0.5}]})
    # the schema fills every key with its default: those pass
    AugmentOptions.from_dict({"ops": [{"op": "hflip", "strength": 0.2, "degrees": 10.0}]})
    with pytest.raises(ValueError, match="op: rotat"):
        AugmentOptions.from_dict({"ops": [{"op": "rotat"}]})


@pytest.mark.slow
def test_training_reads_epoch_k_in_the_kth_pass(epochs, tiny_model, caches, tmp_path, monkeypatch):
    from visionqc import train as train_module

    out, _ = epochs
    pointers = cache_pointers(tmp_path / "cache", {f"epoch_{k}": out / f"epoch_{k}.jsonl" for k in (0, 1)}, tiny_model, CACHE)
    seen = []
    original = train_module.EpochCaches.__getitem__

    def spy(self, index):
        if not isinstance(index, str):
            seen.append(self.epoch % len(self.epochs))
        return original(self, index)

    monkeypatch.setattr(train_module.EpochCaches, "__getitem__", spy)
    recipe = {**RECIPE, "max_steps": -1, "num_train_epochs": 3, "eval_on_start": False, "save_steps": 1000, "eval_steps": 1000}
    records = len(read_jsonl(out / "epoch_0.jsonl"))
    train_into(tiny_model, {"train": [pointers["epoch_0"], pointers["epoch_1"]], "val": caches["val"]}, tmp_path / "run", recipe)
    train_reads = seen[: 3 * records]
    assert Counter(train_reads[:records]) == {0: records}
    assert Counter(train_reads[records: 2 * records]) == {1: records}
    assert Counter(train_reads[2 * records:]) == {0: records}  # past the last epoch, they cycle
