import hashlib
import json
import os
import re
import sys

from snakemake.utils import validate

from visionqc.config_check import ConfigError, check_references, check_schema
from visionqc.stages import BY_NAME
from visionqc.tracking import export_tracking_settings


def stop_on_config_errors(check, *arguments):
    """The config's mistakes stop every invocation (dry runs included) before any job: all of them, a line each."""
    try:
        check(*arguments)
    except ConfigError as error:
        problems = str(error).splitlines()
        print(*problems, sep="\n", file=sys.stderr)
        print(
            f"visionqc: {len(problems)} config problem(s); nothing ran (config/README.md describes every key)",
            file=sys.stderr,
        )
        sys.exit(1)


CONFIG_SCHEMA = "../workflow/schemas/config.schema.yaml"
stop_on_config_errors(check_schema, config, workflow.source_path(CONFIG_SCHEMA))
validate(config, schema=CONFIG_SCHEMA)

SPLITS = ["train", "val"]
DATASETS = sorted(config["datasets"])
SIGNAL_DATASETS = [d for d in DATASETS if config["datasets"][d]["format"] == "signals"]
IMAGE_DATASETS = [d for d in DATASETS if d not in SIGNAL_DATASETS]
# Short constraints: Snakemake rescans a constraint's text for every path it fills in, and an alternation
# of every dataset name cost 2 s of planning at 1,000 datasets (bench/plan_datasets.py). NAME is the
# schema's pattern of a dataset name; the image rules take every name but the signal datasets'.
# "(?!)" matches nothing: a rule with no datasets of its kind never applies.
SIGNAL_DATASETS_PATTERN = "|".join(map(re.escape, SIGNAL_DATASETS)) or "(?!)"
NAME = "[A-Za-z0-9_-]+"
IMAGE_DATASETS_PATTERN = (
    f"(?!(?:{SIGNAL_DATASETS_PATTERN})/){NAME}" if SIGNAL_DATASETS else NAME
)
FUSION = config["fusion"]["name"]


wildcard_constraints:
    dataset=NAME,
    split="|".join(SPLITS),
    fusion=FUSION,


def _check_fusion():
    entries = config["fusion"]["targets"] + config["fusion"].get("sources", [])
    unknown = sorted({e["dataset"] for e in entries} - set(DATASETS))
    if unknown:
        raise ValueError(
            f"config fusion names unknown dataset(s) {', '.join(unknown)}; "
            f"add them under datasets: (known: {', '.join(DATASETS)})"
        )


_check_fusion()


def dataset_inputs(wildcards):
    """The export a dataset converts from (plus its COCO image folder or its signal folder)."""
    spec = config["datasets"][wildcards.dataset]
    inputs = {"source": spec["path"]}
    for folder in ("images", "signals"):
        if spec.get(folder):
            inputs[folder] = spec[folder]
    return inputs


def converted_media(wildcards):
    """The folder of converted images, or of copied signals, that a split's records point into."""
    kind = "signals" if wildcards.dataset in SIGNAL_DATASETS else "images"
    return f"results/convert/{wildcards.dataset}/{kind}"


def stage_options(name):
    """The options JSON of a stage: its config block (named in stages.py) without the keys that wire the DAG.

    A function, so that Snakemake leaves braces in the config's text alone (a prompt's {categories}).
    """
    options = json.dumps(
        BY_NAME[name].block(config), ensure_ascii=False, sort_keys=True
    )
    return lambda wildcards: options


def convert_options(wildcards):
    """Common convert options, overridden by the dataset's own convert: block, as JSON."""
    spec = config["datasets"][wildcards.dataset]
    options = BY_NAME["convert"].block(config)
    options.update(spec.get("convert", {}))
    if spec.get("images"):
        fmt = spec["format"]
        options[fmt] = dict(options.get(fmt, {}), images=spec["images"])
    return json.dumps(options, ensure_ascii=False, sort_keys=True)


def fusion_datasets():
    entries = config["fusion"]["targets"] + config["fusion"].get("sources", [])
    return sorted({entry["dataset"] for entry in entries})


