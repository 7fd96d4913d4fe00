rule train_ts:
    input:
        train="results/cache_ts/{dataset}.train.json",
        val="results/cache_ts/{dataset}.val.json",
        records="results/validate/{dataset}/train.clean.jsonl",
        base=ts_base_dir(),
    output:
        model=directory("results/train_ts/{dataset}/model"),
        summary="results/train_ts/{dataset}/summary.json",
        config="results/train_ts/{dataset}/trainer_config.py",
        history="results/train_ts/{dataset}/history.jsonl",
        loss=report(
            "results/train_ts/{dataset}/loss.png",
            caption="../workflow/report/loss.rst",
            category="train_ts",
        ),
    log:
        "logs/train_ts/{dataset}.log",
    benchmark:
        "logs/train_ts/{dataset}.benchmark.tsv"
    wildcard_constraints:
        dataset=TS_DATASET_PATTERN,
    conda:
        "../envs/xtuner.yaml"
    threads: 8
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=60,
    params:
        options=json.dumps(config["timeseries"]["train"], sort_keys=True),
        work_dir="results/train_ts/{dataset}",
    shell:
        "visionqc train-ts --base {input.base} --train-cache {input.train} --val-cache {input.val} "
        "--train-records {input.records} --model {output.model} --summary {output.summary} "
        "--trainer-config {output.config} --loss-plot {output.loss} --history {output.history} "
        "--work-dir {params.work_dir} --name {wildcards.dataset} --options {params.options:q} > {log} 2>&1"
