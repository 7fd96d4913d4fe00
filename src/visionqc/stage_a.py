"""Stage-A: per-image summaries for photo groups, batched and chunked.

Input layout: `<root>/<mission>/<group_id>/*.{jpg,jpeg,png}` is a new group, to judge;
`<root>/<mission>/{审核通过,审核不通过}/<group_id>/` is a reviewed group whose folder gives its label
(审核通过 → pass, 审核不通过 → fail). Both may be mixed; a group id under both verdict folders (a
resubmission) is two records keyed (group_id, label).

The work is a list of (group, image) items cut into chunks of whole groups (`plan_chunks`: where a
chunk ends depends on the groups alone, so groups added later rerun only the chunk they land in).
Each chunk is written atomically to its own file in `<chunks_dir>/<fingerprint>/`, named by the
digest of its items: their tickets and the sha256 of each photo. A rerun skips chunks that exist,
so an interrupted run redoes only the missing ones, and a photo replaced in place reruns exactly its
chunk. The folder's fingerprint covers the model and the question, so chunks of another model are
never mixed in. `rank`/`world` split the chunks across processes (chunk i belongs to rank
i % world); once every chunk exists, the merged JSONL is written.

A photo that does not decode gets no summary: its group record lists it under `unreadable`, the
report names it, and Stage-B fails that group closed. It never stops the mission.

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from visionqc.arrow_cache import CacheRef
from visionqc.contract import parse_summary
from visionqc.faults import pause_point
from visionqc.images import fully_decodes
from visionqc.inference import Question
from visionqc.io import read_jsonl, sha256_file, sha256_tree, write_json, write_jsonl
from visionqc.messages import LABEL_FOLDERS, ticket_key
from visionqc.options import options_from
from visionqc.tracking import StageResult, numbers_of

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
UNREADABLE = "unreadable_photo"  # the per-image check of a photo that does not decode: no summary was asked


@dataclass
class StageAOptions:
    prompt: str | dict = "summary"  # a prompt name the cache was built with, or {mission: prompt name}
    batch_size: int = 32
    chunk_size: int = 64  # images per chunk on average (chunks hold whole groups)
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

    def prompt_for(self, mission: str) -> str:
        """The prompt this mission asks: the one name, or the mission's own from the map."""
        if isinstance(self.prompt, str):
            return self.prompt
        if mission not in self.prompt:
            raise ValueError(f"stage_a.prompt names no prompt for mission {mission!r} (it names: "
                             f"{', '.join(sorted(self.prompt))}); add {mission}: <prompt name>")
        return self.prompt[mission]


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


LAYOUT = """Stage-A reads photo groups, one folder of photos (.jpg .jpeg .png) per group:
  {base}/<group>/*.jpg          a new group, to judge
  {base}/审核通过/<group>/*.jpg   a group reviewed pass (judged and scored)
  {base}/审核不通过/<group>/*.jpg a group reviewed fail (judged and scored)"""


def discover_groups(root: str | Path, mission: str) -> tuple[list[dict], list[str]]:
    """Groups of one mission, sorted by (group_id, label); returns (groups, warnings).

    A group under a verdict folder carries its label ("pass" or "fail"); a group folder right under
    the mission is new, with label None. Both may be mixed in one mission.
    """
    base = Path(root) / mission
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: mission folder not found; check stage_a.root and stage_a.missions\n"
                                + LAYOUT.format(base=base))
    groups, warnings = [], []
    for child in sorted(base.iterdir(), key=lambda p: _natural(p.name)):
        if child.name in LABEL_FOLDERS and child.is_dir():
            for group_dir in sorted((p for p in child.iterdir() if p.is_dir()), key=lambda p: _natural(p.name)):
                groups += _group(group_dir, mission, LABEL_FOLDERS[child.name], root, warnings)
        elif child.is_dir():
            groups += _group(child, mission, None, root, warnings)
        elif child.suffix.lower() in IMAGE_SUFFIXES:
            warnings.append(f"{child}: a photo directly in the mission folder, ignored (put each group's photos in "
                            f"{base}/<group>/)")
    groups.sort(key=lambda g: (g["group_id"], g["label"] or ""))
    return groups, warnings