def fusion_inputs(wildcards):
    return {
        name: f"results/validate/{name}/{wildcards.split}.clean.jsonl"
        for name in fusion_datasets()
    }


# Stage jobs read the tracking settings from the environment, never from params: changing them reruns nothing.
TRACKING_URI = export_tracking_settings(config["tracking"])


AUGMENT_EPOCHS = config["augment"]["epochs"]


def train_caches():
    """The train split's cache pointers: one per augmented epoch, in epoch order, or the fusion's own."""
    if AUGMENT_EPOCHS:
        return [f"results/cache/{FUSION}.epoch_{k}.json" for k in range(AUGMENT_EPOCHS)]
    return [f"results/cache/{FUSION}.train.json"]


def cache_records(wildcards):
    """The records a cache job encodes: an augmented epoch, or a split of the fusion."""
    if wildcards.part.startswith("epoch_"):
        return f"results/augment/{wildcards.fusion}/{wildcards.part}.jsonl"
    return f"results/fuse/{wildcards.fusion}/{wildcards.part}.jsonl"


def final_outputs():
    outputs = expand(
        "results/validate/{dataset}/{split}.report.json", dataset=DATASETS, split=SPLITS
    )
    outputs += expand(
        "results/fuse/{fusion}/{split}.jsonl", fusion=FUSION, split=SPLITS
    )
    outputs += expand("results/merge/{run}/verification.json", run=RUNS)
    outputs += expand("results/report/{mission}.html", mission=MISSIONS)
    outputs += expand("results/eval_dense/{run}/metrics.json", run=EVAL_DENSE_RUNS)
    outputs += expand("results/qa/{dataset}/report.json", dataset=QA_DATASETS)
    if TS_DATASET:
        outputs.append(f"results/eval_ts/{TS_DATASET}/metrics.json")
    return outputs


onstart:
    if TRACKING_URI:
        Path("results/mlflow").mkdir(parents=True, exist_ok=True)
        Path("results/mlflow/config.json").write_text(
            json.dumps(config, ensure_ascii=False)
        )
        shell("visionqc pipeline start --config results/mlflow/config.json")


onsuccess:
    if TRACKING_URI:
        shell("visionqc pipeline success")


onerror:
    if TRACKING_URI:
        shell("visionqc pipeline error")


DEMO_MODEL = "resources/models/demo"
TRAIN_RUNS = sorted(config["train"]["runs"])
POST_TRAIN_RUNS = sorted(config["post_train"]["runs"])
# every run that merge_adapter merges and Stage-A/B may deploy: supervised runs, then GRPO runs
RUNS = TRAIN_RUNS + POST_TRAIN_RUNS


wildcard_constraints:
    run="|".join(RUNS),


def model_dir():
    """The base checkpoint: config model.path, else the tiny demo model."""
    return config["model"]["path"] or DEMO_MODEL


def run_spec(run):
    return config["train"]["runs"].get(run) or config["post_train"]["runs"][run]


def run_base(wildcards):
    """A run trains on another run's merged model (two-stage, or GRPO after SFT) or on the base checkpoint."""
    base = run_spec(wildcards.run).get("base")
    return f"results/merge/{base}/model" if base else model_dir()


def trained_model(wildcards):
    """What merge_adapter merges: a supervised run's model, or a GRPO run's."""
    stage = "post_train" if wildcards.run in POST_TRAIN_RUNS else "train"
    return f"results/{stage}/{wildcards.run}/model"


def post_train_recipe(wildcards):
    return config["post_train"]["runs"][wildcards.run]["recipe"]


def run_teacher(wildcards):
    """A GKD run's teacher: another run's merged model, or a model folder ([] for the base, or no teacher)."""
    teacher = config["train"]["runs"][wildcards.run].get("teacher")
    if not teacher:
        return []
    return f"results/merge/{teacher}/model" if teacher in TRAIN_RUNS else teacher


def run_recipe(wildcards):
    return config["train"]["runs"][wildcards.run]["recipe"]


