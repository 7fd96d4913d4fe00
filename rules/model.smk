rule build_demo_model:
    output:
        directory("resources/models/demo"),
    log:
        "logs/model/build_demo_model.log",
    conda:
        "../envs/swift.yaml"
    params:
        options=json.dumps(config["model"]["demo"], sort_keys=True),
    shell:
        "visionqc build-demo-model --out-dir {output} --options {params.options:q} > {log} 2>&1"


rule build_demo_ts_models:
    output:
        directory("resources/models/demo_ts"),
    log:
        "logs/model/build_demo_ts_models.log",
    conda:
        "../envs/xtuner.yaml"
    params:
        options=demo_ts_model_options(),
    shell:
        "visionqc build-demo-ts-models --out-dir {output} --options {params.options:q} > {log} 2>&1"
