rule augment_records:
    input:
        records="results/fuse/{fusion}/train.jsonl",
    output:
        augmented="results/augment/{fusion}/epoch_{epoch}.jsonl",
        images=directory("results/augment/{fusion}/epoch_{epoch}/images"),
        report="results/augment/{fusion}/epoch_{epoch}.report.json",
        preview=report(
            "results/augment/{fusion}/epoch_{epoch}.preview.png",
            caption="../workflow/report/augment.rst",
            category="augment",
        ),
    log:
        "logs/augment/{fusion}.epoch_{epoch}.log",
    wildcard_constraints:
        epoch=r"\d+",
    conda:
        "../envs/data.yaml"
    params:
        options=stage_options("augment"),
    shell:
        "visionqc augment --records {input.records} --epoch {wildcards.epoch} --augmented {output.augmented} "
        "--images {output.images} --report {output.report} --preview {output.preview} --threads {threads} "
        "--options {params.options:q} --name {wildcards.fusion}.epoch_{wildcards.epoch} > {log} 2>&1"
