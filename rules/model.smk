rule build_demo_model:
    output:
        out_dir=directory("resources/models/demo"),
    log:
        "logs/model/build_demo_model.log",
    conda:
        "../envs/swift.yaml"
    params:
        options=stage_options("demo_model"),
    shell:
        "visionqc build-demo-model --out-dir {output.out_dir} --options {params.options:q} > {log} 2>&1"


rule build_demo_ts_models:
    output:
        out_dir=directory("resources/models/demo_ts"),
    log:
        "logs/model/build_demo_ts_models.log",
    conda:
        "../envs/xtuner.yaml"
    params:
        options=stage_options("demo_ts_models"),
    shell:
        "visionqc build-demo-ts-models --out-dir {output.out_dir} --options {params.options:q} > {log} 2>&1"
