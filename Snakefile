# VisionQC: annotation exports → contract JSONL → clean → fused → augmented → token cache → trained → merged model → Stage-A summaries → Stage-B verdicts.
#
# resources/demo/              seeded demo exports (platform, labelme, coco, formats/: cvat, label_studio, yolo, voc; photo groups, sensor traces)
# results/convert/{dataset}/   train.jsonl, val.jsonl, report.json, images/ or signals/, overlays/
# results/validate/{dataset}/  {split}.clean.jsonl, {split}.rejects.jsonl, {split}.report.json
# results/fuse/{fusion}/       {split}.jsonl, {split}.report.json
# results/augment/{fusion}/    epoch_{k}.jsonl, epoch_{k}/images/, epoch_{k}.report.json, epoch_{k}.preview.png
# resources/models/demo/       the tiny seeded Qwen3-VL (unless model.path names a checkpoint)
# results/cache/{key}/         tokenized Arrow shards; results/cache/{fusion}.{split}.json points at the key
# results/train/{run}/         model/ (adapter or weights), checkpoints/, summary.json, loss.png
# results/post_train/{run}/    GRPO from a run's merged model: model/, summary.json, completions.jsonl, rewards.png
# results/merge/{run}/         model/ (merged, with processor), verification.json
# results/stage_a/{mission}    .jsonl per-image summaries, .report.json, .chunks/ (resumable)
# results/stage_b/{mission}    .jsonl verdicts, .metrics.json, .confusion.png
# results/eval_dense/{run}/     metrics.json (COCOeval AP/AR, per-class P/R/F1), predictions.jsonl, overlays/
# results/qa/{dataset}/         suspects.jsonl (records whose label the model disputes, ranked), report.json, gallery/
# resources/models/demo_ts/    tiny seeded time-series encoder + Qwen3 LLM (unless timeseries.base names one)
# results/cache_ts/            tokenized signal records; {dataset}.{split}.json points at the key
# results/train_ts/{dataset}/  model/, trainer_config.py (XTuner), summary.json, loss.png
# results/eval_ts/{dataset}/   metrics.json, predictions.jsonl, confusion.png
# results/mlflow/mlflow.db     MLflow tracking store (one run per stage job, under a pipeline run)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"


# The demo's seeded data: only a config with a demo: block (the repository's own) has these rules.
if "demo" in config:

    include: "rules/demo.smk"


include: "rules/convert.smk"
include: "rules/validate.smk"
include: "rules/fuse.smk"
include: "rules/augment.smk"
include: "rules/model.smk"
include: "rules/cache.smk"
include: "rules/train.smk"
include: "rules/post_train.smk"
include: "rules/merge.smk"
include: "rules/stage_a.smk"
include: "rules/stage_b.smk"
include: "rules/verdict_report.smk"
include: "rules/eval_dense.smk"
include: "rules/qa_labels.smk"
include: "rules/cache_ts.smk"
include: "rules/train_ts.smk"
include: "rules/eval_ts.smk"


# Seconds of work each: run on the submit host, never queued (--profile slurm).
localrules:
    all,
    build_demo_model,
    build_demo_ts_models,


rule all:
    default_target: True
    input:
        final_outputs(),


# Every path the config names exists or is made by a rule; prompts and recipe keys are known.
check_config_references()
