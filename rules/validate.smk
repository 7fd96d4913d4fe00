rule validate_records:
    input:
        source="results/convert/{dataset}/{split}.jsonl",
        media=converted_media,
    output:
        clean="results/validate/{dataset}/{split}.clean.jsonl",
        rejects="results/validate/{dataset}/{split}.rejects.jsonl",
        report="results/validate/{dataset}/{split}.report.json",
    log:
        "logs/validate/{dataset}.{split}.log",
    conda:
        "../envs/data.yaml"
    params:
        options=stage_options("validate"),
    shell:
        "visionqc validate --source {input.source} --clean {output.clean} "
        "--rejects {output.rejects} --report {output.report} --name {wildcards.dataset}.{wildcards.split} "
        "--options {params.options:q} > {log} 2>&1"