def visionqc_command(wildcards, resources):
    """`visionqc`, or torchrun with one process per GPU when the job holds several (DDP, rank shards)."""
    gpus = int(resources.get("gpu", 0))
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m visionqc.cli"
    return "visionqc"


MISSIONS = config["stage_a"]["missions"]
STAGE_A_SHARDS = config["stage_a"]["shards"]


wildcard_constraints:
    mission="|".join(re.escape(m) for m in MISSIONS) or "(?!)",
    rank=r"\d+",


def stage_a_shards(wildcards):
    """The shard jobs' reports, when stage_a.shards splits a mission's chunks over several jobs ([] for one)."""
    if STAGE_A_SHARDS == 1:
        return []
    return expand(
        "results/stage_a/{mission}.shards/{rank}.report.json",
        mission=wildcards.mission,
        rank=range(STAGE_A_SHARDS),
    )


def mission_listing(wildcards):
    """A digest of every file of a mission's folder (name, size, mtime): a photo replaced in place, added or
    removed changes it, and Snakemake's params trigger reruns Stage-A (Snakemake reads only a folder input's
    own mtime). A params value, not 100,000 inputs: those cost 8 s of every plan (bench/scale.py --photos).
    A folder a rule makes (the demo's) is that rule's to renew.
    """
    root = config["stage_a"]["root"]
    if _made_by_a_rule(root):
        return ""
    base = os.path.join(root, wildcards.mission)
    entries = []
    for folder, _, names in os.walk(base):
        for name in names:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            entries.append(
                f"{os.path.relpath(path, base)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
            )
    return hashlib.blake2b(
        "".join(sorted(entries)).encode(), digest_size=16
    ).hexdigest()


EVAL_DENSE_RUNS = config["eval_dense"]["runs"]


QA_DATASETS = config["qa_labels"]["datasets"]


def qa_truth(wildcards):
    """The dataset's file of known label errors (evaluation only), when the config names one."""
    truth = config["qa_labels"]["truth"].get(wildcards.dataset)
    return [truth] if truth else []


def deployed_model():
    """The merged model Stage-A, Stage-B and label QA ask ([] when no run is deployed: those stages are off)."""
    run = config["stage_a"]["run"]
    return f"results/merge/{run}/model" if run else []


def deployed_cache():
    """A cache the deployed model trained on: Stage-A takes its prompt text and pixel budget from there."""
    return train_caches()[0]


def guidance_file(wildcards):
    return config["stage_b"]["guidance"].format(mission=wildcards.mission)


TS_DATASET = config["timeseries"]["dataset"]
TS_DATASET_PATTERN = re.escape(TS_DATASET) if TS_DATASET else "(?!)"
DEMO_TS_MODEL = "resources/models/demo_ts"


def _check_timeseries():
    if TS_DATASET and TS_DATASET not in SIGNAL_DATASETS:
        raise ValueError(
            f"config timeseries.dataset {TS_DATASET!r} is not a dataset of format signals "
            f"(signal datasets: {', '.join(SIGNAL_DATASETS) or 'none'}); name one of them, "
            'or set timeseries.dataset: "" to turn the time-series branch off'
        )


_check_timeseries()


def ts_base_dir():
    """The time-series base folder: config timeseries.base, else the tiny demo models."""
    return config["timeseries"]["base"] or DEMO_TS_MODEL


def _made_by_a_rule(path):
    """An output of some job (or a file inside an output folder)."""
    path = os.path.normpath(path)
    for producer in workflow.rules:
        if producer.is_producer(path):
            return True
        folders = [os.path.normpath(o) for o in producer.output if o.is_directory]
        if any(path.startswith(folder + os.sep) for folder in folders):
            return True
    return False


def check_config_references():
    """Called once all rules exist: paths exist or are made, prompts and recipe keys are known."""
    outputs = [o for producer in workflow.rules for o in producer.output]
    stop_on_config_errors(
        check_references,
        config,
        _made_by_a_rule,
        [str(o) for o in outputs if not o.contains_wildcard()],
    )
