"""The team's taxonomy: the categories (and their attribute keys) that answers may contain.

The config's `taxonomy:` block. convert reports (or refuses) an export class that is neither a category nor mapped
onto one by `convert.label_map`; validate rejects a record naming another category or attribute; the cache fills
`{categories}` in the prompts. A taxonomy without categories checks nothing (a config that has not named them yet).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

CATEGORIES_PLACEHOLDER = "{categories}"
UNKNOWN_POLICIES = ("report", "refuse")


def closest(name: str, candidates) -> str | None:
    found = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.5)
    return found[0] if found else None


@dataclass(frozen=True)
class Taxonomy:
    categories: dict = field(default_factory=dict)  # name → {attributes: [keys]}; attributes absent: any keys
    unknown: str = "report"  # report | refuse: an export class that is no category and not mapped

    def check(self, section: str) -> None:
        if self.unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"{section}.unknown must be report or refuse, got {self.unknown!r}")
        for name, spec in self.categories.items():
            if spec is not None and not isinstance(spec, dict):
                raise ValueError(f"{section}.categories.{name} must be a mapping ({{attributes: [...]}}) or empty")

    @property
    def checks(self) -> bool:
        return bool(self.categories)

    def knows(self, category: str) -> bool:
        return not self.checks or category in self.categories

    def unknown_category(self, category: str) -> str | None:
        """Why a category is not the taxonomy's (None when it is), with the closest one."""
        if self.knows(category):
            return None
        near = closest(category, self.categories)
        hint = f" (closest: {near})" if near else ""
        return (f"category {category!r} is not in taxonomy.categories{hint}; add it there, or map the export's name onto "
                "a category with convert.label_map")

    def unknown_attributes(self, category: str, keys) -> str | None:
        """Why a category's attribute keys are not all allowed (None when they are, or when it lists none)."""
        allowed = (self.categories.get(category) or {}).get("attributes")
        if allowed is None:
            return None
        extra = [key for key in keys if key not in allowed]
        if not extra:
            return None
        return (f"attribute {extra[0]!r} of category {category!r} is not among its taxonomy attributes "
                f"({', '.join(allowed) or 'none'}); add it to taxonomy.categories.{category}.attributes")

    def fill(self, prompt: str) -> str:
        """The prompt with {categories} replaced by the category names (、-separated, in taxonomy order).

        Without categories the placeholder stays: the config check refuses a prompt that uses it and is asked.
        """
        if CATEGORIES_PLACEHOLDER not in prompt or not self.categories:
            return prompt
        return prompt.replace(CATEGORIES_PLACEHOLDER, "、".join(self.categories))
