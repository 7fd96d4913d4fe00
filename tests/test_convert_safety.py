"""Convert never writes to, links out to, or silently reads from a team's files outside the export.

Every format gets the same hostile export: an image reference that climbs out with ../, an absolute path,
a symlink that points outside, and two images with the same base name. The sha256 of every file outside
results/ must be the same after the run, and no output may hold an outside file's pixels.
"""

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import convert_into, make_image, read_jsonl

SIZE = (64, 48)
BOX = (10, 10, 30, 20)
CLIMB, ABSOLUTE, LINK, TWIN_1, TWIN_2 = "climb", "absolute", "link", "twin_1", "twin_2"


def tree_digests(root: Path, skip: Path) -> dict[str, str]:
    """sha256 of every file under root (a link by where it points), outside `skip`."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_relative_to(skip) or (path.is_dir() and not path.is_symlink()):
            continue
        found[str(path)] = (f"link:{os.readlink(path)}" if path.is_symlink()
                            else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def outside_files(tmp: Path) -> dict[str, Path]:
    """Two photos outside the export, each a colour no export image has."""
    return {"a": make_image(tmp / "outside" / "a" / "x.png", SIZE, (250, 0, 0)),
            "b": make_image(tmp / "outside" / "b" / "x.png", SIZE, (0, 250, 0))}


def references(base: Path, outside: dict[str, Path]) -> dict[str, str]:
    """The image references of the five cases, as written relative to `base` (where the format resolves names)."""
    make_image(base / "sub1" / "x.png", SIZE, (0, 0, 200))
    make_image(base / "sub2" / "x.png", SIZE, (0, 200, 200))
    base.mkdir(parents=True, exist_ok=True)
    (base / "link.png").symlink_to(outside["a"])
    return {CLIMB: os.path.relpath(outside["a"], base), ABSOLUTE: str(outside["b"]), LINK: "link.png",
            TWIN_1: "sub1/x.png", TWIN_2: "sub2/x.png"}


def labelme(export: Path, refs: dict[str, str]) -> Path:
    for case, ref in refs.items():
        doc = {"imagePath": ref, "imageWidth": SIZE[0], "imageHeight": SIZE[1], "imageData": None,
               "shapes": [{"label": "BBU", "shape_type": "rectangle", "points": [BOX[:2], BOX[2:]]}]}
        (export / f"{case}.json").write_text(json.dumps(doc))
    return export


def coco(export: Path, refs: dict[str, str]) -> Path:
    images = [{"id": i, "file_name": ref, "width": SIZE[0], "height": SIZE[1]} for i, ref in enumerate(refs.values())]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [BOX[0], BOX[1], BOX[2] - BOX[0], BOX[3] - BOX[1]],
                    "iscrowd": 0, "area": 200} for i in range(len(images))]
    path = export / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "BBU"}]}))
    return path


def cvat(export: Path, refs: dict[str, str]) -> Path:
    images = "".join(f'<image id="{i}" name="{ref}" width="{SIZE[0]}" height="{SIZE[1]}">'
                     f'<box label="BBU" xtl="{BOX[0]}" ytl="{BOX[1]}" xbr="{BOX[2]}" ybr="{BOX[3]}" occluded="0"/></image>'
                     for i, ref in enumerate(refs.values()))
    path = export / "annotations.xml"
    path.write_text(f'<?xml version="1.0"?><annotations><meta><task><labels><label><name>BBU</name></label></labels>'
                    f"</task></meta>{images}</annotations>")
    return path


def label_studio(export: Path, refs: dict[str, str]) -> Path:
    region = {"id": "r", "type": "rectanglelabels", "original_width": SIZE[0], "original_height": SIZE[1],
              "value": {"x": BOX[0] / SIZE[0] * 100, "y": BOX[1] / SIZE[1] * 100, "width": 20 / SIZE[0] * 100,
                        "height": 10 / SIZE[1] * 100, "rectanglelabels": ["BBU"]}}
    tasks = [{"id": i, "data": {"image": f"/data/local-files/?d={ref}"}, "annotations": [{"id": i, "result": [region]}]}
             for i, ref in enumerate(refs.values())]
    path = export / "tasks.json"
    path.write_text(json.dumps(tasks))
    return path


def voc(export: Path, refs: dict[str, str]) -> Path:
    for case, ref in refs.items():
        (export / "Annotations" / f"{case}.xml").write_text(
            f"<annotation><filename>{ref}</filename><size><width>{SIZE[0]}</width><height>{SIZE[1]}</height></size>"
            f"<object><name>BBU</name><bndbox><xmin>{BOX[0] + 1}</xmin><ymin>{BOX[1] + 1}</ymin><xmax>{BOX[2]}</xmax>"
            f"<ymax>{BOX[3]}</ymax></bndbox></object></annotation>")
    return export


# format → (writer, the folder its names resolve against, relative to the export)
NAMED = {"labelme": (labelme, "."), "coco": (coco, "."), "cvat": (cvat, "images"), "label_studio": (label_studio, "images"),
         "voc": (voc, "Annotations")}


def converted_pixels(out: Path) -> dict[str, tuple]:
    """Each record's image (as the record names it) → its first pixel."""
    found = {}
    for split in ("train", "val"):
        for record in read_jsonl(out / f"{split}.jsonl"):
            with Image.open(out / record["images"][0]) as image:
                found[record["images"][0]] = image.convert("RGB").getpixel((0, 0))
    return found


