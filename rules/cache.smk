rule cache_tokens:
    input:
        records="results/fuse/{fusion}/{split}.jsonl",
        model=model_dir(),
    output:
        pointer="results/cache/{fusion}.{split}.json",
        lengths=report(
            "results/cache/{fusion}.{split}.lengths.png",
            caption="../workflow/report/lengths.rst",
            category="cache",
        ),
    log:
        "logs/cache/{fusion}.{split}.log",
    conda:
        "../envs/swift.yaml"
    params:
        options=cache_options(),
    shell:
        "visionqc cache --records {input.records} --model {input.model} --cache-root results/cache "
        "--pointer {output.pointer} --lengths-plot {output.lengths} --name {wildcards.fusion}.{wildcards.split} "
        "--options {params.options:q} > {log} 2>&1"
