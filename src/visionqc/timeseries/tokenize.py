"""XTuner tokenize function for time-series records (and pure-text ones): ChatML ids, labels, resampled signals.

Each `<TS_CONTEXT>` placeholder of a user turn becomes `<|ts|>` + n × `<TS_CONTEXT>` + `<|/ts|>`,
where n is the number of frames the encoder emits for that signal after resampling, computed
from the encoder's convolution kernels and strides (never by running it). Labels cover the
assistant answers and their `<|im_end|>` only.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict
from xtuner.v1.data_proto.templates import CHAT_TEMPLATE_MAP
from xtuner.v1.datasets.data_item import CacheItem, DataItem
from xtuner.v1.datasets.utils import (
    CachableTokenizeFunction,
    tokenizer_xxhash,
    with_proxy_attention_flops,
)

from visionqc import contract
from visionqc.signals import read_header, read_signal, resample, resampled_length

TS_START, TS_CONTEXT, TS_END = "<|ts|>", contract.TS_PLACEHOLDER, "<|/ts|>"
TS_TOKENS = (TS_START, TS_CONTEXT, TS_END)
IGNORE_INDEX = -100
CHAT_TEMPLATE = "qwen3-vl"  # XTuner's ChatML strings for Qwen3 (system/user/assistant, sep "\n")


@dataclass(frozen=True)
class EncoderGeometry:
    """The convolutional front end of a wav2vec2-style encoder: frames out for samples in."""

    kernels: tuple[int, ...]
    strides: tuple[int, ...]

    @classmethod
    def from_config(cls, config) -> EncoderGeometry:
        kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
        if not kernels or not strides or len(kernels) != len(strides):
            raise ValueError(
                f"encoder config {type(config).__name__} has no conv_kernel/conv_stride pair; the time-series encoder must be "
                "a convolutional feature-extractor model (Wav2Vec2, HuBERT, WavLM, Data2VecAudio)"
            )
        return cls(tuple(int(k) for k in kernels), tuple(int(s) for s in strides))

    def frames(self, samples: int) -> int:
        """Output frames of the conv stack for `samples` input samples (0 when too short)."""
        for kernel, stride in zip(self.kernels, self.strides, strict=True):
            if samples < kernel:
                return 0
            samples = (samples - kernel) // stride + 1
        return samples

    def min_samples(self) -> int:
        """Fewest input samples that give one frame."""
        samples = 1
        for kernel, stride in reversed(list(zip(self.kernels, self.strides, strict=True))):
            samples = (samples - 1) * stride + kernel
        return samples


def assistant_ids(tokenizer, text: str) -> list[int]:
    """The ids of one assistant turn as XTuner's template writes it (all of them are labelled)."""
    head, tail = CHAT_TEMPLATE_MAP[CHAT_TEMPLATE].assistant.split("{assistant}")
    return [t for part in (head, text, tail) if part for t in tokenizer.encode(part, add_special_tokens=False)]


