"""The stage table (src/visionqc/stages.py) against everything derived from it or written beside it: rules, CLI,
profiles, localrules, options blocks and `visionqc where`. Removing a stage's entry fails here."""

from __future__ import annotations

import importlib.util
import re

import pytest
import yaml

from visionqc import cli
from visionqc.stages import STAGES, options_class
from visionqc.where import print_where

from conftest import REPO

RULE = re.compile(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", re.MULTILINE | re.DOTALL)
# `--flag {input.x}`, `--flag {output.x:q}`, `--flag '{params.x}'`, `--flag {wildcards.x}`, `--flag {threads}`
FLAG = re.compile(r"--([a-z][a-z-]*)(?: '?\{(?:(input|output|params|wildcards)\.(\w+)|(threads))(?::q)?\}'?)?")
SHARED_FLAGS = {"name", "options"}  # every tracked stage's run name and options block


def workflow_rules() -> dict[str, str]:
    """Rule name -> its shell command (the joined string literals after `shell:`)."""
    rules = {}
    for path in [*sorted((REPO / "rules").glob("*.smk")), REPO / "Snakefile"]:
        rules.update(shell_commands(path.read_text()))
    return rules


def shell_commands(text: str) -> dict[str, str]:
    rules = {}
    for name, body in RULE.findall(text):
        shell = body.split("shell:", 1)[1] if "shell:" in body else ""
        rules[name] = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', shell))
    return rules


def load_profiles():
    spec = importlib.util.spec_from_file_location("profiles", REPO / "workflow/scripts/profiles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_rule_runs_a_stage_of_the_table_and_every_stage_has_its_rules():
    rules = workflow_rules()
    declared = {rule for stage in STAGES for rule in stage.rules}
    assert set(rules) - {"all"} == declared, "rules without a stage entry, or entries without a rule"


def test_every_rule_file_is_included():
    included = set(re.findall(r'^\s*include: "(rules/\w+\.smk)"', (REPO / "Snakefile").read_text(), re.MULTILINE))
    assert included == {f"rules/{path.name}" for path in (REPO / "rules").glob("*.smk")}


def test_every_stage_has_its_cli_command():
    commands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {stage.command for stage in STAGES} <= commands
    assert commands - {stage.command for stage in STAGES} == {"init", "pipeline", "tracking-sync", "where"}


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_each_rule_passes_its_inputs_and_outputs_as_flags_of_the_same_name(stage):
    flags = {name.replace("_", "-"): spec for name, spec in stage.flags().items()}
    rules = workflow_rules()
    for rule in stage.rules:
        shell = rules[rule]
        assert f"visionqc {stage.command} " in shell or f"}} {stage.command} " in shell, rule
        passed = {}
        for flag, _, name, _threads in FLAG.findall(shell):
            assert flag in flags or flag in SHARED_FLAGS, f"{rule}: --{flag} is not a flag of {stage.command}"
            assert not name or flag in SHARED_FLAGS or name.replace("_", "-") == flag, f"{rule}: --{flag} takes {name}"
            passed[flag] = name
        missing = [flag for flag, spec in flags.items() if spec.get("required") and flag not in passed]
        assert not missing, f"{rule} does not pass {missing}"
        assert ("name" in passed) == stage.tracked or stage.name == "stage_a", f"{rule}: --name"
        assert ("options" in passed) == (stage.section is not None), f"{rule}: --options"


def test_both_profiles_give_each_rule_the_table_s_threads_and_gpus_exactly_to_gpu_stages():
    profiles = load_profiles()
    local = yaml.safe_load((REPO / "workflow/profiles/local/config.yaml").read_text())
    slurm = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    for stage in STAGES:
        for rule in stage.rules:
            if stage.local:
                assert rule not in slurm["set-threads"] and rule not in local["set-threads"], rule
                continue
            assert local["set-threads"][rule] == slurm["set-threads"][rule] == stage.resources.threads, rule
            assert "gpu" not in local.get("set-resources", {}).get(rule, {}), f"{rule}: local jobs find their device"
            given = slurm["set-resources"].get(rule, {})
            assert (given.get("gpu") == 1) == stage.resources.gpu, f"{rule}: GPU under Slurm"
            if stage.resources.gpu:
                assert given["slurm_partition"] == "'$VISIONQC_SLURM_GPU_PARTITION'", rule
            mem, runtime = (given["mem_mb"], given["runtime"]) if given else (slurm["default-resources"]["mem_mb"],
                                                                              slurm["default-resources"]["runtime"])
            assert str(mem).split(" ")[0] == str(stage.resources.mem_mb), rule
            assert runtime == f"{stage.resources.runtime} * attempt", rule
    for profile in ("local", "slurm"):
        text = (REPO / "workflow/profiles" / profile / "config.yaml").read_text()
        assert text == profiles.render(profile), f"rerun workflow/scripts/profiles.py ({profile} profile is stale)"


def test_localrules_are_the_table_s_local_stages():
    texts = [(REPO / "Snakefile").read_text()] + [path.read_text() for path in sorted((REPO / "rules").glob("*.smk"))]
    listed = [block for text in texts for block in re.findall(r"^localrules:\n((?:\s+\w+,\n)+)", text, re.MULTILINE)]
    assert {name for block in listed for name in re.findall(r"\w+", block)} == {"all"} | {
        rule for s in STAGES if s.local for rule in s.rules}


def test_every_stage_with_options_reads_a_schema_block():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    for stage in STAGES:
        if stage.section is None:
            continue
        node = schema
        for part in stage.section.split("."):
            node = node["properties"][part]
        for key in stage.wiring:
            assert key in node["properties"], f"{stage.name}: wiring key {stage.section}.{key}"
        if stage.options:
            assert options_class(stage) is not None


def test_where_lists_every_stage_that_has_results(tmp_path, capsys):
    with_results = [stage for stage in STAGES if stage.results]
    assert {s.name for s in STAGES if s.tracked} == {s.name for s in with_results}
    for stage in with_results:
        (tmp_path / stage.results).mkdir()
    print_where(tmp_path)
    shown = capsys.readouterr().out
    for stage in with_results:
        assert f"{tmp_path / stage.results}/" in shown, stage.name
