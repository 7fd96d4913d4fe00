rule convert_dataset:
    input:
        unpack(dataset_inputs),
    output:
        train="results/convert/{dataset}/train.jsonl",
        val="results/convert/{dataset}/val.jsonl",
        report="results/convert/{dataset}/report.json",
        media=directory("results/convert/{dataset}/images"),
        overlays=report(
            directory("results/convert/{dataset}/overlays"),
            patterns=["{name}.png"],
            caption="../workflow/report/overlays.rst",
            category="convert",
            subcategory="{dataset}",
        ),
    log:
        "logs/convert/{dataset}.log",
    wildcard_constraints:
        dataset=IMAGE_DATASETS_PATTERN,
    conda:
        "../envs/data.yaml"
    params:
        format=lambda wildcards: config["datasets"][wildcards.dataset]["format"],
        options=convert_options,
    shell:
        "visionqc convert --format {params.format} --source {input.source:q} --train {output.train} "
        "--val {output.val} --report {output.report} --media {output.media} --overlays {output.overlays} "
        "--name {wildcards.dataset} --options {params.options:q} > {log} 2>&1"


rule convert_signals:
    input:
        unpack(dataset_inputs),
    output:
        train="results/convert/{dataset}/train.jsonl",
        val="results/convert/{dataset}/val.jsonl",
        report="results/convert/{dataset}/report.json",
        media=directory("results/convert/{dataset}/signals"),
        examples=report(
            "results/convert/{dataset}/overlays/traces.png",
            caption="../workflow/report/traces.rst",
            category="convert",
            subcategory="{dataset}",
        ),
    log:
        "logs/convert/{dataset}.log",
    wildcard_constraints:
        dataset=SIGNAL_DATASETS_PATTERN,
    conda:
        "../envs/data.yaml"
    params:
        options=convert_options,
    shell:
        "visionqc convert --format signals --source {input.source:q} --train {output.train} "
        "--val {output.val} --report {output.report} --media {output.media} --examples {output.examples} "
        "--name {wildcards.dataset} --options {params.options:q} > {log} 2>&1"
