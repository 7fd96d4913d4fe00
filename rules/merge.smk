rule merge_adapter:
    input:
        trained=trained_model,
        base=run_base,
        val_cache=f"results/cache/{FUSION}.val.json",
    output:
        model=directory("results/merge/{run}/model"),
        verification="results/merge/{run}/verification.json",
    log:
        "logs/merge/{run}.log",
    conda:
        "../envs/swift.yaml"
    params:
        options=stage_options("merge"),
    shell:
        "visionqc merge --base {input.base} --trained {input.trained} --val-cache {input.val_cache} "
        "--model {output.model} --verification {output.verification} --name {wildcards.run} "
        "--options {params.options:q} > {log} 2>&1"
