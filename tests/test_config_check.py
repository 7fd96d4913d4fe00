"""Config mistakes stop the run before any job, with one line naming the key, the bad value and the closest name."""

import copy
import json
import re

import pytest
import yaml

from visionqc.config_check import (
    ConfigError,
    check_datasets,
    check_prompts,
    check_recipes,
    check_runs,
    check_schema,
    swift_fields,
)

from conftest import REPO, snakemake

SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize(("change", "message"), [
    ({"trackin": {}}, r"^config key trackin is unknown; did you mean tracking\? \(see config/README.md\)$"),
    ({"convert": {"multipart": "biggest"}}, r"^config key convert.multipart: 'biggest' is not one of \['hull', 'largest', 'union_bbox'\]"),
    ({"validate": {"self_crosing": "warn"}}, r"^config key validate.self_crosing is unknown; did you mean validate.self_crossing\?"),
    ({"datasets": {"x": {"format": "coco", "pth": "a.json"}}}, r"^config key datasets.x.pth is unknown; did you mean datasets.x.path\?"),
    ({"datasets": {"x": {"format": "cvat_xml", "path": "a.xml"}}}, r"^config key datasets.x.format: 'cvat_xml' is not one of \['platform', .*'cvat', 'label_studio', 'yolo', 'voc'"),
    ({"convert": {"label_studio": {"annotations": "newest"}}}, r"^config key convert.label_studio.annotations: 'newest' is not one of \['latest', 'first'\]"),
])
def test_schema_mistakes_are_a_line_each(change, message):
    config = copy.deepcopy(CONFIG)
    for key, value in change.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(config.get(key), dict) else value
    with pytest.raises(ConfigError) as caught:
        check_schema(config, SCHEMA)
    lines = str(caught.value).splitlines()
    assert any(re.search(message, line) for line in lines), lines
    assert all(line.startswith("config key ") for line in lines), lines


def test_unknown_prompt_names_the_entry():
    config = copy.deepcopy(CONFIG)
    config["fusion"]["sources"][0]["prompt"] = "summry"
    with pytest.raises(ConfigError, match=r"^config key fusion.sources\[0\].prompt: prompt 'summry' is not defined under prompts; did you mean summary\?"):
        check_prompts(config)


def test_a_mixed_entry_needs_the_dense_and_the_summary_prompt():
    config = copy.deepcopy(CONFIG)
    config["fusion"]["targets"][0].update(mode="mixed", prompt="")
    check_prompts(config)  # the demo defines both
    del config["prompts"]["summary"]
    with pytest.raises(ConfigError) as caught:
        check_prompts(config)
    assert "config key fusion.targets[0].prompt: prompt 'summary' is not defined under prompts" in str(caught.value)


def test_a_prompt_per_mission_names_every_mission_and_a_defined_prompt():
    config = copy.deepcopy(CONFIG)
    config["stage_a"]["missions"] = ["BBU安装检查", "RRU安装检查", "机房"]
    config["stage_a"]["prompt"] = {"BBU安装检查": "summary", "RRU安装检查": "summry_rru"}
    check_schema(config, SCHEMA)  # a map is a valid stage_a.prompt
    with pytest.raises(ConfigError) as caught:
        check_prompts(config)
    assert str(caught.value).splitlines() == [
        "config key stage_a.prompt.RRU安装检查: prompt 'summry_rru' is not defined under prompts; did you mean summary? "
        "(defined: dense, summary)",
        "config key stage_a.prompt.机房: stage_a.prompt maps missions to prompts, but not this mission; add it "
        "(prompts: dense, summary)"]


@pytest.mark.parametrize(("key", "change", "message"), [
    ("stage_a", {"run": "dmeo"}, r"^config key stage_a.run: 'dmeo' is not a run under train.runs or post_train.runs; did you mean demo\?"),
    ("eval_dense", {"runs": ["demo", "demo_lroa"]}, r"^config key eval_dense.runs\[1\]: 'demo_lroa' is not a run .*did you mean demo_lora\?"),
])
def test_unknown_run_names_the_key(key, change, message):
    config = copy.deepcopy(CONFIG)
    config[key].update(change)
    with pytest.raises(ConfigError, match=message):
        check_runs(config)
    check_runs(CONFIG)


