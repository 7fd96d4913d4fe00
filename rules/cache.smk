rule cache_tokens:
    input:
        records=cache_records,
        model=model_dir(),
    output:
        pointer="results/cache/{fusion}.{part}.json",
        lengths_plot=report(
            "results/cache/{fusion}.{part}.lengths.png",
            caption="../workflow/report/lengths.rst",
            category="cache",
        ),
    log:
        "logs/cache/{fusion}.{part}.log",
    wildcard_constraints:
        part=r"train|val|epoch_\d+",
    conda:
        "../envs/swift.yaml"
    params:
        options=stage_options("cache"),
    shell:
        "visionqc cache --records {input.records} --model {input.model} --cache-root results/cache "
        "--pointer {output.pointer} --lengths-plot {output.lengths_plot} --name {wildcards.fusion}.{wildcards.part} "
        "--options {params.options:q} > {log} 2>&1"
