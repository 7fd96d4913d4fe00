"""Test-only fault switches, inert unless their environment variable is set.

VISIONQC_TEST_PAUSE_AT=<point>[,<point>…]
    The job prints "paused at <point>" on its own line and sleeps there, so that a test's kill lands
    exactly inside a stage. Points: `<command>:start` (any `visionqc <command>`, before it reads
    anything), `cache:shards-written` (before the manifest),
    `stage_a:chunk-<i>` (after chunk i is written), `train:checkpoint-<N>` (inside the save of
    checkpoint-N: weights written, optimizer and trainer state not yet), `train:trained` (after the
    last step's checkpoint, before model/ is written), `train_ts:step-<N>`
    (after the checkpoint of step N).
VISIONQC_TEST_PAUSE_ONCE=<folder>
    With it, each point pauses on its first visit only (a marker file per point in the folder): a
    job that Slurm kills at its time limit or requeues runs through when it starts again.
VISIONQC_TEST_FAIL_ONCE=<command>:<marker file>
    The first `visionqc <command>` to start creates the marker file and fails; later attempts run
    (a Slurm retry test).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pause_point(point: str) -> None:
    if point not in os.environ.get("VISIONQC_TEST_PAUSE_AT", "").split(","):
        return
    if once := os.environ.get("VISIONQC_TEST_PAUSE_ONCE"):
        marker = Path(once) / point.replace(":", "_")
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("paused\n")
    print(f"\npaused at {point}", flush=True)
    time.sleep(3600)


def fail_once(command: str) -> None:
    switch = os.environ.get("VISIONQC_TEST_FAIL_ONCE", "")
    name, _, marker = switch.partition(":")
    if name == command and marker and not Path(marker).exists():
        Path(marker).write_text(f"failed the first attempt of visionqc {command}\n")
        raise RuntimeError(f"test fault (VISIONQC_TEST_FAIL_ONCE): the first attempt of visionqc {command} fails")
