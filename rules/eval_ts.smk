rule eval_ts:
    input:
        model="results/train_ts/{dataset}/model",
        val="results/cache_ts/{dataset}.val.json",
        train="results/cache_ts/{dataset}.train.json",
        examples="results/convert/{dataset}/overlays",
    output:
        metrics="results/eval_ts/{dataset}/metrics.json",
        predictions="results/eval_ts/{dataset}/predictions.jsonl",
        confusion=report(
            "results/eval_ts/{dataset}/confusion.png",
            caption="../workflow/report/confusion_ts.rst",
            category="eval_ts",
        ),
    log:
        "logs/eval_ts/{dataset}.log",
    wildcard_constraints:
        dataset=TS_DATASET_PATTERN,
    conda:
        "../envs/xtuner.yaml"
    params:
        device=config["timeseries"]["eval"]["device"],
        batch=config["timeseries"]["eval"]["records_per_forward"],
        tracking=tracking_args(),
    shell:
        "visionqc eval-ts --model {input.model} --val-cache {input.val} --train-cache {input.train} "
        "--out-dir results/eval_ts/{wildcards.dataset} --name {wildcards.dataset} --device {params.device} "
        "--records-per-forward {params.batch} --examples {input.examples}/traces.png {params.tracking} > {log} 2>&1"
