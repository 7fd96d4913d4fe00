rule merge_adapter:
    input:
        trained="results/train/{run}/model",
        base=run_base,
        val=f"results/cache/{FUSION}.val.json",
    output:
        model=directory("results/merge/{run}/model"),
        verification="results/merge/{run}/verification.json",
    log:
        "logs/merge/{run}.log",
    conda:
        "../envs/swift.yaml"
    resources:
        mem_mb=8000,
    params:
        samples=config["merge"]["samples"],
        tolerance=config["merge"]["tolerance"],
        cache=cache_options(),
        tracking=tracking_args(),
    shell:
        "visionqc merge --base {input.base} --trained {input.trained} --val-cache {input.val} "
        "--out-dir results/merge/{wildcards.run}/model --samples {params.samples} "
        "--tolerance {params.tolerance} --cache-options {params.cache:q} --name {wildcards.run} "
        "{params.tracking} > {log} 2>&1"
