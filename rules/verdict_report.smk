rule report_verdicts:
    input:
        summaries="results/stage_a/{mission}.jsonl",
        verdicts="results/stage_b/{mission}.jsonl",
        root=config["stage_a"]["root"] or [],
    output:
        page="results/report/{mission}.html",
        table="results/report/{mission}.csv",
        thumbnails=directory("results/report/{mission}.thumbs"),
    log:
        "logs/report/{mission}.log",
    conda:
        "../envs/data.yaml"
    shell:
        "visionqc verdict-report --summaries {input.summaries} --verdicts {input.verdicts} --root {input.root} "
        "--name {wildcards.mission} --page {output.page} --table {output.table} "
        "--thumbnails {output.thumbnails} > {log} 2>&1"
