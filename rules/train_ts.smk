rule train_ts:
    input:
        train_cache="results/cache_ts/{dataset}.train.json",
        val_cache="results/cache_ts/{dataset}.val.json",
        train_records="results/validate/{dataset}/train.clean.jsonl",
        base=ts_base_dir(),
    output:
        model=directory("results/train_ts/{dataset}/model"),
        summary="results/train_ts/{dataset}/summary.json",
        trainer_config="results/train_ts/{dataset}/trainer_config.py",
        history="results/train_ts/{dataset}/history.jsonl",
        loss_plot=report(
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
    params:
        options=stage_options("train_ts"),
        work_dir="results/train_ts/{dataset}",
    shell:
        "visionqc train-ts --base {input.base} --train-cache {input.train_cache} --val-cache {input.val_cache} "
        "--train-records {input.train_records} --model {output.model} --summary {output.summary} "
        "--trainer-config {output.trainer_config} --loss-plot {output.loss_plot} --history {output.history} "
        "--work-dir {params.work_dir} --name {wildcards.dataset} --options {params.options:q} > {log} 2>&1"