def assert_untouched_and_unread(tmp: Path, before: dict, out: Path, outside: dict[str, Path]) -> None:
    assert tree_digests(tmp, tmp / "out") == before, "a file outside results/ changed"
    assert not [p for p in out.rglob("*") if p.is_symlink()], "a symlink was reproduced under results/"
    colours = {Image.open(path).convert("RGB").getpixel((0, 0)) for path in outside.values()}
    leaked = {name: pixel for name, pixel in converted_pixels(out).items() if pixel in colours}
    assert not leaked, f"outside pixels read into results: {leaked}"


@pytest.mark.parametrize("fmt", sorted(NAMED))
def test_no_format_reads_or_writes_outside_its_export(tmp_path, fmt):
    writer, base = NAMED[fmt]
    outside = outside_files(tmp_path)
    export = tmp_path / "export"
    (export / "Annotations").mkdir(parents=True)
    refs = references(export / base, outside)
    source = writer(export, refs)
    before = tree_digests(tmp_path, tmp_path / "out")
    report = convert_into(fmt, source, tmp_path / "out", {"val_fraction": 0})

    assert_untouched_and_unread(tmp_path, before, tmp_path / "out", outside)
    reported = {issue["reason"] for issue in report["issues"]}
    assert reported <= {"unsafe_image_path", "missing_image"}
    unsafe = [issue for issue in report["issues"] if issue["reason"] == "unsafe_image_path"]
    # Label Studio reads ?d= under its storage root, so an absolute path there is a (missing) name, not a way out
    assert len(unsafe) == (2 if fmt == "label_studio" else 3), report["issues"]
    pixels = converted_pixels(tmp_path / "out")
    assert sorted(pixels.values()) == [(0, 0, 200), (0, 200, 200)]  # both twins, each with its own pixels


def test_platform_and_yolo_report_a_symlink_out_and_keep_twins_apart(tmp_path):
    outside = outside_files(tmp_path)
    feature = {"type": "Feature", "geometry": {"type": "ExtentPolygon", "coordinates": [[BOX[:2], (BOX[2], BOX[1]), BOX[2:],
                                                                                          (BOX[0], BOX[3]), BOX[:2]]]},
               "properties": {"objectId": 1, "content": {"label": "BBU"}}}
    platform, yolo = tmp_path / "platform", tmp_path / "yolo"
    for folder, colour in (("sub1", (0, 0, 200)), ("sub2", (0, 200, 200))):
        make_image(platform / folder / "x.png", SIZE, colour)
        make_image(yolo / "images" / folder / "x.png", SIZE, colour)
        (yolo / "labels" / folder).mkdir(parents=True)
    (platform / "link.png").symlink_to(outside["b"])
    (yolo / "images" / "link.png").symlink_to(outside["b"])
    for stem in ("sub1/x", "sub2/x", "link"):
        export = {"info": {"width": SIZE[0], "height": SIZE[1]}, "markResult": {"features": [feature]}}
        (platform / f"{stem}.json").write_text(json.dumps(export))
        (yolo / "labels" / f"{stem}.txt").write_text("0 0.3125 0.3125 0.3125 0.2083\n")
    (yolo / "data.yaml").write_text("names: [BBU]\n")
    before = tree_digests(tmp_path, tmp_path / "out")
    for fmt, source in (("platform", platform), ("yolo", yolo)):
        report = convert_into(fmt, source, tmp_path / "out" / fmt, {"val_fraction": 0})
        assert [issue["reason"] for issue in report["issues"]] == ["unsafe_image_path"], report["issues"]
        assert sorted(converted_pixels(tmp_path / "out" / fmt).values()) == [(0, 0, 200), (0, 200, 200)]
        assert_untouched_and_unread(tmp_path, before, tmp_path / "out" / fmt, outside)


