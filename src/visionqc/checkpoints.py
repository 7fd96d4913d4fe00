"""Resumable checkpoints are complete or invisible.

A job killed while it saves (a Slurm time limit, kill -9) can leave a checkpoint without some of its
files, or with a file cut short. Resuming from it fails every later run. So a checkpoint counts only
when everything a resume reads is there and, where that is cheap, opens: trainer_state.json parses,
every safetensors header reads, every torch pickle's zip directory reads. Otherwise the job falls back
to the one before and logs which one it skipped and why.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from visionqc.io import atomic_directory
from visionqc.launch import launched_rank

WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
# What a trained model folder holds: the weights or adapter of a checkpoint, its config and the processor.
MODEL_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json",
               "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
               "special_tokens_map.json", "additional_config.json", "args.json")


def hf_checkpoint_problem(folder: Path, optimizer: bool = True) -> str | None:
    """Why a transformers `checkpoint-N` folder cannot be resumed from, or None when it can."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text("utf-8"))
    except FileNotFoundError:
        return "trainer_state.json is missing (the save was cut off)"
    except (OSError, ValueError) as exc:
        return f"trainer_state.json does not parse ({exc})"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json has no global_step"
    weights = [folder / name for name in WEIGHTS if (folder / name).exists()]
    if not weights:
        return f"no weights ({' or '.join(WEIGHTS)})"
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return problem
    if optimizer:
        for name in ("optimizer.pt", "scheduler.pt"):
            problem = torch_file_problem(folder / name)
            if problem:
                return problem
    return None


def _safetensors_problem(path: Path) -> str | None:
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text("utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            return f"{path.name} does not parse ({exc})"
        return next((p for p in (_safetensors_problem(path.parent / s) for s in shards) if p), None)
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:  # checks that the data covers what the header lists
            names = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error type for a cut-off file
        return f"{path.name} does not open ({type(exc).__name__}: {exc})"
    return None if names else f"{path.name} holds no tensors"


def torch_file_problem(path: Path) -> str | None:
    """Why a `torch.save` file is unusable: missing, or its zip directory (written last) does not read."""
    if not path.exists():
        return f"{path.name} is missing (the save was cut off)"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{path.name} is cut short or corrupt ({exc})"
    return None


def newest_complete(candidates: list[Path], problem: Callable[[Path], str | None], log=print,
                    remove_skipped: bool = False) -> Path | None:
    """The newest candidate (they come oldest first) without a problem; each one skipped is logged, and removed if asked."""
    for candidate in reversed(candidates):
        reason = problem(candidate)
        if reason is None:
            return candidate
        action = "removed it" if remove_skipped else "left it"
        log(f"skipped checkpoint {candidate}: {reason}; {action}, falling back to the one before")
        if remove_skipped:
            if candidate.is_dir():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
    return None


def checkpoint_folders(folder: Path) -> list[Path]:
    """The `checkpoint-N` folders of a run folder, oldest first."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resumable_checkpoint(run_dir: Path, optimizer: bool = True, log=print) -> Path | None:
    """The newest complete `checkpoint-N` of a run folder. Incomplete ones (a kill during a save) are logged
    and removed (by rank 0 alone under torchrun): transformers would otherwise write into them again, and its
    rotation counts them."""
    problem = functools.partial(hf_checkpoint_problem, optimizer=optimizer)
    return newest_complete(checkpoint_folders(run_dir), problem, log=log, remove_skipped=launched_rank()[0] == 0)


def finished_training(checkpoint: Path) -> bool:
    """Whether a checkpoint holds the run's last step (a rerun after the final save, or after model/ was deleted)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))
    return 0 < int(state.get("max_steps") or 0) <= int(state["global_step"])


def trainer_history(checkpoint: Path) -> list[dict]:
    """The log history a checkpoint's trainer state kept: every entry up to its step."""
    return json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))["log_history"]


def best_checkpoint(run_dir: Path, history: list[dict], metric: str, optimizer: bool = True) -> tuple[Path, int, float]:
    """The complete checkpoint whose step has the best `metric` in the log history: (folder, step, value).

    Lower is better for a metric named like a loss, higher for any other (as transformers' greater_is_better), and
    the earliest of equals wins. A checkpoint without an evaluation at its step cannot be ranked and is passed over.
    """
    name = metric if metric.startswith("eval_") else f"eval_{metric}"
    logged = {int(entry["step"]): entry[name] for entry in history if name in entry and math.isfinite(entry[name])}
    steps = {int(folder.name.split("-")[-1]): folder for folder in checkpoint_folders(run_dir)
             if hf_checkpoint_problem(folder, optimizer) is None}
    ranked = [(logged[step], step) for step in steps if step in logged]
    if not ranked:
        seen = sorted({key for entry in history for key in entry if key.startswith("eval_")})
        raise ValueError(f"select: best found no checkpoint to rank by {name}: checkpoints at steps {sorted(steps)}, "
                         f"{name} logged at steps {sorted(logged)} (eval metrics logged: {', '.join(seen) or 'none'}); "
                         "evaluate where you save (eval_steps equal to save_steps), or name a logged metric")
    lower = "loss" in name
    value, step = min(ranked, key=lambda pair: (pair[0] if lower else -pair[0], pair[1]))  # the earliest of equals
    return steps[step], step, value


def export_model(checkpoint: Path, model_out: str | Path) -> None:
    """The model files of a checkpoint, atomically into `model_out`, the same bytes in every project folder and
    after any resume: adapter target modules sorted, paths inside the project relative to it, no resume path."""
    with atomic_directory(model_out) as work:
        for name in MODEL_FILES:
            if (checkpoint / name).exists():
                shutil.copyfile(checkpoint / name, work / name)  # not copy2: the checkpoint's 0600 stays behind
        if (work / "adapter_config.json").exists():
            sort_target_modules(work / "adapter_config.json")
        for name in ("args.json", "adapter_config.json"):
            if (work / name).exists():
                make_portable(work / name)


def make_portable(path: Path, project: Path | None = None) -> None:
    """Rewrite a JSON file so it names folders inside the project relative to it, and no checkpoint it resumed from."""
    prefix = f"{(project or Path.cwd()).resolve()}/"
    resumed = re.compile(r"resume_from_checkpoint='[^']*'")

    def relative(value):
        if isinstance(value, str):
            return resumed.sub("resume_from_checkpoint=None", value).replace(prefix, "")
        if isinstance(value, list):
            return [relative(item) for item in value]
        if isinstance(value, dict):
            return {key: None if key == "resume_from_checkpoint" else relative(item) for key, item in value.items()}
        return value

    data = json.loads(path.read_text("utf-8"))
    path.write_text(json.dumps(relative(data), ensure_ascii=False, indent=2, sort_keys=True), "utf-8")


ALTERNATION = re.compile(r"\((\w+(?:\|\w+)+)\)")


def sort_target_modules(adapter_config: Path) -> None:
    """Sort the module names in an adapter's `target_modules` in place.

    swift builds the LoRA target regex from a set, so `(k_proj|q_proj|…)` comes out in another order
    in every process; sorted, the same run gives the same bytes. The modules matched do not change.
    """
    config = json.loads(adapter_config.read_text("utf-8"))
    targets = config.get("target_modules")
    if isinstance(targets, str):
        config["target_modules"] = ALTERNATION.sub(lambda m: "(" + "|".join(sorted(m.group(1).split("|"))) + ")", targets)
    elif isinstance(targets, list):
        config["target_modules"] = sorted(targets)
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True), "utf-8")
