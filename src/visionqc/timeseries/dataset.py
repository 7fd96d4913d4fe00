"""A time-series token cache as a dataset of TimeSeriesDataItems (what the tokenize function returned).

Shared by train_ts and eval_ts, which read the cache that cache_ts wrote.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from visionqc.arrow_cache import CacheRef
from visionqc.timeseries.tokenize import TimeSeriesDataItem


class TimeSeriesCacheDataset:
    """Rows of a time-series cache table as TimeSeriesDataItems."""

    def __init__(self, table: pa.Table, channels: int):
        self.table = table
        self.channels = channels

    @classmethod
    def read(cls, cache: CacheRef) -> TimeSeriesCacheDataset:
        return cls(cache.table(), int(cache.options["channels"]))

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> TimeSeriesDataItem:
        row = self.table.slice(index, 1).to_pylist()[0]
        signals = [np.asarray(values, dtype=np.float32).reshape(frames, self.channels)
                   for values, frames in zip(row["time_series"], row["ts_frames"], strict=True)]
        return TimeSeriesDataItem(
            input_ids=row["input_ids"], labels=row["labels"], num_tokens=row["num_tokens"], time_series=signals,
            ts_frames=row["ts_frames"], ts_num_tokens=row["ts_num_tokens"], ts_sampling_rates=row["ts_sampling_rates"],
            ts_urls=row["ts_urls"], ts_token_id=row["ts_token_id"],
        )
