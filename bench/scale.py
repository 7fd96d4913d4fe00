"""The data stages at scale: convert → validate → fuse → augment → cache on N generated records, one process each.

    .venv/bin/python bench/scale.py [--records 10000 100000] [--photos 10000 100000] [--work DIR]

Generates N seeded labelme records, each with its own 64x64 PNG (a coloured box on a coloured
ground, distinct per record) and one rectangle, then runs each stage as the pipeline does
(`visionqc <stage>` with the options of config/config.yaml, fused in summary mode, one augmented
epoch, the tiny demo model's tokenizer). Per stage it prints wall seconds, records/s, the peak RSS
of that process (os.wait4) and the bytes it wrote. The train split is what validate, fuse,
augment and cache handle (val_fraction 0.1 of the records go to val and are validated too).

--photos runs Stage-A over a mission of that many photos (32x32 JPEGs, ten to a group; a fifth of the
groups new, the rest reviewed) with the tiny model asked for 4 new tokens, as `visionqc stage-a`
does in the workflow: the first pass, a rerun that finds every chunk done, and a rerun after one new
group arrives. Its model and cache pointer come from a 1,000-record run of the stages above.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image, ImageDraw
from snakemake.utils import validate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from visionqc.stages import BY_NAME  # noqa: E402

LABELS = ("BBU设备", "标签", "线缆")


def write_export(folder: Path, records: int) -> None:
    """`records` labelme files, each with its own small PNG and one box (seeded by the index)."""
    folder.mkdir(parents=True)
    for n in range(records):
        ground = (n % 251, (n // 251) % 251, (n // 63001) % 251)
        image = Image.new("RGB", (64, 64), ground)
        left, top = 4 + n % 23, 4 + n % 19
        ImageDraw.Draw(image).rectangle((left, top, left + 30, top + 30), fill=(255 - ground[0], 200, 255 - ground[1]))
        image.save(folder / f"{n:07d}.png")
        shape = {"label": LABELS[n % 3], "points": [[left, top], [left + 30, top + 30]], "shape_type": "rectangle", "flags": {}}
        (folder / f"{n:07d}.json").write_text(json.dumps({"version": "5.4.1", "imagePath": f"{n:07d}.png", "imageWidth": 64,
                                                          "imageHeight": 64, "shapes": [shape], "flags": {}}))


def write_mission(folder: Path, photos: int, per_group: int = 10) -> None:
    """`photos` distinct small JPEGs in groups of `per_group`: every fifth group new, the others reviewed."""
    for n in range(photos):
        group = n // per_group
        verdict = "" if group % 5 == 0 else ("审核通过" if group % 2 else "审核不通过")
        path = folder / verdict / f"T{group:06d}" / f"{n % per_group + 1}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (n % 251, (n // 251) % 251, (n // 63001) % 251)).save(path, quality=90)


def options(config: dict, stage: str, **overrides) -> str:
    return json.dumps({**BY_NAME[stage].block(config), **overrides}, ensure_ascii=False)


def stage_commands(work: Path, config: dict) -> list[tuple[str, list[str], list[Path]]]:
    """(stage, argv, outputs) of each stage, in order."""
    r = work / "results"
    fusion = {"targets": [{"dataset": "team", "ratio": 1.0, "mode": "summary", "prompt": "summary", "replace": False}], "sources": []}
    return [
        ("convert", ["convert", "--format", "labelme", "--source", work / "export", "--train", r / "convert/train.jsonl",
                     "--val", r / "convert/val.jsonl", "--report", r / "convert/report.json", "--media", r / "convert/images",
                     "--overlays", r / "convert/overlays", "--options", options(config, "convert")], [r / "convert"]),
        ("validate", ["validate", "--source", r / "convert/train.jsonl", "--clean", r / "validate/train.clean.jsonl",
                      "--rejects", r / "validate/train.rejects.jsonl", "--report", r / "validate/train.report.json",
                      "--options", options(config, "validate")], [r / "validate"]),
        ("fuse", ["fuse", "--inputs", f"team={r / 'validate/train.clean.jsonl'}", "--split", "train", "--records",
                  r / "fuse/train.jsonl", "--report", r / "fuse/train.report.json", "--options", options(config, "fuse", **fusion)],
         [r / "fuse"]),
        ("augment", ["augment", "--records", r / "fuse/train.jsonl", "--epoch", "0", "--augmented", r / "augment/epoch_0.jsonl",
                     "--images", r / "augment/epoch_0/images", "--report", r / "augment/epoch_0.report.json",
                     "--preview", r / "augment/epoch_0.preview.png", "--threads", "2", "--options", options(config, "augment")],
         [r / "augment"]),
        ("cache", ["cache", "--records", r / "augment/epoch_0.jsonl", "--model", work / "model", "--cache-root", r / "cache",
                   "--pointer", r / "cache/pointer.json", "--lengths-plot", r / "cache/lengths.png",
                   "--options", options(config, "cache")], [r / "cache"]),
    ]


# A small Python starts the stage and reports its peak RSS: a child's peak counts the pages of the process it
# was forked from (Linux carries the peak across exec), and this one grows with the records it generates.
LAUNCHER = """import resource, subprocess, sys
done = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=open(sys.argv[1], "w"))
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, done.returncode)"""


def stage_a_command(work: Path, prepared: Path, config: dict, mission: Path) -> list:
    options = {key: value for key, value in config["stage_a"].items() if key not in BY_NAME["stage_a"].wiring}
    options.update(max_new_tokens=4, min_valid_rate=0.0)  # the untrained tiny model: its summaries are not valid
    return ["stage-a", "--root", mission.parent, "--mission", mission.name, "--model", prepared / "model",
            "--cache", prepared / "results/cache/pointer.json", "--device", "cpu", "--summaries", work / "summaries.jsonl",
            "--report", work / "report.json", "--chunks", work / "chunks", "--options", json.dumps(options, ensure_ascii=False)]


def run(argv: list) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one stage process."""
    command = [str(Path(sys.executable).parent / "visionqc"), *map(str, argv)]
    with tempfile.NamedTemporaryFile("w+") as errors:
        start = time.perf_counter()
        launched = subprocess.run([sys.executable, "-c", LAUNCHER, errors.name, *command], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak_kb, returncode = map(int, launched.stdout.split())
        if returncode:
            raise SystemExit(f"visionqc {argv[0]} failed:\n{Path(errors.name).read_text()[-3000:]}")
    return seconds, peak_kb * 1024


def size_of(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def bench_stage_a(root: Path, sizes: list[int], config: dict) -> list[tuple]:
    """(photos, pass, wall s, photos/s, peak RSS MB, chunks run of all) of each Stage-A pass."""
    prepared = root / "stage_a-model"
    shutil.rmtree(prepared, ignore_errors=True)
    write_export(prepared / "export", 1000)
    subprocess.run([sys.executable, "-c", "import sys; from visionqc.demo.model import build_demo_model; "
                    "build_demo_model(sys.argv[1])", str(prepared / "model")], check=True, capture_output=True)
    for _, argv, _ in stage_commands(prepared, config):
        run(argv)
    rows = []
    for photos in sizes:
        work = root / f"stage_a-{photos}"
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        mission = work / "photos" / "巡检"
        write_mission(mission, photos)
        print(f"{photos} photos generated in {time.perf_counter() - start:.0f} s ({work})", flush=True)
        command = stage_a_command(work, prepared, config, mission)
        for name in ("first pass", "rerun, all done", "rerun, one new group"):
            if name == "rerun, one new group":
                write_mission(work / "arrived" / "巡检", 10)
                shutil.move(work / "arrived/巡检/T000000", mission / "T999999")
            seconds, rss = run(command)
            report = json.loads((work / "report.json").read_text())
            rows.append((photos, name, seconds, report["images"] / seconds, rss / 2**20, f"{report['chunks_run']}/{report['chunks']}"))
            print(f"{photos:>8} {name:<22} {seconds:8.1f} s {report['images'] / seconds:9.0f} photos/s {rss / 2**20:6.0f} MB RSS "
                  f"{rows[-1][-1]:>11} chunks run", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="*", help="record counts (default 10000 100000; none with --photos)")
    parser.add_argument("--photos", type=int, nargs="*", default=[], help="Stage-A mission sizes (none by default)")
    parser.add_argument("--work", type=Path, help="a folder to work in (kept); default: a temporary one")
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))  # fills in the schema's defaults, as the workflow does
    root = args.work or Path(tempfile.mkdtemp(prefix="visionqc-scale-"))
    table = []
    for records in args.records if args.records is not None else [] if args.photos else [10000, 100000]:
        work = root / str(records)
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        write_export(work / "export", records)
        subprocess.run([sys.executable, "-c", "import sys; from visionqc.demo.model import build_demo_model; "
                        "build_demo_model(sys.argv[1])", str(work / "model")], check=True, capture_output=True)
        print(f"{records} records generated in {time.perf_counter() - start:.0f} s ({work})", flush=True)
        for stage, argv, outputs in stage_commands(work, config):
            seconds, rss = run(argv)
            source = {"convert": None, "validate": "convert/train.jsonl", "fuse": "validate/train.clean.jsonl",
                      "augment": "fuse/train.jsonl", "cache": "augment/epoch_0.jsonl"}[stage]
            count = records if source is None else lines(work / "results" / source)
            table.append((records, stage, seconds, count / seconds, rss / 2**20, size_of(outputs) / 2**20))
            print(f"{records:>8} {stage:<9} {seconds:8.1f} s {count / seconds:9.0f} rec/s {rss / 2**20:8.0f} MB RSS "
                  f"{size_of(outputs) / 2**20:9.1f} MB written", flush=True)
    if table:
        print("\n| records | stage | wall s | records/s | peak RSS MB | written MB |\n|---:|---|---:|---:|---:|---:|")
    for records, stage, seconds, rate, rss, written in table:
        print(f"| {records:,} | {stage} | {seconds:.1f} | {rate:,.0f} | {rss:.0f} | {written:,.1f} |")
    if args.photos:
        rows = bench_stage_a(root, args.photos, config)
        print("\n| photos | Stage-A pass | wall s | photos/s | peak RSS MB | chunks run |\n|---:|---|---:|---:|---:|---:|")
        for photos, name, seconds, rate, rss, chunks in rows:
            print(f"| {photos:,} | {name} | {seconds:.1f} | {rate:,.0f} | {rss:.0f} | {chunks} |")
    if not args.work:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
