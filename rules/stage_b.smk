rule judge_groups:
    input:
        summaries="results/stage_a/{mission}.jsonl",
        guidance=guidance_file,
        model=deployed_model(),
    output:
        verdicts="results/stage_b/{mission}.jsonl",
        metrics="results/stage_b/{mission}.metrics.json",
        confusion=report(
            "results/stage_b/{mission}.confusion.png",
            caption="../workflow/report/confusion.rst",
            category="stage_b",
        ),
    log:
        "logs/stage_b/{mission}.log",
    conda:
        "../envs/swift.yaml"
    params:
        options=stage_options("stage_b"),
        device=config["train"]["device"],
    shell:
        "visionqc stage-b --summaries {input.summaries} --guidance {input.guidance} --model {input.model} --device {params.device} "
        "--verdicts {output.verdicts} --metrics {output.metrics} --confusion {output.confusion} "
        "--name {wildcards.mission} --options {params.options:q} > {log} 2>&1"
