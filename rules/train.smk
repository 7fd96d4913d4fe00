rule train_model:
    input:
        train_cache=train_caches(),
        val_cache=f"results/cache/{FUSION}.val.json",
        base=run_base,
        recipe=run_recipe,
        teacher=run_teacher,
    output:
        model=directory("results/train/{run}/model"),
        summary="results/train/{run}/summary.json",
        recipe_out="results/train/{run}/recipe.json",
        history="results/train/{run}/log_history.json",
        loss_plot=report(
            "results/train/{run}/loss.png",
            caption="../workflow/report/loss.rst",
            category="train",
            subcategory="{run}",
        ),
    log:
        "logs/train/{run}.log",
    benchmark:
        "logs/train/{run}.benchmark.tsv"
    conda:
        "../envs/swift.yaml"
    params:
        visionqc=visionqc_command,
        checkpoints="results/train/{run}/checkpoints",
        device=config["train"]["device"],
        teacher=lambda wildcards, input: (
            f"--teacher {input.teacher}" if input.teacher else ""
        ),
        select=lambda wildcards: run_spec(wildcards.run)["select"],
        select_metric=lambda wildcards: run_spec(wildcards.run)["select_metric"],
    shell:
        "{params.visionqc} train --base {input.base} --train-cache {input.train_cache} --val-cache {input.val_cache} "
        "--recipe {input.recipe} --device {params.device} --model {output.model} --summary {output.summary} "
        "--recipe-out {output.recipe_out} --history {output.history} --loss-plot {output.loss_plot} "
        "--checkpoints {params.checkpoints} {params.teacher} --select {params.select} --select-metric {params.select_metric} "
        "--name {wildcards.run} > {log} 2>&1"
