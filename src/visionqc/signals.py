"""Signal files shared by stages: reading .wav/.flac/.npy/.csv into (frames, channels) float arrays, resampling."""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

AUDIO_SUFFIXES = (".wav", ".flac")
SIGNAL_SUFFIXES = AUDIO_SUFFIXES + (".npy", ".csv")


@dataclass(frozen=True)
class SignalHeader:
    frames: int
    channels: int
    sampling_rate: float | None  # what the file itself says (audio formats); None for .npy/.csv


def _as_frames_by_channels(samples: np.ndarray, path: Path) -> np.ndarray:
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2:
        raise ValueError(f"{path}: expected 1 or 2 dimensions (frames[, channels]), got shape {samples.shape}")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _read_csv(path: Path) -> np.ndarray:
    """Numeric columns are channels; a first line that is not numeric is a header."""
    with path.open("r", encoding="utf-8") as handle:
        first = handle.readline()
    try:
        [float(cell) for cell in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1
    return np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)


SFC_SET_ADD_PEAK_CHUNK = 0x1050  # libsndfile's sf_command code (sndfile.h)


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> None:
    """A 32-bit float .wav whose bytes depend only on the samples and the rate.

    libsndfile adds a PEAK chunk with a timestamp to float files; it is switched off here through
    soundfile's cffi handle (soundfile has no public call for it), so reruns write identical bytes.
    """
    samples = np.asarray(samples, dtype=np.float32)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    with soundfile.SoundFile(path, "w", samplerate=rate, channels=channels, format="WAV", subtype="FLOAT") as handle:
        soundfile._snd.sf_command(handle._file, SFC_SET_ADD_PEAK_CHUNK, soundfile._ffi.NULL, 0)
        handle.write(samples)


def read_signal(path: str | Path) -> tuple[np.ndarray, float | None]:
    """Samples as float32 [frames, channels] and the file's own sampling rate (None when it has none)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        return samples, float(rate)
    if suffix == ".npy":
        return _as_frames_by_channels(np.load(path, allow_pickle=False), path), None
    if suffix == ".csv":
        return _as_frames_by_channels(_read_csv(path), path), None
    raise ValueError(f"{path}: unknown signal format {suffix!r}; use one of {', '.join(SIGNAL_SUFFIXES)}")


def read_header(path: str | Path) -> SignalHeader:
    """Frames, channels and rate without decoding audio (other formats are read whole)."""
    path = Path(path)
    if path.suffix.lower() in AUDIO_SUFFIXES:
        info = soundfile.info(str(path))
        return SignalHeader(info.frames, info.channels, float(info.samplerate))
    samples, _ = read_signal(path)
    return SignalHeader(samples.shape[0], samples.shape[1], None)


def resampled_length(frames: int, rate: float, target_rate: float) -> int:
    """Frames after resampling `frames` samples from `rate` to `target_rate` (what `resample` returns)."""
    up, down = _ratio(rate, target_rate)
    return -(-frames * up // down)


def _ratio(rate: float, target_rate: float) -> tuple[int, int]:
    scale = 1000  # rates are kept to 1/1000 Hz
    source, target = round(rate * scale), round(target_rate * scale)
    if source <= 0 or target <= 0:
        raise ValueError(f"sampling rates must be positive, got {rate} and {target_rate}")
    common = gcd(source, target)
    return target // common, source // common


def resample(samples: np.ndarray, rate: float, target_rate: float) -> np.ndarray:
    """Polyphase (anti-aliased) resampling of [frames, channels] onto target_rate; the same rate returns a copy."""
    up, down = _ratio(rate, target_rate)
    if up == down:
        return samples.astype(np.float32, copy=True)
    return resample_poly(samples.astype(np.float64), up, down, axis=0).astype(np.float32)
