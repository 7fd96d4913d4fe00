"""Seeded synthetic sensor traces (power draw) in four classes a tiny model can tell apart.

normal   a slow oscillation around a steady level, with noise
spike    the same, plus 3-5 surges of 0.3 s
dropout  the same, with a stretch at zero (power lost)
drift    the same, with a steady trend away from the level

Traces are mono .wav files (32-bit float) at 50, 100 or 200 Hz lasting 6-12 s, listed in a
manifest.csv (path, sampling_rate, channels, label, answer) that the `signals` converter reads.
The label is the Chinese class name (正常, 尖峰, 掉电, 漂移), as a user's own manifest would have it.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from visionqc.io import atomic_directory, atomic_write
from visionqc.signals import write_wav

ANSWERS = {"normal": "正常", "spike": "尖峰", "dropout": "掉电", "drift": "漂移"}
RATES = (50, 100, 200)
SECONDS = (6.0, 12.0)


def trace(rng: np.random.Generator, label: str, rate: int, seconds: float) -> np.ndarray:
    """One mono trace of `label` as float32 samples in [-1, 1]."""
    frames = round(rate * seconds)
    t = np.arange(frames) / rate
    level = rng.uniform(0.2, 0.4)
    period = rng.uniform(2.0, 5.0)
    signal = level + 0.05 * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 0.01, frames)
    if label == "spike":
        width = max(1, int(0.3 * rate))
        for start in rng.choice(np.arange(frames // 10, frames - width), size=int(rng.integers(3, 6)), replace=False):
            signal[start : start + width] += rng.uniform(0.4, 0.6)
    elif label == "dropout":
        length = int(rng.uniform(0.2, 0.35) * frames)
        start = int(rng.integers(frames // 10, frames - length - frames // 10))
        signal[start : start + length] = rng.normal(0, 0.005, length)
    elif label == "drift":
        signal += np.sign(rng.uniform(-1, 1)) * rng.uniform(0.25, 0.4) * t / t[-1]
    elif label != "normal":
        raise ValueError(f"unknown trace label {label!r}; choose one of {', '.join(ANSWERS)}")
    return np.clip(signal, -1, 1).astype(np.float32)


def write_signals(manifest: str | Path, traces: str | Path, seed: int = 17, count: int = 400) -> None:
    """Write `count` traces (classes in turn) into the `traces` folder and list them in `manifest` (CSV)."""
    manifest, traces = Path(manifest), Path(traces)
    prefix = Path(os.path.relpath(traces.resolve(), manifest.parent.resolve())).as_posix()
    rng = np.random.default_rng([seed, 101])
    labels = list(ANSWERS)
    rows = []
    with atomic_directory(traces) as work:
        for index in range(count):
            label = labels[index % len(labels)]
            rate = int(rng.choice(RATES))
            samples = trace(rng, label, rate, rng.uniform(*SECONDS))
            name = f"{index:05d}.wav"
            write_wav(work / name, samples, rate)
            rows.append({"path": f"{prefix}/{name}", "sampling_rate": rate, "channels": 1, "label": ANSWERS[label], "answer": ANSWERS[label]})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(manifest) as handle:
        handle.write(text.getvalue())
