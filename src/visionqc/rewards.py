"""GRPO rewards for Stage-A summaries and Stage-B verdicts, and their ms-swift ORM plugin.

Each reward is a pure function of one completion (and the reference answer) returning a value in
[0, 1]. A reward that does not apply to a prompt's task (a summary reward on a verdict prompt)
gives None, which ms-swift counts as no reward (NaN, skipped in the weighted sum).

`register()` puts every reward in `swift.rewards.orms` under its function name; swift_plugin.py calls
it, for `swift rlhf --external_plugins src/visionqc/swift_plugin.py --reward_funcs summary_format …`.
The prompt rows carry `task` (summary or verdict) and `solution` (the reference answer).
"""

from __future__ import annotations

import json

from visionqc.contract import COUNT_KEY, IRRELEVANT_SUMMARY, parse_summary
from visionqc.messages import parse_verdict


def summary_format(completion: str, solution: str | None = None) -> float:
    """One line that is a JSON object or the literal 无关图片 (the 统计 shape is summary_parse's business)."""
    text = completion.strip()
    if not text or "\n" in text:
        return 0.0
    if text == IRRELEVANT_SUMMARY:
        return 1.0
    try:
        return 1.0 if isinstance(json.loads(text), dict) else 0.0
    except ValueError:
        return 0.0


def summary_parse(completion: str, solution: str | None = None) -> float:
    """The summary contract holds: 无关图片, or a 统计 list of {类别, 数量} entries, each category once."""
    return 1.0 if parse_summary(completion).valid else 0.0


def _counts(completion: str, solution: str) -> tuple[dict, dict] | None:
    """(predicted, annotated) {category: count}; None when either side breaks the contract."""
    predicted, annotated = parse_summary(completion), parse_summary(solution)
    if not predicted.valid or not annotated.valid:
        return None
    return predicted.counts, annotated.counts


def summary_categories(completion: str, solution: str) -> float:
    """Jaccard overlap of the predicted categories with the annotated ones (1 when both name none)."""
    counts = _counts(completion, solution)
    if counts is None:
        return 0.0
    predicted, annotated = (set(c) for c in counts)
    union = predicted | annotated
    return len(predicted & annotated) / len(union) if union else 1.0


def summary_counts(completion: str, solution: str) -> float:
    """Share of the categories on either side whose count agrees (a missing category counts 0)."""
    counts = _counts(completion, solution)
    if counts is None:
        return 0.0
    predicted, annotated = counts
    union = set(predicted) | set(annotated)
    if not union:
        return 1.0
    return sum(predicted.get(c, 0) == annotated.get(c, 0) for c in union) / len(union)


def summary_content_f1(completion: str, solution: str) -> float:
    """F1 over objects: each category contributes min(predicted, annotated) matches, weighted by its counts."""
    counts = _counts(completion, solution)
    if counts is None:
        return 0.0
    predicted, annotated = counts
    total_predicted, total_annotated = sum(predicted.values()), sum(annotated.values())
    if total_predicted == total_annotated == 0:
        return 1.0
    matched = sum(min(n, annotated.get(c, 0)) for c, n in predicted.items())
    return 2 * matched / (total_predicted + total_annotated)


def _payload(text: str) -> dict | None:
    """The summary's JSON object ({} for 无关图片); None when the contract does not hold."""
    if not parse_summary(text).valid:
        return None
    text = text.strip()
    return {} if text == IRRELEVANT_SUMMARY else json.loads(text)


def summary_header(completion: str, solution: str) -> float:
    """The answer's form is the reference's: 无关图片 for 无关图片, else an object with the same top-level keys in
    the same order (Jaccard of the key sets when they differ, halved when only the order differs)."""
    predicted, annotated = _payload(completion), _payload(solution)
    if predicted is None or annotated is None:
        return 0.0
    if not predicted or not annotated:
        return 1.0 if predicted == annotated else 0.0
    if list(predicted) == list(annotated):
        return 1.0
    keys, reference = set(predicted), set(annotated)
    return 0.5 if keys == reference else len(keys & reference) / len(keys | reference)


def summary_dataset(completion: str, solution: str) -> float:
    """The fields beside 统计 (a dataset or site tag the annotation carries) are the reference's: the share of
    fields on either side whose values agree (1 when neither has any)."""
    predicted, annotated = _payload(completion), _payload(solution)
    if predicted is None or annotated is None:
        return 0.0
    fields = (set(predicted) | set(annotated)) - {COUNT_KEY}
    if not fields:
        return 1.0
    return sum(name in predicted and name in annotated and predicted[name] == annotated[name] for name in fields) / len(fields)


def summary_objects_total(completion: str, solution: str) -> float:
    """How close the total object count is: 1 - |predicted - annotated| / max(predicted, annotated)."""
    counts = _counts(completion, solution)
    if counts is None:
        return 0.0
    predicted, annotated = (sum(c.values()) for c in counts)
    return 1.0 if predicted == annotated else 1 - abs(predicted - annotated) / max(predicted, annotated)


def summary_content(completion: str, solution: str) -> float:
    """The counts are exactly the reference's, category for category (Stage-A's exact match of one image)."""
    counts = _counts(completion, solution)
    return 1.0 if counts is not None and counts[0] == counts[1] else 0.0


def verdict_format(completion: str, solution: str | None = None) -> float:
    """Exactly two lines: 通过 or 不通过, then 理由: and a reason."""
    return 1.0 if parse_verdict(completion)[2] else 0.0


def verdict_label(completion: str, solution: str) -> float:
    """The verdict equals the reference answer's; an unparseable completion earns nothing."""
    verdict, _, parsed = parse_verdict(completion)
    expected, _, known = parse_verdict(solution)
    return 1.0 if parsed and known and verdict == expected else 0.0


# name → (function, the task whose prompts it scores)
REWARDS = {
    **{f.__name__: (f, "summary") for f in (summary_format, summary_parse, summary_header, summary_dataset, summary_categories,
                                            summary_counts, summary_objects_total, summary_content, summary_content_f1)},
    **{f.__name__: (f, "verdict") for f in (verdict_format, verdict_label)},
}


def score_batch(name: str, completions: list[str], task: list[str], solution: list[str]) -> list[float | None]:
    """One reward over a batch of rows, None where the row's task is not the reward's."""
    function, scored_task = REWARDS[name]
    return [function(c, s) if t == scored_task else None for c, t, s in zip(completions, task, solution, strict=True)]


def register() -> list[str]:
    """Register every reward as an ms-swift ORM named after its function; returns the names."""
    from swift.rewards import ORM, orms

    def make(name: str):
        def __call__(self, completions, task=None, solution=None, **kwargs):
            if task is None or solution is None:
                raise ValueError(f"reward {name}: the prompt rows need `task` and `solution` columns (post_train writes them)")
            return score_batch(name, list(completions), list(task), list(solution))

        return type(name, (ORM,), {"__call__": __call__, "__doc__": REWARDS[name][0].__doc__})

    for name in REWARDS:
        orms[name] = make(name)
    return list(REWARDS)

