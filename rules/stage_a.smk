rule summarize_images:
    input:
        root=config["stage_a"]["root"] or [],
        model=deployed_model(),
        cache=deployed_cache(),
        shards=stage_a_shards,
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
        photos=mission_listing,
        truth=config["stage_a"]["truth"],
        chunks="results/stage_a/{mission}.chunks",
        device=config["train"]["device"],
    shell:
        "{params.visionqc} stage-a --root {input.root} --mission {wildcards.mission} --model {input.model} "
        "--cache {input.cache} --device {params.device} --summaries {output.summaries} --report {output.report} "
        "--chunks {params.chunks} --truth '{params.truth}' "
        "--options {params.options:q} > {log} 2>&1"


# Shard {rank} of the stage_a.shards jobs of a mission (a Slurm job each): it generates the chunks i with
# i % shards == rank, and summarize_images above, finding every chunk there, only merges them.
rule summarize_shard:
    input:
        root=config["stage_a"]["root"] or [],
        model=deployed_model(),
        cache=deployed_cache(),
    output:
        report="results/stage_a/{mission}.shards/{rank}.report.json",
    log:
        "logs/stage_a/{mission}.shard-{rank}.log",
    conda:
        "../envs/swift.yaml"
    params:
        visionqc=visionqc_command,
        options=stage_options("stage_a"),
        photos=mission_listing,
        chunks="results/stage_a/{mission}.chunks",
        device=config["train"]["device"],
        world=STAGE_A_SHARDS,
    shell:
        "{params.visionqc} stage-a --root {input.root} --mission {wildcards.mission} --model {input.model} "
        "--cache {input.cache} --device {params.device} --report {output.report} --chunks {params.chunks} "
        "--rank {wildcards.rank} --world {params.world} --name {wildcards.mission}.shard-{wildcards.rank} "
        "--options {params.options:q} > {log} 2>&1"