def _group(folder: Path, mission: str, label: str | None, root: str | Path, warnings: list[str]) -> list[dict]:
    """The group a folder holds ([] with a warning when it holds no photo, or links out of the root)."""
    if outside := _outside(folder, root):
        warnings.append(outside)
        return []
    images = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=lambda p: _natural(p.name))
    outside = {p: why for p in images if (why := _outside(p, root))}
    warnings += list(outside.values())
    images = [p for p in images if p not in outside]
    if not images:
        inner = [p.name for p in folder.iterdir() if p.is_dir()][:3]
        hint = f" (it holds folders {', '.join(inner)}: a group is one folder of photos)" if inner else ""
        warnings.append(f"{folder}: no photos, skipped{hint}")
        return []
    return [{"group_id": folder.name, "mission": mission, "label": label, "images": [str(p) for p in images]}]


def no_groups_message(root: str | Path, mission: str, warnings: list[str]) -> str:
    base = Path(root) / mission
    seen = "\n".join(f"  {w}" for w in warnings) or "  (the folder is empty)"
    return f"{base}: no photo groups found.\n{LAYOUT.format(base=base)}\nWhat is there:\n{seen}"


def _outside(path: Path, root: str | Path) -> str:
    """Why a group folder or photo is skipped (a link that leaves stage_a.root), or ""."""
    real = path.resolve()
    if real.is_relative_to(Path(root).resolve()):
        return ""
    return f"{path}: a link to {real}, outside stage_a.root {root}; skipped (copy the photos in to judge them)"


def plan_chunks(groups: list[dict], chunk_size: int) -> list[list[tuple[int, int]]]:
    """Items (group index, image index) cut into chunks of whole groups, about `chunk_size` images each.

    A chunk ends after a group whose key hashes below (its photos / chunk_size), a choice made by that
    group alone. So a group added later changes only the chunk it lands in (or splits it in two, when
    it ends a chunk itself); every other chunk keeps its items, its name and its answers.
    """
    chunks, current = [], []
    for g, group in enumerate(groups):
        current += [(g, i) for i in range(len(group["images"]))]
        draw = int.from_bytes(hashlib.sha256(ticket_key(group).encode()).digest()[:8], "big") / 2**64
        if draw < len(group["images"]) / chunk_size:
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
    """Each chunk's file name: the digest of its items (ticket, image number, photo sha256)."""
    photos = {path: sha256_file(path) for group in groups for path in group["images"]}
    names = []
    for chunk in chunks:
        items = [[ticket_key(groups[g]), i + 1, photos[groups[g]["images"][i]]] for g, i in chunk]
        digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]
        names.append(f"chunk-{digest}.jsonl")
    return names


