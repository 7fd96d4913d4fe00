"""The conda envs repeat the virtualenv's pins."""

import re

import yaml

from conftest import REPO


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_env_files_parse_and_agree_with_requirements():
    pins = requirement_pins()
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert len(env_files) >= 3
    for path in env_files:
        env = yaml.safe_load(path.read_text())
        pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
        assert pip, path
        for spec in pip:
            name, _, version = spec.partition("==")
            assert version, f"{path.name}: {spec} is not pinned"
            assert pins.get(name.lower()) == version, f"{path.name}: {spec} disagrees with requirements.txt ({pins.get(name.lower())})"


def test_config_readme_documents_every_schema_key():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    readme = (REPO / "config" / "README.md").read_text()
    missing = []
    for top, spec in schema["properties"].items():
        for key in spec.get("properties", {}):
            if f"`{top}.{key}" not in readme:
                missing.append(f"{top}.{key}")
    assert not missing, f"config/README.md lacks {missing}"


def test_every_stage_rule_has_an_env_that_installs_visionqc():
    """`--software-deployment-method conda`: each rule names an env, and each such env installs the package."""
    used = set()
    for rule_file in sorted((REPO / "rules").glob("*.smk")):
        text = rule_file.read_text()
        rules = re.split(r"^rule ", text, flags=re.MULTILINE)[1:]
        for body in rules:
            name = body.split(":", 1)[0]
            if "visionqc" in body.split("shell:", 1)[-1]:
                env = re.search(r'conda:\s*\n\s*"\.\./(envs/\w+\.yaml)"', body)
                assert env, f"{rule_file.name}: rule {name} runs visionqc without a conda: env"
                used.add(env.group(1))
    assert used == {"envs/data.yaml", "envs/swift.yaml", "envs/xtuner.yaml"}
    for env in used:
        script = (REPO / env).with_suffix(".post-deploy.sh").read_text()
        assert "pip install --no-deps --no-build-isolation -e ." in script, env
    xtuner = (REPO / "envs" / "xtuner.post-deploy.sh").read_text()
    assert '--no-deps "${VISIONQC_XTUNER_WHEEL:-xtuner @ git+https://github.com/InternLM/xtuner@b934f462095c1e750229de35367c50ae36caa786}"' in xtuner
