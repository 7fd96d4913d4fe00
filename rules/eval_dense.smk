rule evaluate_dense:
    input:
        model="results/merge/{run}/model",
        records=f"results/fuse/{FUSION}/val.jsonl",
        cache=deployed_cache(),
    output:
        metrics="results/eval_dense/{run}/metrics.json",
        predictions="results/eval_dense/{run}/predictions.jsonl",
        overlays=report(
            directory("results/eval_dense/{run}/overlays"),
            patterns=["{name}.png"],
            caption="../workflow/report/eval_dense.rst",
            category="eval_dense",
            subcategory="{run}",
        ),
    log:
        "logs/eval_dense/{run}.log",
    conda:
        "../envs/swift.yaml"
    params:
        options=stage_options("eval_dense"),
        device=config["train"]["device"],
    shell:
        "visionqc eval-dense --model {input.model} --records {input.records} --cache {input.cache} "
        "--device {params.device} --metrics {output.metrics} --predictions {output.predictions} "
        "--overlays {output.overlays} --name {wildcards.run} --options {params.options:q} > {log} 2>&1"
