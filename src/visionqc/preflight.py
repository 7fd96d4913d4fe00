"""Pre-flight checks of a training run: what would waste GPU hours is refused before the first step.

Each check returns problems as text that says what is wrong and what to do; train raises them all at once.
- `base_files`: the base folder holds the tokenizer and processor files that merge and Stage-A will need;
- `lengths`: the recipe's max_length is not below the longest cached sample;
- `vision_tokens`: a row with images has one vision block per image, holding exactly the grid's tokens;
- `grids_now`: every cached image grid equals what the processor's resize rule makes from the image today;
- `trainable_modules`: every LoRA `target_modules` / `modules_to_save` pattern matches a module of the model; a
  LoRA recipe does not ask for fully trained weights through `trainable_parameters` (swift ignores it under LoRA),
  and no weight trains fully outside `modules_to_save` (the adapter would not save it, so merge would lose it).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visionqc.vision import HeaderGrids

# merge and Stage-A load the processor from the trained folder, which copies these from the base (the cache
# encodes with tokenizer.json too)
TOKENIZER_FILES = ("tokenizer.json",)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
SHOWN = 5  # examples per problem


def base_files(model_dir: str | Path) -> list[str]:
    folder = Path(model_dir)
    problems = []
    for kind, names in (("tokenizer", TOKENIZER_FILES), ("image processor", PROCESSOR_FILES)):
        if not any((folder / name).exists() for name in names):
            problems.append(f"the base {folder} has no {kind} file ({' or '.join(names)}); merge and Stage-A load it "
                            "from the trained folder, which copies it from the base: copy it from the original checkpoint")
    if not any((folder / name).exists() for name in TEMPLATE_FILES):
        problems.append(f"the base {folder} has no chat template ({' or '.join(TEMPLATE_FILES)}); copy it from the original checkpoint")
    return problems


def lengths(max_length: int | None, tables: dict[str, pa.Table]) -> list[str]:
    if not max_length:
        return []
    problems = []
    for name, table in tables.items():
        longest = pc.max(table.column("length")).as_py() or 0
        if longest > max_length:
            over = pc.sum(pc.greater(table.column("length"), max_length)).as_py()
            problems.append(f"the recipe's max_length {max_length} is below the longest sample of {name} ({longest} tokens; "
                            f"{over} samples longer): raise max_length to {longest} or more, or cache with a smaller "
                            "cache.max_length (model.image_max_tokens shortens image samples)")
    return problems


def _row_counts(table: pa.Table, token: int) -> np.ndarray:
    """How many times `token` occurs in each row's input_ids."""
    ids = table.column("input_ids").combine_chunks()
    flat = ids.flatten().to_numpy(zero_copy_only=False)
    offsets = ids.offsets.to_numpy()
    hits = np.concatenate([[0], np.cumsum(flat == token)])
    return hits[offsets[1:]] - hits[offsets[:-1]]


def vision_tokens(tables: dict[str, pa.Table], vision_start: int, image_pad: int, merge: int) -> list[str]:
    problems = []
    for name, table in tables.items():
        starts, pads = _row_counts(table, vision_start), _row_counts(table, image_pad)
        images = pc.list_value_length(table.column("images")).to_numpy(zero_copy_only=False)
        grids = table.column("image_grid_thw").to_pylist()
        expected = np.array([sum(t * h * w for t, h, w in grid) // merge**2 for grid in grids], dtype=np.int64)
        lines = table.column("line").to_numpy()
        wrong = np.flatnonzero((starts != images) | (pads != expected))
        if len(wrong):
            shown = ", ".join(f"line {lines[i]}: {images[i]} images, {starts[i]} vision blocks, {pads[i]} image tokens "
                              f"(the grid needs {expected[i]})" for i in wrong[:SHOWN])
            problems.append(f"{name}: {len(wrong)} samples whose image tokens do not match their images ({shown}); "
                            "rebuild the cache with the same model folder the run trains")
    return problems


def grids_now(tables: dict[str, pa.Table], grids: HeaderGrids) -> list[str]:
    problems = []
    for name, table in tables.items():
        wrong = []
        for line, paths, cached in zip(table.column("line").to_pylist(), table.column("images").to_pylist(),
                                       table.column("image_grid_thw").to_pylist(), strict=True):
            for path, grid in zip(paths, cached, strict=True):
                try:
                    now = grids(path)
                except OSError as exc:
                    wrong.append(f"line {line}: {path} cannot be read ({exc})")
                    continue
                if list(grid) != now:
                    wrong.append(f"line {line}: {path} was cached as grid {list(grid)}, the processor now makes {now}")
        if wrong:
            problems.append(f"{name}: {len(wrong)} images changed since caching ({'; '.join(wrong[:SHOWN])}); "
                            "rerun cache_tokens (snakemake --forcerun cache_tokens)")
    return problems


def _patterns(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def trainable_modules(arguments: dict, module_names: list[str], trained: list[str] = ()) -> list[str]:
    """LoRA target patterns and modules_to_save entries that name no module (PEFT would train without them), and
    weights that train fully (`trained`: names of parameters that require grad) outside LoRA and modules_to_save."""
    if arguments.get("tuner_type", "lora") != "lora":
        return []
    problems = []
    for key in ("trainable_parameters", "trainable_parameters_regex"):
        if arguments.get(key):  # ms-swift 4.6 applies them to full fine-tuning only
            problems.append(f"the recipe sets {key} {arguments[key]!r}, which ms-swift ignores under LoRA: those weights "
                            "would stay frozen; list their modules in modules_to_save to train them fully")
    unsaved = [name for name in trained if "lora_" not in name and "modules_to_save" not in name]
    if unsaved:
        modules = sorted({name.rsplit(".", 1)[0] for name in unsaved})
        problems.append(f"{len(unsaved)} weights train fully but the LoRA adapter will not save them "
                        f"({', '.join(modules[:SHOWN])}{', …' if len(modules) > SHOWN else ''}); add their modules to "
                        "modules_to_save, or drop them from trainable_parameters")
    leaves = {name.rsplit(".", 1)[-1] for name in module_names}
    for key in ("target_modules", "modules_to_save"):
        for pattern in _patterns(arguments.get(key)):
            if pattern.startswith("all-") or pattern in leaves:
                continue  # swift's all-linear/all-embedding/…, or a module name PEFT matches by suffix
            try:
                found = any(re.fullmatch(pattern, name) for name in module_names)
            except re.error as exc:
                problems.append(f"the recipe's {key} entry {pattern!r} is neither a module name nor a valid regex ({exc})")
                continue
            if not found:
                close = sorted(n for n in leaves if pattern.lower() in n.lower() or n.lower() in pattern.lower())[:SHOWN]
                hint = f" (modules with similar names: {', '.join(close)})" if close else ""
                problems.append(f"the recipe's {key} entry {pattern!r} matches no module of the model{hint}; "
                                f"with LoRA, a module trained fully must be listed in modules_to_save by a name it has")
    return problems
