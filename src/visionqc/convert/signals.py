"""Signal manifests (CSV or JSONL) → time-series chat records in the contract.

A manifest row names one trace:

    path            signal file relative to the manifest's folder (.wav, .flac, .npy, .csv)
    sampling_rate   samples per second; optional for .wav/.flac, whose header says it
    channels        optional; validate compares it with the file
    label           short class name (plots, confusion matrices); optional
    answer          the assistant's answer; defaults to label
    prompt          optional; defaults to the convert option signals.prompt

Conversion translates and copies; it does not judge. A row with a bad rate or no answer still
becomes a record, so that validate rejects it with its line number and reason. Each record keeps
`metadata.source` = manifest:line.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from visionqc import contract
from visionqc.convert.common import ConvertOptions, ConvertOutputs, Issue, SignalOptions, write_splits
from visionqc.io import link_or_copy, write_json
from visionqc.plots import plot_traces
from visionqc.signals import AUDIO_SUFFIXES, read_header, read_signal


@dataclass
class ManifestRow:
    line: int
    fields: dict


def read_manifest(path: Path) -> list[ManifestRow]:
    """Rows of a .csv (header line first) or .jsonl manifest, with 1-based line numbers."""
    if path.suffix.lower() == ".jsonl":
        rows = []
        for line, text in enumerate(path.read_text("utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line}: not valid JSON ({exc}); fix the manifest line") from exc
            if not isinstance(fields, dict):
                raise ValueError(f"{path}:{line}: a manifest line must be a JSON object")
            rows.append(ManifestRow(line, fields))
        return rows
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ValueError(f"{path}:1: the header must name a 'path' column (got {reader.fieldnames}); see config/README.md")
        return [ManifestRow(reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}) for row in reader]


def _number(value):
    """Manifest numbers arrive as text in CSV; anything unparsable stays as given for validate to reject."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    return value


def _signal_url(source: Path, export_root: Path, outputs: ConvertOutputs, issues: list[Issue], where: str) -> tuple[str, str, Path | None]:
    """Where a signal inside the export goes: (url relative to the records, path inside the media folder, the file or None)."""
    real, root = os.path.realpath(export_root / source), os.path.realpath(export_root)
    if os.path.isabs(source) or not real.startswith(root + os.sep):
        issues.append(Issue(where, str(source), "outside_export", "not copied; validate rejects paths outside its data root"))
        return os.path.relpath(real, os.path.realpath(outputs.records_dir)).replace(os.sep, "/"), "", None
    relative = Path(os.path.relpath(real, root)).as_posix()
    url = f"{outputs.media_prefix}/{relative}"
    if not os.path.isfile(real):
        issues.append(Issue(where, str(source), "missing_signal", f"no file at {real}"))
        return url, relative, None
    return url, relative, Path(real)


def convert_signals(source: Path, outputs: ConvertOutputs, opts: ConvertOptions) -> dict:
    """Convert a signal manifest into the outputs (train/val JSONL, report, signals/, overlays/traces.png); returns the report."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: manifest not found; check datasets.<name>.path in the config")
    rows = read_manifest(source)
    issues: list[Issue] = []
    records, readable = [], {}
    with outputs.staged() as scratch:
        for row in rows:
            where = f"{source}:{row.line}"
            record, relative, copied = _record(row, source.parent, outputs, opts.signals, issues, where)
            if copied is not None:
                target = scratch / "media" / relative
                if not target.exists():  # rows may share a trace
                    link_or_copy(copied, target)
                readable[id(record)] = target
            records.append((f"{row.line}:{row.fields.get('path', '')}", record))
        examples = _examples([r for _, r in records], readable, opts.signals.examples_per_label)
    if outputs.examples is not None:
        plot_traces(examples, outputs.examples)
    splits = write_splits(outputs, records, opts.val_fraction, opts.seed)
    report = {
        "format": "signals",
        "source": str(source),
        "records_in": len(rows),
        "records_out": len(records),
        "records": {name: len(split_rows) for name, split_rows in splits.items()},
        "labels": dict(sorted(Counter(r["metadata"].get("label", "") for _, r in records).items())),
        "issues_by_reason": dict(sorted(Counter(issue.reason for issue in issues).items())),
        "issues": [issue.as_dict() for issue in issues],
    }
    write_json(outputs.report, report)
    return report


def _record(row: ManifestRow, export_root: Path, outputs: ConvertOutputs, opts: SignalOptions, issues: list[Issue],
            where: str) -> tuple[dict, str, Path | None]:
    fields = row.fields
    path = Path(str(fields.get("path", "")))
    url, relative, copied = _signal_url(path, export_root, outputs, issues, where)
    signal = {"url": url}
    rate = _number(fields.get("sampling_rate"))
    if rate is None and copied is not None and copied.suffix.lower() in AUDIO_SUFFIXES:
        rate = read_header(copied).sampling_rate
    if rate is not None:
        signal["sampling_rate"] = rate
    if "channels" in fields:
        signal["channels"] = _number(fields["channels"])
    prompt = str(fields.get("prompt", opts.prompt))
    text = prompt if contract.TS_PLACEHOLDER in prompt else f"{contract.TS_PLACEHOLDER}\n{prompt}"
    messages = [{"role": "user", "content": [{"type": contract.TS_PART, contract.TS_PART: signal}, {"type": "text", "text": text}]}]
    answer = fields.get("answer", fields.get("label"))
    if answer is not None:
        messages.append({"role": "assistant", "content": str(answer)})
    metadata = {"source": where}
    if "label" in fields:
        metadata["label"] = str(fields["label"])
    if "id" in fields:
        metadata["id"] = str(fields["id"])
    return {"messages": messages, "metadata": metadata}, relative, copied


def _examples(records: list[dict], copies: dict[int, Path], per_label: int) -> dict[str, list]:
    """Up to `per_label` readable traces per label (or answer), for the examples plot; `copies` maps id(record) to its trace."""
    examples: dict[str, list] = defaultdict(list)
    for record in records:
        label = record["metadata"].get("label") or (record["messages"][-1]["content"] if len(record["messages"]) > 1 else "")
        if len(examples[label]) >= per_label:
            continue
        signal = record["messages"][0]["content"][0]["time_series_url"]
        rate = signal.get("sampling_rate")
        if id(record) not in copies:
            continue
        try:
            samples, header_rate = read_signal(copies[id(record)])
        except Exception:  # unreadable traces are validate's business, not the plot's
            continue
        rate = rate if isinstance(rate, (int, float)) and rate > 0 else header_rate
        if rate:
            examples[label].append((samples, float(rate)))
    return {label: traces for label, traces in sorted(examples.items()) if traces}
