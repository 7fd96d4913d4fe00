"""Stage options: dataclasses built from one config block, refusing unknown keys.

Every stage reads its block through `options_from`. A field whose type is another options
dataclass is built from its nested block the same way, so `convert.labelme.ignore_labelz` is
refused as precisely as `convert.resise`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import TypeVar

T = TypeVar("T")


def unknown_key_message(section: str, key: str, known: typing.Iterable[str]) -> str:
    """`unknown option a.b; did you mean a.c?` with the closest valid key, if one is close."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {section}.{close[0]}?" if close else f"; valid keys: {', '.join(sorted(known))}"
    return f"unknown option {section}.{key}{hint} (see config/README.md)"


def options_from(cls: type[T], options: dict | None, section: str) -> T:
    """`cls(**options)`, nested option blocks included; an unknown key is a ValueError naming it."""
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"{section} must be a mapping of options, got {type(options).__name__}")
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in options:
        if key not in fields:
            raise ValueError(unknown_key_message(section, key, fields))
    hints = typing.get_type_hints(cls)
    for name, value in options.items():
        nested = hints.get(name)
        if isinstance(nested, type) and dataclasses.is_dataclass(nested) and isinstance(value, dict):
            options[name] = options_from(nested, value, f"{section}.{name}")
    made = cls(**options)
    check = getattr(made, "check", None)
    if check is not None:
        check(section)
    return made
