import json

from visionqc import contract
from visionqc.demo.exports import DemoExports, generate
from visionqc.demo.scenes import FAIL_DIR, MISSION, PASS_DIR
from visionqc.io import sha256_tree

from conftest import read_jsonl


def test_same_seed_same_bytes(tmp_path):
    for name, seed in (("a", 9), ("b", 9), ("c", 10)):
        generate(DemoExports.under(tmp_path / name), seed=seed, platform=4, labelme=2, coco=2, groups=2)
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b") != sha256_tree(tmp_path / "c")


def test_injected_label_errors_change_only_the_listed_annotations(tmp_path):
    sizes = {"seed": 5, "platform": 30, "labelme": 1, "coco": 1, "groups": 1}
    generate(DemoExports.under(tmp_path / "clean"), **sizes)
    generate(DemoExports.under(tmp_path / "noisy"), **sizes, label_errors=0.3)
    assert read_jsonl(tmp_path / "clean" / "label_errors.jsonl") == []
    injected = read_jsonl(tmp_path / "noisy" / "label_errors.jsonl")
    assert 4 <= len(injected) <= 16 and [row["kind"] for row in injected[:3]] == ["deleted", "wrong_class", "extra"]
    listed = {row["source_file"]: row for row in injected}
    for path in sorted((tmp_path / "clean" / "platform").iterdir()):
        noisy = tmp_path / "noisy" / "platform" / path.name
        assert (path.read_bytes() == noisy.read_bytes()) == (path.name not in listed), path.name  # the pixels never change
    for name, row in listed.items():
        labels = [[f["properties"]["content"]["label"] for f in json.loads((tmp_path / folder / "platform" / name).read_text())
                   ["markResult"]["features"]] for folder in ("clean", "noisy")]
        before, after = ({label: side.count(label) for label in set(labels[0]) | set(labels[1])} for side in labels)
        change = {label: after[label] - before[label] for label in before if after[label] != before[label]}
        expected = {"deleted": {row["label"]: -1}, "extra": {row["label"]: 1},
                    "wrong_class": {row["label"]: -1, row.get("given"): 1}}[row["kind"]]
        assert change == expected, (name, row)


def counts(summary: str) -> dict[str, int]:
    if summary == contract.IRRELEVANT_SUMMARY:
        return {}
    return {row["类别"]: row["数量"] for row in json.loads(summary)["统计"]}


def test_group_labels_follow_the_documented_rule(demo_exports):
    truth = read_jsonl(demo_exports / "groups" / "truth.jsonl")
    assert {row["label"] for row in truth} == {"pass", "fail", None}
    keys = [(row["group_id"], row["label"]) for row in truth]
    assert len(keys) == len(set(keys))
    assert len({row["group_id"] for row in truth}) < len(truth), "expected at least one resubmitted group"
    for row in truth:
        folder = {"pass": f"{PASS_DIR}/", "fail": f"{FAIL_DIR}/", None: ""}[row["label"]]  # a new group: no verdict folder
        assert all(path.startswith(f"{MISSION}/{folder}{row['group_id']}/") for path in row["images"])
        assert all((demo_exports / "groups" / path).exists() for path in row["images"])
        assert list(row["per_image"]) == [f"image_{i}" for i in range(1, len(row["images"]) + 1)]
        per_image = [counts(s) for s in row["per_image"].values()]
        passes = all(c.get("BBU", 0) >= 1 and c.get("标签", 0) >= c.get("BBU", 0) for c in per_image)
        assert row["label"] is None or passes == (row["label"] == "pass")


def test_verdict_records_follow_the_rule_and_parse(demo_exports):
    from visionqc.demo.scenes import verdict_reason
    from visionqc.messages import parse_verdict

    rows = read_jsonl(demo_exports / "verdicts" / "records.jsonl")
    assert len(rows) > 10 and {r["metadata"]["verdict"] for r in rows} == {"pass", "fail"}
    for row in rows:
        assert contract.check_record(row) == ([], [])
        verdict, reason, parsed = parse_verdict(row["messages"][1]["content"])
        assert parsed and (verdict == "通过") == (row["metadata"]["verdict"] == "pass") and reason
    assert verdict_reason([{"BBU": 1, "标签": 1}, {"BBU": 2, "标签": 1}]) == (False, "图片_2有2台BBU，只有1个标签")
    assert verdict_reason([{"BBU": 0, "标签": 2}])[0] is False
    assert verdict_reason([{"BBU": 3, "标签": 3, "线缆": 0}])[0] is True


def test_demo_signals_have_the_same_bytes_on_every_run(tmp_path):
    """libsndfile stamps float .wav files with the time (PEAK chunk) unless told not to."""
    import time

    from visionqc.demo.signals import write_signals

    write_signals(tmp_path / "a" / "manifest.csv", tmp_path / "a" / "traces", seed=3, count=4)
    time.sleep(1.1)  # the PEAK timestamp has a one-second resolution
    write_signals(tmp_path / "b" / "manifest.csv", tmp_path / "b" / "traces", seed=3, count=4)
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    assert b"PEAK" not in (tmp_path / "a" / "traces" / "00000.wav").read_bytes()


def test_demo_generators_leave_each_others_outputs_alone(tmp_path):
    """generate_demo_data and generate_demo_signals write into one resources/demo/ folder, in either order
    (or at once): each swaps only its own folders into place."""
    from visionqc.demo.signals import write_signals

    root = tmp_path / "demo"
    write_signals(root / "signals" / "manifest.csv", root / "signals" / "traces", seed=3, count=4)
    signals = sha256_tree(root / "signals")
    generate(DemoExports.under(root), seed=9, platform=4, labelme=2, coco=2, groups=2)
    assert sha256_tree(root / "signals") == signals
    exports = {p.name: sha256_tree(p) for p in root.iterdir() if p.name != "signals"}
    write_signals(root / "signals" / "manifest.csv", root / "signals" / "traces", seed=3, count=4)
    assert {p.name: sha256_tree(p) for p in root.iterdir() if p.name != "signals"} == exports
    assert sha256_tree(root / "signals") == signals
