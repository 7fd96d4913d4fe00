"""Stage cache_ts: validated time-series JSONL → tokenized Arrow cache (the vision cache's layout and reuse rules).

Rows hold the tokenize function's output, with the resampled, normalised signals flattened:
input_ids, labels, num_tokens, time_series (per signal, frames × channels values), ts_frames,
ts_num_tokens, ts_sampling_rates, ts_urls, ts_token_id, and answer, label, line for evaluation.
The key is a sha256 over the records, every signal file they name, and the tokenize function's
hash (tokenizer, encoder geometry, rate, channels, template and its source code).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from visionqc import contract
from visionqc.arrow_cache import (
    length_stats,
    over_length_error,
    reuse_or_build,
    write_shards,
)
from visionqc.io import atomic_directory, read_jsonl, sha256_file, write_json
from visionqc.options import options_from
from visionqc.plots import plot_lengths
from visionqc.timeseries.model import MODEL_FILE
from visionqc.timeseries.tokenize import (
    TimeSeriesTokenizeFunction,
    load_geometry,
    load_tokenizer,
)
from visionqc.tracking import StageResult

CACHE_FORMAT = 1
TS_CACHE_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
    ("time_series", pa.list_(pa.list_(pa.float32()))),
    ("ts_frames", pa.list_(pa.int32())),
    ("ts_num_tokens", pa.list_(pa.int32())),
    ("ts_sampling_rates", pa.list_(pa.float64())),
    ("ts_urls", pa.list_(pa.string())),
    ("ts_token_id", pa.int32()),
    ("answer", pa.string()),
    ("label", pa.string()),
    ("line", pa.int32()),
])


@dataclass
class TimeSeriesCacheOptions:
    target_rate: float = 50.0  # Hz every signal is resampled to
    channels: int = 1
    max_length: int = 512
    shard_size: int = 8192

    @classmethod
    def from_dict(cls, options: dict) -> TimeSeriesCacheOptions:
        return options_from(cls, options, "timeseries")


def check_base_agrees(base: Path, opts: TimeSeriesCacheOptions) -> None:
    """The base folder's timeseries.json was built for one rate and channel count; the config must name the same."""
    described = json.loads((base / MODEL_FILE).read_text()) if (base / MODEL_FILE).exists() else {}
    for name in ("target_rate", "channels"):
        if name in described and float(described[name]) != float(getattr(opts, name)):
            raise ValueError(f"timeseries.{name} is {getattr(opts, name)}, but the base model {base} was built for "
                             f"{described[name]} ({base / MODEL_FILE}); set timeseries.{name}: {described[name]} or use another base")


def tokenize_function(records: Path, llm_dir, encoder_dir, opts: TimeSeriesCacheOptions) -> TimeSeriesTokenizeFunction:
    return TimeSeriesTokenizeFunction(load_tokenizer(llm_dir), load_geometry(encoder_dir), target_rate=opts.target_rate,
                                      channels=opts.channels, media_root=records.parent, max_length=None)


def ts_cache_key(records: Path, function: TimeSeriesTokenizeFunction, opts: TimeSeriesCacheOptions) -> str:
    digest = hashlib.sha256(f"visionqc-ts-cache-{CACHE_FORMAT}|{function.hash(located=False)}|{opts.max_length}\n".encode())
    digest.update(records.read_bytes())
    for _, record in read_jsonl(records):
        for _, signal in contract.time_series_parts(record):
            digest.update(f"\n{signal['url']}\n{sha256_file(records.parent / signal['url'])}".encode())
    return digest.hexdigest()


def answer_of(record: dict) -> str:
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return answers[-1] if answers and isinstance(answers[-1], str) else ""


def build_ts_cache(records: str | Path, base: str | Path, cache_root: str | Path, pointer: str | Path,
                   options: dict | None = None) -> StageResult:
    """Tokenize `records` into `<cache_root>/<key>/` (reused when it exists) and write `pointer`."""
    opts = TimeSeriesCacheOptions.from_dict(dict(options or {}))
    records, base = Path(records), Path(base)
    check_base_agrees(base, opts)
    function = tokenize_function(records, base / "llm", base / "encoder", opts)
    key = ts_cache_key(records, function, opts)
    manifest = reuse_or_build(cache_root, key, pointer, records, lambda folder: _encode_into(records, function, folder, opts, key))
    folder = Path(cache_root) / key
    lengths = manifest["lengths"]
    return StageResult(
        report=manifest,
        metrics={"records_in": lengths["samples"], "records_out": lengths["samples"], "reused": int(manifest["reused"]),
                 "signals": manifest["signals"], "context_tokens": manifest["context_tokens"],
                 "label_tokens": manifest["label_tokens"], **{f"length.{k}": v for k, v in lengths.items()}},
        artifacts=[folder / "lengths.png", folder / "manifest.json"],
        inputs={"records": records, "base": base}, outputs={"cache": folder},
    )


def _encode_into(records: Path, function: TimeSeriesTokenizeFunction, folder: Path, opts: TimeSeriesCacheOptions, key: str) -> None:
    rows, too_long = [], []
    for lineno, record in tqdm(read_jsonl(records), desc=f"cache_ts {records.name}", unit="rec", mininterval=2):
        try:
            item = function(record)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{records}:{lineno}: cannot tokenize: {exc}") from exc
        if item["num_tokens"] > opts.max_length:
            too_long.append((lineno, item["num_tokens"]))
        rows.append({
            "input_ids": item["input_ids"], "labels": item["labels"], "num_tokens": item["num_tokens"],
            "time_series": [signal.reshape(-1) for signal in item["time_series"]],
            **{name: item[name] for name in ("ts_frames", "ts_num_tokens", "ts_sampling_rates", "ts_urls", "ts_token_id")},
            "answer": answer_of(record), "label": (record.get("metadata") or {}).get("label", ""), "line": lineno,
        })
    if too_long:
        raise over_length_error(records, too_long, "timeseries.max_length", opts.max_length,
                                "Raise timeseries.max_length or lower timeseries.target_rate")
    if not rows:
        raise ValueError(f"{records} holds no records to cache")
    lengths = Counter(row["num_tokens"] for row in rows)
    with atomic_directory(folder) as work:
        shards = write_shards(work, rows, TS_CACHE_SCHEMA, opts.shard_size)
        plot_lengths(lengths, opts.max_length, work / "lengths.png")
        write_json(work / "manifest.json", {
            "key": key, "records": str(records), "shards": list(shards), "shard_sha256": shards, "options": asdict(opts),
            "tokenize_hash": function.hash(located=False),
            "lengths": length_stats(lengths), "signals": sum(len(row["ts_frames"]) for row in rows),
            "context_tokens": sum(sum(row["ts_num_tokens"]) for row in rows),
            "label_tokens": sum(sum(1 for t in row["labels"] if t != -100) for row in rows),
            "answers": sorted({row["answer"] for row in rows}),
        })
