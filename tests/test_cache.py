import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from visionqc.arrow_cache import CacheRef, open_cache
from visionqc.cache import CacheOptions, HeaderEncoder, build_cache, cache_key
from visionqc.messages import build_messages

from conftest import PROMPTS, held_by, make_image, read_jsonl, write_lines

OPTIONS = {"prompts": PROMPTS, "image_max_tokens": 64, "image_min_tokens": 4}


@pytest.fixture(scope="module")
def built(tiny_model, fused_records, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    manifest = build_cache(fused_records["train"], tiny_model, root, root / "train.json", root / "lengths.png", OPTIONS).report
    assert (root / "lengths.png").read_bytes() == (root / manifest["key"] / "lengths.png").read_bytes()
    return root, manifest


def test_cache_equals_swift_template_encode(built, tiny_model, fused_records):
    """The oracle: swift's own template.encode (which decodes pixels) gives the same tokens and grids."""
    from swift.template import get_template

    root, manifest = built
    table = open_cache(root / manifest["key"])
    encoder = HeaderEncoder(tiny_model, CacheOptions(**OPTIONS))  # sets the pixel budget for swift too
    reference = get_template(encoder.processor, template_type="qwen3_vl", max_length=None)
    reference.set_mode("train")
    records = read_jsonl(fused_records["train"])
    assert table.num_rows == len(records) > 10
    modes = set()
    for row, record in zip(table.to_pylist(), records, strict=True):
        messages = build_messages(record, fused_records["train"].parent, PROMPTS)
        expected = reference.encode(messages)
        assert row["input_ids"] == expected["input_ids"], row["line"]
        assert row["labels"] == expected["labels"], row["line"]
        assert row["length"] == len(expected["input_ids"])
        grids = expected["image_grid_thw"].tolist() if "image_grid_thw" in expected else []
        assert row["image_grid_thw"] == grids
        modes.add(record.get("metadata", {}).get("_fusion_mode", "chat") if "messages" not in record else "chat")
        if len(grids) > 1:
            modes.add("multi-image")
    assert modes == {"dense", "summary", "chat", "multi-image"}


def test_columns_and_memory_map(built):
    root, manifest = built
    shard = root / manifest["key"] / manifest["shards"][0]
    with pa.memory_map(str(shard)) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.schema.names == ["input_ids", "labels", "length", "images", "image_grid_thw", "source", "line"]
    assert set(table.column("source").to_pylist()) == {"platform", "labelme", "extra"}
    assert (root / manifest["key"] / "lengths.png").stat().st_size > 1000
    assert manifest["lengths"]["max"] == max(table.column("length").to_pylist())


def test_a_changed_byte_in_a_shard_stops_training_and_names_the_shard(built, tiny_model, tmp_path):
    """The manifest holds each shard's sha256; the trainer checks them before it loads the model."""
    root, manifest = built
    copy = tmp_path / "cache" / manifest["key"]
    shutil.copytree(root / manifest["key"], copy)
    shard = copy / manifest["shards"][0]
    assert manifest["shard_sha256"][manifest["shards"][0]] == hashlib.sha256(shard.read_bytes()).hexdigest()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the token columns: Arrow itself reads it without complaint
    shard.write_bytes(bytes(data))
    pointer = tmp_path / "pointer.json"
    pointer.write_text(json.dumps({"key": manifest["key"], "path": str(copy), "records": "r.jsonl"}))
    (tmp_path / "recipe.yaml").write_text("max_steps: 1\n")
    trained = subprocess.run([str(Path(sys.executable).parent / "visionqc"), "train", "--base", str(tiny_model),
                              "--train-cache", str(pointer), "--recipe", "recipe.yaml", "--model", "m", "--summary", "s.json",
                              "--loss-plot", "l.png", "--recipe-out", "r.json", "--history", "h.json", "--checkpoints", "c",
                              "--name", "t", "--tracking-uri", ""], cwd=tmp_path, capture_output=True, text=True)
    assert trained.returncode == 1
    assert f"{shard}: its bytes differ from what the cache rule wrote" in trained.stderr, trained.stderr[-2000:]
    assert "Traceback" not in trained.stderr and not (tmp_path / "c").exists()


def test_key_reuse_and_invalidation(built, tiny_model, fused_records, tmp_path):
    root, manifest = built
    again = build_cache(fused_records["train"], tiny_model, root, tmp_path / "p.json", None, OPTIONS).report
    assert again["reused"] and again["key"] == manifest["key"]
    assert json.loads((tmp_path / "p.json").read_text())["key"] == manifest["key"]

    changed = tmp_path / "changed.jsonl"
    lines = fused_records["train"].read_text("utf-8").splitlines()
    changed.write_text("\n".join(lines[1:]) + "\n", "utf-8")
    base = cache_key(fused_records["train"], tiny_model, CacheOptions(**OPTIONS))
    assert cache_key(changed, tiny_model, CacheOptions(**OPTIONS)) != base
    assert cache_key(fused_records["train"], tiny_model, CacheOptions(**{**OPTIONS, "max_length": 512})) != base
    assert cache_key(fused_records["train"], tiny_model, CacheOptions(**{**OPTIONS, "image_max_tokens": 32})) != base
    assert cache_key(fused_records["train"], tiny_model, CacheOptions(**{**OPTIONS, "prompts": {**PROMPTS, "dense": "x"}})) != base
    assert cache_key(fused_records["train"], tiny_model, CacheOptions(**OPTIONS, template="qwen3_vl")) == base


def test_over_length_samples_are_listed_not_truncated(tiny_model, fused_records, tmp_path):
    with pytest.raises(ValueError) as error:
        build_cache(fused_records["train"], tiny_model, tmp_path, tmp_path / "p.json", None, {**OPTIONS, "max_length": 60})
    message = str(error.value)
    assert "exceed cache.max_length=60" in message and f"{fused_records['train']}:1:" in message
    assert list(tmp_path.iterdir()) == []  # no cache folder, no pointer


def test_the_pixel_budget_bites_as_in_swift(tiny_model, tmp_path):
    """Images larger than the budget and of odd aspect ratios: the cache's grids and ids equal swift's template.encode
    (which decodes and resizes pixels) under the same budget, handed to swift the one way the stages do.

    ms-swift fixes the budget once per process, so this test uses the session's budget (64 merged tokens, the
    one OPTIONS gives every cache test) and images far above it; a different budget later in the process is refused.
    """
    from swift.template import get_template

    from visionqc.vision import PixelBudget

    sizes = [(640, 480), (1000, 200), (90, 700), (333, 77), (48, 48)]
    rows = []
    for index, size in enumerate(sizes):
        make_image(tmp_path / "images" / f"{index}.jpg", size=size, color=(40 * index, 90, 160))
        rows.append({"images": [f"images/{index}.jpg"], "width": size[0], "height": size[1],
                     "objects": [{"bbox_2d": [1, 1, 20, 20], "desc": "类别=BBU"}], "metadata": {"_fusion_mode": "dense"}})
    records = write_lines(tmp_path / "records.jsonl", rows)
    build_cache(records, tiny_model, tmp_path / "cache", tmp_path / "p.json", None, OPTIONS)
    table = CacheRef.read(tmp_path / "p.json").table().to_pylist()
    encoder = HeaderEncoder(tiny_model, CacheOptions(**OPTIONS))  # exports the budget to swift (PixelBudget.export_to_swift)
    reference = get_template(encoder.processor, template_type="qwen3_vl", max_length=None)
    reference.set_mode("train")
    grids = []
    for row, record in zip(table, rows, strict=True):
        expected = reference.encode(build_messages(record, tmp_path, PROMPTS))
        assert row["input_ids"] == expected["input_ids"]
        assert row["image_grid_thw"] == expected["image_grid_thw"].tolist()
        grids.append(row["image_grid_thw"][0])
    merged_tokens = [t * h * w // 4 for t, h, w in grids]
    assert max(merged_tokens) <= 64 < 640 * 480 // 32**2  # the budget bites: the big images were shrunk to it
    assert min(merged_tokens) >= 4 and len({(h, w) for _, h, w in grids}) >= 4 and any(h != w for _, h, w in grids)
    bigger = build_cache(records, tiny_model, tmp_path / "cache", tmp_path / "q.json", None, {**OPTIONS, "image_max_tokens": 256})
    assert bigger.report["key"] != CacheRef.read(tmp_path / "p.json").key
    assert max(g[1] * g[2] // 4 for g in (r["image_grid_thw"][0] for r in CacheRef.read(tmp_path / "q.json").table().to_pylist())) > 64
    with pytest.raises(RuntimeError, match="ms-swift already sized images in this process at 64/4"):
        PixelBudget(256, 4).export_to_swift()


def test_memory_stays_flat_as_the_records_grow(tiny_model, tmp_path):
    """Shards are written as they fill and answers are not kept: ten times the records hold about the same
    Python memory (building the whole table held every row: 18.7 and 46.1 MB peak at 2,000 and 20,000)."""
    for n in range(20):
        make_image(tmp_path / "images" / f"{n}.png", size=(32 + n, 32), color=(10 * n, 80, 160))

    def held(records: int) -> float:
        path = tmp_path / f"{records}.jsonl"
        write_lines(path, [{"images": [f"images/{n % 20}.png"], "width": 32 + n % 20, "height": 32, "objects": [],
                            "summary": f"第{n}组: 螺丝×{n % 7}", "metadata": {"_fusion_mode": "summary", "_fusion_prompt": "summary"}}
                           for n in range(records)])
        return held_by(lambda: build_cache(path, tiny_model, tmp_path / f"cache{records}", tmp_path / f"{records}.json", None,
                                           {**OPTIONS, "shard_size": 256}))

    held(200)  # imports and first-call state
    small, large = held(2000), held(20000)
    per_record = (large - small) / 18_000
    assert per_record < 256, (small, large)


def test_header_sizes_agree_with_pil_on_every_kind_of_image(demo_exports, tmp_path):
    """The cache's header reader against `PIL.Image.open(...).size`: the demo's images, the reference photos, and
    the formats and modes a team's photos come in (EXIF-rotated, progressive and CMYK JPEG, 16-bit PNG, WebP...)."""
    from PIL import Image

    from visionqc.images import image_size

    from conftest import REFERENCE

    made = [make_image(tmp_path / "rotated.jpg", size=(90, 40), exif_orientation=6),
            make_image(tmp_path / "plain.png", size=(33, 77))]
    for name, mode, options in (("progressive.jpg", "RGB", {"progressive": True}), ("cmyk.jpg", "CMYK", {}),
                                ("grey16.png", "I;16", {}), ("palette.png", "P", {}), ("alpha.png", "RGBA", {}),
                                ("photo.webp", "RGB", {}), ("lossless.webp", "RGBA", {"lossless": True}),
                                ("anim.gif", "P", {}), ("bitmap.bmp", "RGB", {}), ("scan.tiff", "RGB", {})):
        Image.new(mode, (123, 45)).save(tmp_path / name, **options)
        made.append(tmp_path / name)
    photos = [*made, *sorted(demo_exports.rglob("*.png")), *sorted(demo_exports.rglob("*.jpg")),
              *sorted(p for p in REFERENCE.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))]
    assert len(photos) > 40
    for path in photos:
        with Image.open(path) as image:
            assert image_size(path) == image.size, path
    broken = tmp_path / "cut.png"
    broken.write_bytes((tmp_path / "plain.png").read_bytes()[:12])
    with pytest.raises(OSError):
        image_size(broken)
