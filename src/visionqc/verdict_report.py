"""verdict_report: a mission's verdicts as a page people read, and a CSV.

One row per group: the thumbnails of its photos, each with its Stage-A summary, then the verdict
and its reason; where the group was reviewed, its label and whether the verdict agrees. Groups
judged 不通过 come first, and a checkbox shows only them. The page is static: it opens from the
file, its thumbnails in a folder beside it. The CSV (UTF-8 with a byte-order mark, so spreadsheet
programs read the Chinese text) has the same rows.

Thumbnails show the photos' raw pixels, as the model saw them.
"""

from __future__ import annotations

import csv
import io
import urllib.parse
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image
from tqdm import tqdm

from visionqc.io import atomic_directory, atomic_write, read_jsonl
from visionqc.messages import LABEL_FOLDERS, VERDICT_PASS, ticket_key
from visionqc.tracking import StageResult

THUMBNAIL = 192  # longest side, px
FOLDER_OF = {label: folder for folder, label in LABEL_FOLDERS.items()}
COLUMNS = ("ticket_key", "group_id", "verdict", "reason", "judged_by", "label", "agrees", "photos", "unreadable", "summaries")


def run_verdict_report(summaries: str | Path, verdicts: str | Path, root: str | Path, *, mission: str, page_out: str | Path,
                       table_out: str | Path, thumbnails_out: str | Path) -> StageResult:
    """Write the page, the CSV and the thumbnails folder of one mission."""
    groups = {ticket_key(record): record for _, record in read_jsonl(summaries)}
    rows = [_row(verdict, groups[verdict["ticket_key"]]) for _, verdict in read_jsonl(verdicts)]
    rows.sort(key=lambda row: row["passed"])  # stable: failed groups first, each part in Stage-B's order
    thumbnails_out = Path(thumbnails_out)
    with atomic_directory(thumbnails_out) as work:
        for number, row in enumerate(tqdm(rows, desc=f"thumbnails {mission}", unit="group")):
            for photo in row["photos"]:
                if photo["readable"]:
                    name = f"{number:05d}-{photo['name']}.jpg"
                    _thumbnail(Path(root) / photo["path"], work / name)
                    photo["thumbnail"] = f"{urllib.parse.quote(thumbnails_out.name)}/{name}"
    counts = _counts(rows)
    page = Environment(loader=PackageLoader("visionqc", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = page.get_template("verdict_report.html.j2").render(mission=mission, rows=rows, counts=counts, size=THUMBNAIL)
    with atomic_write(page_out) as handle:
        handle.write(html)
    with atomic_write(table_out, encoding="utf-8-sig") as handle:
        handle.write(_csv(rows))
    return StageResult(report=counts, metrics=dict(counts), artifacts=[page_out, table_out, (thumbnails_out, thumbnails_out.name)],
                       inputs={"summaries": summaries, "verdicts": verdicts}, outputs={"page": page_out, "table": table_out})


def _row(verdict: dict, group: dict) -> dict:
    passed = verdict["verdict"] == VERDICT_PASS
    label = group["label"]
    photos = [{"name": key, "path": path, "summary": group["per_image"][key], "readable": key not in group.get("unreadable", {}),
               "thumbnail": ""}
              for key, path in zip(group["per_image"], group["images"], strict=True)]
    for photo in photos:
        if not photo["readable"]:
            photo["summary"] = group["unreadable"][photo["name"]]
    return {"ticket_key": verdict["ticket_key"], "group_id": group["group_id"], "verdict": verdict["verdict"],
            "reason": verdict["reason"], "judged_by": verdict["judged_by"], "passed": passed,
            "label": FOLDER_OF[label] if label else "", "agrees": None if not label else passed == (label == "pass"),
            "photos": photos}


def _thumbnail(photo: Path, target: Path) -> None:
    with Image.open(photo) as image:
        image.draft("RGB", (THUMBNAIL, THUMBNAIL))
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        image.convert("RGB").save(target, "JPEG", quality=80)


def _counts(rows: list[dict]) -> dict:
    scored = [row for row in rows if row["agrees"] is not None]
    return {"groups": len(rows), "fail": sum(not row["passed"] for row in rows), "pass": sum(row["passed"] for row in rows),
            "unreadable": sum(not all(photo["readable"] for photo in row["photos"]) for row in rows),
            "scored": len(scored), "agree": sum(row["agrees"] for row in scored)}


def _csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        agrees = "" if row["agrees"] is None else ("yes" if row["agrees"] else "no")
        writer.writerow([row["ticket_key"], row["group_id"], row["verdict"], row["reason"], row["judged_by"], row["label"], agrees,
                         ";".join(photo["path"] for photo in row["photos"]),
                         sum(not photo["readable"] for photo in row["photos"]),
                         " | ".join(f"{photo['name']}: {photo['summary']}" for photo in row["photos"])])
    return text.getvalue()