def run_stage_a(root: str | Path, mission: str, model_dir: str | Path, cache: str | Path, *, summaries_out: str | Path | None,
                report_out: str | Path, chunks_dir: str | Path, truth: str | Path | None = None, options: dict | None = None,
                device: str = "auto", rank: int = 0, world: int = 1, generator=None, barrier=None, reporter: bool = True,
                log_metrics=None) -> StageResult | None:
    """Summarise every image of a mission's groups; write `summaries_out` (once every chunk exists) and `report_out`.

    Without `summaries_out` the call is one shard of the mission (`stage_a.shards`, a Snakemake job of its own): it
    generates its chunks (those of rank `rank` of `world`) and reports, and a later call with `summaries_out` merges.

    With `barrier` (ranks started together, e.g. by torchrun), every rank waits there after its
    chunks and the `reporter` (the job's first rank) merges and reports; the other ranks return None. A valid rate below
    `min_valid_rate` raises ValueError after `log_metrics` (when given) has the report's numbers.
    """
    opts = StageAOptions.from_dict(dict(options or {}))
    question = Question.from_cache(CacheRef.read(cache), opts.prompt_for(mission), f"stage_a.prompt ({mission})")
    groups, warnings = discover_groups(root, mission)
    if not groups:
        raise ValueError(no_groups_message(root, mission, warnings))
    for warning in warnings:
        print(f"stage_a: {warning}", file=sys.stderr)
    chunks = plan_chunks(groups, opts.chunk_size)
    folder = Path(chunks_dir) / fingerprint(model_dir, opts, question)
    files = [folder / name for name in chunk_names(groups, chunks)]
    mine = [i for i in range(len(chunks)) if i % world == rank and not files[i].exists()]
    generated, seconds = 0, 0.0
    if mine:
        if generator is None:
            from visionqc.inference import Generator

            generator = Generator(model_dir, device, question.budget, opts.max_new_tokens)
        for index in tqdm(mine, desc=f"stage_a {mission} rank {rank}", unit="chunk"):
            unreadable = {item: why for item in chunks[index] if (why := photo_problem(groups[item[0]]["images"][item[1]]))}
            rows = {(g, i): {"key": ticket_key(groups[g]), "image": i + 1, "summary": "", "unreadable": why}
                    for (g, i), why in unreadable.items()}
            readable = [item for item in chunks[index] if item not in unreadable]
            for batch in batches(readable, opts.mode, opts.batch_size):
                requests = [{"images": [groups[g]["images"][i]], "prompt": question.prompt} for g, i in batch]
                start = time.perf_counter()
                answers = generator.generate(requests)
                seconds += time.perf_counter() - start
                generated += len(batch)
                rows.update({(g, i): {"key": ticket_key(groups[g]), "image": i + 1, "summary": answer}
                             for (g, i), answer in zip(batch, answers, strict=True)})
            write_jsonl(files[index], [rows[item] for item in chunks[index]])
            pause_point(f"stage_a:chunk-{index}")
    if barrier is not None:
        barrier()
        if not reporter:
            return None
    done = sum(file.exists() for file in files)
    report = {"mission": mission, "prompt": opts.prompt_for(mission), "groups": len(groups), "new_groups": sum(g["label"] is None for g in groups), "images": sum(len(g["images"]) for g in groups),
              "chunks": len(chunks), "chunks_done": done, "chunks_run": len(mine), "images_generated": generated,
              "generation_seconds": round(seconds, 3), "images_per_second": round(generated / seconds, 3) if seconds else None,
              "warnings": warnings, "rank": rank, "world": world, "merged": False}
    if done == len(chunks) and summaries_out:
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


def photo_problem(path: str) -> str:
    """Why a photo cannot be read ("" when it decodes), so that its group is judged without it."""
    try:
        fully_decodes(path)
    except Exception as exc:  # PIL raises many types for broken files
        return f"{Path(path).name} does not decode: {exc}"
    return ""


def merge_chunks(groups: list[dict], files: list[Path], root: str | Path) -> list[dict]:
    """Join chunk files into one record per group, with strict checks."""
    summaries: dict[str, dict[int, str]] = {}
    unreadable: dict[str, dict[str, str]] = {}
    for file in files:
        for _, row in read_jsonl(file):
            summaries.setdefault(row["key"], {})[row["image"]] = row["summary"]
            if row.get("unreadable"):
                unreadable.setdefault(row["key"], {})[f"image_{row['image']}"] = row["unreadable"]
    merged = []
    for group in groups:
        key = ticket_key(group)
        got = summaries.get(key, {})
        expected = list(range(1, len(group["images"]) + 1))
        if sorted(got) != expected:
            raise ValueError(f"{key}: chunks hold images {sorted(got)}, expected {expected}; delete {files[0].parent} and rerun")
        lost = unreadable.get(key, {})
        checks = {f"image_{n}": UNREADABLE if f"image_{n}" in lost else parse_summary(got[n]).problem or "valid"
                  for n in expected}
        merged.append({
            "group_id": group["group_id"], "mission": group["mission"], "label": group["label"],
            "images": [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p for p in group["images"]],
            "per_image": {f"image_{n}": got[n] for n in expected},
            "per_image_check": checks,
            "summaries_valid": all(check == "valid" for check in checks.values()),
            "unreadable": lost,
        })
    return merged


EXAMPLES = 5


def contract_report(records: list[dict]) -> dict:
    """Valid rate over readable images, invalid images per problem, groups with an invalid summary, a few
    examples, and the unreadable photos (left out of the valid rate: they say nothing about the model)."""
    problems: dict[str, int] = {}
    examples, images, unreadable = [], 0, []
    for record in records:
        for image, check in record["per_image_check"].items():
            if check == UNREADABLE:
                unreadable.append({"group": ticket_key(record), "image": image, "why": record["unreadable"][image]})
                continue
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
            "invalid_examples": examples, "unreadable_photos": unreadable}


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