def test_labelme_images_folder_makes_the_sibling_layout_work(tmp_path):
    """labelme writes imagePath ../images/x.jpg when annotations and images are sibling folders."""
    make_image(tmp_path / "images" / "x.png", SIZE, (0, 0, 200))
    (tmp_path / "labels").mkdir()
    labelme(tmp_path / "labels", {"a": "../images/x.png"})
    with pytest.raises(ValueError, match="converted no record") as refused:  # its only image is out of bounds
        convert_into("labelme", tmp_path / "labels", tmp_path / "refused", {"val_fraction": 0})
    assert "reported: unsafe_image_path 1" in str(refused.value) and "datasets.<name>.images" in str(refused.value)
    report = convert_into("labelme", tmp_path / "labels", tmp_path / "out",
                          {"val_fraction": 0, "labelme": {"images": str(tmp_path / "images")}})
    assert report["issues"] == [] and converted_pixels(tmp_path / "out") == {"images/x.png": (0, 0, 200)}


def test_an_embedded_image_whose_name_is_taken_gets_its_own_file(tmp_path):
    """b.json's x.png and z.json's embedded image, named missing/x.png, would both be images/x.png."""
    export = tmp_path / "export"
    make_image(export / "x.png", SIZE, (0, 0, 200))
    labelme(export, {"b": "x.png", "z": "missing/x.png"})
    embedded = io.BytesIO()
    Image.new("RGB", SIZE, (0, 200, 200)).save(embedded, format="PNG")
    doc = json.loads((export / "z.json").read_text())
    (export / "z.json").write_text(json.dumps({**doc, "imageData": base64.b64encode(embedded.getvalue()).decode()}))
    before = tree_digests(tmp_path, tmp_path / "out")
    report = convert_into("labelme", export, tmp_path / "out", {"val_fraction": 0})
    assert tree_digests(tmp_path, tmp_path / "out") == before
    pixels = converted_pixels(tmp_path / "out")
    assert pixels["images/x.png"] == (0, 0, 200) and sorted(pixels.values()) == [(0, 0, 200), (0, 200, 200)]
    assert [note["reason"] for note in report["notes"]] == ["renamed_image"]


def test_an_image_over_the_pixel_limit_is_reported_not_decoded(tmp_path):
    make_image(tmp_path / "export" / "x.png", (128, 96))
    make_image(tmp_path / "export" / "y.png", SIZE)
    labelme(tmp_path / "export", {"x": "x.png", "y": "y.png"})
    report = convert_into("labelme", tmp_path / "export", tmp_path / "out", {"val_fraction": 0, "max_image_pixels": 5000})
    (issue,) = report["issues"]
    assert issue["reason"] == "image_too_large" and "128x96" in issue["detail"] and "convert.max_image_pixels" in issue["detail"]
    assert report["records_out"] == 1


CONVERT_AND_MEASURE = """
import re, sys
from pathlib import Path
from visionqc.convert import convert
from visionqc.convert.common import ConvertOutputs
out = Path(sys.argv[1])
convert("labelme", Path(sys.argv[2]), ConvertOutputs(out / "train.jsonl", out / "val.jsonl", out / "report.json",
        out / "images", out / "overlays"), {"val_fraction": 0})
# this process's peak (getrusage's ru_maxrss would include the forking pytest's)
print(int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024)
"""


def test_a_12000_pixel_square_png_is_reported_from_its_header(tmp_path):
    """144 MP: over the 50 MP default. Reading it (PIL decodes a PNG whole to find its EXIF) cost 868 MB before."""
    make = "from PIL import Image; import sys; Image.new('RGB', (12000, 12000), (9, 9, 9)).save(sys.argv[1])"
    (tmp_path / "export").mkdir()
    subprocess.run([sys.executable, "-c", make, str(tmp_path / "export" / "x.png")], check=True)
    make_image(tmp_path / "export" / "y.png", SIZE)
    labelme(tmp_path / "export", {"x": "x.png", "y": "y.png"})
    measured = subprocess.run([sys.executable, "-c", CONVERT_AND_MEASURE, str(tmp_path / "out"), str(tmp_path / "export")],
                              check=True, capture_output=True, text=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [issue["reason"] for issue in report["issues"]] == ["image_too_large"]
    assert int(measured.stdout.split()[-1]) < 300, f"{measured.stdout.split()[-1]} MB to report one image"
