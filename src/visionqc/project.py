"""`visionqc init DIR`: a team's own project folder, running the installed workflow on its own config.

The folder holds what is the team's: `config/config.yaml` (no demo inside), `config/recipes/`, `config/guidance/`,
and the `local` and `slurm` profiles. Its Snakefile includes the installed workflow's Snakefile by path, as
snakedeploy's does, so an upgrade of VisionQC is an upgrade of every project. It is an `include:`, not a `module`:
Snakemake runs only the main Snakefile's onstart/onsuccess handlers, which open and close the pipeline's MLflow run.

`--dataset NAME=FORMAT:PATH` scans the export with the converter (into a temporary folder) and writes the taxonomy
of the categories it holds, with their counts, for the team to edit.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import visionqc

NAME = re.compile(r"^[A-Za-z0-9_-]+$")
IMAGE_FORMATS = ("platform", "labelme", "coco", "cvat", "label_studio", "yolo", "voc")
PHOTO_LAYOUT = ("it should hold <mission>/<group>/*.jpg (new groups, to judge) or <mission>/{审核通过,审核不通过}/<group>/*.jpg "
                "(reviewed groups, judged and scored)")


def workflow_root() -> Path:
    """The folder holding the installed workflow's Snakefile, rules/ and profiles (the source checkout)."""
    root = Path(visionqc.__file__).resolve().parents[2]
    if not (root / "Snakefile").is_file() or not (root / "rules").is_dir():
        raise FileNotFoundError(f"no VisionQC workflow beside the installed package (looked in {root}); install VisionQC "
                                "from its source checkout (pip install -e <checkout>) so that its Snakefile is there")
    return root


@dataclass
class DatasetScan:
    """What init found in one export: its categories (with attribute keys) and what convert would report."""

    name: str
    format: str
    path: str
    categories: Counter = field(default_factory=Counter)
    attributes: dict[str, set] = field(default_factory=dict)
    records: int = 0
    reported: dict[str, int] = field(default_factory=dict)


def parse_dataset(text: str) -> tuple[str, str, str]:
    """NAME=FORMAT:PATH → (name, format, path)."""
    name, _, rest = text.partition("=")
    fmt, _, path = rest.partition(":")
    if not (name and NAME.match(name) and fmt and path):
        raise ValueError(f"--dataset {text!r}: write NAME=FORMAT:PATH, e.g. street=cvat:/data/exports/street "
                         f"(NAME of letters, digits, _ and -; FORMAT one of {', '.join(IMAGE_FORMATS)})")
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"--dataset {text!r}: format {fmt!r} is not an image export format; choose one of {', '.join(IMAGE_FORMATS)}")
    return name, fmt, path


def scan_dataset(name: str, fmt: str, path: str) -> DatasetScan:
    """Convert the export into a temporary folder and count what came out: the categories, the reported shapes."""
    from visionqc.contract import desc_attributes, desc_category
    from visionqc.convert import convert
    from visionqc.convert.common import ConvertOutputs
    from visionqc.io import read_jsonl

    scan = DatasetScan(name, fmt, path)
    with tempfile.TemporaryDirectory(prefix="visionqc-init-") as scratch:
        folder = Path(scratch)
        outputs = ConvertOutputs(folder / "train.jsonl", folder / "val.jsonl", folder / "report.json", folder / "images")
        result = convert(fmt, path, outputs, {"overlays": 0})
        for split in (outputs.train, outputs.val):
            for _, record in read_jsonl(split):
                scan.records += 1
                for obj in record.get("objects", []):
                    category = desc_category(obj["desc"])
                    scan.categories[category] += 1
                    scan.attributes.setdefault(category, set()).update(desc_attributes(obj["desc"]))
        scan.reported = result.report.get("issues_by_reason", {})
    return scan


