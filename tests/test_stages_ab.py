"""Stage-A (group ingestion, left padding, chunk resume) and Stage-B (verdict parsing, scoring)."""

import json
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from visionqc.arrow_cache import CacheRef
from visionqc.messages import parse_verdict, ticket_key, verdict_prompt
from visionqc.stage_a import batches, discover_groups, exact_match, plan_chunks, run_stage_a
from visionqc.stage_b import run_stage_b, score

from conftest import make_image, read_jsonl


@pytest.fixture
def groups_root(tmp_path) -> Path:
    root = tmp_path / "groups"
    for label_dir, group, count in (("审核通过", "G1", 2), ("审核不通过", "G1", 3), ("审核不通过", "G2", 1), ("审核通过", "G3", 11)):
        for n in range(1, count + 1):
            make_image(root / "任务" / label_dir / group / f"{n}.jpg", size=(64, 64), color=(10 * n, 100, 200))
    (root / "任务" / "审核通过" / "G3" / "notes.txt").write_text("not an image")
    (root / "任务" / "待审核").mkdir()
    return root


def test_group_folders_give_labels_and_resubmissions_are_two_records(groups_root):
    groups, warnings = discover_groups(groups_root, "任务")
    assert [(g["group_id"], g["label"], len(g["images"])) for g in groups] == [
        ("G1", "fail", 3), ("G1", "pass", 2), ("G2", "fail", 1), ("G3", "pass", 11)]
    assert [Path(p).name for p in groups[3]["images"]][:3] == ["1.jpg", "2.jpg", "3.jpg"]  # natural order: 2 before 10
    assert Path(groups[3]["images"][-1]).name == "11.jpg"
    assert any("待审核" in w for w in warnings)
    with pytest.raises(FileNotFoundError, match="mission folder not found"):
        discover_groups(groups_root, "没有")


def test_new_groups_beside_reviewed_ones_and_what_is_not_a_group(groups_root):
    mission = groups_root / "任务"
    for name in ("1.jpg", "2.png"):
        make_image(mission / "T-7" / name, size=(32, 32))
    make_image(mission / "stray.jpg", size=(32, 32))  # a photo outside any group folder
    make_image(mission / "batch-2" / "T-9" / "1.jpg", size=(32, 32))  # a folder of folders, one level too deep
    groups, warnings = discover_groups(groups_root, "任务")
    assert [(g["group_id"], g["label"], len(g["images"])) for g in groups] == [
        ("G1", "fail", 3), ("G1", "pass", 2), ("G2", "fail", 1), ("G3", "pass", 11), ("T-7", None, 2)]
    assert [ticket_key(g) for g in groups][-2:] == ["G3::pass", "T-7"]
    assert any("stray.jpg: a photo directly in the mission folder" in w for w in warnings)
    assert any("batch-2: no photos, skipped (it holds folders T-9: a group is one folder of photos)" in w for w in warnings)


def test_a_mission_with_no_group_says_the_layout_it_expects_and_what_it_saw(tmp_path):
    make_image(tmp_path / "m" / "flat.jpg", size=(32, 32))
    (tmp_path / "m" / "审核通过").mkdir()
    with pytest.raises(ValueError) as error:
        stage_a_run = run_stage_a(tmp_path, "m", tmp_path, cache_pointer(tmp_path / "c"), summaries_out=tmp_path / "a.jsonl",
                                  report_out=tmp_path / "r.json", chunks_dir=tmp_path / "chunks", generator=FakeGenerator())
        assert stage_a_run is None
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'm'}: no photo groups found.")
    for line in ("<group>/*.jpg          a new group, to judge", "审核通过/<group>/*.jpg   a group reviewed pass",
                 "审核不通过/<group>/*.jpg a group reviewed fail", "flat.jpg: a photo directly in the mission folder"):
        assert line in message
    with pytest.raises(FileNotFoundError, match=r"mission folder not found[\s\S]*a new group, to judge"):
        discover_groups(tmp_path, "nowhere")


def sized_groups(sizes: dict[str, int]) -> list[dict]:
    return [{"group_id": name, "mission": "m", "label": None, "images": [f"{name}/{n}.jpg" for n in range(size)]}
            for name, size in sorted(sizes.items())]


