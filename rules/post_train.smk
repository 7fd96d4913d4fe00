rule post_train_grpo:
    input:
        base=run_base,
        records=f"results/fuse/{FUSION}/train.jsonl",
        cache=deployed_cache(),
        recipe=post_train_recipe,
    output:
        model=directory("results/post_train/{run}/model"),
        summary="results/post_train/{run}/summary.json",
        history="results/post_train/{run}/log_history.json",
        completions="results/post_train/{run}/completions.jsonl",
        rewards_plot=report(
            "results/post_train/{run}/rewards.png",
            caption="../workflow/report/rewards.rst",
            category="post_train",
            subcategory="{run}",
        ),
    log:
        "logs/post_train/{run}.log",
    benchmark:
        "logs/post_train/{run}.benchmark.tsv"
    conda:
        "../envs/swift.yaml"
    params:
        visionqc=visionqc_command,
        checkpoints="results/post_train/{run}/checkpoints",
        device=config["train"]["device"],
    shell:
        "{params.visionqc} post-train --base {input.base} --records {input.records} --cache {input.cache} "
        "--recipe {input.recipe} --device {params.device} --model {output.model} --summary {output.summary} "
        "--history {output.history} --completions {output.completions} --rewards-plot {output.rewards_plot} "
        "--checkpoints {params.checkpoints} --name {wildcards.run} > {log} 2>&1"
