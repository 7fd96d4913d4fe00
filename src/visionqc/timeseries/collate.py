"""XTuner's SequenceContext with signals, and the collator that builds it (named by dotted path in DataloaderConfig)."""

from __future__ import annotations

import torch
from xtuner.v1.data_proto import SequenceContext
from xtuner.v1.datasets.collator import ColateItem, build_text_ctx_labels

from visionqc.timeseries.tokenize import TimeSeriesDataItem

COLLATOR = "visionqc.timeseries.collate.time_series_collator"
_TS_FIELDS = ("time_series", "ts_frames", "ts_num_tokens", "ts_sampling_rates", "ts_token_id")


class TimeSeriesSequenceContext(SequenceContext):
    """A packed sequence plus its signals.

    time_series        [signals, frames, channels] float32, zero-padded to the longest signal
    ts_frames          [signals] samples of each signal before padding
    ts_num_tokens      [signals] <TS_CONTEXT> positions each signal fills, in order
    ts_sampling_rates  [signals] rates as recorded (before resampling)
    ts_token_id        the <TS_CONTEXT> id
    """

    def __init__(self, *args, time_series: torch.Tensor | None = None, ts_frames: torch.Tensor | None = None,
                 ts_num_tokens: torch.Tensor | None = None, ts_sampling_rates: torch.Tensor | None = None,
                 ts_token_id: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.time_series = time_series
        self.ts_frames = ts_frames
        self.ts_num_tokens = ts_num_tokens
        self.ts_sampling_rates = ts_sampling_rates
        self.ts_token_id = ts_token_id

    @classmethod
    def from_text(cls, ctx: SequenceContext, **signals) -> TimeSeriesSequenceContext:
        made = cls.__new__(cls)
        made.__dict__.update(ctx.__dict__)
        for name in _TS_FIELDS:
            setattr(made, name, signals.get(name))
        return made

    def copy(self, **overrides) -> TimeSeriesSequenceContext:
        base = SequenceContext.copy(self, **{k: v for k, v in overrides.items() if k not in _TS_FIELDS})
        for name in _TS_FIELDS:
            setattr(base, name, overrides.get(name, getattr(self, name)))
        return base

    def to(self, device: torch.device | str) -> TimeSeriesSequenceContext:
        super().to(device)
        for name in ("time_series", "ts_frames", "ts_num_tokens"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    @property
    def num_signals(self) -> int:
        return 0 if self.ts_frames is None else int(self.ts_frames.numel())


def pad_signals(items: list[TimeSeriesDataItem], channels: int | None = None) -> dict:
    """The signal fields of a list of items as padded tensors (empty tensors for pure text)."""
    signals = [torch.as_tensor(s) for item in items for s in item.get("time_series", [])]
    frames = [int(f) for item in items for f in item.get("ts_frames", [])]
    width = channels or (signals[0].shape[1] if signals else 1)
    padded = torch.zeros(len(signals), max(frames, default=0), width, dtype=torch.float32)
    for index, signal in enumerate(signals):
        padded[index, : signal.shape[0]] = signal
    return {
        "time_series": padded,
        "ts_frames": torch.tensor(frames, dtype=torch.long),
        "ts_num_tokens": torch.tensor([int(n) for item in items for n in item.get("ts_num_tokens", [])], dtype=torch.long),
        "ts_sampling_rates": torch.tensor([float(r) for item in items for r in item.get("ts_sampling_rates", [])], dtype=torch.float64),
    }


def time_series_collator(instances: list[list[TimeSeriesDataItem]], pack_max_length: int, padding_token_idx: int,
                         pack_to_max_length: bool = True, pad_chunk_size: int = 256) -> list[ColateItem]:
    """XTuner collator: each packed instance → {seq_ctx: TimeSeriesSequenceContext, shifted_labels}."""
    collated: list[ColateItem] = []
    for instance in instances:
        ctx, shifted_labels, kept = build_text_ctx_labels(instance, pack_max_length, padding_token_idx, pack_to_max_length, pad_chunk_size)
        ids = {item["ts_token_id"] for item in kept if "ts_token_id" in item}
        if len(ids) > 1:
            raise ValueError(f"items of one batch disagree on the <TS_CONTEXT> id: {sorted(ids)}")
        seq_ctx = TimeSeriesSequenceContext.from_text(ctx, ts_token_id=ids.pop() if ids else None, **pad_signals(list(kept)))
        collated.append({"seq_ctx": seq_ctx, "shifted_labels": shifted_labels})
    return collated


def pack(items: list[TimeSeriesDataItem], device: str) -> dict:
    """Items packed into one unpadded sequence on `device`: {seq_ctx, shifted_labels}, as XTuner's trainer gets them."""
    total = sum(item["num_tokens"] for item in items)
    collated = time_series_collator([items], pack_max_length=total, padding_token_idx=0, pack_to_max_length=False)[0]
    return {"seq_ctx": collated["seq_ctx"].to(device), "shifted_labels": collated["shifted_labels"].to(device)}
