"""The on-disk token cache shared by the vision and time-series caches: Arrow IPC shards + manifest.json.

A cache lives in `<cache_root>/<key>/`, where the key is a content hash that the caller computes
over everything that changes the tokens. An existing key is reused; a new one is built under a
temporary name and renamed into place. A small JSON pointer tells the workflow which key a split uses.

`CacheRef.read(pointer)` is the one reader of a pointer and the manifest it leads to: later stages
take the options they must agree with (pixel budget, prompts, template) from `CacheRef.options`.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from pathlib import Path

import pyarrow as pa

from visionqc.io import sha256_file, write_json


def reuse_or_build(cache_root: str | Path, key: str, pointer: str | Path, records: str | Path, build: Callable[[Path], None]) -> dict:
    """Build `<cache_root>/<key>/` with `build(folder)` unless it exists; write `pointer`; return the manifest."""
    folder = Path(cache_root) / key
    reused = (folder / "manifest.json").exists() and "shard_sha256" in json.loads((folder / "manifest.json").read_text())
    if not reused:  # a cache without shard digests (an older visionqc) is built again
        build(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    write_json(pointer, {"key": key, "path": str(folder), "records": str(records), "reused": reused})
    return {**manifest, "reused": reused}


@dataclass(frozen=True)
class CacheRef:
    """A cache pointer file and the cache folder it names."""

    pointer: Path
    key: str
    folder: Path
    records: str

    @classmethod
    def read(cls, pointer: str | Path) -> CacheRef:
        pointer = Path(pointer)
        try:
            fields = json.loads(pointer.read_text())
            ref = cls(pointer, fields["key"], Path(fields["path"]), fields["records"])
        except FileNotFoundError:
            raise FileNotFoundError(f"{pointer}: cache pointer not found; run the cache rule that writes it") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{pointer}: not a cache pointer ({exc}); rerun the cache rule that writes it") from exc
        if not (ref.folder / "manifest.json").exists():
            raise FileNotFoundError(f"{pointer} names {ref.folder}, which holds no manifest.json; rerun the cache rule")
        return ref

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.folder / "manifest.json").read_text())

    @property
    def options(self) -> dict:
        """The options the cache was built with (for the vision cache: template, pixel budget, prompts)."""
        return self.manifest["options"]

    def table(self) -> pa.Table:
        return open_cache(self.folder)


class ShardWriter:
    """Rows to `data-NNNNN.arrow` files of `shard_size` rows, each written once full (memory: one shard of rows)."""

    def __init__(self, work: Path, schema: pa.Schema, shard_size: int):
        self.work, self.schema, self.shard_size = work, schema, shard_size
        self.digests: dict[str, str] = {}  # {name: sha256}, for the manifest
        self._rows: list[dict] = []

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) == self.shard_size:
            self._flush()

    def close(self) -> dict[str, str]:
        if self._rows:
            self._flush()
        return self.digests

    def _flush(self) -> None:
        name = f"data-{len(self.digests):05d}.arrow"
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        with pa.OSFile(str(self.work / name), "wb") as sink, pa.ipc.new_file(sink, self.schema) as writer:
            writer.write_table(table, max_chunksize=1024)
        self.digests[name] = sha256_file(self.work / name)
        self._rows = []


def write_shards(work: Path, rows: list[dict], schema: pa.Schema, shard_size: int) -> dict[str, str]:
    """Rows as `data-NNNNN.arrow` files of at most `shard_size` rows; returns {name: sha256} for the manifest."""
    writer = ShardWriter(work, schema, shard_size)
    for row in rows:
        writer.add(row)
    return writer.close()


_VERIFIED: set[tuple[Path, str]] = set()  # (shard, digest) already checked in this process


def verify_shards(folder: Path, manifest: dict) -> None:
    """Every shard's bytes against the sha256 the manifest recorded when it was written; once per process."""
    digests = manifest.get("shard_sha256")
    if not isinstance(digests, dict) or set(digests) != set(manifest["shards"]):
        raise ValueError(f"{folder}/manifest.json records no shard digests (written by an older visionqc); "
                         f"delete {folder} and rerun the cache rule")
    for name, expected in digests.items():
        if (folder / name, expected) in _VERIFIED:
            continue
        if sha256_file(folder / name) != expected:
            raise ValueError(f"{folder / name}: its bytes differ from what the cache rule wrote (sha256 in manifest.json): "
                             f"the file changed on disk. Delete {folder} and rerun the cache rule")
        _VERIFIED.add((folder / name, expected))


def open_cache(folder: str | Path) -> pa.Table:
    """Memory-map every shard of a cache folder into one table (no copy), after checking their digests."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    verify_shards(folder, manifest)
    tables = [pa.ipc.open_file(pa.memory_map(str(folder / name))).read_all() for name in manifest["shards"]]
    return pa.concat_tables(tables)


def length_stats(lengths: Counter) -> dict:
    """Count, total, min, mean, p50, p95 and max of the samples' token lengths ({length: samples})."""
    ordered = sorted(lengths)
    below = list(accumulate(lengths[length] for length in ordered))  # samples at or below each length
    samples, tokens = below[-1], sum(length * count for length, count in lengths.items())

    def at(rank: int) -> int:
        return ordered[bisect_right(below, rank)]

    return {
        "samples": samples,
        "tokens": tokens,
        "min": ordered[0],
        "mean": round(tokens / samples, 2),
        "p50": at(samples // 2),
        "p95": at(min(samples - 1, int(samples * 0.95))),
        "max": ordered[-1],
    }


def over_length_error(records: Path, too_long: list[tuple[int, int]], key: str, max_length: int, advice: str) -> ValueError:
    """One error listing the over-length samples as file:line (the first 20); `key` is the config key of the limit."""
    listed = "\n".join(f"  {records}:{line}: {length} tokens" for line, length in too_long[:20])
    more = f"\n  … and {len(too_long) - 20} more" if len(too_long) > 20 else ""
    return ValueError(f"{len(too_long)} sample(s) exceed {key}={max_length}:\n{listed}{more}\n{advice}; nothing was truncated.")
