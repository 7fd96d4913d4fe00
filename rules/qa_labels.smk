rule find_label_suspects:
    input:
        model=deployed_model(),
        cache=deployed_cache(),
        train="results/validate/{dataset}/train.clean.jsonl",
        val="results/validate/{dataset}/val.clean.jsonl",
        truth=qa_truth,
    output:
        suspects="results/qa/{dataset}/suspects.jsonl",
        report="results/qa/{dataset}/report.json",
        gallery=report(
            directory("results/qa/{dataset}/gallery"),
            patterns=["{name}.png"],
            caption="../workflow/report/qa_labels.rst",
            category="qa_labels",
            subcategory="{dataset}",
        ),
    log:
        "logs/qa/{dataset}.log",
    wildcard_constraints:
        dataset=IMAGE_DATASETS_PATTERN,
    conda:
        "../envs/swift.yaml"
    params:
        options=stage_options("qa_labels"),
        device=config["train"]["device"],
    shell:
        "visionqc qa-labels --model {input.model} --cache {input.cache} --train {input.train} --val {input.val} "
        "--device {params.device} --suspects {output.suspects} --report {output.report} --gallery {output.gallery} "
        "--truth '{input.truth}' --name {wildcards.dataset} --options {params.options:q} > {log} 2>&1"
