"""Asking a Qwen3-VL folder, sized exactly like training: the question (prompt and pixel budget from the
training cache), batched left-padded greedy generation, and teacher-forced answer log-likelihoods.

Shared by Stage-A, Stage-B, eval_dense and qa_labels. Images are resized to the grid that the
cache and training used (header grid under the pixel budget, qwen_vl_utils resize), then the
processor runs with do_resize=False; the tokenizer pads on the left, so every row's answer starts
right after its own prompt and batched outputs equal batch-1 outputs under greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from visionqc.arrow_cache import CacheRef
from visionqc.launch import resolve_device
from visionqc.vision import PixelBudget, images_at_grid, patch_and_merge


@dataclass(frozen=True)
class Question:
    """What every image is asked, and at what size: from the manifest of the cache the model trained on."""

    prompt: str
    budget: PixelBudget

    @classmethod
    def from_cache(cls, cache: CacheRef, prompt_name: str, option: str) -> Question:
        """`option` names the config key that chose the prompt, for the error message."""
        prompts = cache.options["prompts"]
        if prompt_name not in prompts:
            raise ValueError(f"{option} {prompt_name!r} is not a prompt of the cache {cache.pointer} "
                             f"(it has {', '.join(sorted(prompts))}); name one of them or add it under prompts:")
        return cls(prompts[prompt_name], PixelBudget.from_cache_options(cache.options))


ANSWER_END = "<|im_end|>"


class Generator:
    """`budget` sizes the images (the training cache's pixel budget); None for text-only requests."""

    def __init__(self, model_dir: str | Path, device: str, budget: PixelBudget | None, max_new_tokens: int):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(model_dir))
        self.processor.tokenizer.padding_side = "left"
        device = resolve_device(device)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
        self.device = device
        self.patch = patch_and_merge(model_dir)[0]
        self.grids = budget.grids(model_dir) if budget else None
        self.max_new_tokens = max_new_tokens

    def _texts_and_images(self, requests: list[dict]) -> tuple[list[str], list]:
        """Chat texts ending with the generation prompt, and the images resized to their grids, in order."""
        texts, images = [], []
        for request in requests:
            content = [{"type": "image", "image": path} for path in request.get("images", [])]
            content.append({"type": "text", "text": request["prompt"]})
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                            add_generation_prompt=True))
            paths = request.get("images", [])
            if paths and self.grids is None:
                raise ValueError("this generator has no pixel budget, so it cannot take images")
            images += images_at_grid(paths, [self.grids(p) for p in paths], self.patch)
        return texts, images

    def generate(self, requests: list[dict]) -> list[str]:
        """requests: {"images": [paths], "prompt": str} → one decoded answer each, in order."""
        import torch

        texts, images = self._texts_and_images(requests)
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt", do_resize=False)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        prompt_length = inputs["input_ids"].shape[1]
        return [self.processor.tokenizer.decode(row[prompt_length:], skip_special_tokens=True).strip() for row in output]

    def log_likelihoods(self, requests: list[dict], answers: list[str], rows_per_forward: int = 8) -> list[float]:
        """Teacher-forced log p(answer tokens, then <|im_end|>) for each request and its answer, summed (nats).

        The same tokens training puts labels on. Rows are left-padded, so every answer ends the row;
        only the answer positions' logits are computed (`logits_to_keep`).
        """
        import torch

        scores = []
        tokenizer = self.processor.tokenizer
        for start in range(0, len(requests), rows_per_forward):
            chunk, replies = requests[start : start + rows_per_forward], answers[start : start + rows_per_forward]
            prompts, images = self._texts_and_images(chunk)
            full = [prompt + reply + ANSWER_END for prompt, reply in zip(prompts, replies, strict=True)]
            lengths = []
            for prompt, text in zip(prompts, full, strict=True):
                before, after = tokenizer(prompt).input_ids, tokenizer(text).input_ids
                if after[: len(before)] != before:
                    raise RuntimeError("the answer's tokens do not start where the prompt ends; the chat template is not one "
                                       "this scorer knows")
                lengths.append(len(after) - len(before))
            inputs = self.processor(text=full, images=images or None, padding=True, return_tensors="pt", do_resize=False)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            keep = max(lengths) + 1
            with torch.no_grad():
                logits = self.model(**inputs, logits_to_keep=keep).logits.float()
            ids = inputs["input_ids"][:, -keep:]
            for row, length in enumerate(lengths):
                predicted = torch.log_softmax(logits[row, -length - 1 : -1], dim=-1)
                scores.append(float(predicted.gather(1, ids[row, -length:, None]).sum()))
        return scores
