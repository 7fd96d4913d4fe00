# Seconds of work each: run on the submit host, never queued (--profile slurm).
localrules:
    generate_demo_data,
    generate_demo_signals,


rule generate_demo_data:
    input:
        guidance=config["demo"]["guidance"],
    output:
        platform=directory("resources/demo/platform"),
        labelme=directory("resources/demo/labelme"),
        coco="resources/demo/coco/instances.json",
        coco_images=directory("resources/demo/coco/images"),
        labelme_coco="resources/demo/labelme_coco.json",
        groups=directory("resources/demo/groups"),
        verdicts="resources/demo/verdicts/records.jsonl",
        label_errors="resources/demo/label_errors.jsonl",
        formats_platform=directory("resources/demo/formats/platform"),
        formats_cvat=directory("resources/demo/formats/cvat"),
        formats_label_studio=directory("resources/demo/formats/label_studio"),
        formats_yolo=directory("resources/demo/formats/yolo"),
        formats_voc=directory("resources/demo/formats/voc"),
    log:
        "logs/demo/generate_demo_data.log",
    conda:
        "../envs/data.yaml"
    params:
        options=stage_options("demo_data"),
    shell:
        "visionqc demo-data --platform {output.platform} --labelme {output.labelme} --coco {output.coco} "
        "--coco-images {output.coco_images} --labelme-coco {output.labelme_coco} --groups {output.groups} --verdicts {output.verdicts} "
        "--label-errors {output.label_errors} --formats resources/demo/formats "
        "--options {params.options:q} > {log} 2>&1"


rule generate_demo_signals:
    output:
        manifest="resources/demo/signals/manifest.csv",
        traces=directory("resources/demo/signals/traces"),
    log:
        "logs/demo/generate_demo_signals.log",
    conda:
        "../envs/data.yaml"
    params:
        options=json.dumps(
            {"seed": config["demo"]["seed"], "count": config["demo"]["signals"]},
            sort_keys=True,
        ),
    shell:
        "visionqc demo-signals --manifest {output.manifest} --traces {output.traces} "
        "--options {params.options:q} > {log} 2>&1"