def test_recipe_keys_are_checked_against_the_installed_ms_swift(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fields = swift_fields()
    assert {"learning_rate", "tuner_type", "lora_rank", "max_steps"} <= fields["sft"] and len(fields["sft"]) > 100
    assert fields["sft"] < fields["rlhf"] and {"teacher_model", "lmbda", "sft_alpha"} <= fields["rlhf"] - fields["sft"]
    (cached,) = (tmp_path / "cache" / "visionqc").glob("ms-swift-*-argument-fields.json")
    assert {kind: set(names) for kind, names in json.loads(cached.read_text()).items()} == fields

    def no_child(*args, **kwargs):
        raise AssertionError("the field list should come from the cache")

    monkeypatch.setattr("visionqc.config_check.subprocess.run", no_child)
    assert swift_fields() == fields  # the second call reads the cache: no import of swift

    recipe = tmp_path / "typo.yaml"
    recipe.write_text("learnin_rate: 0.1\nmax_steps: 2\n")
    config = {"train": {"runs": {"demo": {"recipe": str(recipe)}}}}
    with pytest.raises(ConfigError, match=r"typo.yaml sets learnin_rate, which is not an argument of ms-swift [\d.]+ SftArguments; did you mean learning_rate\?"):
        check_recipes(config, fields)
    for name in ("demo_full", "demo_lora", "lora", "full", "freeze_llm", "stage1_aligner", "stage2_llm_aligner", "gkd"):
        check_recipes({"train": {"runs": {name: {"recipe": str(REPO / "config" / "recipes" / f"{name}.yaml")}}}}, fields)


@pytest.mark.parametrize("recipe, teacher, message", [
    ("lmbda: 0.5\n", "", r"sets lmbda, which is not an argument of ms-swift [\d.]+ SftArguments"),  # a GKD key without rlhf_type
    ("rlhf_type: gkd\nlmbda: 0.5\nlmbda_x: 1\n", "", r"sets lmbda_x, which is not an argument of ms-swift [\d.]+ RLHFArguments; did you mean lmbda\?"),
    ("rlhf_type: dpo\n", "", r"sets rlhf_type: dpo; train_model runs SFT or rlhf_type: gkd"),
    ("tuner_type: lora\n", "base_run", r"train.runs.run.teacher: only a GKD recipe \(rlhf_type: gkd\) has a teacher"),
])
def test_gkd_recipes_are_checked_against_rlhf_arguments(tmp_path, recipe, teacher, message):
    fields = swift_fields()
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    with pytest.raises(ConfigError, match=message):
        check_recipes({"train": {"runs": {"run": {"recipe": str(path), "teacher": teacher}}}}, fields)
    path.write_text("rlhf_type: gkd\nlmbda: 0.5\nllm_kd_weight: 0.5\nvisual_kd: {vit: 0.1}\n")
    check_recipes({"train": {"runs": {"run": {"recipe": str(path), "teacher": teacher}}}}, fields)


@pytest.mark.parametrize("change, message", [
    ({"demo": {"base": "demo_lroa", "recipe": "config/recipes/grpo_verdicts.yaml"}},
     r"post_train.runs.demo: 'demo' is also a run under train.runs"),
    ({"grpo": {"base": "demo_lroa", "recipe": "config/recipes/grpo_verdicts.yaml"}},
     r"post_train.runs.grpo.base: 'demo_lroa' is not a run under train.runs; did you mean demo_lora\?"),
])
def test_grpo_runs_start_from_a_supervised_run_of_their_own_name(change, message):
    config = copy.deepcopy(CONFIG)
    config["post_train"]["runs"] = change
    with pytest.raises(ConfigError, match=message):
        check_runs(config)
    config["post_train"]["runs"] = {"grpo": {"base": "demo", "recipe": "config/recipes/grpo_verdicts.yaml"}}
    config["stage_a"]["run"] = "grpo"  # a GRPO run can be deployed
    check_runs(config)


@pytest.mark.parametrize("recipe, message", [
    ("rlhf_type: grpo\nreward_funcs: [verdict_format]\nnum_generatons: 4\n", r"sets num_generatons, .* RLHFArguments; did you mean num_generations\?"),
    ("rlhf_type: dpo\nreward_funcs: [verdict_format]\n", r"sets rlhf_type: dpo; post_train runs grpo"),
    ("rlhf_type: grpo\nreward_funcs: [verdict_lable]\n", r"needs reward_funcs among .* \(unknown: verdict_lable; did you mean verdict_label\?\)"),
    ("rlhf_type: grpo\n", r"needs reward_funcs among summary_format"),
])
def test_grpo_recipes_are_checked(tmp_path, recipe, message):
    from visionqc.config_check import check_post_train_recipes

    path = tmp_path / "grpo.yaml"
    path.write_text(recipe)
    with pytest.raises(ConfigError, match=message):
        check_post_train_recipes({"post_train": {"runs": {"g": {"base": "demo", "recipe": str(path)}}}}, swift_fields())
    check_post_train_recipes({"post_train": {"runs": {"g": {"base": "demo", "recipe": str(REPO / "config/recipes/grpo_verdicts.yaml")}}}},
                             swift_fields())


def test_an_images_folder_only_where_the_format_reads_one():
    config = copy.deepcopy(CONFIG)
    check_datasets(config)  # coco's images folder is fine
    config["datasets"]["demo_yolo"]["images"] = "resources/demo/formats/yolo/images"
    with pytest.raises(ConfigError, match=r"datasets.demo_yolo.images: format yolo does not read a separate images folder "
                                          r"\(only coco, cvat, label_studio, labelme do\)"):
        check_datasets(config)


def test_a_run_cannot_teach_itself():
    config = copy.deepcopy(CONFIG)
    config["train"]["runs"]["demo"]["teacher"] = "demo"
    with pytest.raises(ConfigError, match=r"train\.runs\.demo\.teacher: a run cannot teach itself"):
        check_runs(config)


def _targets_with_prompt(workdir, prompt):
    targets = yaml.safe_load((workdir / "config" / "config.yaml").read_text())["fusion"]["targets"]
    return [{**targets[0], "prompt": prompt}, *targets[1:]]


MISTAKES = {
    "mistyped_dataset_path": (lambda w: {"datasets": {"demo_labelme": {"format": "labelme", "path": "resources/demo/labelmee"}}},
                              "config key datasets.demo_labelme.path: resources/demo/labelmee does not exist and no rule makes it; "
                              "did you mean resources/demo/labelme?"),
    "missing_recipe": (lambda w: {"train": {"runs": {"demo_lora": {"recipe": "config/recipes/demo_lroa.yaml", "base": ""}}}},
                       "config key train.runs.demo_lora.recipe: config/recipes/demo_lroa.yaml does not exist and no rule makes it; "
                       "did you mean config/recipes/demo_lora.yaml?"),
    "unknown_prompt": (lambda w: {"fusion": {"targets": _targets_with_prompt(w, "summry")}},
                       "config key fusion.targets[0].prompt: prompt 'summry' is not defined under prompts; did you mean summary?"),
    "unknown_recipe_key": (lambda w: {"train": {"runs": {"demo_lora": {"recipe": "config/recipes/mistake.yaml", "base": ""}}}},
                           "sets lora_rnak, which is not an argument of ms-swift"),
    "unknown_top_level_key": (lambda w: {"trackng": {"enabled": False}},
                              "config key trackng is unknown; did you mean tracking? (see config/README.md)"),
    "bad_value": (lambda w: {"validate": {"mode": "sometimes"}},
                  "config key validate.mode: 'sometimes' is not one of ['report', 'fail_fast']"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_a_config_mistake_stops_a_folder_with_results_before_any_job(finished_workflow, case):
    workdir = finished_workflow
    change, message = MISTAKES[case]
    (workdir / "config" / "recipes" / "mistake.yaml").write_text("tuner_type: lora\nlora_rnak: 8\n")
    overlay = workdir / "mistake.yaml"
    overlay.write_text(yaml.safe_dump(change(workdir), allow_unicode=True))
    before = {path: path.stat().st_mtime_ns for path in (workdir / "results").rglob("*") if path.is_file()}
    try:
        result = snakemake(workdir, "-n", "--configfile", str(overlay), check=False)
        run = snakemake(workdir, "--configfile", str(overlay), check=False)
    finally:
        overlay.unlink()
    for attempt in (result, run):
        assert attempt.returncode != 0, case
        output = attempt.stdout + attempt.stderr
        errors = [line for line in output.splitlines() if line.startswith("config key")]
        assert len(errors) == 1 and message in errors[0], (case, output)
        assert "Job stats" not in output and not re.search(r"^(local)?rule \w+:", output, re.MULTILINE), case
        assert "Failed validating" not in output, case  # not the whole schema
    after = {path: path.stat().st_mtime_ns for path in (workdir / "results").rglob("*") if path.is_file()}
    assert after == before, case  # nothing ran, nothing was rewritten


def test_the_demo_dense_overlay_passes_the_checks_and_leaves_the_default_runs_alone():
    from snakemake.utils import update_config

    config = copy.deepcopy(CONFIG)
    update_config(config, yaml.safe_load((REPO / "config" / "demo_dense.yaml").read_text()))
    check_schema(config, SCHEMA)
    check_datasets(config)
    check_prompts(config)
    check_runs(config)
    assert config["fusion"]["name"] != CONFIG["fusion"]["name"]  # its own fuse/augment/cache folders
    assert set(config["train"]["runs"]) == set(CONFIG["train"]["runs"]) | {"demo_dense"}
    assert config["eval_dense"]["runs"] == ["demo_dense"]