def chunk_plan(groups: list[dict], chunk_size: int = 16) -> list[tuple]:
    return [tuple((groups[g]["group_id"], i) for g, i in chunk) for chunk in plan_chunks(groups, chunk_size)]


@pytest.mark.parametrize("arriving", [{17, 111, 205, 290, 377}, set(range(360, 400))], ids=["scattered", "a-new-week"])
def test_chunks_hold_whole_groups_and_new_groups_move_only_the_chunk_they_land_in(arriving):
    sizes = {f"T-{n:04d}": 1 + n % 5 for n in range(400)}
    arrived = {f"T-{n:04d}" for n in arriving}
    before = chunk_plan(sized_groups({k: v for k, v in sizes.items() if k not in arrived}))
    after = chunk_plan(sized_groups(sizes))
    assert sum(map(len, after)) == sum(sizes.values()) and 8 <= sum(sizes.values()) / len(after) <= 32
    for chunk in after:  # whole groups only
        held = {name for name, _ in chunk}
        assert all(sum(1 for name, _ in chunk if name == group) == sizes[group] for group in held)
    changed = [chunk for chunk in after if chunk not in before]
    holding_new = [chunk for chunk in changed if {name for name, _ in chunk} & arrived]
    # an arrival changes the chunk it lands in, and the rest of that chunk when it ends a chunk itself
    assert len(changed) - len(holding_new) <= len(arrived)
    assert len(before) - sum(chunk in after for chunk in before) <= len(arrived)
    if min(arriving) > 300:  # a new week's tickets sort after the old: every old chunk but the last is kept
        assert before[:-1] == after[: len(before) - 1]


def test_batch_plans(groups_root):
    groups, _ = discover_groups(groups_root, "任务")
    (chunk,) = [chunk for chunk in plan_chunks(groups, 100)]  # nothing ends a chunk below its size: one chunk
    assert all(len({g for g, _ in b}) == 1 for b in batches(chunk, "per_group", 8))
    assert [len(b) for b in batches(chunk, "per_group", 8)] == [3, 2, 1, 8, 3]
    mixed = batches(chunk, "per_image", 8)
    assert [len(b) for b in mixed] == [8, 8, 1] and len({g for g, _ in mixed[0]}) == 4


def cache_pointer(folder: Path, **options) -> Path:
    """A cache pointer and manifest holding only what Stage-A reads from them (prompts, pixel budget)."""
    options = {"prompts": {"summary": "统计"}, "image_max_tokens": 64, "image_min_tokens": 4, **options}
    (folder / "cache").mkdir(parents=True, exist_ok=True)
    (folder / "cache" / "manifest.json").write_text(json.dumps({"options": options}, ensure_ascii=False))
    pointer = folder / "pointer.json"
    pointer.write_text(json.dumps({"key": "k", "path": str(folder / "cache"), "records": "r.jsonl"}))
    return pointer


def stage_a(root, model, cache, out, chunks, options, **kwargs):
    return run_stage_a(root, "任务", model, cache, summaries_out=out, report_out=out.with_suffix(".report.json"), chunks_dir=chunks,
                       options=options, **kwargs)


def summary_naming(request) -> str:
    """A summary that meets the contract and names the request's image, e.g. G3/11.jpg×1."""
    image = Path(request["images"][0])
    return json.dumps({"统计": [{"类别": f"{image.parent.name}/{image.name}", "数量": 1}]}, ensure_ascii=False)


class FakeGenerator:
    """Counts calls; answers deterministically from the request. Used only to test chunk bookkeeping."""

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after

    def generate(self, requests):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        return [summary_naming(r) for r in requests]


