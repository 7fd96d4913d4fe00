"""Config mistakes found before any job runs, every one at once: a line each, naming the key, the bad value and the
closest valid name.

rules/common.smk calls these on every invocation, dry runs included, and prints the lines without a traceback:
- `check_schema`: the config against workflow/schemas/config.schema.yaml (unknown keys, wrong types, bad values);
- `check_references`: every path the config names exists or is made by a rule, every prompt asked is defined (and
  its {categories} has a taxonomy), every label_map target is a category, and every recipe key is a field of the
  installed ms-swift's SftArguments (RLHFArguments for GKD).
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import jsonschema
import yaml

from visionqc.io import atomic_write


class ConfigError(ValueError):
    """Config mistakes, one per line of the message."""


def _closest(value: str, candidates) -> str:
    close = difflib.get_close_matches(value, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _key(path) -> str:
    parts = []
    for part in path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}" if parts else str(part))
    return "".join(parts)


def check_schema(config: dict, schema: dict | str | Path) -> None:
    """Every schema violation, one line each (Snakemake's own message prints the whole schema)."""
    if not isinstance(schema, dict):
        schema = yaml.safe_load(Path(schema).read_text("utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    problems = []
    for error in errors:
        where = _key(error.absolute_path)
        known = error.schema.get("properties", {})
        unknown = sorted(set(error.instance) - set(known)) if error.validator == "additionalProperties" and isinstance(error.instance, dict) else []
        if unknown:
            prefix = f"{where}." if where else ""
            full_names = [f"{prefix}{name}" for name in known]
            problems += [f"config key {prefix}{name} is unknown{_closest(prefix + name, full_names)} (see config/README.md)"
                         for name in unknown]
        else:
            problems.append(f"config key {where or '<top>'}: {error.message} (see config/README.md)")
    raise_all(problems)


def raise_all(problems: list[str]) -> None:
    """One ConfigError holding every problem found, one per line."""
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


def _path_hint(path: str, produced_paths: list[str]) -> str:
    """The closest existing sibling or produced path to a path that is neither."""
    parent = Path(path).parent
    siblings = [str(parent / name) for name in os.listdir(parent)] if parent.is_dir() else []
    return _closest(path, siblings + produced_paths)


def configured_paths(config: dict) -> Iterator[tuple[str, str]]:
    """(config key, path) of every file or folder the config names that must exist."""
    for name, spec in sorted(config["datasets"].items()):
        for field in ("path", "images", "signals"):
            if spec.get(field):
                yield f"datasets.{name}.{field}", spec[field]
    for run, spec in sorted(config["train"]["runs"].items()):
        yield f"train.runs.{run}.recipe", spec["recipe"]
        if spec.get("teacher") and spec["teacher"] not in config["train"]["runs"]:
            yield f"train.runs.{run}.teacher", spec["teacher"]
    for run, spec in sorted(config.get("post_train", {}).get("runs", {}).items()):
        yield f"post_train.runs.{run}.recipe", spec["recipe"]
    if config["stage_a"]["missions"]:  # stage_b.guidance is Stage-B's input: Stage-A alone runs without it
        yield "stage_a.root", config["stage_a"]["root"]
        if config["stage_a"].get("truth"):
            yield "stage_a.truth", config["stage_a"]["truth"]
    if "demo" in config:
        yield "demo.guidance", config["demo"]["guidance"]
    if config["model"].get("path"):
        yield "model.path", config["model"]["path"]
    if config["timeseries"].get("base"):
        yield "timeseries.base", config["timeseries"]["base"]
    for dataset, truth in sorted(config.get("qa_labels", {}).get("truth", {}).items()):
        yield f"qa_labels.truth.{dataset}", truth


def check_paths(config: dict, produced: Callable[[str], bool], produced_paths: list[str]) -> None:
    raise_all([f"config key {key}: {path} does not exist and no rule makes it{_path_hint(path, produced_paths)}"
               for key, path in configured_paths(config) if not os.path.exists(path) and not produced(path)])


FOLDER_FIELDS = {"images": ("coco", "cvat", "label_studio", "labelme"), "signals": ("signals",)}


def check_datasets(config: dict) -> None:
    """A dataset's images/signals folder only where its format reads one."""
    problems: list[str] = []
    for name, spec in sorted(config["datasets"].items()):
        for field, formats in FOLDER_FIELDS.items():
            if spec.get(field) and spec["format"] not in formats:
                problems.append(f"config key datasets.{name}.{field}: format {spec['format']} does not read a separate "
                                f"{field} folder (only {', '.join(formats)} do); remove it")
    raise_all(problems)


MISSING_PROMPT = "\0"  # a mission the stage_a.prompt map leaves out


def _entry_prompts(entry: dict) -> list[str | None]:
    """The prompts a fusion entry asks: its own, else its mode's (a mixed entry both; chat records carry theirs)."""
    if entry.get("prompt"):
        return [entry["prompt"]]
    mode = entry.get("mode", "dense")
    return {"chat": [None], "mixed": ["dense", "summary"]}.get(mode, [mode])


def prompt_uses(config: dict) -> list[tuple[str, str | None]]:
    """(config key, prompt name) of every prompt the pipeline asks; None for chat records (their own messages)."""
    uses = [(f"fusion.{group}[{i}].prompt", name)
            for group in ("targets", "sources") for i, entry in enumerate(config["fusion"].get(group, []))
            for name in _entry_prompts(entry)]
    prompt = config["stage_a"].get("prompt", "summary")
    for mission in config["stage_a"].get("missions", []):
        if isinstance(prompt, str):
            uses.append(("stage_a.prompt", prompt))
        else:
            uses.append((f"stage_a.prompt.{mission}", prompt.get(mission, MISSING_PROMPT)))
    if config.get("eval_dense", {}).get("runs"):
        uses.append(("eval_dense.prompt", config["eval_dense"].get("prompt")))
    qa = config.get("qa_labels", {})
    if qa.get("datasets"):
        uses.append(("qa_labels.prompt", qa.get("prompt") or qa.get("mode")))
    return list(dict.fromkeys(uses))


def check_prompts(config: dict) -> None:
    problems: list[str] = []
    defined = config["prompts"]
    for key, name in prompt_uses(config):
        if name == MISSING_PROMPT:
            problems.append(f"config key {key}: stage_a.prompt maps missions to prompts, but not this mission; "
                            f"add it (prompts: {', '.join(sorted(defined))})")
        elif name is not None and name not in defined:
            problems.append(f"config key {key}: prompt {name!r} is not defined under prompts{_closest(name, defined)} "
                            f"(defined: {', '.join(sorted(defined))})")
    raise_all(problems)


def check_runs(config: dict) -> None:
    """stage_a.run and eval_dense.runs name a run (supervised or GRPO); every base names a run of train.runs."""
    problems: list[str] = []
    runs = config["train"]["runs"]
    post_runs = config.get("post_train", {}).get("runs", {})
    for run in sorted(set(runs) & set(post_runs)):
        problems.append(f"config key post_train.runs.{run}: {run!r} is also a run under train.runs; "
                        "give the GRPO run its own name (both are merged into results/merge/<run>/)")
    deployable = {**runs, **post_runs}
    if config["stage_a"]["missions"] and not config["stage_a"].get("run"):
        problems.append("config key stage_a.run: Stage-A needs the training run whose merged model answers; name one "
                        f"of {', '.join(sorted(deployable)) or 'the runs under train.runs (there are none yet)'}")
    uses = [("stage_a.run", config["stage_a"].get("run"), deployable)]
    uses += [(f"eval_dense.runs[{i}]", name, deployable) for i, name in enumerate(config.get("eval_dense", {}).get("runs", []))]
    uses += [(f"train.runs.{run}.base", spec.get("base"), runs) for run, spec in runs.items()]
    uses += [(f"post_train.runs.{run}.base", spec.get("base"), runs) for run, spec in post_runs.items()]
    for key, name, known in uses:
        if name and name not in known:
            where = "train.runs or post_train.runs" if known is deployable else "train.runs"
            problems.append(f"config key {key}: {name!r} is not a run under {where}{_closest(name, known)} "
                            f"(runs: {', '.join(sorted(known))})")
    for run, spec in sorted(runs.items()):
        if spec.get("teacher") == run:
            problems.append(f"config key train.runs.{run}.teacher: a run cannot teach itself; name another run, "
                            "a model folder, or leave it empty for the run's base")
    raise_all(problems)


def _cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "visionqc"


def swift_fields() -> dict[str, frozenset[str]] | None:
    """Field names of the installed ms-swift's SftArguments ("sft") and RLHFArguments ("rlhf"), cached per
    ms-swift version; None without ms-swift.

    Importing swift takes seconds, so the lists are computed once per version, in a child process.
    """
    try:
        version = metadata.version("ms-swift")
    except metadata.PackageNotFoundError:
        return None
    cached = _cache_folder() / f"ms-swift-{version}-argument-fields.json"
    if cached.is_file():
        return {kind: frozenset(names) for kind, names in json.loads(cached.read_text()).items()}
    script = ("import dataclasses, json; from swift.arguments import RLHFArguments, SftArguments; "
              "print(json.dumps({kind: sorted(f.name for f in dataclasses.fields(cls)) "
              "for kind, cls in (('sft', SftArguments), ('rlhf', RLHFArguments))}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    names = json.loads(result.stdout.strip().splitlines()[-1])
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(cached) as handle:
        handle.write(json.dumps(names))
    return {kind: frozenset(fields) for kind, fields in names.items()}


# Recipe keys that are ours, not ms-swift's: train reads them and never passes them to ms-swift's arguments.
RECIPE_EXTENSIONS = {
    "save_delay_steps": "no checkpoint is saved before this step (the last step always saves)",
    "logits_at_labels": "the LM head computes only the rows whose next token is a label (default true; false: ms-swift's rows)",
    "llm_kd_weight": "GKD: the weight of the logit JSD term (0 turns it off)",
    "visual_kd": "GKD: {vit, aligner, deepstack: weights, distance: mse|cosine} between student and teacher vision features",
}


def check_recipes(config: dict, fields: dict[str, frozenset[str]] | None) -> None:
    if fields is None:
        print("visionqc: ms-swift is not importable here; recipe keys are checked when train runs", file=sys.stderr)
        return
    problems: list[str] = []
    version = metadata.version("ms-swift")
    for run, spec in sorted(config["train"]["runs"].items()):
        path = spec["recipe"]
        try:
            recipe = _recipe(f"config key train.runs.{run}.recipe", path)
        except ConfigError as error:
            problems.append(str(error))
            continue
        if recipe is None:
            continue
        gkd = recipe.get("rlhf_type") == "gkd"
        if recipe.get("rlhf_type") not in (None, "gkd"):
            problems.append(f"config key train.runs.{run}.recipe: {path} sets rlhf_type: {recipe['rlhf_type']}; "
                            "train_model runs SFT or rlhf_type: gkd (GRPO has its own rule, see docs/stages.md, post_train)")
        if spec.get("teacher") and not gkd:
            problems.append(f"config key train.runs.{run}.teacher: only a GKD recipe (rlhf_type: gkd) has a teacher, "
                            f"and {path} is not one")
        known, kind = (fields["rlhf"], "RLHFArguments") if gkd else (fields["sft"], "SftArguments")
        for key in recipe:
            if key not in known and key not in RECIPE_EXTENSIONS:
                problems.append(f"config key train.runs.{run}.recipe: {path} sets {key}, which is not an argument of "
                                f"ms-swift {version} {kind}{_closest(str(key), known)}")
    raise_all(problems)


def check_post_train_recipes(config: dict, fields: dict[str, frozenset[str]] | None) -> None:
    """A GRPO recipe: RLHFArguments keys only, rlhf_type grpo (or unset), and reward_funcs among ours."""
    from visionqc.rewards import REWARDS

    problems: list[str] = []
    for run, spec in sorted(config.get("post_train", {}).get("runs", {}).items()):
        path, key = spec["recipe"], f"config key post_train.runs.{run}.recipe"
        try:
            recipe = _recipe(key, path)
        except ConfigError as error:
            problems.append(str(error))
            continue
        if recipe is None:
            continue
        if recipe.get("rlhf_type", "grpo") != "grpo":
            problems.append(f"{key}: {path} sets rlhf_type: {recipe['rlhf_type']}; post_train runs grpo")
        funcs = recipe.get("reward_funcs") or []
        unknown = [name for name in funcs if name not in REWARDS]
        if unknown or not funcs:
            problems.append(f"{key}: {path} needs reward_funcs among {', '.join(REWARDS)}"
                            f"{f' (unknown: {unknown[0]}{_closest(str(unknown[0]), REWARDS)})' if unknown else ''}")
        if fields is not None:
            for name in recipe:
                if name not in fields["rlhf"]:
                    problems.append(f"{key}: {path} sets {name}, which is not an argument of ms-swift "
                                    f"{metadata.version('ms-swift')} RLHFArguments{_closest(str(name), fields['rlhf'])}")
    raise_all(problems)


def _recipe(key: str, path: str) -> dict | None:
    """A recipe file as a mapping; None when it does not exist (check_paths has spoken, or a rule makes it)."""
    if not os.path.isfile(path):
        return None
    try:
        recipe = yaml.safe_load(Path(path).read_text("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: {path} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(recipe, dict):
        raise ConfigError(f"{key}: {path} must be a mapping of ms-swift arguments")
    return recipe


def check_taxonomy(config: dict) -> None:
    """Prompts asked with {categories} need categories; label_map targets must be categories (when there are any)."""
    from visionqc.taxonomy import CATEGORIES_PLACEHOLDER

    problems: list[str] = []
    categories = (config.get("taxonomy") or {}).get("categories") or {}
    for key, name in prompt_uses(config):
        text = config["prompts"].get(name or "", "")
        if CATEGORIES_PLACEHOLDER in text and not categories:
            problems.append(f"config key prompts.{name}: it uses {CATEGORIES_PLACEHOLDER} (asked by {key}) but "
                            "taxonomy.categories is empty; name the categories under taxonomy:")
    maps = [("convert.label_map", config["convert"].get("label_map") or {})]
    maps += [(f"datasets.{name}.convert.label_map", (spec.get("convert") or {}).get("label_map") or {})
             for name, spec in sorted(config["datasets"].items())]
    for key, mapping in maps:
        for source, target in mapping.items():
            if categories and target is not None and target not in categories:
                problems.append(f"config key {key}.{source}: {target!r} is not in taxonomy.categories"
                                f"{_closest(str(target), categories)}; map onto a category, or null to report the class")
    raise_all(problems)


def check_references(config: dict, produced: Callable[[str], bool], produced_paths: list[str]) -> None:
    """Every check below, every problem of every one reported at once."""
    fields = swift_fields()
    checks = [lambda: check_paths(config, produced, produced_paths), lambda: check_datasets(config),
              lambda: check_prompts(config), lambda: check_taxonomy(config), lambda: check_runs(config),
              lambda: check_recipes(config, fields), lambda: check_post_train_recipes(config, fields)]
    problems: list[str] = []
    for check in checks:
        try:
            check()
        except ConfigError as error:
            problems += str(error).splitlines()
    raise_all(problems)
