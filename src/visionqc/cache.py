"""Stage cache: fused JSONL → a tokenized, memory-mappable Arrow cache, keyed by a content hash.

The text side is encoded by ms-swift's own template (so the tokens are what swift would train
on), but image placeholders are expanded from a header read: the grid comes from the image size
and the qwen_vl_utils resize rule under the configured pixel budget, never from decoded pixels.

Layout: `<cache_root>/<key>/` holds `data-NNNNN.arrow` (Arrow IPC files: input_ids, labels,
length, images, image_grid_thw, source, line), `manifest.json` and `lengths.png`. The key is a
sha256 over the records, the tokenizer/processor files, the template, max_length, the pixel
budget, the prompts, the message options and the ms-swift version; an existing key is reused.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from visionqc.arrow_cache import (
    ShardWriter,
    length_stats,
    over_length_error,
    reuse_or_build,
)
from visionqc.faults import pause_point
from visionqc.io import atomic_directory, copy_atomic, read_jsonl, write_json
from visionqc.messages import build_messages, record_mode
from visionqc.options import options_from
from visionqc.plots import plot_lengths, plotting_process
from visionqc.taxonomy import Taxonomy
from visionqc.tracking import StageResult
from visionqc.vision import (
    CACHE_SCHEMA,
    HeaderGrids,
    PixelBudget,
)

CACHE_FORMAT = 1
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "processor_config.json", "preprocessor_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "video_preprocessor_config.json")


@dataclass
class CacheOptions:
    """The cache block, plus what the cache must agree on with the model (model.*) and the prompts.

    Later stages read these back from the manifest (`CacheRef.options`), never from the config again.
    """

    image_max_tokens: int  # model.image_max_tokens: merged vision tokens per image, at most
    image_min_tokens: int  # model.image_min_tokens
    prompts: dict
    model_type: str = "qwen3_vl"
    template: str = "qwen3_vl"
    max_length: int = 1024
    images_per_turn: int = 0  # 0: all images of a record in one user turn
    default_mode: str = "dense"
    shard_size: int = 8192

    @classmethod
    def from_dict(cls, options: dict) -> CacheOptions:
        missing = [name for name in ("image_max_tokens", "image_min_tokens", "prompts") if name not in options]
        if missing:
            raise ValueError(f"cache options lack {', '.join(missing)} (model.image_max_tokens, model.image_min_tokens, prompts)")
        options = dict(options)
        taxonomy = options_from(Taxonomy, options.pop("taxonomy", None), "taxonomy")
        options["prompts"] = {name: taxonomy.fill(text) for name, text in options["prompts"].items()}
        return options_from(cls, options, "cache")

    @property
    def pixel_budget(self) -> PixelBudget:
        return PixelBudget(self.image_max_tokens, self.image_min_tokens)


def cache_key(records: str | Path, model_dir: str | Path, options: CacheOptions) -> str:
    digest = hashlib.sha256()
    digest.update(f"visionqc-cache-{CACHE_FORMAT}|swift-{metadata.version('ms-swift')}\n".encode())
    _hash_file(digest, records)
    for name in PROCESSOR_FILES:
        path = Path(model_dir) / name
        if path.exists():
            digest.update(f"\n{name}\n".encode())
            _hash_file(digest, path)
    settings = {k: v for k, v in asdict(options).items() if k != "shard_size"}
    digest.update(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def _hash_file(digest, path: str | Path) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)


class FastChatMLEncoder:
    """ms-swift's qwen3_vl encoding, rebuilt for speed: the same context strings, tokenised in batches.

    swift splits a conversation into contexts (prompt parts unlabelled, answers labelled) and
    tokenises each one; we build the same contexts, tokenise all of them with one batched call of
    the Rust tokenizer (prompt contexts repeat, so they are memoised) and expand the image
    placeholders from header grids. Rows it does not cover (a system turn, `<image>` tags in
    text, a conversation that does not end with the assistant) return None and go to swift's
    own template. The cache test compares every demo record with swift's `template.encode`.
    """

    TEMPLATES = ("qwen3_vl",)
    MEMO_SIZE = 4096  # prompt contexts kept encoded: a run's prompts repeat; chat turns that quote a record do not
    IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

    def __init__(self, model_dir: str | Path, options: CacheOptions):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self.grids = options.pixel_budget.grids(model_dir)
        self.image_token = self.tokenizer.token_to_id("<|image_pad|>")
        self._memo: dict[str, list[int]] = {}

    def contexts(self, row: dict) -> list[tuple[str, bool]] | None:
        messages = row["messages"]
        if row.get("images") or len(messages) % 2 or any(
            m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(messages)
        ):
            return None
        contexts, closing = [], ""
        for i in range(0, len(messages), 2):
            query = self._render(messages[i]["content"])
            answer = messages[i + 1]["content"]
            if query is None or not isinstance(answer, str) or "<image>" in answer:
                return None
            contexts.append((f"{closing}<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n", False))
            last = i + 2 == len(messages)
            contexts.append((answer + ("<|im_end|>\n" if last else ""), True))
            closing = "<|im_end|>\n"
        return contexts

    def _render(self, content) -> str | None:
        if isinstance(content, str):
            return None if "<image>" in content else content
        parts = []
        for item in content:
            if item.get("type") == "image":
                parts.append(self.IMAGE)
            elif item.get("type") == "text":
                parts.append(item["text"])
            else:
                return None
        return "".join(parts)

    def encode_many(self, rows: list[dict]) -> list[dict | None]:
        """Encode a batch: the first MEMO_SIZE prompt contexts once per run, the other contexts once per batch."""
        plans = [self.contexts(row) for row in rows]
        pending = sorted({text for plan in plans if plan for text, _ in plan if text not in self._memo})
        answers = {}
        for text, encoding in zip(pending, self.tokenizer.encode_batch(pending, add_special_tokens=False), strict=True):
            answers[text] = encoding.ids
        for text in (text for plan in plans if plan for text, labelled in plan if not labelled):
            if text in answers and len(self._memo) < self.MEMO_SIZE:
                self._memo[text] = answers.pop(text)
        return [self._assemble(row, plan, answers) if plan else None for row, plan in zip(rows, plans, strict=True)]

    def _assemble(self, row: dict, plan: list[tuple[str, bool]], answers: dict[str, list[int]]) -> dict:
        images = _images_of(row)
        counts = iter([self.grids.tokens(path) for path in images])
        input_ids, labels = [], []
        for text, labelled in plan:
            for token in self._memo[text] if text in self._memo else answers[text]:
                repeat = next(counts) if token == self.image_token else 1
                input_ids.extend([token] * repeat)
                labels.extend(([token] if labelled else [-100]) * repeat)
        return {"input_ids": input_ids, "labels": labels, "image_grid_thw": [self.grids(path) for path in images]}


class HeaderEncoder:
    """ms-swift's template with image placeholders expanded from header-read grids."""

    def __init__(self, model_dir: str | Path, options: CacheOptions):
        options.pixel_budget.export_to_swift()
        from swift.model import get_processor
        from swift.template import get_template

        self.processor = get_processor(str(model_dir), model_type=options.model_type)
        self.template = get_template(self.processor, template_type=options.template, max_length=None)
        self.template.set_mode("train")
        image_processor = self.processor.image_processor
        self.grids = HeaderGrids(image_processor.patch_size, image_processor.merge_size, options.pixel_budget)
        # Keep swift's text encoding; skip its pixel work (image loading, fetch_image, image_processor).
        self.template.load_images = False
        self.template.replace_tag = self._placeholder
        self.template._encode = self._encode

    def _placeholder(self, media_type, index, inputs):
        if media_type != "image":
            raise ValueError(f"the cache supports images only, got {media_type}")
        return ["<|vision_start|><|image_pad|><|vision_end|>"]

    def _encode(self, inputs):
        from swift.template.base import Template

        encoded = Template._encode(self.template, inputs)
        grids = [self.grids(path) for path in inputs.images]
        token = self.template.image_token_id
        positions = [i for i, t in enumerate(encoded["input_ids"]) if t == token]

        def new_tokens(i):
            return [token] * self.grids.tokens(inputs.images[i])

        input_ids, labels, loss_scale, _ = self.template._extend_tokens(
            encoded["input_ids"], encoded["labels"], encoded.get("loss_scale"), positions, new_tokens,
            mm_mask=[False] * len(encoded["input_ids"]))
        return {"input_ids": input_ids, "labels": labels, "loss_scale": loss_scale, "image_grid_thw": grids}

    def encode(self, row: dict) -> dict:
        encoded = self.template.encode(row)
        return {"input_ids": encoded["input_ids"], "labels": encoded["labels"], "image_grid_thw": encoded.get("image_grid_thw", [])}


