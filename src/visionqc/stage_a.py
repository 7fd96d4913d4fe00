"""Stage-A: per-image summaries for photo groups, batched and chunked.

Input layout: `<root>/<mission>/{审核通过,审核不通过}/<group_id>/*.{jpg,jpeg,png}`. The folder gives
the label (审核通过 → pass, 审核不通过 → fail); a group id under both folders (a resubmission) is
two records keyed (group_id, label).

The work is a list of (record, image) items cut into chunks. Each chunk is written atomically to
its own file in `<chunks_dir>/<fingerprint>/`, named by the digest of its items: their tickets and
the sha256 of each photo. A rerun skips chunks that exist, so an interrupted run redoes only the
missing ones, and a photo replaced in place reruns exactly its chunk. The folder's fingerprint
covers the model and the question, so chunks of another model are never mixed in. `rank`/`world`
split the chunks across processes (chunk i belongs to rank i % world); once every chunk exists,
the merged JSONL is written.

The prompt text and the pixel budget come from the manifest of the cache the model was trained
on, so Stage-A asks what training taught, at the image size training saw.

Batching modes: per_group (a batch never mixes groups) and per_image (batches fill across groups).

Every answer is read against the summary contract (`contract.parse_summary`). Each group record
says per image whether its summary is valid (`per_image_check`: "valid" or the problem code); the
report gives the valid rate, the count per problem and a few examples. Below
`min_valid_rate` the stage fails: the model does not fit these photos.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from visionqc.arrow_cache import CacheRef
from visionqc.contract import parse_summary
from visionqc.faults import pause_point
from visionqc.inference import Question
from visionqc.io import read_jsonl, sha256_file, sha256_tree, write_json, write_jsonl
from visionqc.messages import LABEL_FOLDERS
from visionqc.options import options_from
from visionqc.tracking import StageResult, numbers_of

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class StageAOptions:
    prompt: str = "summary"  # the name of a prompt the cache was built with
    batch_size: int = 32
    chunk_size: int = 64  # images per chunk
    mode: str = "per_image"  # per_group | per_image
    max_new_tokens: int = 96
    min_valid_rate: float = 0.9  # share of images whose summary meets the contract; below it the stage fails

    @classmethod
    def from_dict(cls, options: dict) -> StageAOptions:
        made = options_from(cls, options, "stage_a")
        if made.mode not in ("per_group", "per_image"):
            raise ValueError(f"stage_a.mode must be per_group or per_image, got {made.mode!r}")
        if not 0 <= made.min_valid_rate <= 1:
            raise ValueError(f"stage_a.min_valid_rate must lie in [0, 1], got {made.min_valid_rate}")
        return made


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def discover_groups(root: str | Path, mission: str) -> tuple[list[dict], list[str]]:
    """Groups of one mission, sorted by (group_id, label); returns (groups, warnings)."""
    base = Path(root) / mission
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: mission folder not found; check stage_a.root and stage_a.missions")
    groups, warnings = [], []
    for child in sorted(base.iterdir()):
        if child.is_dir() and child.name not in LABEL_FOLDERS:
            warnings.append(f"{child}: not 审核通过 or 审核不通过, ignored")
    for folder_name, label in LABEL_FOLDERS.items():
        label_dir = base / folder_name
        if not label_dir.is_dir():
            continue
        for group_dir in sorted(p for p in label_dir.iterdir() if p.is_dir()):
            if outside := _outside(group_dir, root):
                warnings.append(outside)
                continue
            images = sorted((p for p in group_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: _natural(p.name))
            outside = {p: why for p in images if (why := _outside(p, root))}
            warnings += list(outside.values())
            images = [p for p in images if p not in outside]
            if not images:
                warnings.append(f"{group_dir}: no images, skipped")
                continue
            groups.append({"group_id": group_dir.name, "mission": mission, "label": label,
                           "images": [str(p) for p in images]})
    groups.sort(key=lambda g: (g["group_id"], g["label"]))
    return groups, warnings


def _outside(path: Path, root: str | Path) -> str:
    """Why a group folder or photo is skipped (a link that leaves stage_a.root), or ""."""
    real = path.resolve()
    if real.is_relative_to(Path(root).resolve()):
        return ""
    return f"{path}: a link to {real}, outside stage_a.root {root}; skipped (copy the photos in to judge them)"


def ticket_key(group: dict) -> str:
    return f"{group['group_id']}::{group['label']}"


def plan_chunks(groups: list[dict], mode: str, chunk_size: int) -> list[list[tuple[int, int]]]:
    """Items (group index, image index) cut into chunks; per_group keeps each group within one chunk."""
    chunks, current = [], []
    for g, group in enumerate(groups):
        items = [(g, i) for i in range(len(group["images"]))]
        if mode == "per_group" and current and len(current) + len(items) > chunk_size:
            chunks.append(current)
            current = []
        for item in items:
            current.append(item)
            if mode == "per_image" and len(current) == chunk_size:
                chunks.append(current)
                current = []
    if current:
        chunks.append(current)
    return chunks


def batches(items: list[tuple[int, int]], mode: str, batch_size: int) -> list[list[tuple[int, int]]]:
    if mode == "per_image":
        return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    out = []
    for group in dict.fromkeys(g for g, _ in items):
        own = [item for item in items if item[0] == group]
        out += [own[i : i + batch_size] for i in range(0, len(own), batch_size)]
    return out


def fingerprint(model_dir: str | Path, options: StageAOptions, question: Question) -> str:
    """The chunk folder's name: the model and everything that shapes an answer but the photos."""
    digest = hashlib.sha256(sha256_tree(model_dir).encode())
    settings = {"prompt": question.prompt, "chunk_size": options.chunk_size, "mode": options.mode,
                "max_new_tokens": options.max_new_tokens, "image_max_tokens": question.budget.max_tokens,
                "image_min_tokens": question.budget.min_tokens}
    digest.update(json.dumps({"options": settings}, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def chunk_names(groups: list[dict], chunks: list[list[tuple[int, int]]]) -> list[str]:
    """Each chunk's file name: its index and the digest of its items (ticket, image number, photo sha256)."""
    photos = {path: sha256_file(path) for group in groups for path in group["images"]}
    names = []
    for index, chunk in enumerate(chunks):
        items = [[ticket_key(groups[g]), i + 1, photos[groups[g]["images"][i]]] for g, i in chunk]
        digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]
        names.append(f"chunk-{index:05d}-{digest}.jsonl")
    return names


def run_stage_a(root: str | Path, mission: str, model_dir: str | Path, cache: str | Path, *, summaries_out: str | Path,
                report_out: str | Path, chunks_dir: str | Path, truth: str | Path | None = None, options: dict | None = None,
                device: str = "auto", rank: int = 0, world: int = 1, generator=None, barrier=None,
                log_metrics=None) -> StageResult | None:
    """Summarise every image of a mission's groups; write `summaries_out` (once every chunk exists) and `report_out`.

    With `barrier` (ranks started together, e.g. by torchrun), every rank waits there after its
    chunks and rank 0 merges and reports; the other ranks return None. A valid rate below
    `min_valid_rate` raises ValueError after `log_metrics` (when given) has the report's numbers.
    """
    opts = StageAOptions.from_dict(dict(options or {}))
    question = Question.from_cache(CacheRef.read(cache), opts.prompt, "stage_a.prompt")
    groups, warnings = discover_groups(root, mission)
    if not groups:
        raise ValueError(f"{Path(root) / mission}: no photo groups found")
    chunks = plan_chunks(groups, opts.mode, opts.chunk_size)
    folder = Path(chunks_dir) / fingerprint(model_dir, opts, question)
    files = [folder / name for name in chunk_names(groups, chunks)]
    mine = [i for i in range(len(chunks)) if i % world == rank and not files[i].exists()]
    generated, seconds = 0, 0.0
    if mine:
        if generator is None:
            from visionqc.inference import Generator

            generator = Generator(model_dir, device, question.budget, opts.max_new_tokens)
        for index in tqdm(mine, desc=f"stage_a {mission} rank {rank}", unit="chunk"):
            rows = []
            for batch in batches(chunks[index], opts.mode, opts.batch_size):
                requests = [{"images": [groups[g]["images"][i]], "prompt": question.prompt} for g, i in batch]
                start = time.perf_counter()
                answers = generator.generate(requests)
                seconds += time.perf_counter() - start
                generated += len(batch)
                rows += [{"key": ticket_key(groups[g]), "image": i + 1, "summary": answer}
                         for (g, i), answer in zip(batch, answers, strict=True)]
            write_jsonl(files[index], rows)
            pause_point(f"stage_a:chunk-{index}")
    if barrier is not None:
        barrier()
        if rank != 0:
            return None
    done = sum(file.exists() for file in files)
    report = {"mission": mission, "groups": len(groups), "images": sum(len(g["images"]) for g in groups),
              "chunks": len(chunks), "chunks_done": done, "chunks_run": len(mine), "images_generated": generated,
              "generation_seconds": round(seconds, 3), "images_per_second": round(generated / seconds, 3) if seconds else None,
              "warnings": warnings, "rank": rank, "world": world, "merged": False}
    if done == len(chunks):
        merged = merge_chunks(groups, files, root)
        for stale in set(folder.glob("chunk-*.jsonl")) - set(files):  # answers for photos since replaced
            stale.unlink(missing_ok=True)
        report.update(contract_report(merged))
        if truth and Path(truth).exists():
            report.update(exact_match(merged, truth))
        if report["valid_rate"] < opts.min_valid_rate:
            if log_metrics:
                log_metrics(numbers_of(report))
            raise ValueError(unfit_model_message(report, opts.min_valid_rate, folder))
        write_jsonl(summaries_out, merged)
        report["merged"] = True
    write_json(report_out, report)
    return StageResult(
        report=report, metrics=numbers_of(report), artifacts=[report_out],
        inputs={"groups": Path(root) / mission, "model": model_dir} if report["merged"] else {},
        outputs={"summaries": summaries_out} if report["merged"] else {},
    )


def merge_chunks(groups: list[dict], files: list[Path], root: str | Path) -> list[dict]:
    """Join chunk files into one record per group, with strict checks."""
    summaries: dict[str, dict[int, str]] = {}
    for file in files:
        for _, row in read_jsonl(file):
            summaries.setdefault(row["key"], {})[row["image"]] = row["summary"]
    merged = []
    for group in groups:
        key = ticket_key(group)
        got = summaries.get(key, {})
        expected = list(range(1, len(group["images"]) + 1))
        if sorted(got) != expected:
            raise ValueError(f"{key}: chunks hold images {sorted(got)}, expected {expected}; delete {files[0].parent} and rerun")
        checks = {f"image_{n}": parse_summary(got[n]).problem or "valid" for n in expected}
        merged.append({
            "group_id": group["group_id"], "mission": group["mission"], "label": group["label"],
            "images": [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p for p in group["images"]],
            "per_image": {f"image_{n}": got[n] for n in expected},
            "per_image_check": checks,
            "summaries_valid": all(check == "valid" for check in checks.values()),
        })
    return merged


EXAMPLES = 5


def contract_report(records: list[dict]) -> dict:
    """Valid rate over images, invalid images per problem, groups with an invalid summary, a few examples."""
    problems: dict[str, int] = {}
    examples, images = [], 0
    for record in records:
        for image, check in record["per_image_check"].items():
            images += 1
            if check == "valid":
                continue
            problems[check] = problems.get(check, 0) + 1
            if len(examples) < EXAMPLES:
                examples.append({"group": ticket_key(record), "image": image, "problem": check,
                                 "summary": record["per_image"][image][:160]})
    invalid = sum(problems.values())
    return {"valid_rate": (images - invalid) / images if images else 1.0, "invalid_images": invalid,
            "invalid_by_problem": dict(sorted(problems.items())),
            "groups_with_invalid_summaries": sum(not record["summaries_valid"] for record in records),
            "invalid_examples": examples}


def unfit_model_message(report: dict, minimum: float, folder: Path) -> str:
    kinds = ", ".join(f"{kind} {count}" for kind, count in report["invalid_by_problem"].items())
    shown = "\n".join(f"  {e['group']} {e['image']} [{e['problem']}]: {e['summary']!r}" for e in report["invalid_examples"])
    return (f"the model does not fit these photos: {report['invalid_images']} of {report['images']} summaries "
            f"(valid rate {report['valid_rate']:.3f}, below stage_a.min_valid_rate {minimum}) miss the summary contract "
            f"({kinds}). Examples:\n{shown}\nTrain on photos like these, or lower stage_a.min_valid_rate to pass the "
            f"invalid summaries on to Stage-B (which fails their groups closed). The answers stay in {folder}/, "
            "so a rerun does not generate them again.")


def exact_match(records: list[dict], truth_path: str | Path) -> dict:
    """Share of images whose summary equals the known one (groups matched by group_id and label)."""
    truth = {(row["group_id"], row["label"]): row["per_image"] for _, row in read_jsonl(truth_path)}
    hits = total = 0
    for record in records:
        known = truth.get((record["group_id"], record["label"]))
        if known is None:
            continue
        for key, summary in record["per_image"].items():
            total += 1
            hits += summary == known.get(key)
    return {"exact_match": hits / total if total else None, "images_with_truth": total}