def test_interrupted_run_redoes_only_missing_chunks(groups_root, tmp_path):
    options = {"chunk_size": 2, "batch_size": 2, "mode": "per_image"}  # one chunk per group: 3, 2, 1 and 11 photos
    out, chunks = tmp_path / "a.jsonl", tmp_path / "chunks"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cache = cache_pointer(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        stage_a(groups_root, model, cache, out, chunks, options, generator=FakeGenerator(fail_after=4))
    written = sorted(chunks.rglob("chunk-*.jsonl"))
    assert len(written) == 3 and not out.exists()  # three whole chunks (2 + 1 + 1 calls) survived
    resumed = FakeGenerator()
    report = stage_a(groups_root, model, cache, out, chunks, options, generator=resumed).report
    assert json.loads(out.with_suffix(".report.json").read_text()) == report
    assert report["chunks_run"] == 1 and report["merged"]
    assert resumed.calls == 6  # only the missing chunk's batches: G3's 11 photos, 2 at a time
    records = read_jsonl(out)
    assert [(r["group_id"], r["label"]) for r in records] == [("G1", "fail"), ("G1", "pass"), ("G2", "fail"), ("G3", "pass")]
    assert json.loads(records[3]["per_image"]["image_11"])["统计"][0]["类别"] == "G3/11.jpg"
    assert report["valid_rate"] == 1.0 and records[3]["per_image_check"]["image_11"] == "valid" and records[3]["summaries_valid"]
    assert list(records[0]["per_image"]) == ["image_1", "image_2", "image_3"]
    # ranks split the chunks; only the last rank's completion merges
    out2, chunks2 = tmp_path / "b.jsonl", tmp_path / "chunks2"
    first = stage_a(groups_root, model, cache, out2, chunks2, options, rank=0, world=2, generator=FakeGenerator()).report
    assert first["chunks_run"] == 2 and not first["merged"] and not out2.exists()
    second = stage_a(groups_root, model, cache, out2, chunks2, options, rank=1, world=2, generator=FakeGenerator()).report
    assert second["chunks_run"] == 2 and second["merged"]
    assert out2.read_bytes() == out.read_bytes()
    # another pixel budget in the cache is another question: its chunks are not reused
    other = stage_a(groups_root, model, cache_pointer(tmp_path / "other", image_max_tokens=32), tmp_path / "c.jsonl", chunks,
                    options, generator=FakeGenerator()).report
    assert other["chunks_run"] == other["chunks"] == 4


class ColourReader(FakeGenerator):
    """Answers with the photo's colour: a summary that follows the pixels, not the file name."""

    def generate(self, requests):
        self.calls += 1
        answers = []
        for request in requests:
            with Image.open(request["images"][0]) as image:
                colour = "-".join(map(str, image.convert("RGB").resize((1, 1)).getpixel((0, 0))))
            answers.append(json.dumps({"统计": [{"类别": colour, "数量": 1}]}))
        return answers


def test_a_photo_replaced_in_place_reruns_exactly_its_chunk(groups_root, tmp_path):
    options = {"chunk_size": 2, "batch_size": 4, "mode": "per_image"}
    model = tmp_path / "model"
    model.mkdir()
    out, chunks, cache = tmp_path / "a.jsonl", tmp_path / "chunks", cache_pointer(tmp_path)
    first = stage_a(groups_root, model, cache, out, chunks, options, generator=ColourReader()).report
    assert first["chunks_run"] == 4
    (before,) = [r for r in read_jsonl(out) if r["group_id"] == "G3"]
    photo = groups_root / "任务" / "审核通过" / "G3" / "7.jpg"  # G3's 11 photos are one chunk
    make_image(photo, size=(64, 64), color=(250, 0, 0))
    again = ColourReader()
    report = stage_a(groups_root, model, cache, out, chunks, options, generator=again).report
    assert report["chunks_run"] == 1 and report["images_generated"] == 11 and again.calls == 3
    (g3,) = [r for r in read_jsonl(out) if r["group_id"] == "G3"]
    assert json.loads(g3["per_image"]["image_7"])["统计"][0]["类别"].startswith("25")  # red now
    assert {k: v for k, v in g3["per_image"].items() if k != "image_7"} == {k: v for k, v in before["per_image"].items() if k != "image_7"}
    assert g3["per_image"]["image_7"] != before["per_image"]["image_7"]
    assert len(list(chunks.rglob("chunk-*.jsonl"))) == 4  # the replaced photo's old answers are gone


def add_groups(mission: Path, *named: tuple[str, int]) -> None:
    for folder, count in named:
        for n in range(1, count + 1):
            make_image(mission / folder / f"{n}.jpg", size=(64, 64), color=(30 * n, 60, len(folder) * 9))


def test_groups_added_later_run_only_their_chunks_and_give_the_bytes_of_a_run_from_scratch(groups_root, tmp_path):
    options = {"chunk_size": 3, "batch_size": 4, "mode": "per_image"}
    model = tmp_path / "model"
    model.mkdir()
    cache, chunks, out = cache_pointer(tmp_path), tmp_path / "chunks", tmp_path / "a.jsonl"
    mission = groups_root / "任务"
    add_groups(mission, *((f"T-{n:03d}", 1 + n % 4) for n in range(0, 60, 2)))  # last week's new tickets
    first = stage_a(groups_root, model, cache, out, chunks, options, generator=ColourReader()).report
    old_chunks = {p.name for p in chunks.rglob("chunk-*.jsonl")}
    add_groups(mission, ("T-031", 3), ("T-077", 2), ("审核通过/G0", 2))  # this week's, and one reviewed group
    again = ColourReader()
    report = stage_a(groups_root, model, cache, out, chunks, options, generator=again).report
    new_chunks = {p.name for p in chunks.rglob("chunk-*.jsonl")}
    assert report["chunks"] == len(new_chunks) and report["chunks_run"] == len(new_chunks - old_chunks)
    assert 1 <= report["chunks_run"] <= 2 * 3 and report["chunks"] - report["chunks_run"] >= first["chunks"] - 3
    asked = report["images_generated"]
    assert asked < first["images_generated"] / 2 and again.calls >= 1
    scratch = tmp_path / "scratch.jsonl"
    stage_a(groups_root, model, cache, scratch, tmp_path / "scratch-chunks", options, generator=ColourReader())
    assert out.read_bytes() == scratch.read_bytes()
    records = read_jsonl(out)
    assert {(r["group_id"], r["label"]) for r in records} >= {("T-031", None), ("T-077", None), ("G0", "pass")}
    assert report["new_groups"] == 32 and report["groups"] == 37


def judge_leniently(summaries: Path, tmp_path: Path, options: dict) -> tuple[dict, dict, list]:
    """Stage-B with a model that passes every group it is asked: (metrics, verdicts by ticket, requests asked)."""
    (tmp_path / "g.txt").write_text("规则")
    asked = []

    class Lenient:
        def generate(self, requests):
            asked.extend(requests)
            return ["通过\n理由: 看起来都好"] * len(requests)

    metrics = run_stage_b(summaries, tmp_path / "g.txt", tmp_path, verdicts_out=tmp_path / "b.jsonl", metrics_out=tmp_path / "m.json",
                          confusion_out=tmp_path / "c.png", generator=Lenient(), options=options).report
    return metrics, {v["ticket_key"]: v for v in read_jsonl(tmp_path / "b.jsonl")}, asked


def truncate(photo: Path) -> None:
    photo.write_bytes(photo.read_bytes()[: photo.stat().st_size // 3])


def test_an_unreadable_photo_fails_its_group_closed_and_the_mission_goes_on(groups_root, tmp_path):
    mission = groups_root / "任务"
    add_groups(mission, ("T-1", 3), ("T-2", 2))
    truncate(mission / "T-1" / "2.jpg")
    model = tmp_path / "model"
    model.mkdir()
    out = tmp_path / "a.jsonl"
    report = stage_a(groups_root, model, cache_pointer(tmp_path), out, tmp_path / "c", {}, generator=ColourReader()).report
    assert report["merged"] and report["valid_rate"] == 1.0 and report["images"] == 22 and report["invalid_images"] == 0
    (lost,) = report["unreadable_photos"]
    assert lost["group"] == "T-1" and lost["image"] == "image_2" and "2.jpg does not decode" in lost["why"]
    records = {r["group_id"]: r for r in read_jsonl(out) if r["label"] is None}
    assert records["T-1"]["per_image_check"] == {"image_1": "valid", "image_2": "unreadable_photo", "image_3": "valid"}
    assert records["T-1"]["per_image"]["image_2"] == "" and not records["T-1"]["summaries_valid"]
    assert records["T-2"]["summaries_valid"] and records["T-2"]["unreadable"] == {}
    metrics, verdicts, asked = judge_leniently(out, tmp_path, {"invalid_summaries": "judge"})
    assert len(asked) == 5 and all("T-1" not in r["prompt"] for r in asked)  # every group but T-1 was asked
    assert verdicts["T-1"]["verdict"] == "不通过" and verdicts["T-1"]["judged_by"] == "policy"
    assert "无法判定" in verdicts["T-1"]["reason"] and "image_2" in verdicts["T-1"]["reason"]
    assert verdicts["T-2"]["verdict"] == "通过"
    assert metrics["groups_judged"] == 6 and metrics["groups_scored"] == 4 and metrics["groups_unreadable"] == 1
    assert metrics["groups_failed"] == 1 and metrics["confusion"]["fail->pass"] == 2


def test_two_missions_ask_their_own_prompts(groups_root, tmp_path):
    add_groups(groups_root / "机房", ("R-1", 2))
    asked = {}

    class Recorder(FakeGenerator):
        def generate(self, requests):
            for r in requests:
                asked.setdefault(Path(r["images"][0]).parts[-3], set()).add(r["prompt"])
            return super().generate(requests)

    model = tmp_path / "model"
    model.mkdir()
    cache = cache_pointer(tmp_path, prompts={"summary_bbu": "数BBU", "summary_rru": "数RRU"})
    prompts = {"任务": "summary_bbu", "机房": "summary_rru"}
    for mission in prompts:
        run_stage_a(groups_root, mission, model, cache, summaries_out=tmp_path / f"{mission}.jsonl",
                    report_out=tmp_path / f"{mission}.json", chunks_dir=tmp_path / mission, options={"prompt": prompts},
                    generator=Recorder())
    assert asked == {"审核通过": {"数BBU"}, "审核不通过": {"数BBU"}, "机房": {"数RRU"}}
    with pytest.raises(ValueError, match=r"stage_a.prompt names no prompt for mission '机房'.*add 机房: <prompt name>"):
        run_stage_a(groups_root, "机房", model, cache, summaries_out=tmp_path / "x.jsonl", report_out=tmp_path / "x.json",
                    chunks_dir=tmp_path / "x", options={"prompt": {"任务": "summary_bbu"}}, generator=Recorder())


def test_a_group_folder_linked_from_outside_the_root_is_skipped(groups_root, tmp_path):
    elsewhere = make_image(tmp_path / "elsewhere" / "G9" / "1.jpg").parent
    (groups_root / "任务" / "审核通过" / "G9").symlink_to(elsewhere)
    (groups_root / "任务" / "审核通过" / "G1" / "9.jpg").symlink_to(elsewhere / "1.jpg")
    groups, warnings = discover_groups(groups_root, "任务")
    assert "G9" not in {g["group_id"] for g in groups}
    assert [len(g["images"]) for g in groups if g["group_id"] == "G1"] == [3, 2]
    assert [w.split(":")[0].rsplit("/", 2)[-2:] for w in warnings if "outside stage_a.root" in w] == [["G1", "9.jpg"], ["审核通过", "G9"]]


def test_stage_a_asks_the_prompt_the_cache_was_built_with(groups_root, tmp_path):
    class Recorder(FakeGenerator):
        def generate(self, requests):
            assert {r["prompt"] for r in requests} == {"统计"}
            return super().generate(requests)

    model = tmp_path / "model"
    model.mkdir()
    stage_a(groups_root, model, cache_pointer(tmp_path), tmp_path / "a.jsonl", tmp_path / "c", {}, generator=Recorder())
    with pytest.raises(ValueError, match=r"stage_a.prompt \(任务\) 'dense' is not a prompt of the cache .* \(it has summary\)"):
        stage_a(groups_root, model, cache_pointer(tmp_path), tmp_path / "b.jsonl", tmp_path / "c", {"prompt": "dense"},
                generator=Recorder())


class SometimesBroken(FakeGenerator):
    """Group G3's images 1-4 get broken answers: fragments, the legacy form, an empty string."""

    BROKEN: ClassVar[dict[str, str]] = {"1.jpg": '","数量":","数量":', "2.jpg": "设备×1，标签×1", "3.jpg": "", "4.jpg": '{"统计":[{"类别":"BBU","数量":-2}]}'}

    def generate(self, requests):
        return [self.BROKEN.get(Path(r["images"][0]).name, summary_naming(r)) if Path(r["images"][0]).parent.name == "G3"
                else summary_naming(r) for r in requests]


def test_every_summary_is_checked_against_the_contract(groups_root, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    out = tmp_path / "a.jsonl"
    report = stage_a(groups_root, model, cache_pointer(tmp_path), out, tmp_path / "c", {"min_valid_rate": 0.7},
                     generator=SometimesBroken()).report
    assert report["images"] == 17 and report["invalid_images"] == 4 and report["valid_rate"] == pytest.approx(13 / 17)
    assert report["invalid_by_problem"] == {"bad_count": 1, "empty": 1, "legacy_form": 1, "not_json": 1}
    assert report["groups_with_invalid_summaries"] == 1
    assert [(e["group"], e["image"], e["problem"]) for e in report["invalid_examples"]] == [
        ("G3::pass", "image_1", "not_json"), ("G3::pass", "image_2", "legacy_form"), ("G3::pass", "image_3", "empty"),
        ("G3::pass", "image_4", "bad_count")]
    records = {r["group_id"]: r for r in read_jsonl(out) if r["label"] == "pass"}
    assert records["G3"]["per_image_check"]["image_1"] == "not_json" and records["G3"]["per_image_check"]["image_5"] == "valid"
    assert not records["G3"]["summaries_valid"] and records["G1"]["summaries_valid"]


def test_a_model_below_the_valid_rate_stops_the_stage(groups_root, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    out, logged = tmp_path / "a.jsonl", {}
    with pytest.raises(ValueError, match=r"does not fit these photos: 4 of 17 summaries \(valid rate 0.765, below "
                                         r"stage_a.min_valid_rate 0.9\)[^\n]*bad_count 1, empty 1[\s\S]*G3::pass image_1 \[not_json\]"):
        stage_a(groups_root, model, cache_pointer(tmp_path), out, tmp_path / "c", {}, generator=SometimesBroken(),
                log_metrics=logged.update)
    assert not out.exists() and logged["valid_rate"] == pytest.approx(13 / 17) and logged["invalid_by_problem.not_json"] == 1
    # the answers are kept: lowering the threshold merges them without generating again
    report = stage_a(groups_root, model, cache_pointer(tmp_path), out, tmp_path / "c", {"min_valid_rate": 0.5},
                     generator=FakeGenerator(fail_after=0)).report
    assert report["chunks_run"] == 0 and report["merged"] and out.exists()


@pytest.mark.slow
def test_left_padded_batches_equal_batch_one(merged_model, demo_exports, caches):
    """Greedy decoding gives the same text batched (left-padded) as one request at a time."""
    from visionqc.inference import Generator
    from visionqc.vision import PixelBudget

    budget = PixelBudget.from_cache_options(CacheRef.read(caches["train"]).options)
    generator = Generator(merged_model[0], "auto", budget, max_new_tokens=12)
    images = sorted((demo_exports / "platform").glob("*.jpg"))[:4]
    requests = [{"images": [str(p)], "prompt": "统计" + "很多" * i} for i, p in enumerate(images)]
    requests.append({"prompt": verdict_prompt("规则一", {"image_1": "无关图片"})})  # text-only, longest prompt
    batched = generator.generate(requests)
    single = [generator.generate([r])[0] for r in requests]
    assert batched == single
    assert len(set(batched)) > 1  # answers depend on the input


@pytest.mark.parametrize(
    "raw, verdict, reason, parsed",
    [
        ("通过\n理由: 每台BBU都有标签", "通过", "每台BBU都有标签", True),
        ("不通过\n理由：第2张缺少标签", "不通过", "第2张缺少标签", True),
        ("  通过 \n 理由: ok  \n", "通过", "ok", True),
        ("通过", "不通过", None, False),
        ("通过\n原因: x", "不通过", None, False),
        ("可能通过\n理由: x", "不通过", None, False),
        ("通过\n理由: x\n多余的一行", "不通过", None, False),
        ("通过\n理由:", "不通过", None, False),
        ("", "不通过", None, False),
    ],
)
def test_verdict_parsing(raw, verdict, reason, parsed):
    got_verdict, got_reason, got_parsed = parse_verdict(raw)
    assert (got_verdict, got_parsed) == (verdict, parsed)
    if reason:
        assert got_reason == reason


def test_scoring_counts_fail_as_positive():
    rows = [{"ticket_key": "a::pass", "verdict": "通过", "parsed": True}, {"ticket_key": "b::fail", "verdict": "不通过", "parsed": True},
            {"ticket_key": "c::pass", "verdict": "不通过", "parsed": False}, {"ticket_key": "d::fail", "verdict": "通过", "parsed": True}]
    labels = {"a::pass": "pass", "b::fail": "fail", "c::pass": "pass", "d::fail": "fail"}
    metrics = score(rows, labels)
    assert metrics["label_match"] == 0.5 and metrics["unparseable"] == 1
    assert metrics["fail_precision"] == 0.5 and metrics["fail_recall"] == 0.5
    assert metrics["confusion"] == {"pass->pass": 1, "pass->fail": 1, "fail->pass": 1, "fail->fail": 1}


VALID = '{"统计":[{"类别":"BBU","数量":1}]}'


def test_stage_b_fails_closed_and_keeps_raw(tmp_path):
    summaries = tmp_path / "a.jsonl"
    rows = [{"group_id": "G1", "mission": "m", "label": "pass", "images": [], "per_image": {"image_1": VALID}},
            {"group_id": "G2", "mission": "m", "label": "fail", "images": [], "per_image": {"image_1": "无关图片"}}]
    summaries.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    (tmp_path / "g.txt").write_text("规则")

    class Answers:
        def generate(self, requests):
            assert all("审核规则:\n规则" in r["prompt"] and "image_1: " in r["prompt"] for r in requests)
            return ["通过\n理由: 都好", "好像不行"]

    metrics = run_stage_b(summaries, tmp_path / "g.txt", tmp_path, verdicts_out=tmp_path / "b.jsonl", metrics_out=tmp_path / "m.json",
                          confusion_out=tmp_path / "c.png", generator=Answers()).report
    assert json.loads((tmp_path / "m.json").read_text()) == metrics and (tmp_path / "c.png").stat().st_size > 1000
    verdicts = read_jsonl(tmp_path / "b.jsonl")
    assert verdicts[0] == {"ticket_key": "G1::pass", "verdict": "通过", "reason": "都好", "raw": "通过\n理由: 都好", "parsed": True,
                           "judged_by": "model", "summaries_valid": True, "invalid_summaries": {}, "unreadable_photos": {}}
    assert verdicts[1]["verdict"] == "不通过" and not verdicts[1]["parsed"] and verdicts[1]["raw"] == "好像不行"
    assert metrics["unparseable"] == 1 and metrics["label_match"] == 1.0 and metrics["invalid_summary_groups"] == 0


@pytest.mark.parametrize("policy", ["fail", "judge"])
def test_groups_with_invalid_summaries_follow_the_policy(tmp_path, policy):
    summaries = tmp_path / "a.jsonl"
    rows = [{"group_id": "G1", "mission": "m", "label": "pass", "images": [], "per_image": {"image_1": VALID, "image_2": '","数量":'}},
            {"group_id": "G2", "mission": "m", "label": "pass", "images": [], "per_image": {"image_1": VALID}},
            {"group_id": "G3", "mission": "m", "label": "fail", "images": [], "per_image": {"image_1": VALID}}]
    summaries.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    metrics, verdicts, asked = judge_leniently(summaries, tmp_path, {"invalid_summaries": policy})
    first = verdicts["G1::pass"]
    assert not first["summaries_valid"] and first["invalid_summaries"] == {"image_2": "not_json"}
    assert verdicts["G2::pass"]["summaries_valid"] and verdicts["G2::pass"]["judged_by"] == "model"
    assert metrics["invalid_summary_groups"] == 1 and metrics["label_match_valid_summaries"] == 0.5
    if policy == "fail":
        assert len(asked) == 2 and first["verdict"] == "不通过" and first["judged_by"] == "policy" and "image_2: not_json" in first["reason"]
        assert metrics["label_match"] == pytest.approx(1 / 3) and metrics["unparseable"] == 0
    else:
        assert len(asked) == 3 and first["verdict"] == "通过" and first["judged_by"] == "model"
        assert metrics["label_match"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"stage_b\.invalid_summaries must be fail or judge"):
        judge_leniently(summaries, tmp_path, {"invalid_summaries": "skip"})


def test_exact_match_against_truth(tmp_path):
    truth = tmp_path / "truth.jsonl"
    truth.write_text(json.dumps({"group_id": "G", "label": "pass", "per_image": {"image_1": "a", "image_2": "b"}}) + "\n")
    records = [{"group_id": "G", "label": "pass", "per_image": {"image_1": "a", "image_2": "c"}}]
    assert exact_match(records, truth) == {"exact_match": 0.5, "images_with_truth": 2}
