"""Contract record → ms-swift messages. Shared by cache, training and inference.

- user turn: the images as {"type": "image", "image": path}, then the prompt;
- assistant, dense mode: JSON grouped per image, {"图片_1": [{"bbox_2d": [...], "desc": ...}]}, each image's
  objects in reading order (top to bottom, then left to right, by the top-left corner), with
  coordinates normalised to 0-1000 (x·1000/width, y·1000/height, rounded);
- assistant, summary mode: the record's summary.

A dense record with more images than `images_per_turn` becomes several user/assistant turns, each
carrying that many images and the objects on them (an object's optional `image_index`, 0-based,
says which image it is on; the default is the first). Summary mode keeps all images in one turn
because the summary describes the whole record. Chat-only records pass through, their image paths
resolved. The prompt is chosen by the record's `_fusion_prompt` (set by fuse), else by its mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from visionqc import contract

IMAGE_KEY = "图片_{}"


def normalise(flat: list[float], width: int, height: int) -> list[int]:
    return [round(v * 1000 / (width if i % 2 == 0 else height)) for i, v in enumerate(flat)]


def reading_order(answer: dict) -> tuple[int, int]:
    """An answered object's place when read top to bottom, then left to right: its shape's top-left corner."""
    flat = answer[contract.geometry_key(answer)]
    return min(flat[1::2]), min(flat[0::2])


def dense_answer(objects: list[dict], width: int, height: int, image_numbers: list[int]) -> str:
    """Each image's objects in reading order, whatever order the annotator drew them in: the answer is then
    a function of the photo, which a model can learn."""
    grouped: dict[str, list[dict]] = {IMAGE_KEY.format(n): [] for n in image_numbers}
    for obj in objects:
        number = obj.get("image_index", 0) + 1
        if number not in image_numbers:
            continue
        key = contract.geometry_key(obj)
        grouped[IMAGE_KEY.format(number)].append({key: normalise(obj[key], width, height), "desc": obj["desc"]})
    ordered = {image: sorted(answers, key=reading_order) for image, answers in grouped.items()}
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))


def _resolve(path: str, base_dir: Path) -> str:
    return path if os.path.isabs(path) else os.path.normpath(base_dir / path)


def record_mode(record: dict, default: str = "dense") -> str:
    """dense, summary or chat. A mixed record draws dense or summary from its draw key and its epoch
    (`metadata._epoch`, set by augment; 0 unaugmented), so epoch k of a fusion is a function of (config, k).
    A record without objects is always summary; one without a summary, always dense."""
    if "messages" in record:
        return "chat"
    metadata = record.get("metadata") or {}
    mode = metadata.get("_fusion_mode", default)
    if mode != "mixed":
        return mode
    if not record.get("objects"):  # every contract object has geometry
        return "summary"
    if "summary" not in record:
        return "dense"
    key = f"{metadata['_fusion_draw']}:{metadata.get('_epoch', 0)}".encode()
    draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    return "dense" if draw < metadata["_fusion_dense_ratio"] else "summary"


def build_messages(record: dict, base_dir: str | Path, prompts: dict[str, str], images_per_turn: int = 0, default_mode: str = "dense") -> dict:
    """One record → {"messages": [...]} in ms-swift's format, image paths made absolute."""
    base_dir = Path(base_dir)
    mode = record_mode(record, default_mode)
    if mode == "chat":
        messages = []
        for message in record["messages"]:
            content = message["content"]
            if isinstance(content, list):
                content = [dict(item, image=_resolve(item["image"], base_dir)) if item.get("type") == "image" else item for item in content]
            messages.append({"role": message["role"], "content": content})
        row = {"messages": messages}
        if record.get("images"):
            row["images"] = [_resolve(p, base_dir) for p in record["images"]]
        return row

    prompt_name = (record.get("metadata") or {}).get("_fusion_prompt") or mode  # a mixed record: the drawn mode's
    if prompt_name not in prompts:
        raise ValueError(f"prompt {prompt_name!r} is not defined; add it under prompts: (have {', '.join(sorted(prompts))})")
    prompt = prompts[prompt_name]
    images = [_resolve(p, base_dir) for p in record["images"]]
    if mode == "summary":
        if "summary" not in record:
            raise ValueError("summary mode needs a record with a summary; set convert.summary: true or use dense mode")
        turns = [(list(range(1, len(images) + 1)), record["summary"])]
    elif mode == "dense":
        step = images_per_turn if images_per_turn > 0 else len(images)
        turns = []
        for start in range(0, len(images), step):
            numbers = list(range(start + 1, min(start + step, len(images)) + 1))
            turns.append((numbers, dense_answer(record["objects"], record["width"], record["height"], numbers)))
    else:
        raise ValueError(f"unknown mode {mode!r}; use dense, summary or chat")
    messages = []
    for numbers, answer in turns:
        content = [{"type": "image", "image": images[n - 1]} for n in numbers]
        content.append({"type": "text", "text": prompt})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


VERDICT_PASS, VERDICT_FAIL = "通过", "不通过"
# Photo-group folders and the label each gives (Stage-A reads them; plots show the folder names).
LABEL_FOLDERS = {"审核通过": "pass", "审核不通过": "fail"}


def ticket_key(group: dict) -> str:
    """A photo group's key in Stage-A/B rows: `<group_id>::pass|fail` when reviewed, `<group_id>` when new."""
    return f"{group['group_id']}::{group['label']}" if group["label"] else group["group_id"]

VERDICT_CONTRACT = "只输出两行：第一行写“通过”或“不通过”；第二行写“理由: ”加上原因。"


def verdict_prompt(guidance: str, per_image: dict[str, str]) -> str:
    """The Stage-B prompt: output contract, mission guidance, then the group's per-image summaries."""
    summaries = "\n".join(f"{key}: {summary}" for key, summary in per_image.items())
    return f"{VERDICT_CONTRACT}\n审核规则:\n{guidance.strip()}\n图片摘要:\n{summaries}"


def verdict_answer(passed: bool, reason: str) -> str:
    return f"{VERDICT_PASS if passed else VERDICT_FAIL}\n理由: {reason}"


REASON = re.compile(r"^理由\s*[:：]\s*(\S.*)$")


def parse_verdict(raw: str) -> tuple[str, str, bool]:
    """Strict two-line parse → (verdict, reason, parsed). Unparseable output fails closed."""
    lines = [line.strip() for line in raw.strip().splitlines()]
    if len(lines) == 2 and lines[0] in (VERDICT_PASS, VERDICT_FAIL):
        match = REASON.match(lines[1])
        if match:
            return lines[0], match.group(1).strip(), True
    return VERDICT_FAIL, "无法解析模型输出，按不通过处理", False