def _images_of(row: dict) -> list[str]:
    paths = list(row.get("images", []))
    for message in row["messages"]:
        if isinstance(message["content"], list):
            paths += [item["image"] for item in message["content"] if item.get("type") == "image"]
    return paths


def build_cache(records: str | Path, model_dir: str | Path, cache_root: str | Path, pointer: str | Path,
                lengths_plot: str | Path | None = None, options: dict | None = None) -> StageResult:
    """Tokenize `records` into `<cache_root>/<key>/` (reused when it exists); write `pointer` and `lengths_plot`.

    Raises ValueError listing every over-length sample (file:line); nothing is truncated or dropped.
    """
    opts = CacheOptions.from_dict(dict(options or {}))
    records = Path(records)
    key = cache_key(records, model_dir, opts)
    manifest = reuse_or_build(cache_root, key, pointer, records, lambda folder: _encode_into(records, model_dir, folder, opts, key))
    folder = Path(cache_root) / key
    if lengths_plot:
        copy_atomic(folder / "lengths.png", lengths_plot)
    lengths = manifest["lengths"]
    return StageResult(
        report=manifest,
        metrics={"records_in": lengths["samples"], "records_out": lengths["samples"], "reused": int(manifest["reused"]),
                 "label_tokens": manifest["label_tokens"], **{f"length.{k}": v for k, v in lengths.items()},
                 **{f"mode.{k}": v for k, v in manifest.get("modes", {}).items()}},
        artifacts=[folder / "lengths.png", folder / "manifest.json"],
        inputs={"records": records, "model": model_dir}, outputs={"cache": folder},
    )


