"""Planning at scale: `snakemake -n` on the repository's workflow with N more datasets (goal: 1,000 in ≤ 5 s).

    .venv/bin/python bench/plan_datasets.py [--datasets 1000] [--profile]

A copy of the repository whose config adds N labelme datasets (each its own one-image export
folder) to the demo's; every one is converted and validated (3 jobs each), none is fused. Times
the whole `snakemake -n` process, as a user waits for it, and the same with the demo's datasets
only; --profile prints where the big plan's seconds go (cProfile, top 25 by own time). For
scale, it plans the same number of datasets in a two-rule Snakefile of trivial jobs (convert one
folder into two splits, copy each split): what Snakemake itself needs for that many jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COPIED = ("Snakefile", "rules", "workflow", "config")


def project(folder: Path, datasets: int) -> Path:
    """A copy of the workflow whose config adds `datasets` labelme exports of one shape each."""
    folder.mkdir()
    for name in COPIED:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, folder / name)
    config = yaml.safe_load((folder / "config/config.yaml").read_text())
    for n in range(datasets):
        export = folder / "exports" / f"team_{n:04d}"
        export.mkdir(parents=True)
        (export / "a.json").write_text(json.dumps({"imagePath": "a.png", "imageWidth": 8, "imageHeight": 8, "shapes": []}))
        config["datasets"][f"team_{n:04d}"] = {"format": "labelme", "path": str(export.relative_to(folder))}
    (folder / "config/config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return folder


FLOOR = """N = [f"d{n:04d}" for n in range(%d)]
rule all:
    input: expand("v/{d}/{s}.txt", d=N, s=["train", "val"])
rule convert:
    input: "e/{d}"
    output: "c/{d}/train.txt", "c/{d}/val.txt"
    log: "logs/c/{d}.log"
    shell: "cp -r {input} {output[0]}; touch {output[1]} 2> {log}"
rule validate:
    input: "c/{d}/{s}.txt"
    output: "v/{d}/{s}.txt"
    log: "logs/v/{d}.{s}.log"
    shell: "cp {input} {output} 2> {log}"
"""


def floor(folder: Path, datasets: int) -> Path:
    """The same datasets in a minimal workflow: three trivial jobs each."""
    folder.mkdir()
    (folder / "Snakefile").write_text(FLOOR % datasets)
    for n in range(datasets):
        (folder / "e" / f"d{n:04d}").mkdir(parents=True)
    return folder


def plan(folder: Path, profile: bool = False) -> tuple[float, int, str]:
    """Seconds of one `snakemake -n` process (best of three), its job count, and the profile when asked."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    command = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--cores", "2"]
    best, output = float("inf"), ""
    for _ in range(3):
        start = time.perf_counter()
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"snakemake -n failed in {folder}:\n{done.stderr[-3000:]}")
        output = done.stdout + done.stderr
    jobs = next(int(line.split()[1]) for line in output.splitlines() if line.startswith("total"))
    profiled = ""
    if profile:
        profiled = subprocess.run([sys.executable, "-m", "cProfile", "-s", "tottime", *command[1:]], cwd=folder, env=env,
                                  capture_output=True, text=True).stdout
        lines = profiled.splitlines()
        start = next(i for i, line in enumerate(lines) if "Ordered by" in line)
        profiled = "\n".join(lines[start : start + 30])
    return best, jobs, profiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo_seconds, demo_jobs, _ = plan(project(Path(tmp) / "demo", 0))
        seconds, jobs, profiled = plan(project(Path(tmp) / "many", args.datasets), args.profile)
        floor_seconds, floor_jobs, _ = plan(floor(Path(tmp) / "floor", args.datasets))
    print(f"snakemake -n, whole process, best of 3 (python {sys.version.split()[0]})")
    print(f"demo config:                 {demo_seconds:6.2f} s  {demo_jobs:5d} jobs")
    print(f"demo + {args.datasets:5d} datasets:      {seconds:6.2f} s  {jobs:5d} jobs")
    print(f"two trivial rules, {args.datasets:5d} ds: {floor_seconds:6.2f} s  {floor_jobs:5d} jobs  (Snakemake alone; "
          f"ours {seconds / floor_seconds:.2f}x)")
    if profiled:
        print(profiled)


if __name__ == "__main__":
    main()
