"""The seams between Snakemake, the CLI and the stages: imports, options, error messages, the error exit."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys

import pytest
import yaml

from visionqc import cli
from visionqc.augment import AugmentOp
from visionqc.cli import EXPECTED_ERRORS, main
from visionqc.convert.common import ConvertOptions
from visionqc.fuse import FusionEntry, FusionOptions
from visionqc.options import options_from
from visionqc.stage_a import StageAOptions
from visionqc.stages import BY_NAME, STAGES, options_class
from visionqc.taxonomy import Taxonomy
from visionqc.validate import ValidateOptions

from conftest import REPO

SRC = REPO / "src" / "visionqc"
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
# Stage modules: each is called by one rule; shared modules (contract, io, tracking, messages, vision, …) serve them.
STAGE_MODULES = {"convert", "validate", "fuse", "augment", "cache", "train", "post_train", "merge", "stage_a", "stage_b", "eval_dense", "qa_labels",
          "timeseries.cache", "timeseries.train", "timeseries.evaluate"}


def stage_of(module: str) -> str | None:
    name = module.removeprefix("visionqc.")
    return next((stage for stage in STAGE_MODULES if name == stage or name.startswith(stage + ".")), None)


def test_no_stage_imports_another_stage():
    found = []
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        own = stage_of(module)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                other = stage_of(name) if name.startswith("visionqc.") else None
                if other and other != own:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: stage {own} imports stage {other} ({name})")
    assert not found, "\n".join(found)


def schema_at(dotted: str) -> dict | None:
    """The schema node of a dotted config key; `<name>` (or a dataset/run name) steps into additionalProperties."""
    node = SCHEMA
    for part in dotted.split("."):
        properties = node.get("properties", {})
        if part in properties:
            node = properties[part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
        if "$ref" in node:
            node = {**SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
        if node.get("type") == "array" and isinstance(node.get("items"), dict) and "$ref" in node["items"]:
            node = {**node, **SCHEMA["$defs"][node["items"]["$ref"].rsplit("/", 1)[1]]}
    return node


# Each options class, the config block it reads, and the keys that come from elsewhere or only wire the DAG: from
# the stage table, plus the classes of list items.
OPTION_BLOCKS = [(options_class(stage), stage.section, {*stage.wiring, *stage.extra}) for stage in STAGES if stage.options]
OPTION_BLOCKS += [(FusionEntry, "fusion.targets", set()), (AugmentOp, "augment.ops", set()), (Taxonomy, "taxonomy", set())]


@pytest.mark.parametrize("cls, block, elsewhere", OPTION_BLOCKS, ids=[b for _, b, _ in OPTION_BLOCKS])
def test_every_option_in_code_is_in_the_schema_with_a_description(cls, block, elsewhere):
    node = schema_at(block)
    assert node is not None, f"{block} is not in the schema"
    properties = node.get("properties", {})
    for field in dataclasses.fields(cls):
        spec = properties.get(field.name)
        if spec is None:  # a key of another block (the cache's model.* and prompts)
            other = next((e for e in elsewhere if e == field.name or e.endswith("." + field.name)), None)
            spec = schema_at(other) if other else None
        assert spec is not None, f"{cls.__name__}.{field.name} is not in the schema ({block}.{field.name})"
        assert spec.get("description"), f"{block}.{field.name} has no description"
    for name in properties:
        assert name in cls.__dataclass_fields__ or name in elsewhere, f"{block}.{name} is in the schema, but {cls.__name__} does not read it"


def default_disagreements(cls, block: str, elsewhere=()) -> list[str]:
    """Fields whose dataclass default differs from the schema's default (nested option blocks field by field)."""
    wrong = []
    for field in dataclasses.fields(cls):
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            continue  # required: no default to agree on
        own = field.name in (schema_at(block) or {}).get("properties", {})
        other = None if own else next((e for e in elsewhere if e.endswith("." + field.name) or e == field.name), None)
        key = other or f"{block}.{field.name}"
        spec = schema_at(key) or {}
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if dataclasses.is_dataclass(default):
            wrong += default_disagreements(type(default), key)
        elif field.name in (schema_at(key.rpartition(".")[0]) or {}).get("required", []):
            continue  # the config must name it
        elif "default" not in spec:
            wrong.append(f"{key}: the schema has no default ({cls.__name__} says {default!r})")
        elif spec["default"] != (list(default) if isinstance(default, tuple) else default):
            wrong.append(f"{key}: schema {spec['default']!r}, {cls.__name__} {default!r}")
    return wrong


@pytest.mark.parametrize("cls, block, elsewhere", OPTION_BLOCKS, ids=[b for _, b, _ in OPTION_BLOCKS])
def test_each_default_is_the_same_in_the_schema_and_the_options_class(cls, block, elsewhere):
    """`visionqc <stage>` run by hand and the same stage under Snakemake (which fills the schema's defaults) agree."""
    assert not default_disagreements(cls, block, elsewhere)