def _encode_into(records: Path, model_dir, folder: Path, opts: CacheOptions, key: str) -> None:
    """Encode in batches and write each shard once full; matplotlib loads in a second process meanwhile."""
    fast = FastChatMLEncoder(model_dir, opts) if opts.template in FastChatMLEncoder.TEMPLATES else None
    fallback: HeaderEncoder | None = None
    lengths, sources, modes, too_long, totals = Counter(), Counter(), Counter(), [], Counter()
    batch: list[tuple[int, dict, dict]] = []

    def flush(shards: ShardWriter) -> None:
        nonlocal fallback
        encoded_rows = fast.encode_many([messages for _, _, messages in batch]) if fast else [None] * len(batch)
        for (lineno, record, messages), encoded in zip(batch, encoded_rows, strict=True):
            try:
                if encoded is None:
                    fallback = fallback or HeaderEncoder(model_dir, opts)
                    encoded = fallback.encode(messages)
                    totals["slow"] += 1
                images = _images_of(messages)
                grids = [list(map(int, g)) for g in encoded["image_grid_thw"]]
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(f"{records}:{lineno}: cannot encode: {exc}") from exc
            length = len(encoded["input_ids"])
            if length > opts.max_length:
                too_long.append((lineno, length))
            source = (record.get("metadata") or {}).get("_fusion_source", "")
            lengths[length] += 1
            sources[source] += 1
            modes[record_mode(record, opts.default_mode)] += 1
            totals["label_tokens"] += sum(1 for t in encoded["labels"] if t != -100)
            shards.add({"input_ids": encoded["input_ids"], "labels": encoded["labels"], "length": length, "images": images,
                        "image_grid_thw": grids, "source": source, "line": lineno})
        batch.clear()

    with plotting_process() as plotter, atomic_directory(folder) as work:
        shards = ShardWriter(work, CACHE_SCHEMA, opts.shard_size)
        for lineno, record in tqdm(read_jsonl(records), desc=f"cache {records.name}", unit="rec", mininterval=2):
            try:
                messages = build_messages(record, records.parent, opts.prompts, opts.images_per_turn, opts.default_mode)
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{records}:{lineno}: cannot build messages: {exc}") from exc
            batch.append((lineno, record, messages))
            if len(batch) >= 1024:
                flush(shards)
        flush(shards)
        if too_long:
            raise over_length_error(records, too_long, "cache.max_length", opts.max_length, "Raise cache.max_length, lower model.image_max_tokens or split the records")
        if not lengths:
            raise ValueError(f"{records} holds no records to cache")
        plot = plotter.submit(plot_lengths, lengths, opts.max_length, work / "lengths.png")
        digests = shards.close()
        pause_point("cache:shards-written")
        write_json(work / "manifest.json", {
            "key": key, "records": str(records), "shards": list(digests), "shard_sha256": digests, "options": asdict(opts),
            "lengths": length_stats(lengths), "sources": dict(sources), "modes": dict(sorted(modes.items())), "label_tokens": totals["label_tokens"],
            "encoded_by_swift_template": totals["slow"],
        })
        plot.result()
