rule train_model:
    input:
        train=f"results/cache/{FUSION}.train.json",
        val=f"results/cache/{FUSION}.val.json",
        base=run_base,
        recipe=run_recipe,
    output:
        model=directory("results/train/{run}/model"),
        summary="results/train/{run}/summary.json",
        loss=report(
            "results/train/{run}/loss.png",
            caption="../workflow/report/loss.rst",
            category="train",
            subcategory="{run}",
        ),
    log:
        "logs/train/{run}.log",
    benchmark:
        "logs/train/{run}.benchmark.tsv"
    conda:
        "../envs/swift.yaml"
    threads: 8
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=60,
    params:
        visionqc=visionqc_command,
        cache=cache_options(),
        device=config["train"]["device"],
        tracking=tracking_args(),
    shell:
        "{params.visionqc} train --base {input.base} --train-cache {input.train} --val-cache {input.val} "
        "--recipe {input.recipe} --out-dir results/train/{wildcards.run} --name {wildcards.run} "
        "--device {params.device} --cache-options {params.cache:q} {params.tracking} > {log} 2>&1"
