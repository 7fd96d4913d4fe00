rule eval_ts:
    input:
        model="results/train_ts/{dataset}/model",
        val_cache="results/cache_ts/{dataset}.val.json",
        train_cache="results/cache_ts/{dataset}.train.json",
        examples=rules.convert_signals.output.examples,
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
        options=stage_options("eval_ts"),
    shell:
        "visionqc eval-ts --model {input.model} --val-cache {input.val_cache} --train-cache {input.train_cache} "
        "--metrics {output.metrics} --predictions {output.predictions} --confusion {output.confusion} "
        "--examples {input.examples} --name {wildcards.dataset} --options {params.options:q} > {log} 2>&1"
