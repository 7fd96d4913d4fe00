"""Mixed mode: a fusion entry's records are asked densely or for their summary, drawn per record and epoch."""

import json
from pathlib import Path

import pytest

from visionqc.augment import augment_epoch
from visionqc.fuse import fuse
from visionqc.messages import build_messages, record_mode

from conftest import CACHE, RECIPE, cache_pointers, read_jsonl, train_into, write_lines

RATIO = 0.5


@pytest.fixture(scope="module")
def mixed(fused_records, tmp_path_factory) -> Path:
    """The demo's platform and labelme records fused in mixed mode (train split), each twice (each copy draws its own),
    with a photo that has no objects and one that has no summary."""
    converted = fused_records["train"].parents[1] / "convert"
    out = tmp_path_factory.mktemp("mixed")
    photo = read_jsonl(converted / "platform/train.jsonl")[0]
    photo["images"] = [str((converted / "platform" / photo["images"][0]).resolve())]
    irrelevant = {key: photo[key] for key in ("images", "width", "height")} | {"summary": "无关图片", "objects": []}
    unsummarised = {key: value for key, value in photo.items() if key != "summary"}
    write_lines(out / "extra.jsonl", [irrelevant, unsummarised])
    spec = {"seed": 4, "partial_records": "keep", "targets": [
        {"dataset": name, "ratio": 2.0, "mode": "mixed", "dense_ratio": RATIO} for name in ("platform", "labelme", "extra")]}
    inputs = {name: converted / name / "train.jsonl" for name in ("platform", "labelme")} | {"extra": out / "extra.jsonl"}
    fuse(spec, inputs, out / "fuse/train.jsonl", out / "fuse/train.report.json")
    return out


def epoch(mixed: Path, k: int, out: Path | None = None) -> Path:
    """Epoch k of the augment chain, every record passed through (bypass_prob 1): only the draw changes."""
    out = out or mixed / "augment"
    augment_epoch(mixed / "fuse/train.jsonl", out / f"epoch_{k}.jsonl", out / f"epoch_{k}", out / f"epoch_{k}.report.json",
                  out / f"epoch_{k}.preview.png", {"bypass_prob": 1.0}, k)
    return out / f"epoch_{k}.jsonl"


def test_the_draw_is_seeded_per_epoch_resumable_and_honours_what_a_record_has(mixed):
    epochs = [epoch(mixed, k) for k in range(3)]
    modes = [[record_mode(r) for r in read_jsonl(path)] for path in epochs]
    records = read_jsonl(epochs[0])
    assert len(records) >= 30 and all(set(m) <= {"dense", "summary"} for m in modes)
    for m in modes:  # both modes in every epoch, near the ratio (binomial: 4 sd at n = 30 is 0.37)
        assert abs(m.count("dense") / len(m) - RATIO) < 0.37 and 0 < m.count("dense") < len(m)
    assert modes[0] != modes[1] != modes[2]  # each epoch draws anew
    for record, *drawn in zip(records, *modes, strict=True):
        if not record.get("objects"):
            assert set(drawn) == {"summary"}  # nothing to ask densely
        if "summary" not in record:
            assert set(drawn) == {"dense"}
    assert any(not r.get("objects") for r in records) and any("summary" not in r for r in records)

    # resumable and deterministic: epoch 2 alone, in another folder, is the same bytes
    again = epoch(mixed, 2, out=mixed / "again")
    assert again.read_bytes() == epochs[2].read_bytes()
    # each record's messages follow its draw: the dense prompt and JSON, or the summary
    for record, mode in zip(records, modes[0], strict=True):
        answer = build_messages(record, epochs[0].parent, CACHE["prompts"])["messages"][-1]["content"]
        assert (answer == record.get("summary")) == (mode == "summary")
        if mode == "dense":
            assert json.loads(answer).keys() == {"图片_1"}


def test_a_mixed_ratio_of_0_or_1_asks_one_mode():
    record = {"images": ["a.jpg"], "width": 10, "height": 10, "summary": "无关图片",
              "objects": [{"bbox_2d": [1, 1, 5, 5], "desc": "类别=BBU"}]}
    for ratio, expected in ((0.0, "summary"), (1.0, "dense")):
        for n in range(20):
            tagged = dict(record, metadata={"_fusion_mode": "mixed", "_fusion_dense_ratio": ratio, "_fusion_draw": f"1:train:{n}"})
            assert record_mode(tagged) == expected


def test_mixed_epochs_cache_their_draw_and_train_with_logits_only_where_a_label_follows(mixed, tiny_model, tmp_path, monkeypatch):
    """Each epoch's cache holds its own draw; a run trains on them. Its LM head computes only the rows whose next
    token is a label, packed in one row: fewer rows, and the same loss, gradient norm and per-source metrics at every
    step as ms-swift's rows from the batch's earliest answer on (logits_at_labels: false)."""
    import visionqc.train

    epochs = {f"epoch_{k}": epoch(mixed, k) for k in range(2)}
    pointers = cache_pointers(tmp_path / "cache", epochs, tiny_model, CACHE)
    for part, path in epochs.items():
        manifest = json.loads((Path(json.loads(pointers[part].read_text())["path"]) / "manifest.json").read_text())
        drawn = [record_mode(r) for r in read_jsonl(path)]
        assert manifest["modes"] == {mode: drawn.count(mode) for mode in sorted(set(drawn))}
    # the same records and config give the same bytes in a fresh cache store
    again = cache_pointers(tmp_path / "again", {"epoch_1": epochs["epoch_1"]}, tiny_model, CACHE)
    shards = [sorted(Path(json.loads(p.read_text())["path"]).glob("*.arrow")) for p in (pointers["epoch_1"], again["epoch_1"])]
    assert shards[0] and [s.read_bytes() for s in shards[0]] == [s.read_bytes() for s in shards[1]]

    rows = {True: 0, False: 0}  # LM head rows computed in each run
    count_sources = visionqc.train.count_source_accuracy

    def counted(trainer, packed):
        def count(module, inputs, logits):
            rows[packed is not None] += logits.shape[:-1].numel()

        trainer.model.get_output_embeddings().register_forward_hook(count)
        count_sources(trainer, packed)

    monkeypatch.setattr(visionqc.train, "count_source_accuracy", counted)
    recipe = dict(RECIPE, per_device_train_batch_size=4, max_steps=4, logging_steps=1, eval_on_start=False, eval_steps=4,
                  save_steps=4)
    logged, summaries = {}, {}
    for at in (True, False):
        logged[at] = []
        summaries[at] = train_into(
            tiny_model, {"train": [pointers["epoch_0"], pointers["epoch_1"]]}, tmp_path / f"run_{at}", dict(recipe, logits_at_labels=at),
            on_log=lambda metrics, step, log=logged[at]: log.append((step, metrics))).report
    assert summaries[True]["steps"] == 4 and summaries[True]["last_loss"] > 0
    steps = {at: [(step, metrics) for step, metrics in logged[at] if "loss" in metrics] for at in logged}
    assert len(steps[True]) == 4 and any("train/platform_loss" in metrics for _, metrics in steps[True])
    for (step, packed), (_, unpacked) in zip(steps[True], steps[False], strict=True):
        # the same maths; the head's product over fewer rows and the loss summed over another length may round
        # differently in the last float32 bits
        timing = {"elapsed_time", "remaining_time", "train_speed(s/it)"}
        assert packed.keys() == unpacked.keys()
        for key in packed.keys() - timing:
            assert packed[key] == pytest.approx(unpacked[key], rel=1e-6, abs=0), (step, key)
    assert 0 < rows[True] < 0.6 * rows[False], rows
