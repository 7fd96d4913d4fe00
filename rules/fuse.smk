rule fuse_datasets:
    input:
        unpack(fusion_inputs),
    output:
        records="results/fuse/{fusion}/{split}.jsonl",
        report="results/fuse/{fusion}/{split}.report.json",
    log:
        "logs/fuse/{fusion}.{split}.log",
    conda:
        "../envs/data.yaml"
    params:
        options=stage_options("fuse"),
        inputs=lambda wildcards, input: " ".join(
            f"{name}={path}" for name, path in input.items()
        ),
    shell:
        "visionqc fuse --inputs {params.inputs} --split {wildcards.split} --records {output.records} "
        "--report {output.report} --name {wildcards.fusion}.{wildcards.split} "
        "--options {params.options:q} > {log} 2>&1"
