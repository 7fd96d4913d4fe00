"""Stage options: dataclasses built from the config section, refusing unknown keys."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def options_from(cls: type[T], options: dict, section: str) -> T:
    unknown = set(options) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown {section} option(s): {', '.join(sorted(unknown))}; see config/README.md")
    return cls(**options)