def test_nested_option_blocks_match_the_schema_too():
    import typing

    for cls, block in ((ConvertOptions, "convert"), (ValidateOptions, "validate")):
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint) and name not in BY_NAME[block].extra:  # a borrowed block has its own entry
                properties = schema_at(f"{block}.{name}").get("properties", {})
                assert set(properties) == {f.name for f in dataclasses.fields(hint)}, f"{block}.{name}"
                assert all(spec.get("description") for spec in properties.values()), f"{block}.{name}"


def test_an_unknown_option_names_the_key_and_the_closest_valid_one():
    with pytest.raises(ValueError, match=r"unknown option stage_a\.batchsize; did you mean stage_a\.batch_size\?"):
        options_from(StageAOptions, {"batchsize": 3}, "stage_a")
    with pytest.raises(ValueError, match=r"unknown option convert\.labelme\.ignore_label; did you mean convert\.labelme\.ignore_labels\?"):
        ConvertOptions.from_dict({"labelme": {"ignore_label": []}})
    with pytest.raises(ValueError, match=r"unknown option fusion\.targets\[0\]\.ratoi; did you mean fusion\.targets\[0\]\.ratio\?"):
        FusionOptions.from_dict({"targets": [{"dataset": "a", "ratoi": 2}]})
    with pytest.raises(ValueError, match=r"unknown option convert\.zzz; valid keys: "):
        ConvertOptions.from_dict({"zzz": 1})


SECTIONS = tuple(SCHEMA["properties"])
FILE_SUFFIXES = {"json", "jsonl", "py", "png", "yaml", "txt", "pt", "arrow", "csv", "wav", "smk", "safetensors", "log", "md"}
KEY = re.compile(rf"(?<![\w./])((?:{'|'.join(SECTIONS)})(?:\.(?:[A-Za-z_]\w*|<\w+>))+)")


def error_texts(tree: ast.AST) -> list[tuple[int, str]]:
    """String parts of every raise statement and of every *Error(...) call (messages built for the user), and the
    section names given to options_from (its messages print them)."""
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "options_from" and len(node.args) == 3:
            section = node.args[2]
            if isinstance(section, ast.Constant) and isinstance(section.value, str):
                texts.append((section.lineno, section.value + ".x"))  # any key under the section
        is_error_call = isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")).endswith(("Error", "error"))
        if isinstance(node, ast.Raise) or is_error_call:
            for inner in ast.walk(node):
                if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                    texts.append((inner.lineno, inner.value))
    return texts


def test_config_keys_named_in_error_messages_exist():
    sources = [(path, error_texts(ast.parse(path.read_text()))) for path in SRC.rglob("*.py")]
    sources.append((REPO / "rules" / "common.smk", list(enumerate((REPO / "rules" / "common.smk").read_text().splitlines(), 1))))
    checked, wrong = 0, []
    for path, texts in sources:
        for lineno, text in texts:
            for key in KEY.findall(text):
                if key.rsplit(".", 1)[-1] in FILE_SUFFIXES:
                    continue
                checked += 1
                if key.endswith(".x"):  # an options_from section: the section must exist
                    key = key.removesuffix(".x")
                if schema_at(key) is None:
                    wrong.append(f"{path.relative_to(REPO)}:{lineno}: {key}")
    assert checked > 15, "the scan found too few keys to be trusted"
    assert not wrong, "error messages name config keys that do not exist:\n" + "\n".join(wrong)


def test_every_error_we_raise_exits_with_its_message():
    """Every `raise SomeError(...)` in the package is an error the CLI turns into a message and exit 1."""
    import builtins
    import importlib

    unknown = []
    for path in SRC.rglob("*.py"):
        module = importlib.import_module(".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                cls = getattr(module, node.exc.func.id, getattr(builtins, node.exc.func.id, None))
                if isinstance(cls, type) and not issubclass(cls, EXPECTED_ERRORS):
                    unknown.append(f"{path.relative_to(REPO)}:{node.lineno}: {cls.__name__}")
    assert not unknown, "\n".join(unknown)


def test_an_error_prints_its_message_without_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["merge", "--base", "b", "--trained", "t", "--val-cache", "missing.json", "--model", "m", "--verification", "v.json",
            "--name", "x", "--tracking-uri", ""]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "visionqc merge: error: missing.json: cache pointer not found; run the cache rule that writes it" in err
    assert "Traceback" not in err and "--debug" in err
    with pytest.raises(FileNotFoundError):
        main(["--debug", *args])


MMAPPED_BLOCKS = """
import ctypes, sys
from visionqc import cli
if sys.argv[1] == "tuned":
    assert cli.keep_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("mode, mmapped", [("default", 1), ("tuned", 0)])
def test_the_cli_keeps_big_freed_blocks_in_the_heap(mode, mmapped):
    """Untuned glibc serves a 64 MB block by mmap (and unmaps it on free); the CLI's setting keeps it in the heap."""
    done = subprocess.run([sys.executable, "-c", MMAPPED_BLOCKS, mode], capture_output=True, text=True, check=True)
    assert int(done.stdout) == mmapped


def test_the_heap_setting_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("VISIONQC_KEEP_FREED_MEMORY", "0")
    assert not cli.keep_freed_memory()
