from collections import Counter
from pathlib import Path

import pytest

from visionqc.fuse import fuse

from conftest import make_image, read_jsonl, write_lines


@pytest.fixture
def datasets(tmp_path) -> dict[str, Path]:
    paths = {}
    for name, count in (("target_a", 40), ("target_b", 10), ("aux", 30)):
        folder = tmp_path / "validate" / name
        make_image(folder / "images" / "x.png", size=(8, 8))
        records = [{"images": ["images/x.png"], "width": 8, "height": 8, "objects": [], "metadata": {"n": i}} for i in range(count)]
        paths[name] = write_lines(folder / "train.clean.jsonl", records)
    return paths


SPEC = {
    "seed": 7,
    "targets": [{"dataset": "target_a", "ratio": 0.5, "mode": "dense", "prompt": "dense"},
                {"dataset": "target_b", "ratio": 2.5, "mode": "summary", "prompt": "summary"}],
    "sources": [{"dataset": "aux", "ratio": 0.5, "replace": False, "mode": "dense"}],
}


def run(datasets, tmp_path, spec=SPEC, name="fused", **kwargs):
    out = tmp_path / "fuse" / f"{name}.jsonl"
    report = fuse(spec, datasets, out, tmp_path / "fuse" / f"{name}.report.json", **kwargs).report
    return out, report


def test_quotas_and_tags(datasets, tmp_path):
    out, report = run(datasets, tmp_path)
    records = read_jsonl(out)
    by_source = Counter(r["metadata"]["_fusion_source"] for r in records)
    # target_a: 40*0.5=20 without replacement; target_b: 10*2.5=25 (all 10 once + 15 drawn); aux: 0.5*45=22 (23 by rounding half to even)
    assert by_source["target_a"] == 20 and by_source["target_b"] == 25
    assert report["target_quota"] == 45 and by_source["aux"] == round(0.5 * 45)
    rows = {row["dataset"]: row for row in report["datasets"]}
    assert rows["target_a"]["unique"] == 20
    assert rows["target_b"]["unique"] == 10  # every record kept once before the extra draws
    assert rows["aux"]["unique"] == rows["aux"]["taken"]  # without replacement
    for record in records:
        meta = record["metadata"]
        assert meta["_fusion_domain"] == ("source" if meta["_fusion_source"] == "aux" else "target")
        assert meta["_fusion_mode"] == {"target_a": "dense", "target_b": "summary", "aux": "dense"}[meta["_fusion_source"]]
        assert (out.parent / record["images"][0]).exists()
        assert "n" in meta  # the record's own metadata is kept


def test_without_replacement_is_capped_and_reported(datasets, tmp_path):
    spec = dict(SPEC, sources=[{"dataset": "aux", "ratio": 2.0, "replace": False}])
    _, report = run(datasets, tmp_path, spec)
    aux = next(row for row in report["datasets"] if row["dataset"] == "aux")
    assert aux["taken"] == 30 and aux["shortfall"] == 90 - 30


def test_same_seed_same_bytes_other_seed_other_bytes(datasets, tmp_path):
    first, _ = run(datasets, tmp_path, name="a")
    second, _ = run(datasets, tmp_path, name="b")
    third, _ = run(datasets, tmp_path, dict(SPEC, seed=8), name="c")
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != third.read_bytes()


def test_adding_a_dataset_keeps_the_others_draws(datasets, tmp_path):
    only_targets = dict(SPEC, sources=[])
    base, _ = run(datasets, tmp_path, only_targets, name="a")
    more, _ = run(datasets, tmp_path, name="b")
    def picked(path, name):
        return sorted(r["metadata"]["n"] for r in read_jsonl(path) if r["metadata"]["_fusion_source"] == name)

    assert picked(base, "target_a") == picked(more, "target_a")


def test_eval_split_keeps_targets_once(datasets, tmp_path):
    out, _report = run(datasets, tmp_path, eval_split=True)
    sources = Counter(r["metadata"]["_fusion_source"] for r in read_jsonl(out))
    assert sources == {"target_a": 40, "target_b": 10}


def test_unknown_dataset_is_a_clear_error(datasets, tmp_path):
    with pytest.raises(ValueError, match="'missing' has no input"):
        run(datasets, tmp_path, dict(SPEC, targets=[{"dataset": "missing"}]))
