"""kill -9 of a whole `snakemake` process group inside a stage, then `snakemake --unlock` and a rerun: the
rerun finishes, resumes what was done, and its outputs equal the uninterrupted run's, byte for byte.

The uninterrupted run is the small workflow's full run; each test works in one copy of it. A test-only
pause point (visionqc/faults.py) holds the job exactly where the kill should land."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from visionqc.io import sha256_tree

from conftest import jobs_in, snakemake

MISSION = "BBU安装检查"


@pytest.fixture(scope="module")
def workdir(finished_workflow, tmp_path_factory) -> Path:
    """A copy of the finished small workflow, without training checkpoints (no test here resumes vision training)."""
    copy = tmp_path_factory.mktemp("faults") / "wf"
    shutil.copytree(finished_workflow, copy, symlinks=True, ignore=shutil.ignore_patterns("checkpoints", "mlruns"))
    return copy


def kill_inside(workdir: Path, point: str, log: str, *args: str) -> None:
    """Run snakemake with the pause point armed; kill -9 its whole process group once the job's log says it paused."""
    env = dict(os.environ, VISIONQC_TEST_PAUSE_AT=point, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    job = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=workdir, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while f"paused at {point}" not in _text(workdir / log):
            assert job.poll() is None, f"snakemake ended before {point}:\n{_text(workdir / log)[-2000:]}"
            assert time.monotonic() < deadline, f"{point} not reached in 10 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)


def _text(path: Path) -> str:
    return path.read_text("utf-8", errors="replace") if path.exists() else ""


def rerun(workdir: Path, *targets: str) -> str:
    """What a user does after a crash: unlock the folder, rerun (the profiles set rerun-incomplete)."""
    snakemake(workdir, "--unlock")
    result = snakemake(workdir, *targets, "--rerun-incomplete")
    return result.stdout + result.stderr


def test_kill_9_mid_cache(workdir):
    pointer = workdir / "results/cache/demo.epoch_0.json"  # the train split's cache (augment epoch 0)
    key = json.loads(pointer.read_text())["key"]
    before = {"pointer": pointer.read_bytes(), "cache": sha256_tree(workdir / "results/cache" / key)}
    shutil.rmtree(workdir / "results/cache" / key)  # the cache is content-keyed: without this the job reuses it

    kill_inside(workdir, "cache:shards-written", "logs/cache/demo.epoch_0.log",
                "results/cache/demo.epoch_0.json", "--forcerun", "cache_tokens")
    assert not pointer.exists() and not (workdir / "results/cache" / key).exists()  # nothing that looks complete

    rerun(workdir, "results/cache/demo.epoch_0.json")
    assert pointer.read_bytes() == before["pointer"]
    assert sha256_tree(workdir / "results/cache" / key) == before["cache"]


def test_kill_9_mid_stage_a(workdir):
    summaries = workdir / f"results/stage_a/{MISSION}.jsonl"
    before = summaries.read_bytes()
    chunks = workdir / f"results/stage_a/{MISSION}.chunks"
    total = json.loads((workdir / f"results/stage_a/{MISSION}.report.json").read_text())["chunks"]
    assert total >= 3, "the small workflow should cut Stage-A into several chunks"
    shutil.rmtree(chunks)  # chunks are resumable: without this the job would find them all done

    kill_inside(workdir, "stage_a:chunk-1", f"logs/stage_a/{MISSION}.log",
                str(summaries.relative_to(workdir)), "--forcerun", "summarize_images")
    assert not summaries.exists()
    assert len(list(chunks.rglob("chunk-*.jsonl"))) == 2

    rerun(workdir, str(summaries.relative_to(workdir)))
    report = json.loads((workdir / f"results/stage_a/{MISSION}.report.json").read_text())
    assert report["chunks_run"] == total - 2  # the two chunks written before the kill were not redone
    assert summaries.read_bytes() == before


def test_stage_a_refuses_a_model_below_the_valid_rate(workdir):
    """The small workflow's 32-step model answers outside the summary contract; at the default threshold the
    stage stops and says why, and leaves no summaries behind. Restoring the small config's threshold (0)
    merges the kept answers again."""
    summaries = workdir / f"results/stage_a/{MISSION}.jsonl"
    before = summaries.read_bytes()
    assert json.loads((workdir / f"results/stage_a/{MISSION}.report.json").read_text())["valid_rate"] < 0.9
    overlay = workdir / "strict.yaml"
    overlay.write_text("stage_a: {min_valid_rate: 0.9}\n")
    target = str(summaries.relative_to(workdir))
    result = snakemake(workdir, target, "--configfile", str(overlay), check=False)
    log = _text(workdir / f"logs/stage_a/{MISSION}.log")
    assert result.returncode != 0 and not summaries.exists()
    assert "the model does not fit these photos" in log and "below stage_a.min_valid_rate 0.9" in log, log[-2000:]
    assert "Traceback" not in log
    snakemake(workdir, target)
    assert summaries.read_bytes() == before


def test_kill_9_mid_train_ts(workdir):
    model = workdir / "results/train_ts/demo_signals/model"
    before = sha256_tree(model)
    shutil.rmtree(workdir / "results/train_ts/demo_signals/checkpoints", ignore_errors=True)

    kill_inside(workdir, "train_ts:step-3", "logs/train_ts/demo_signals.log",
                str(model.relative_to(workdir)), "--forcerun", "train_ts")
    assert not model.exists()

    log = rerun(workdir, str(model.relative_to(workdir)))
    summary = json.loads((workdir / "results/train_ts/demo_signals/summary.json").read_text())
    assert summary["steps_run_now"] == summary["steps"] - 3, log[-2000:]
    assert sha256_tree(model) == before


def test_a_photo_replaced_in_place_is_summarised_and_judged_anew(workdir):
    """A team's own photo folder (no rule makes it): a photo replaced in place (same name, other pixels) makes
    Snakemake rerun Stage-A and B, and Stage-A generates exactly the chunk that holds it. Last in this module:
    it leaves the copy judging photos/."""
    from visionqc.stage_a import discover_groups, plan_chunks

    shutil.copytree(workdir / "resources/demo/groups", workdir / "photos")
    overlay = workdir / "photos.yaml"
    overlay.write_text("stage_a: {root: photos}\n")
    summaries, report_path = workdir / f"results/stage_a/{MISSION}.jsonl", workdir / f"results/stage_a/{MISSION}.report.json"
    verdicts = workdir / f"results/stage_b/{MISSION}.jsonl"
    before = summaries.read_bytes()
    snakemake(workdir, "--configfile", str(overlay))
    assert json.loads(report_path.read_text())["images_generated"] == 0  # same photos, same chunks: nothing generated
    assert summaries.read_bytes() == before
    assert "Nothing to be done" in snakemake(workdir, "-n", "--configfile", str(overlay)).stdout

    answers = {f"{r['label']}/{r['group_id']}/{n}": r["per_image"][f"image_{n}"]
               for r in map(json.loads, before.decode().splitlines()) for n in range(1, len(r["images"]) + 1)}
    groups, _ = discover_groups(workdir / "photos", MISSION)
    photo = {f"{g['label']}/{g['group_id']}/{n}": Path(p) for g in groups for n, p in enumerate(g["images"], start=1)}
    target = next(iter(photo))
    others = [name for name in photo if name.split("/")[:2] != target.split("/")[:2]]  # a photo of another group
    donor = next((name for name in others if answers[name] != answers[target]), others[0])
    shutil.copyfile(photo[donor], photo[target])  # in place: same name, the donor's pixels
    verdicts_before = verdicts.stat().st_mtime_ns

    plan = jobs_in(snakemake(workdir, "-n", "--configfile", str(overlay)).stdout)
    assert plan == {"summarize_images": 1, "judge_groups": 1, "report_verdicts": 1, "all": 1}
    snakemake(workdir, "--configfile", str(overlay))
    options = yaml.safe_load((workdir / "config/config.yaml").read_text())["stage_a"]
    chunks = plan_chunks(groups, options["chunk_size"])
    index = next(i for i, g in enumerate(groups) if str(photo[target]) in g["images"])
    held = next(chunk for chunk in chunks if any(g == index for g, _ in chunk))
    report = json.loads(report_path.read_text())
    assert report["chunks_run"] == 1 and report["images_generated"] == len(held)
    after = {f"{r['label']}/{r['group_id']}/{n}": r["per_image"][f"image_{n}"]
             for r in map(json.loads, summaries.read_text().splitlines()) for n in range(1, len(r["images"]) + 1)}
    assert after[target] == answers[donor]  # the summary follows the new pixels
    assert {k: v for k, v in after.items() if k != target} == {k: v for k, v in answers.items() if k != target}
    assert verdicts.stat().st_mtime_ns > verdicts_before  # and Stage-B judged again from it
