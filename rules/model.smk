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