def missions_under(photos: Path) -> list[str]:
    """The missions of a photo-group root: its subfolders."""
    if not photos.is_dir():
        raise FileNotFoundError(f"--photos {photos}: no such folder; {PHOTO_LAYOUT}")
    missions = sorted(entry.name for entry in photos.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not missions:
        raise ValueError(f"--photos {photos}: no mission folders in it; {PHOTO_LAYOUT}")
    return missions


def _flow(value) -> str:
    """A YAML value on one line."""
    return yaml.safe_dump([value], default_flow_style=True, allow_unicode=True, width=1 << 16).strip()[1:-1]


def render_config(scans: list[DatasetScan], *, run: str, model: str, photos: str, missions: list[str]) -> str:
    """The project's config/config.yaml: the team's datasets, taxonomy, fusion, one run, Stage-A/B; no demo."""
    lines = ["# A VisionQC project. Every key is described in the workflow's config/README.md; what is not here takes",
             "# the schema's default. Run from this folder:  snakemake --profile profiles/local", "",
             "# Annotation exports to convert; each key names a dataset in results/ paths and in fusion.", "datasets:"]
    for scan in scans:
        lines.append(f"  {scan.name}: {_flow({'format': scan.format, 'path': scan.path})}")
    lines += ["", "# The categories answers may contain. init found these in the exports (objects per category); rename,",
              "# merge or drop what you will not train, and map export names onto them with convert.label_map.",
              "# attributes: the keys a category's desc may carry (类别=<name>,key=value).", "taxonomy:",
              "  categories:"]
    totals = Counter()
    for scan in scans:
        totals.update(scan.categories)
    for category in sorted(totals):
        attributes = sorted(set().union(*(scan.attributes.get(category, set()) for scan in scans)))
        where = ", ".join(f"{scan.categories[category]} in {scan.name}" for scan in scans if scan.categories[category])
        lines.append(f"    {_flow(category)}: {_flow({'attributes': attributes})}  # {where}")
    if not totals:
        lines.append("    {}")
    lines += ["  # A class in an export that is no category and not mapped: report (its shapes are reported as",
              "  # unknown_category) or refuse (convert stops, naming every such class).", "  unknown: report", "",
              "# Options of every converter; label_map: export class name → category (null reports the class).",
              "convert:", "  label_map: {}", "",
              "# The prompts fusion, Stage-A and eval_dense ask; {categories} is the taxonomy's category names.",
              "prompts:", '  dense: "找出图中的{categories}，按图片输出JSON，坐标归一化到0-1000。"',
              '  summary: "统计图中各类别的数量，输出一行JSON。"', "",
              "# How the datasets mix into the training data: every dataset, asked for its summary (what Stage-A asks).",
              "# mode: dense trains every object's category and geometry instead.",
              "fusion:", f"  name: {run}", "  targets:"]
    for scan in scans:
        lines.append(f"    - {_flow({'dataset': scan.name, 'ratio': 1.0, 'mode': 'summary', 'prompt': 'summary'})}")
    lines += ["", "# The base model: a Qwen3-VL checkpoint folder (empty: a tiny random model, to try the pipeline).",
              "model:", f"  path: {_flow(model)}", "",
              "# Training runs (results/train/<run>/), each an ms-swift recipe (any SftArguments key).",
              "train:", "  runs:", f"    {run}: {{recipe: config/recipes/{run}.yaml}}", ""]
    lines += ["# Stage-A summarises every photo of each mission's groups, Stage-B judges each group with",
              "# config/guidance/<mission>.txt. root holds <mission>/<group>/*.jpg, new groups to judge, and",
              "# <mission>/{审核通过,审核不通过}/<group>/*.jpg, reviewed groups that are judged and scored.",
              "# prompt: one prompt name, or {mission: prompt name} when missions ask different questions.",
              "stage_a:", f"  root: {_flow(photos)}", f"  missions: {_flow(missions)}", f"  run: {run if missions else _flow('')}",
              "", "# Dense answers of the run on the fusion's held-out records ([] turns it off).",
              "eval_dense:", "  runs: []", ""]
    return "\n".join(lines) + "\n"


SNAKEFILE = """\
# A VisionQC project, made by `visionqc init`: the installed workflow, run on this folder's config/config.yaml.
# Run it from this folder:  snakemake --profile profiles/local   (on a Slurm cluster: --profile profiles/slurm)
include: {snakefile!r}


# `include:` keeps this file's default target: the workflow's own `all`.
rule project:
    default_target: True
    input:
        rules.all.input,
"""

GUIDANCE = """\
每张照片都必须能看到至少一个{category}。
任何一张照片不满足以上要求，整组判为不通过。
"""


def init_project(folder: str | Path, datasets: list[str], *, photos: str = "", model: str = "", run: str = "main") -> dict:
    """Write the project folder; refuse to overwrite any file that is there. Returns what was written."""
    folder = Path(folder)
    root = workflow_root()
    if not NAME.match(run):
        raise ValueError(f"--run {run!r}: a run name is letters, digits, _ and -")
    parsed = [parse_dataset(text) for text in datasets]
    names = [name for name, _, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"--dataset names repeat: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}")
    if not parsed:
        raise ValueError("name at least one export: --dataset NAME=FORMAT:PATH (e.g. street=cvat:/data/exports/street)")
    missions = missions_under(Path(photos)) if photos else []
    files = {"Snakefile": SNAKEFILE.format(snakefile=str(root / "Snakefile")),
             "config/config.yaml": None,
             f"config/recipes/{run}.yaml": (root / "config/recipes/lora.yaml").read_text("utf-8"),
             "profiles/local/config.yaml": (root / "workflow/profiles/local/config.yaml").read_text("utf-8"),
             "profiles/slurm/config.yaml": (root / "workflow/profiles/slurm/config.yaml").read_text("utf-8")}
    for mission in missions:
        files[f"config/guidance/{mission}.txt"] = None
    there = [name for name in files if (folder / name).exists()]
    if there:
        raise FileExistsError(f"{folder}: {', '.join(there)} already there; init never overwrites a file (move them, "
                              "or init another folder)")
    scans = [scan_dataset(name, fmt, str(Path(path).absolute())) for name, fmt, path in parsed]
    files["config/config.yaml"] = render_config(scans, run=run, model=str(Path(model).absolute()) if model else "",
                                                photos=str(Path(photos).absolute()) if photos else "", missions=missions)
    first = max(sum((scan.categories for scan in scans), Counter()).items(), key=lambda item: item[1], default=("目标", 0))[0]
    for mission in missions:
        files[f"config/guidance/{mission}.txt"] = GUIDANCE.format(category=first)
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
    return {"folder": str(folder), "files": sorted(files), "scans": scans}


def print_summary(made: dict) -> None:
    print(f"wrote {made['folder']}/: {', '.join(made['files'])}")
    for scan in made["scans"]:
        found = ", ".join(f"{name} {count}" for name, count in scan.categories.most_common())
        print(f"  {scan.name} ({scan.format}): {scan.records} records; categories: {found or 'none'}")
        if scan.reported:
            print(f"    reported by convert: {', '.join(f'{reason} {n}' for reason, n in scan.reported.items())}")
    print(f"next: edit {made['folder']}/config/config.yaml (taxonomy, prompts), then\n"
          f"  cd {made['folder']} && snakemake --profile profiles/local")
