rule summarize_images:
    input:
        root=config["stage_a"]["root"] or [],
        photos=mission_photos,
        model=deployed_model(),
        cache=deployed_cache(),
    output:
        summaries="results/stage_a/{mission}.jsonl",
        report="results/stage_a/{mission}.report.json",
    log:
        "logs/stage_a/{mission}.log",
    conda:
        "../envs/swift.yaml"
    params:
        visionqc=visionqc_command,
        options=stage_options("stage_a"),
        truth=config["stage_a"]["truth"],
        chunks="results/stage_a/{mission}.chunks",
        device=config["train"]["device"],
    shell:
        "{params.visionqc} stage-a --root {input.root} --mission {wildcards.mission} --model {input.model} "
        "--cache {input.cache} --device {params.device} --summaries {output.summaries} --report {output.report} "
        "--chunks {params.chunks} --truth '{params.truth}' "
        "--options {params.options:q} > {log} 2>&1"
