"""Stage fuse: mix target and source datasets by ratios, deterministically, tagging each record.

Quotas (train split):
- a target with ratio r contributes round(n * r) records: r < 1 draws without replacement; r > 1
  keeps every record once and draws the extra with replacement;
- the target quota T is the sum over targets; a source with ratio r contributes round(r * T),
  drawn with replacement unless `replace: false` (then capped at its size, the shortfall reported).

The eval split (`eval_split=True`) keeps every target record once and no sources, so evaluation
reflects the target data. Each dataset draws from its own generator seeded by (seed, name), so
adding a dataset leaves the others' draws unchanged; the result is shuffled with the seed.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from visionqc import contract
from visionqc.io import read_jsonl, write_json, write_jsonl

MODES = ("dense", "summary", "chat")


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


def _tag(record: dict, entry: dict, domain: str, source_dir: Path, out_dir: Path) -> dict:
    record = contract.rebase_media(dict(record), source_dir, out_dir)
    metadata = dict(record.get("metadata") or {})
    metadata.update(_fusion_source=entry["dataset"], _fusion_domain=domain, _fusion_mode=entry.get("mode", "dense"))
    if entry.get("prompt"):
        metadata["_fusion_prompt"] = entry["prompt"]
    record["metadata"] = metadata
    return record


def fuse(spec: dict, inputs: dict[str, str | Path], out_path: str | Path, report_path: str | Path, eval_split: bool = False) -> dict:
    """Fuse the datasets named in `spec` (targets, sources, seed) whose JSONL files are `inputs`."""
    out_path = Path(out_path)
    seed = int(spec.get("seed", 0))
    targets, sources = list(spec.get("targets", [])), [] if eval_split else list(spec.get("sources", []))
    if not targets:
        raise ValueError("fusion needs at least one target dataset (fusion.targets)")
    for entry in targets + sources:
        if entry["dataset"] not in inputs:
            raise ValueError(f"fusion dataset {entry['dataset']!r} has no input; add it under datasets:")
        if entry.get("mode", "dense") not in MODES:
            raise ValueError(f"fusion dataset {entry['dataset']!r}: mode must be one of {MODES}")

    fused, rows = [], []
    target_quota = 0
    for domain, entries in (("target", targets), ("source", sources)):
        for entry in entries:
            name = entry["dataset"]
            path = Path(inputs[name])
            records = [record for _, record in read_jsonl(path)]
            ratio = 1.0 if eval_split else float(entry.get("ratio", 1.0))
            quota = round(len(records) * ratio) if domain == "target" else round(ratio * target_quota)
            replace = domain == "source" and bool(entry.get("replace", True))
            picks, shortfall = _draw(_rng(seed, name), len(records), quota, replace, upsample=domain == "target" or replace)
            if domain == "target":
                target_quota += len(picks)
            fused.extend(_tag(records[i], entry, domain, path.parent, out_path.parent) for i in picks)
            rows.append(
                {"dataset": name, "domain": domain, "available": len(records), "ratio": ratio, "quota": quota,
                 "taken": int(len(picks)), "unique": int(len(set(picks.tolist()))), "shortfall": shortfall,
                 "replace": replace, "mode": entry.get("mode", "dense")}
            )
    order = np.random.default_rng(seed).permutation(len(fused))
    write_jsonl(out_path, (fused[i] for i in order))
    report = {"records_out": len(fused), "target_quota": target_quota, "seed": seed, "eval_split": eval_split, "datasets": rows}
    write_json(report_path, report)
    return report
