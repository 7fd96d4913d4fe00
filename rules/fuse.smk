rule fuse_datasets:
    input:
        unpack(fusion_inputs),
    output:
        records="results/fuse/{fusion}/{split}.jsonl",
        report="results/fuse/{fusion}/{split}.report.json",
    log:
        "logs/fuse/{fusion}.{split}.log",
    conda:
        "../envs/data.yaml"
    params:
        spec=fusion_spec(),
        inputs=lambda wildcards, input: " ".join(
            f"--input {name}={path}" for name, path in input.items()
        ),
        eval_split=lambda wildcards: (
            "--eval-split" if wildcards.split != "train" else ""
        ),
    shell:
        "visionqc fuse --options {params.spec:q} {params.inputs} --out {output.records} "
        "--report {output.report} --name {wildcards.fusion}.{wildcards.split} {params.eval_split} "
        "> {log} 2>&1"
