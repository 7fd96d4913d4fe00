rule cache_ts:
    input:
        records="results/validate/{dataset}/{split}.clean.jsonl",
        base=ts_base_dir(),
    output:
        pointer="results/cache_ts/{dataset}.{split}.json",
    log:
        "logs/cache_ts/{dataset}.{split}.log",
    wildcard_constraints:
        dataset=TS_DATASET_PATTERN,
    conda:
        "../envs/xtuner.yaml"
    params:
        options=stage_options("cache_ts"),
    shell:
        "visionqc cache-ts --records {input.records} --base {input.base} --cache-root results/cache_ts "
        "--pointer {output.pointer} --name {wildcards.dataset}.{wildcards.split} "
        "--options {params.options:q} > {log} 2>&1"
