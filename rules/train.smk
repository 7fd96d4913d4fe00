rule train_model:
    input:
        train=f"results/cache/{FUSION}.train.json",
        val=f"results/cache/{FUSION}.val.json",
        base=run_base,
        recipe=run_recipe,
    output:
        model=directory("results/train/{run}/model"),
        summary="results/train/{run}/summary.json",
    log:
        "logs/train/{run}.log",
    benchmark:
        "logs/train/{run}.benchmark.tsv"
    conda:
        "../envs/swift.yaml"
    threads: train_resource("threads")
    resources:
        gpu=train_resource("gpu"),
        mem_mb=train_resource("mem_mb"),
        runtime=train_resource("runtime"),
    params:
        cache=cache_options(),
        device=config["train"]["device"],
        tracking=tracking_args(),
    shell:
        "visionqc train --base {input.base} --train-cache {input.train} --val-cache {input.val} "
        "--recipe {input.recipe} --out-dir results/train/{wildcards.run} --name {wildcards.run} "
        "--device {params.device} --cache-options {params.cache:q} {params.tracking} > {log} 2>&1"