def add_time_series_tokens(tokenizer) -> dict[str, int]:
    """Add <|ts|>, <TS_CONTEXT>, <|/ts|> as special tokens (idempotent); returns their ids."""
    missing = [token for token in TS_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return {token: tokenizer.convert_tokens_to_ids(token) for token in TS_TOKENS}


class TimeSeriesDataItem(DataItem, total=False):
    time_series: list[np.ndarray]  # per signal: [frames, channels] float32, resampled and normalised
    ts_frames: list[int]  # samples per signal after resampling
    ts_num_tokens: list[int]  # <TS_CONTEXT> tokens per signal (= encoder frames)
    ts_sampling_rates: list[float]  # rates as recorded
    ts_urls: list[str]
    ts_token_id: int  # the <TS_CONTEXT> id the placeholders were expanded to


class TimeSeriesTokenizeFunction(CachableTokenizeFunction[TimeSeriesDataItem]):
    """A contract record → TimeSeriesDataItem. `media_root` is the folder signal URLs are relative to."""

    def __init__(self, tokenizer, geometry: EncoderGeometry, *, target_rate: float, channels: int, media_root: str | Path,
                 max_length: int | None = None, tokenizer_hash: str | None = None):
        super().__init__(tokenizer)
        self.ids = add_time_series_tokens(tokenizer)
        self.geometry = geometry
        self.target_rate = float(target_rate)
        self.channels = int(channels)
        self.media_root = Path(media_root)
        self.max_length = max_length
        self.template = CHAT_TEMPLATE_MAP[CHAT_TEMPLATE]
        self._tokenizer_hash = tokenizer_hash

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def num_ts_tokens(self, frames: int, rate: float) -> int:
        return self.geometry.frames(resampled_length(frames, rate, self.target_rate))

    def _signal(self, signal: dict, load: bool) -> tuple[np.ndarray | None, int, int]:
        """(samples or None, frames after resampling, context tokens) of one time_series_url."""
        path = self.media_root / signal["url"]
        rate = float(signal["sampling_rate"])
        if not load:
            header = read_header(path)
            frames = resampled_length(header.frames, rate, self.target_rate)
            return None, frames, self.geometry.frames(frames)
        samples, _ = read_signal(path)
        if samples.shape[1] != self.channels:
            raise ValueError(f"{path}: {samples.shape[1]} channel(s), the model takes {self.channels}")
        samples = resample(samples, rate, self.target_rate)
        samples = (samples - samples.mean(axis=0)) / (samples.std(axis=0) + 1e-5)
        return samples.astype(np.float32), samples.shape[0], self.geometry.frames(samples.shape[0])

    def _user_ids(self, content, signals: list, load: bool, found: dict) -> list[int]:
        if isinstance(content, str):
            return self._encode(content)
        text = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        parts = [part[contract.TS_PART] for part in content if part.get("type") == contract.TS_PART]
        pieces = text.split(TS_CONTEXT)
        if len(pieces) - 1 != len(parts):
            raise ValueError(f"{len(parts)} signal(s) but {len(pieces) - 1} {TS_CONTEXT} placeholder(s)")
        ids = self._encode(pieces[0])
        for signal, piece in zip(parts, pieces[1:], strict=True):
            samples, frames, tokens = self._signal(signal, load)
            if tokens < 1:
                raise ValueError(f"{signal['url']}: too short for the encoder ({frames} samples at {self.target_rate:g} Hz, "
                                 f"it needs {self.geometry.min_samples()})")
            signals.append(samples)
            found["ts_frames"].append(frames)
            found["ts_num_tokens"].append(tokens)
            found["ts_sampling_rates"].append(float(signal["sampling_rate"]))
            found["ts_urls"].append(signal["url"])
            ids += [self.ids[TS_START]] + [self.ids[TS_CONTEXT]] * tokens + [self.ids[TS_END]]
            ids += self._encode(piece)
        return ids

    @with_proxy_attention_flops
    def __call__(self, item: dict, **kwargs) -> TimeSeriesDataItem | CacheItem:
        load = self.state != "cache"
        messages = item["messages"] if isinstance(item, dict) else item
        input_ids: list[int] = []
        labels: list[int] = []
        signals: list = []
        found: dict[str, list] = {"ts_frames": [], "ts_num_tokens": [], "ts_sampling_rates": [], "ts_urls": []}
        sep = self._encode(self.template.sep)
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system":
                head, tail = self.template.system.split("{system}")
                ids = self._encode(head) + self._encode(content) + self._encode(tail)
                input_ids += ids
                labels += [IGNORE_INDEX] * len(ids)
            elif role == "user":
                head, tail = self.template.user.split("{user}")
                ids = self._encode(head) + self._user_ids(content, signals, load, found) + self._encode(tail)
                input_ids += ids
                labels += [IGNORE_INDEX] * len(ids)
            elif role == "assistant":
                ids = assistant_ids(self.tokenizer, content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
                input_ids += ids
                labels += ids
                if index + 1 < len(messages):
                    input_ids += sep
                    labels += [IGNORE_INDEX] * len(sep)
            else:
                raise ValueError(f"messages[{index}]: role {role!r} is not supported by the time-series template")
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise ValueError(f"{len(input_ids)} tokens exceed max_length {self.max_length}; nothing is truncated")
        if not load:
            return CacheItem(num_tokens=len(input_ids))
        return TimeSeriesDataItem(input_ids=input_ids, labels=labels, num_tokens=len(input_ids), time_series=signals,
                                  ts_token_id=self.ids[TS_CONTEXT], **found)

    def settings(self, located: bool = True) -> dict:
        """Everything besides the tokenizer and this source that changes the output. `located` adds the absolute
        media root, which XTuner's own dataset cache needs; our cache keys the signal files by their bytes instead."""
        settings = {"geometry": asdict(self.geometry), "target_rate": self.target_rate, "channels": self.channels,
                    "max_length": self.max_length, "template": CHAT_TEMPLATE, "ts_ids": self.ids}
        if located:
            settings["media_root"] = os.path.abspath(self.media_root)
        return settings

    def hash(self, located: bool = True) -> str:
        """XTuner's cache hash (`located=False`: the same in any folder, for content-keyed caches)."""
        tokenizer_hash = self._tokenizer_hash or tokenizer_xxhash(self.tokenizer)[:16]
        source = inspect.getsource(type(self)) + inspect.getsource(resample) + inspect.getsource(EncoderGeometry)
        digest = hashlib.sha256(json.dumps(self.settings(located), sort_keys=True).encode() + source.encode()
                                + repr(self.template).encode())
        return f"{tokenizer_hash}_{digest.hexdigest()[:16]}"


class TimeSeriesTokenizeFnConfig(BaseModel):
    """The tokenize_fn entry of XTuner's dataset_config_list (what `xtuner.v1.train.cli.sft` builds)."""

    model_config = ConfigDict(extra="forbid")
    encoder_path: str
    target_rate: float
    channels: int = 1
    media_root: str
    max_length: int | None = None

    def build(self, tokenizer, tokenizer_hash: str | None = None, anno_name: str | None = None, **kwargs) -> TimeSeriesTokenizeFunction:
        from transformers import AutoConfig

        geometry = EncoderGeometry.from_config(AutoConfig.from_pretrained(self.encoder_path))
        return TimeSeriesTokenizeFunction(tokenizer, geometry, target_rate=self.target_rate, channels=self.channels,
                                          media_root=self.media_root, max_length=self.max_length, tokenizer_hash=tokenizer_hash)


def load_tokenizer(llm_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llm_dir))


def load_geometry(encoder_dir: str | Path) -> EncoderGeometry:
    from transformers import AutoConfig

    return EncoderGeometry.from_config(AutoConfig.from_pretrained(str(encoder_dir)))
