"""Stage fuse: mix target and source datasets by ratios, deterministically, tagging each record.

Quotas (train split):
- a target with ratio r contributes round(n * r) records: r < 1 draws without replacement; r > 1
  keeps every record once and draws the extra with replacement;
- the target quota T is the sum over targets; a source with ratio r contributes round(r * T),
  drawn with replacement unless `replace: false` (then capped at its size, the shortfall reported).

The eval split (`eval_split=True`) keeps every target record once and no sources, so evaluation
reflects the target data. Each dataset draws from its own generator seeded by (seed, name), so
adding a dataset leaves the others' draws unchanged; the result is shuffled with the seed. A `mixed`
entry's records are asked densely or for their summary, drawn per epoch (`messages.record_mode`):
fuse gives each its own draw key and the entry's dense_ratio.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionqc import contract
from visionqc.io import read_record_at, record_offsets, write_json, write_jsonl
from visionqc.options import options_from
from visionqc.tracking import StageResult

MODES = ("dense", "summary", "chat", "mixed")


@dataclass
class FusionEntry:
    dataset: str
    ratio: float = 1.0
    replace: bool = True  # sources only
    mode: str = "dense"
    prompt: str = ""  # name of a prompt; empty: the mode's own
    dense_ratio: float = 0.5  # mixed only: the share of records asked densely in an epoch

    def check(self, section: str) -> None:
        if self.mode not in MODES:
            raise ValueError(f"{section}.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 <= self.dense_ratio <= 1:
            raise ValueError(f"{section}.dense_ratio must lie in [0, 1], got {self.dense_ratio}")
        if self.mode == "mixed" and self.prompt:
            raise ValueError(f"{section}: a mixed entry asks the dense and the summary prompts; remove prompt: {self.prompt}")


@dataclass
class FusionOptions:
    """The fusion block without its name (which only names the output folder)."""

    seed: int = 17
    targets: list[FusionEntry] = field(default_factory=list)
    sources: list[FusionEntry] = field(default_factory=list)
    partial_records: str = "drop"  # summary entries: drop | keep records with reported shapes (their counts are short)

    def check(self, section: str) -> None:
        if self.partial_records not in ("drop", "keep"):
            raise ValueError(f"{section}.partial_records must be drop or keep, got {self.partial_records!r}")

    @classmethod
    def from_dict(cls, options: dict) -> FusionOptions:
        options = dict(options)
        for kind in ("targets", "sources"):
            entries = options.get(kind, [])
            if not isinstance(entries, list):
                raise ValueError(f"fusion.{kind} must be a list of {{dataset: ..., ratio: ...}} entries")
            for index, entry in enumerate(entries):
                if not isinstance(entry, dict) or "dataset" not in entry:
                    raise ValueError(f"fusion.{kind}[{index}] needs a dataset: name")
            options[kind] = [options_from(FusionEntry, entry, f"fusion.{kind}[{index}]") for index, entry in enumerate(entries)]
        return options_from(cls, options, "fusion")


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _draw(rng: np.random.Generator, size: int, count: int, replace: bool, upsample: bool) -> tuple[np.ndarray, int]:
    """Indices to take; returns (indices, shortfall). Beyond `size`, every index once plus extra draws."""
    if count == size:
        return np.arange(size), 0
    if count < size:
        return np.sort(rng.choice(size, count, replace=replace)), 0
    if not upsample:
        return np.arange(size), count - size
    return np.concatenate([np.arange(size), rng.choice(size, count - size, replace=True)]), 0


def _tag(record: dict, entry: FusionEntry, domain: str, source_dir: Path, out_dir: Path, draw: str) -> dict:
    record = contract.rebase_media(dict(record), source_dir, out_dir)
    metadata = dict(record.get("metadata") or {})
    metadata.update(_fusion_source=entry.dataset, _fusion_domain=domain, _fusion_mode=entry.mode)
    if entry.prompt:
        metadata["_fusion_prompt"] = entry.prompt
    if entry.mode == "mixed":
        metadata.update(_fusion_dense_ratio=entry.dense_ratio, _fusion_draw=draw)
    record["metadata"] = metadata
    return record


def _whole(record: dict) -> bool:
    return not (record.get("metadata") or {}).get("partial")


def fuse(spec: dict, inputs: dict[str, str | Path], out_path: str | Path, report_path: str | Path, eval_split: bool = False) -> StageResult:
    """Fuse the datasets named in `spec` (the fusion block: seed, targets, sources) whose JSONL files are `inputs`."""
    opts = FusionOptions.from_dict(spec)
    out_path = Path(out_path)
    seed = opts.seed
    targets, sources = opts.targets, [] if eval_split else opts.sources
    if not targets:
        raise ValueError("fusion needs at least one target dataset (fusion.targets)")
    for entry in targets + sources:
        if entry.dataset not in inputs:
            raise ValueError(f"fusion dataset {entry.dataset!r} has no input; add it under datasets:")

    picked: list[tuple[FusionEntry, str, Path, np.ndarray]] = []  # per entry: the byte offsets of its picks
    rows, target_quota = [], 0
    for domain, entries in (("target", targets), ("source", sources)):
        for entry in entries:
            name = entry.dataset
            path = Path(inputs[name])
            drop_partial = entry.mode in ("summary", "mixed") and opts.partial_records == "drop"
            offsets, partial = record_offsets(path, _whole if drop_partial else None)
            ratio = 1.0 if eval_split else float(entry.ratio)
            quota = round(len(offsets) * ratio) if domain == "target" else round(ratio * target_quota)
            replace = domain == "source" and entry.replace
            picks, shortfall = _draw(_rng(seed, name), len(offsets), quota, replace, upsample=domain == "target" or replace)
            if domain == "target":
                target_quota += len(picks)
            picked.append((entry, domain, path, offsets[picks]))
            rows.append(
                {"dataset": name, "domain": domain, "available": len(offsets), "ratio": ratio, "quota": quota,
                 "taken": len(picks), "unique": len(np.unique(picks)), "shortfall": shortfall,
                 "replace": replace, "mode": entry.mode, "partial_left_out": partial}
            )
    which = np.concatenate([np.full(len(offsets), n, dtype=np.int32) for n, (*_, offsets) in enumerate(picked)])
    where = np.concatenate([offsets for *_, offsets in picked])
    order = np.random.default_rng(seed).permutation(len(where))
    split = "val" if eval_split else "train"
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(path, "rb")) for _, _, path, _ in picked]

        def fused():
            for position, i in enumerate(order):
                entry, domain, path, _ = picked[which[i]]
                record = read_record_at(handles[which[i]], int(where[i]))
                yield _tag(record, entry, domain, path.parent, out_path.parent, f"{seed}:{split}:{position}")

        write_jsonl(out_path, fused())
    report = {"records_out": len(where), "target_quota": target_quota, "seed": seed, "eval_split": eval_split, "datasets": rows}
    write_json(report_path, report)
    metrics = {"records_out": report["records_out"], "records_in": sum(row["available"] for row in rows)}
    for row in rows:
        metrics |= {f"taken.{row['dataset']}": row["taken"], f"shortfall.{row['dataset']}": row["shortfall"],
                    f"partial_left_out.{row['dataset']}": row["partial_left_out"]}
    return StageResult(report=report, metrics=metrics, artifacts=[report_path], inputs=dict(inputs), outputs={"fused": out_path})
