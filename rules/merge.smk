rule merge_adapter:
    input:
        trained=trained_model,
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
        options=json.dumps(config["merge"], sort_keys=True),
    shell:
        "visionqc merge --base {input.base} --trained {input.trained} --val-cache {input.val} "
        "--model {output.model} --verification {output.verification} --name {wildcards.run} "
        "--options {params.options:q} > {log} 2>&1"
