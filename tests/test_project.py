"""A team's own project: `visionqc init` on an English-category export in two formats, then the workflow through
Snakemake in that project, with no demo job. The README's "Your own data" walkthrough runs these commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from street_export import CLASSES, draw, scenes, write_cvat, write_yolo
from visionqc.arrow_cache import CacheRef

from conftest import jobs_in, read_jsonl, snakemake

DEMO_RULES = {"generate_demo_data", "generate_demo_signals", "build_demo_model", "build_demo_ts_models"}
MISSION = "CrossingCheck"
NEW_ONLY = "SignCheck"  # a mission of new tickets only, asked its own prompt


def visionqc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "visionqc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False)


def write_photo_groups(root: Path) -> None:
    """Two street photos a group: two reviewed groups and a new one in one mission, two new ones in another."""
    for folder, seed in ((f"{MISSION}/审核通过/ticket-001", 11), (f"{MISSION}/审核不通过/ticket-002", 12),
                         (f"{MISSION}/ticket-003", 13), (f"{NEW_ONLY}/ticket-101", 14), (f"{NEW_ONLY}/ticket-102", 15)):
        for index, boxes in enumerate(scenes(2, seed)):
            draw(boxes, root / folder / f"{index:02d}.png")


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_model):
    """A team folder: exports/, photos/ and the project `visionqc init` made; and the class counts written."""
    root = tmp_path_factory.mktemp("team")
    counts = {"street": write_cvat(root / "exports" / "street"), "road": write_yolo(root / "exports" / "road")}
    write_photo_groups(root / "photos")
    made = visionqc("init", "project", "--dataset", "street=cvat:exports/street", "--dataset", "road=yolo:exports/road",
                    "--photos", "photos", "--model", str(tiny_model), cwd=root)
    assert made.returncode == 0, made.stderr
    return root, counts, made.stdout


def test_init_writes_the_export_s_taxonomy_with_its_counts(team):
    root, counts, printed = team
    project = root / "project"
    config = yaml.safe_load((project / "config" / "config.yaml").read_text())
    assert set(config["taxonomy"]["categories"]) == {*CLASSES, "Lane"}
    assert set(config["datasets"]) == {"street", "road"} and not any("demo" in key for key in config)
    text = (project / "config" / "config.yaml").read_text()
    for category in config["taxonomy"]["categories"]:  # each category's line counts its objects per dataset
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{category}:"))
        assert re.findall(r"(\d+) in (\w+)", line) == [(str(counts[name][category]), name) for name in ("street", "road")
                                                      if counts[name].get(category)], line
    assert config["stage_a"]["missions"] == [MISSION, NEW_ONLY]
    assert all((project / "config" / "guidance" / f"{mission}.txt").is_file() for mission in (MISSION, NEW_ONLY))
    assert "Cars" in printed and (project / "profiles" / "slurm" / "config.yaml").is_file()
    again = visionqc("init", "project", "--dataset", "street=cvat:exports/street", cwd=root)  # never overwrites
    assert again.returncode == 1 and "already there" in again.stderr


def test_the_project_plans_only_the_team_s_jobs(team):
    root, _, _ = team
    planned = snakemake(root / "project", "-n", "--profile", "profiles/local")
    jobs = jobs_in(planned.stdout)
    assert not DEMO_RULES & set(jobs) and "demo" not in planned.stdout
    assert jobs == {"convert_dataset": 2, "validate_records": 4, "fuse_datasets": 2, "cache_tokens": 2, "train_model": 1,
                    "merge_adapter": 1, "summarize_images": 2, "judge_groups": 2, "report_verdicts": 2, "project": 1}
    guidance = root / "project" / "config" / "guidance" / f"{NEW_ONLY}.txt"
    kept = guidance.read_text()
    guidance.unlink()
    try:  # Stage-A alone needs no guidance; Stage-B says which file it misses
        alone = snakemake(root / "project", "-n", f"results/stage_a/{NEW_ONLY}.jsonl", check=False)
        whole = snakemake(root / "project", "-n", check=False)
    finally:
        guidance.write_text(kept)
    assert alone.returncode == 0 and jobs_in(alone.stdout)["summarize_images"] == 1, alone.stderr
    assert whole.returncode != 0 and f"config/guidance/{NEW_ONLY}.txt" in whole.stdout + whole.stderr


def test_config_mistakes_come_all_at_once_and_a_demo_only_file_is_refused(team):
    root, _, _ = team
    project = root / "project"
    config_file = project / "config" / "config.yaml"
    original = config_file.read_text()
    config = yaml.safe_load(original)
    config["datasets"]["road"]["path"] = "exports/roads"
    config["stage_a"]["truth"] = "resources/demo/groups/truth.jsonl"  # only the demo's rule makes it
    config["fusion"]["targets"][0]["prompt"] = "summry"
    config_file.write_text(yaml.safe_dump(config, allow_unicode=True))
    try:
        result = snakemake(project, "-n", check=False)
    finally:
        config_file.write_text(original)
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines() if line.startswith("config key")]
    assert result.returncode != 0 and len(problems) == 3, output
    assert "datasets.road.path: exports/roads does not exist" in problems[0]
    assert any("stage_a.truth: resources/demo/groups/truth.jsonl does not exist and no rule makes it" in p for p in problems)
    assert "3 config problem(s)" in output and "Traceback" not in output and 'File "' not in output


@pytest.mark.slow
def test_the_project_runs_from_export_to_verdicts(team, monkeypatch):
    """convert → validate → fuse → cache → train (2 steps) → merge → Stage-A → Stage-B, through snakemake."""
    root, _, _ = team
    project = root / "project"
    recipe = project / "config" / "recipes" / "main.yaml"
    recipe.write_text(recipe.read_text() + "max_steps: 2\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 1\n"
                      "eval_steps: 2\nsave_steps: 2\nlogging_steps: 1\nmax_length: 1024\n")
    config_file = project / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["stage_a"].update(max_new_tokens=16, min_valid_rate=0.0)  # two steps do not teach the contract
    config["prompts"]["summary_signs"] = "数一数图中的{categories}。"
    config["stage_a"]["prompt"] = {MISSION: "summary", NEW_ONLY: "summary_signs"}
    config["stage_b"] = {"max_new_tokens": 8}
    config["model"]["image_max_tokens"] = 64
    config_file.write_text(yaml.safe_dump(config, allow_unicode=True))
    snakemake(project, "--profile", "profiles/local")
    results = project / "results"
    for name in ("street", "road"):
        report = json.loads((results / "convert" / name / "report.json").read_text())
        assert report["records_out"] == 8 and report["issues"] == [], report
        assert json.loads((results / "validate" / name / "train.report.json").read_text())["rejected"] == 0
    # the prompts' {categories} is the taxonomy's, in the cache the deployed model trained on
    monkeypatch.chdir(project)  # the pointer names the cache relative to the project
    assert CacheRef.read(results / "cache" / "main.train.json").options["prompts"]["dense"].startswith(
        "找出图中的Cars、Lane、Pedestrians、Two-wheelers，")
    verdicts = read_jsonl(results / "stage_b" / f"{MISSION}.jsonl")
    assert [v["ticket_key"] for v in verdicts] == ["ticket-001::pass", "ticket-002::fail", "ticket-003"]
    assert sum(len(group["images"]) for group in read_jsonl(results / "stage_a" / f"{MISSION}.jsonl")) == 6
    metrics = json.loads((results / "stage_b" / f"{MISSION}.metrics.json").read_text())
    assert metrics["groups_judged"] == 3 and metrics["groups_scored"] == 2
    new_only = json.loads((results / "stage_b" / f"{NEW_ONLY}.metrics.json").read_text())
    assert new_only["groups_judged"] == 2 and new_only["groups_scored"] == 0 and new_only["label_match"] is None
    asked = {m: json.loads((results / "stage_a" / f"{m}.report.json").read_text())["prompt"] for m in (MISSION, NEW_ONLY)}
    assert asked == {MISSION: "summary", NEW_ONLY: "summary_signs"}
    assert not (project / "resources").exists()  # no demo data, no demo model
    # the rest of the README's walkthrough, as printed
    snakemake(project, "--report", "report.html")
    assert (project / "report.html").stat().st_size > 0
    where = visionqc("where", cwd=project)
    assert where.returncode == 0 and f"results/stage_b/{MISSION}.jsonl" in where.stdout
    assert f"Report:    results/report/{NEW_ONLY}.html" in where.stdout
    synced = visionqc("tracking-sync", cwd=project)
    assert synced.returncode == 0 and "sqlite:///results/mlflow/mlflow.db" in synced.stdout, synced.stderr
